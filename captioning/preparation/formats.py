"""Dataset-format readers: each source format of captions (Karpathy split JSON, CSV, JSONL,
Flickr8k(-CN) token files, AI Challenger and official COCO caption JSON) read into ImageRecords.

`read_karpathy` reads a Karpathy split file (--karpathy-json); `read_caption_table` reads your own
captions (--captions-file): caption_format recognises which of CAPTION_FORMATS a file is, and
that format's own function reads its rows. captioning/preparation/prepare.py turns the records into the prepared files.
"""
import codecs
import collections
import csv
import dataclasses
import io
import json
import os
import random

from captioning import text

SPLIT_NAMES = {'train': 'TRAIN', 'restval': 'TRAIN', 'val': 'VAL', 'test': 'TEST'}


@dataclasses.dataclass
class ImageRecord:
    """One image of a source dataset with all of its captions."""
    name: str              # as the source names it (for messages)
    path: str              # where the image file is
    split: str             # TRAIN, VAL or TEST
    tokens: list           # one token list per caption
    raws: list             # the raw sentences, same order
    tokenizer: str = 'words'     # how tokens were made (captioning/text.py)
    merged_duplicates: int = 0   # repeated captions of this image merged by the reader
    image_id: int = None         # the dataset's own id of the image (a Karpathy JSON's cocoid), when it has one


# ----------------------------------------------------------------------------------------------
# Readers: each returns a list of ImageRecord, or raises ValueError naming the file and the place.
# Captions are tokenised with one tokenizer (captioning/text.py); 'auto' picks jieba for mostly-CJK captions.
# Image names must stay inside the image folder unless allow_outside is set.

def _inside(image_folder, rel, source, where, allow_outside):
    """image_folder/rel, refusing absolute paths and '..' that leave the folder (unless allowed)."""
    rel = str(rel)
    if not allow_outside:
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == '..' or norm.startswith('..' + os.sep) or norm.startswith('../'):
            raise ValueError(f"{source}: {where}: image path {rel!r} leaves the image folder (absolute or '..'); "
                             'pass --allow-outside-paths if that is intended')
    return os.path.join(image_folder, rel)


def _tokenize_records(records, tokenizer, source):
    """Fill each record's tokens (where the source gave none, or the tokenizer is not `words`) with
    one tokenizer; 'auto' is resolved on all raw sentences. Returns the records."""
    tokenizer = text.resolve_tokenizer(tokenizer, (s for r in records for s in r.raws))
    for r in records:
        if tokenizer != 'words' or not r.tokens or any(not t for t in r.tokens):
            r.tokens = [text.tokenize(s, tokenizer) for s in r.raws]
        r.tokenizer = tokenizer
    return records


def read_karpathy(json_path, image_folder, tokenizer='words', allow_outside=False):
    """Read a Karpathy split file (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

    train and restval -> TRAIN, val -> VAL, test -> TEST. Image path = image_folder/filepath/filename
    when the image has a 'filepath' (COCO), else image_folder/filename. Sentences with 'raw' only (or
    empty 'tokens') are tokenised from 'raw'; with a tokenizer other than `words`, 'raw' always is.
    """
    try:
        data = json.loads(_read_text(json_path))            # UTF-8 (a BOM is fine), bad bytes named by line
    except FileNotFoundError:
        raise FileNotFoundError(f'Karpathy split JSON not found: {json_path}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{json_path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})') from None
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
        raise ValueError(f"{json_path}: expected an object with a list field 'images' (Karpathy format)")
    records = []
    for i, img in enumerate(data['images']):
        where = f'images[{i}]'
        if not isinstance(img, dict):
            raise ValueError(f'{json_path}: {where}: expected an object, got {type(img).__name__}')
        if 'filename' in img:
            where = f"{where} ({img['filename']})"
        for key in ('filename', 'split', 'sentences'):
            if key not in img:
                raise ValueError(f"{json_path}: {where}: missing field '{key}'")
        split = SPLIT_NAMES.get(img['split'])
        if split is None:
            raise ValueError(f"{json_path}: {where}: field 'split' is {img['split']!r}; expected one of "
                             f"{', '.join(SPLIT_NAMES)}")
        if not isinstance(img['sentences'], list):
            raise ValueError(f"{json_path}: {where}: field 'sentences' must be a list")
        tokens, raws = [], []
        for j, s in enumerate(img['sentences']):
            if not isinstance(s, dict) or ('tokens' not in s and 'raw' not in s):
                raise ValueError(f"{json_path}: {where}: sentences[{j}] needs a field 'tokens' or 'raw'")
            toks = s.get('tokens') or []
            if not isinstance(toks, list):
                raise ValueError(f"{json_path}: {where}: sentences[{j}].tokens must be a list of words")
            raw = s.get('raw')
            if not isinstance(raw, str) or not raw.strip():
                raw = ' '.join(str(t) for t in toks)
            if not text.words(raw):
                raise ValueError(f"{json_path}: {where}: sentences[{j}] has no words")
            tokens.append([str(t) for t in toks])
            raws.append(raw)
        rel = os.path.join(str(img['filepath']), str(img['filename'])) if img.get('filepath') else img['filename']
        path = _inside(image_folder, rel, json_path, where, allow_outside)
        cocoid = img.get('cocoid')
        records.append(ImageRecord(str(img['filename']), path, split, tokens, raws,
                                   image_id=cocoid if isinstance(cocoid, int) and not isinstance(cocoid, bool) else None))
    return _tokenize_records(records, tokenizer, json_path)


def read_caption_table(path, image_folder, seed=0, val_fraction=0.1, test_fraction=0.1, tokenizer='words',
                       allow_outside=False, split_lists=None, val_path=None, val_image_folder=None):
    """Read your own captions, one format recognised per file:
      - CSV (header image,caption[,split]; Flickr8k's captions.txt; a UTF-8 BOM is fine) or JSONL rows;
      - Flickr8k.token.txt lines 'name.jpg#k<TAB>caption' and Flickr8k-CN lines 'name.jpg#zhc#k caption';
      - AI Challenger caption JSON: [{"url", "image_id", "caption": [sentences]}];
      - official COCO caption annotations (captions_train2017.json): {"images", "annotations"}.

    Splits: a split column; else `split_lists` {'TRAIN'|'VAL'|'TEST': file of image names or ids, one
    per line, e.g. Flickr8k-CN's flickr8ktrain.txt} (images in no list are left out); else a seeded
    shuffle: test_fraction -> TEST, val_fraction -> VAL, rest TRAIN. `val_path` (e.g. AI Challenger's
    or COCO's separate validation file, images in `val_image_folder`) gives VAL instead of val_fraction.
    Repeated rows are merged (counted in ImageRecord.merged_duplicates; see _group_rows).
    """
    by_image = _group_rows(path, _table_rows(path))
    if not by_image:
        raise ValueError(f'{path}: no captions found')
    has_split = [e['split'] is not None for e in by_image.values()]
    if any(has_split) and not all(has_split):
        first = next(e['where'] for e in by_image.values() if e['split'] is None)
        raise ValueError(f'{path}: {first}: some rows give a split and others do not')
    if split_lists:
        listed = _read_split_lists(split_lists)
        for name, e in list(by_image.items()):
            e['split'] = listed.get(os.path.splitext(os.path.basename(name))[0])
            if e['split'] is None:
                del by_image[name]
        if not by_image:
            raise ValueError(f'{path}: none of its images is named in the split lists '
                             f"({', '.join(map(str, split_lists.values()))})")
    elif not any(has_split):
        names = sorted(by_image)
        random.Random(seed).shuffle(names)
        val_fraction = 0 if val_path else val_fraction
        n_test, n_val = round(len(names) * test_fraction), round(len(names) * val_fraction)
        for k, name in enumerate(names):
            by_image[name]['split'] = 'TEST' if k < n_test else 'VAL' if k < n_test + n_val else 'TRAIN'
    records = [ImageRecord(name, _inside(image_folder, name, path, e['where'], allow_outside), e['split'],
                           [], e['raws'], merged_duplicates=e['merged'])
               for name, e in by_image.items()]
    if val_path:
        val_rows = _group_rows(val_path, _table_rows(val_path))
        folder = val_image_folder or image_folder
        records += [ImageRecord(name, _inside(folder, name, val_path, e['where'], allow_outside), 'VAL',
                                [], e['raws'], merged_duplicates=e['merged'])
                    for name, e in val_rows.items()]
    return _tokenize_records(records, tokenizer, path)


def _group_rows(path, rows):
    """(where, image, caption, split, row id) rows -> {image: {'split', 'where', 'raws', 'merged'}}.

    A repeated row (same image, caption and row id) is merged and counted. Rows of a CSV/JSONL have no
    id, so a repeated (image, caption) pair is merged; a token file's id is its sentence id
    ('x.jpg#zhc#3') and JSON annotations are all distinct, so two annotators who wrote the same
    sentence both stay references (Flickr8k-CN has 1693 such pairs).
    """
    by_image = collections.OrderedDict()
    for where, name, caption, split, row_id in rows:
        entry = by_image.setdefault(name, {'split': split, 'where': where, 'raws': [], 'seen': set(), 'merged': 0})
        if split is not None and entry['split'] is not None and split != entry['split']:
            raise ValueError(f"{path}: {where}: image {name!r} has split {split!r} here but "
                             f"{entry['split']!r} at {entry['where']}")
        key = (row_id, ' '.join(caption.split()))
        if key in entry['seen']:
            entry['merged'] += 1
            continue
        entry['seen'].add(key)
        entry['raws'].append(caption)
    return by_image


def _read_split_lists(split_lists):
    """{'TRAIN': file, ...} -> {image id (file name without extension): SPLIT}."""
    listed = {}
    for split, list_path in split_lists.items():
        if not list_path:
            continue
        for line, name in enumerate(_read_text(list_path).splitlines(), 1):
            name = name.strip()
            if not name:
                continue
            stem = os.path.splitext(os.path.basename(name))[0]
            if stem in listed and listed[stem] != split:
                raise ValueError(f'{list_path}: line {line}: image {name!r} is also in the {listed[stem]} list')
            listed[stem] = split
    return listed


def _read_text(path):
    """A UTF-8 file's text (a leading BOM dropped); a non-UTF-8 file's error names the line."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f'file not found: {path}') from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise ValueError(f'{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start} of the file); '
                         'save it as UTF-8') from None


def _table_rows(path):
    """Yield (where, image, caption, SPLIT or None, row id for duplicate merging) from a file in one
    of CAPTION_FORMATS (the one caption_format recognises)."""
    name, content = caption_format(path, _read_text(path))
    yield from CAPTION_FORMATS[name](path, content)


def caption_format(path, content):
    """The name in CAPTION_FORMATS of the format of `path` (text `content`), and what that format's
    rows function reads: the text, or for the JSON formats the parsed JSON. ValueError when a JSON
    file is none of them."""
    ext = os.path.splitext(path)[1].lower()
    first = content.split('\n', 1)[0]
    head = first.split('\t')[0] if '\t' in first else (first.split(None, 1) or [''])[0]
    if ext == '.jsonl':
        return 'jsonl', content
    if ext == '.json':
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: line {e.lineno}: not valid JSON ({e.msg})') from None
        if isinstance(data, list):
            return 'ai_challenger', data
        if isinstance(data, dict) and 'annotations' in data and 'images' in data:
            return 'coco', data
        if isinstance(data, dict) and 'images' in data:
            raise ValueError(f'{path}: this looks like a Karpathy split JSON: pass it with --karpathy-json')
        raise ValueError(f'{path}: unrecognised JSON: expected AI Challenger captions (a list of '
                         '{"image_id", "caption": [...]}) or COCO caption annotations ({"images", "annotations"})')
    if ext == '.txt' and '#' in head:
        return 'token_file', content
    return 'csv', content


def _split_value(path, where, value):
    if value is None or str(value).strip() == '':
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise ValueError(f"{path}: {where}: split {value!r} is not one of {', '.join(SPLIT_NAMES)}")
    return split


def _check_row(path, where, image, caption):
    if not isinstance(image, (str, int)) or not str(image).strip():
        raise ValueError(f"{path}: {where}: empty or invalid 'image'")
    if not isinstance(caption, str) or not text.words(caption):
        raise ValueError(f"{path}: {where}: 'caption' has no words")
    return str(image).strip(), caption.strip()


def _csv_rows(path, content):
    reader = csv.DictReader(io.StringIO(content, newline=''))
    try:
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if 'image' not in fields or 'caption' not in fields:
            raise ValueError(f"{path}: line 1: the CSV header must name the columns 'image' and 'caption' "
                             f"(optionally 'split'); found {reader.fieldnames}")
        reader.fieldnames = fields
        for row in reader:
            where = f'line {reader.line_num}'
            if None in row:
                raise ValueError(f'{path}: {where}: more fields than the header names '
                                 '(quote captions that contain commas)')
            image, caption = _check_row(path, where, row['image'], row['caption'])
            yield where, image, caption, _split_value(path, where, row.get('split')), None
    except csv.Error as e:
        raise ValueError(f'{path}: line {reader.line_num}: unreadable CSV ({e})') from None


def _jsonl_rows(path, content):
    for line, row_text in enumerate(content.splitlines(), 1):
        if not row_text.strip():
            continue
        where = f'line {line}'
        try:
            row = json.loads(row_text)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: {where}: not valid JSON ({e.msg})') from None
        if not isinstance(row, dict) or 'image' not in row or 'caption' not in row:
            raise ValueError(f"{path}: {where}: expected an object with fields 'image' and 'caption'")
        image, caption = _check_row(path, where, row['image'], row['caption'])
        yield where, image, caption, _split_value(path, where, row.get('split')), None


def _token_file_rows(path, content):
    """Flickr8k.token.txt 'name.jpg#k<TAB>caption' or Flickr8k-CN 'name.jpg#zhc#k caption'."""
    for line, row_text in enumerate(content.splitlines(), 1):
        if not row_text.strip():
            continue
        where = f'line {line}'
        name, sep, caption = row_text.partition('\t')
        if not sep:
            name, _, caption = row_text.strip().partition(' ')
        if '#' not in name or not caption.strip():
            raise ValueError(f'{path}: {where}: expected "image.jpg#k<TAB>caption" or "image.jpg#zhc#k caption"')
        image, caption = _check_row(path, where, name.split('#')[0], caption)
        yield where, image, caption, None, name.strip()


def _ai_challenger_rows(path, data):
    """AI Challenger caption JSON: [{"url", "image_id", "caption": [sentences]}]."""
    for i, item in enumerate(data):
        where = f'[{i}]'
        if not isinstance(item, dict) or 'image_id' not in item:
            raise ValueError(f"{path}: {where}: expected an object with 'image_id' and a 'caption' list "
                             '(AI Challenger caption JSON)')
        caps = item.get('caption')
        if not isinstance(caps, list):
            raise ValueError(f"{path}: {where} ({item['image_id']}): field 'caption' must be a list of "
                             f"sentences, got {type(caps).__name__ if caps is not None else 'nothing'}")
        for j, cap in enumerate(caps):
            image, caption = _check_row(path, f'{where}.caption[{j}]', item['image_id'], cap)
            yield where, image, caption, None, f'{where}.caption[{j}]'


def coco_image_ids(path):
    """{file_name: id} of an official COCO caption annotation file's images (ValueError naming the
    file when it is not one)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})') from None
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
        raise ValueError(f"{path}: expected COCO caption annotations (an object with a list field 'images')")
    ids = {}
    for i, img in enumerate(data['images']):
        if not isinstance(img, dict) or not isinstance(img.get('id'), int) or 'file_name' not in img:
            raise ValueError(f"{path}: images[{i}]: expected an object with an integer 'id' and 'file_name'")
        ids[str(img['file_name'])] = img['id']
    return ids


def _coco_rows(path, data):
    """Official COCO caption annotations (captions_train2017.json): {"images", "annotations"}."""
    if not isinstance(data['images'], list) or not isinstance(data['annotations'], list):
        raise ValueError(f"{path}: fields 'images' and 'annotations' must be lists (COCO caption annotations)")
    files = {}
    for i, img in enumerate(data['images']):
        if not isinstance(img, dict) or 'id' not in img or 'file_name' not in img:
            raise ValueError(f"{path}: images[{i}]: expected an object with 'id' and 'file_name'")
        files[img['id']] = img['file_name']
    for j, ann in enumerate(data['annotations']):
        where = f'annotations[{j}]'
        if not isinstance(ann, dict) or 'image_id' not in ann or 'caption' not in ann:
            raise ValueError(f"{path}: {where}: expected an object with 'image_id' and 'caption'")
        if ann['image_id'] not in files:
            raise ValueError(f"{path}: {where}: image_id {ann['image_id']!r} is not in 'images'")
        image, caption = _check_row(path, where, files[ann['image_id']], ann['caption'])
        yield where, image, caption, None, where


# The formats --captions-file reads (caption_format tells which a file is): name -> its rows function,
# (path, text or parsed JSON) -> (where, image, caption, SPLIT or None, row id).
CAPTION_FORMATS = {
    'csv': _csv_rows,                  # header image,caption[,split]; Flickr8k's captions.txt (any other file)
    'jsonl': _jsonl_rows,              # .jsonl: {"image", "caption"[, "split"]} per line
    'token_file': _token_file_rows,    # .txt: Flickr8k.token.txt, Flickr8k-CN's caption files
    'ai_challenger': _ai_challenger_rows,   # .json: a list of {"image_id", "caption": [...]}
    'coco': _coco_rows,                # .json: {"images", "annotations"} (official COCO captions)
}

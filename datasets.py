"""Reading captioned datasets, writing the prepared files, and the datasets that training,
evaluation and inference read.

Prepared files (in one folder, base = '{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq'):
    WORDMAP_{base}.json              word -> id; <pad> = 0, then words, then <unk>, <start>, <end>
    {SPLIT}_CAPTIONS_{base}.json     [N * cpi][max_len + 2] ids: <start> w ... <end> <pad> ...
    {SPLIT}_CAPLENS_{base}.json      [N * cpi] true lengths including <start> and <end>
    {SPLIT}_paths_{base}.pkl         [N] image paths; image i owns caption rows [i * cpi, (i + 1) * cpi)
    {SPLIT}_REFS_{base}.json         [N] lists of every raw reference sentence (for scoring)
    {SPLIT}_IMAGES_{base}.hdf5       optional: 'images' uint8 [N, 3, S, S]
    TOKENIZER_{base}.json            {"tokenizer": "words" | "jieba" | "chars"} (text.py; absent = words)
with SPLIT in TRAIN, VAL, TEST.
"""
import codecs
import collections
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

import text
from utils import (SPECIAL_TOKENS, atomic_path, check_free_space, data_base_name, read_json, remove_stale_temp,
                   state_dict_digest, tokenize, write_json)

SPLITS = ('TRAIN', 'VAL', 'TEST')
SPLIT_NAMES = {'train': 'TRAIN', 'restval': 'TRAIN', 'val': 'VAL', 'test': 'TEST'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


@dataclasses.dataclass
class ImageRecord:
    """One image of a source dataset with all of its captions."""
    name: str              # as the source names it (for messages)
    path: str              # where the image file is
    split: str             # TRAIN, VAL or TEST
    tokens: list           # one token list per caption
    raws: list             # the raw sentences, same order
    tokenizer: str = 'words'     # how tokens were made (text.py)
    merged_duplicates: int = 0   # repeated captions of this image merged by the reader


# ----------------------------------------------------------------------------------------------
# Readers: each returns a list of ImageRecord, or raises ValueError naming the file and the place.
# Captions are tokenised with one tokenizer (text.py); 'auto' picks jieba for mostly-CJK captions.
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
        records.append(ImageRecord(str(img['filename']), path, split, tokens, raws))
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
    """Yield (where, image, caption, SPLIT or None, row id for duplicate merging) from a CSV, JSONL,
    JSON or Flickr8k(-CN) token file."""
    ext = os.path.splitext(path)[1].lower()
    content = _read_text(path)
    first = content.split('\n', 1)[0]
    head = first.split('\t')[0] if '\t' in first else (first.split(None, 1) or [''])[0]
    if ext == '.jsonl':
        yield from _jsonl_rows(path, content)
    elif ext == '.json':
        yield from _json_rows(path, content)
    elif ext == '.txt' and '#' in head:
        yield from _token_file_rows(path, content)
    else:
        yield from _csv_rows(path, content)


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


def _json_rows(path, content):
    """AI Challenger caption JSON or official COCO caption annotations, recognised by their shape."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: line {e.lineno}: not valid JSON ({e.msg})') from None
    if isinstance(data, list):                                   # AI Challenger
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
        return
    if isinstance(data, dict) and 'annotations' in data and 'images' in data:   # official COCO captions
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
        return
    if isinstance(data, dict) and 'images' in data:
        raise ValueError(f'{path}: this looks like a Karpathy split JSON: pass it with --karpathy-json')
    raise ValueError(f'{path}: unrecognised JSON: expected AI Challenger captions (a list of '
                     '{"image_id", "caption": [...]}) or COCO caption annotations ({"images", "annotations"})')


# ----------------------------------------------------------------------------------------------
# Images: one loader for preparation, training, evaluation and inference.

def load_image(path, size=None):
    """Open an image file as an RGB PIL image: EXIF orientation applied; grayscale, palette, RGBA
    (composited on white), CMYK and 16-bit images converted. With `size`, JPEGs are decoded at the
    smallest DCT scale that is still at least `size` pixels on each side (much faster, same result
    after resizing to `size`)."""
    img = Image.open(path)
    if size and img.format == 'JPEG':
        img.draft('RGB', (size, size))
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if img.mode != 'F' and arr.max() > 255 else arr * (255.0 if arr.max() <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert('RGB') if img.mode != 'RGB' else img


def resized_uint8(path, size):
    """Image file -> uint8 array [3, size, size] (the tutorial's squash resize; HDF5 stores these)."""
    img = load_image(path, size).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class ImageTransform:
    """The one image transform: PIL image or uint8 tensor [3, H, W] -> normalised float [3, S, S].

    `size`, `mean` and `std` come from the encoder's weights (models.Encoder.transform_config()).
    Plain torch ops with the numerics of torchvision's v2 pil_to_tensor / resize(antialias=True) /
    normalize (tests compare them), so captioning does not import torchvision (1.3 s).
    """

    def __init__(self, size, mean, std, crop=False):
        self.size, self.mean, self.std, self.crop = int(size), list(mean), list(std), crop

    def __call__(self, img):
        if isinstance(img, Image.Image):
            if self.crop and img.size != (self.size, self.size):   # shorter side to size, centre crop (antialiased)
                img = ImageOps.fit(img, (self.size, self.size), Image.BICUBIC)
            elif img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            img = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)   # uint8 [3, S, S]
        elif img.shape[-2:] != (self.size, self.size):
            # uint8 in, uint8 out, as torchvision resizes uint8 tensors (its AVX path rounds the same way)
            img = torch.nn.functional.interpolate(img.unsqueeze(0), size=[self.size, self.size], mode='bilinear',
                                                  align_corners=False, antialias=True).squeeze(0)
        x = img.float().div_(255.0)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self):
        return f'ImageTransform(size={self.size}, mean={self.mean}, std={self.std}, crop={self.crop})'


class PackedTransform:
    """Several encoders' transforms of one image, flattened and joined: [sum_i 3 * S_i * S_i]
    (an ensemble's input, unpacked by ensemble.EnsembleEncoder). Each transform resizes the source
    image itself; `size` (the largest) is what images are decoded at."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        self.size = max(t.size for t in self.transforms)

    def __call__(self, img):
        return torch.cat([t(img).reshape(-1) for t in self.transforms])

    def __repr__(self):
        return f'PackedTransform({self.transforms})'


def image_transform(encoder):
    """The transform of an encoder's input: an ImageTransform from its weights' settings, or for an
    ensemble (ensemble.EnsembleEncoder: `members`) each member's, packed."""
    members = getattr(encoder, 'members', None)
    if members is not None:
        return PackedTransform([image_transform(e) for e in members])
    return ImageTransform(**encoder.transform_config())


def list_images(paths):
    """Image files from a file, a folder or a list of both, in the order given (folders: every
    jpg/jpeg/png/bmp/webp below them, any letter case, sorted; each file once).

    Only regular files are listed: a FIFO or device named .jpg would block the reader forever. A
    path given explicitly that is missing or not a regular file raises."""
    found, seen = [], set()
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            files = []
            for root, dirs, names in os.walk(path):   # does not follow symlinked folders: no loops
                dirs.sort()
                files += [os.path.join(root, f) for f in sorted(names)
                          if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))]
        elif os.path.isfile(path):
            files = [path]
        elif os.path.exists(path):
            raise ValueError(f'{path}: not a regular file or folder (a FIFO, socket or device cannot be captioned)')
        else:
            raise FileNotFoundError(f'no such image file or folder: {path}')
        for f in files:
            if f not in seen:
                seen.add(f)
                found.append(f)
    return found


class ImageFiles(Dataset):
    """Raw image files for inference. Item -> (tensor [3, S, S] or None, index, error message or '')."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(load_image(self.paths[i], self.transform.size)), i, ''
        except Exception as e:  # noqa: BLE001 - any undecodable file is reported, not fatal
            return None, i, f'{e.__class__.__name__}: {e}'


def collate_image_files(batch):
    """-> (images [B, 3, S, S] or None, indices of those images, [(index, error), ...] of the failures)."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, err) for x, i, err in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


# ----------------------------------------------------------------------------------------------
# Preparation

def _check_one(path):
    """'' if `path` decodes, else the reason (runs in worker processes)."""
    try:
        with Image.open(path) as img:
            img.draft('RGB', (32, 32))
            img.load()
        return ''
    except Exception as e:  # noqa: BLE001
        return f'{e.__class__.__name__}: {e}'


def _pool_map(fn, items, desc, workers):
    """Ordered map over `items`, in worker processes when there are many, with a progress bar."""
    if workers <= 1 or len(items) < 64:
        return [fn(x) for x in tqdm(items, desc=desc, unit='img', leave=False, disable=None)]
    ctx = multiprocessing.get_context('spawn' if os.name == 'nt' else 'fork')
    with ctx.Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, items, chunksize=32), total=len(items), desc=desc, unit='img',
                         leave=False, disable=None))


def check_images(records, skip_missing=False, workers=None):
    """Check every image exists and decodes. Returns (kept records, [(name, reason), ...] skipped).

    Without `skip_missing`, a missing or broken image raises with the count and the first names.
    """
    workers = workers or min(os.cpu_count() or 1, 8)
    missing = [r for r in records if not os.path.isfile(r.path)]
    if missing and not skip_missing:
        names = ', '.join(r.path for r in missing[:5])
        raise FileNotFoundError(f'{len(missing)} of {len(records)} images are missing (first: {names}). '
                                'Check --image-folder, or pass --skip-missing to leave them out.')
    present = [r for r in records if os.path.isfile(r.path)]
    errors = _pool_map(_check_one, [r.path for r in present], 'checking images', workers)
    broken = [(r, e) for r, e in zip(present, errors) if e]
    if broken and not skip_missing:
        shown = '; '.join(f'{r.path}: {e}' for r, e in broken[:3])
        raise ValueError(f'{len(broken)} images cannot be decoded (first: {shown}). '
                         'Replace them, or pass --skip-missing to leave them out.')
    bad = {id(r) for r, _ in broken}
    kept = [r for r in present if id(r) not in bad]
    skipped = [(r.name, 'missing') for r in missing] + [(r.name, e) for r, e in broken]
    return kept, skipped


def build_word_map(caption_tokens, min_word_freq):
    """Word map from the TRAIN captions: words counted more than `min_word_freq` times (the tutorial's
    threshold), most frequent first; <pad> = 0, then the words, then <unk>, <start>, <end>."""
    freq = collections.Counter(w for toks in caption_tokens for w in toks)
    words = sorted((w for w, n in freq.items() if n > min_word_freq and w not in SPECIAL_TOKENS),
                   key=lambda w: (-freq[w], w))
    word_map = {'<pad>': 0}
    for w in words:
        word_map[w] = len(word_map)
    for w in ('<unk>', '<start>', '<end>'):
        word_map[w] = len(word_map)
    return word_map


def encode_caption(tokens, word_map, max_len):
    """tokens -> [<start>, ids..., <end>, <pad>...] of length max_len + 2, and the true length."""
    unk = word_map['<unk>']
    ids = [word_map['<start>']] + [word_map.get(w, unk) for w in tokens] + [word_map['<end>']]
    return ids + [word_map['<pad>']] * (max_len + 2 - len(ids)), len(ids)


def decode_caption(ids, rev_word_map):
    """ids -> words, without <start>/<end>/<pad> (stops at the first <end>)."""
    words = []
    for i in ids:
        w = rev_word_map[int(i)]
        if w == '<end>':
            break
        if w not in ('<start>', '<pad>'):
            words.append(w)
    return words


def prepare_dataset(records, dataset, output_folder, captions_per_image=5, min_word_freq=5, max_len=50,
                    hdf5=False, image_size=256, seed=0, skip_missing=False, workers=None):
    """Write the prepared files for `records` (see the module docstring). Returns a summary dict.

    Everything is written into a staging folder first and moved into place at the end, the word
    map (which marks a prepared dataset) last: a failed or interrupted run leaves the previous
    complete set as it was, and never a set that looks complete but is not.
    """
    if captions_per_image < 1 or max_len < 1 or min_word_freq < 0:
        raise ValueError('captions_per_image and max_len must be >= 1 and min_word_freq >= 0')
    base = data_base_name(dataset, captions_per_image, min_word_freq)
    os.makedirs(output_folder, exist_ok=True)

    tokenizers = {r.tokenizer for r in records}
    if len(tokenizers) > 1:
        raise ValueError(f"the records were tokenised with different tokenizers: {', '.join(sorted(tokenizers))}")
    tokenizer = tokenizers.pop() if tokenizers else text.DEFAULT_TOKENIZER
    merged = sum(r.merged_duplicates for r in records)
    records, skipped_images = check_images(records, skip_missing, workers)
    summary = {'base_name': base, 'skipped_images': len(skipped_images), 'skipped_examples': skipped_images[:5],
               'dropped_captions': 0, 'images_without_captions': 0, 'splits': {},
               'tokenizer': tokenizer, 'merged_duplicates': merged}
    # Captions longer than max_len are dropped; images left with none are skipped.
    kept = {s: [] for s in SPLITS}
    for r in records:
        toks = [t for t in r.tokens if len(t) <= max_len]
        summary['dropped_captions'] += len(r.tokens) - len(toks)
        if not toks:
            summary['images_without_captions'] += 1
            continue
        kept[r.split].append((r, toks))
    if not kept['TRAIN']:
        raise ValueError('no TRAIN images left: check the split names of the source and --max-len')
    word_map = build_word_map([t for _, toks in kept['TRAIN'] for t in toks], min_word_freq)

    remove_stale_temp(output_folder)   # what a killed earlier run left (its pid is in the name)
    staging = tempfile.mkdtemp(prefix=f'.staging-{os.getpid()}-', dir=output_folder)
    try:
        rng = random.Random(seed)
        for split in SPLITS:
            captions, caplens, paths, refs = [], [], [], []
            for r, toks in kept[split]:
                if len(toks) < captions_per_image:
                    chosen = toks + [rng.choice(toks) for _ in range(captions_per_image - len(toks))]
                else:
                    chosen = rng.sample(toks, k=captions_per_image)
                for t in chosen:
                    enc, n = encode_caption(t, word_map, max_len)
                    captions.append(enc)
                    caplens.append(n)
                paths.append(os.path.abspath(r.path))
                refs.append(list(r.raws))
            summary['splits'][split] = {'images': len(paths), 'captions': len(captions)}
            _write_split(staging, split, base, captions, caplens, paths, refs)
            if hdf5 and paths:
                write_hdf5(os.path.join(staging, f'{split}_IMAGES_{base}.hdf5'), paths, image_size,
                           captions_per_image, workers)
        word_map_name = f'WORDMAP_{base}.json'
        write_json(text.tokenizer_path(staging, base), text.tokenizer_record(tokenizer))   # read by 01/02/03
        write_json(os.path.join(staging, word_map_name), word_map)
        # Publish: retire the old set's word map, move the new files in, the word map last. A kill
        # in between leaves split files without a word map, which every reader reports as an
        # incomplete set (check_complete_set), never as a dataset.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_folder, word_map_name))
        for split in SPLITS:   # an HDF5 file of an earlier --hdf5 run must not outlive its set
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_folder, f'{split}_IMAGES_{base}.hdf5'))
        for name in sorted(os.listdir(staging)):
            if name != word_map_name:
                os.replace(os.path.join(staging, name), os.path.join(output_folder, name))
        os.replace(os.path.join(staging, word_map_name), os.path.join(output_folder, word_map_name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary['vocab_size'] = len(word_map)
    return summary


def check_complete_set(data_folder, data_name):
    """FileNotFoundError unless the word map that 00_create_input_files.py publishes last is there;
    split files without it are a set whose publishing was interrupted."""
    if os.path.exists(os.path.join(data_folder, f'WORDMAP_{data_name}.json')):
        return
    parts = [s for s in SPLITS for kind in ('CAPTIONS', 'paths')
             if os.path.exists(os.path.join(data_folder, f"{s}_{kind}_{data_name}.{'pkl' if kind == 'paths' else 'json'}"))]
    if parts:
        raise FileNotFoundError(f'{data_folder}: incomplete set {data_name} (split files without '
                                f'WORDMAP_{data_name}.json: 00_create_input_files.py was interrupted); re-run 00')
    raise FileNotFoundError(f'{data_folder}: no prepared dataset {data_name} (no WORDMAP_{data_name}.json): '
                            'run 00_create_input_files.py first, or check --data-folder/--data-name')


def split_sizes(data_folder, data_name):
    """{SPLIT: number of images} of a prepared set (a split whose file is missing or unreadable: 0)."""
    sizes = {}
    for split in SPLITS:
        try:
            sizes[split] = len(read_paths_pickle(os.path.join(data_folder, f'{split}_paths_{data_name}.pkl')))
        except (OSError, ValueError):
            sizes[split] = 0
    return sizes


def _write_split(folder, split, base, captions, caplens, paths, refs):
    write_json(os.path.join(folder, f'{split}_CAPTIONS_{base}.json'), captions)
    write_json(os.path.join(folder, f'{split}_CAPLENS_{base}.json'), caplens)
    write_json(os.path.join(folder, f'{split}_REFS_{base}.json'), refs)
    with atomic_path(os.path.join(folder, f'{split}_paths_{base}.pkl')) as tmp:
        with open(tmp, 'wb') as f:
            pickle.dump(paths, f)


def _resize_task(args):
    return resized_uint8(*args)


def write_hdf5(path, paths, image_size, captions_per_image, workers=None):
    """Decode, resize and store images as uint8 [N, 3, S, S] in dataset 'images' of an HDF5 file."""
    import h5py
    workers = workers or min(os.cpu_count() or 1, 8)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, 'w') as h:
            h.attrs['captions_per_image'] = captions_per_image
            h.attrs['image_size'] = image_size
            images = h.create_dataset('images', (len(paths), 3, image_size, image_size), dtype='uint8',
                                      chunks=(1, 3, image_size, image_size))
            tasks = [(p, image_size) for p in paths]
            ctx = multiprocessing.get_context('spawn' if os.name == 'nt' else 'fork')
            pool = ctx.Pool(workers) if workers > 1 and len(paths) >= 64 else None
            try:
                it = pool.imap(_resize_task, tasks, chunksize=16) if pool else map(_resize_task, tasks)
                for i, arr in enumerate(tqdm(it, total=len(tasks), desc=f'writing {os.path.basename(path)}',
                                             unit='img', leave=False, disable=None)):
                    images[i] = arr
            finally:
                if pool:
                    pool.terminate()


def print_summary(summary, output_folder):
    print(f"\nPrepared '{summary['base_name']}' in {output_folder}")
    print(f"{'split':<6} {'images':>8} {'captions':>9}")
    for split, s in summary['splits'].items():
        print(f"{split:<6} {s['images']:>8} {s['captions']:>9}")
    print(f"vocabulary: {summary['vocab_size']} entries (incl. <pad> <start> <end> <unk>); "
          f"tokenizer: {summary.get('tokenizer', text.DEFAULT_TOKENIZER)}")
    if summary.get('merged_duplicates'):
        print(f"merged {summary['merged_duplicates']} duplicate caption row(s) (same image and caption)")
    print(f"dropped captions longer than max_len: {summary['dropped_captions']}; images left without "
          f"captions: {summary['images_without_captions']}; images skipped (missing/undecodable): "
          f"{summary['skipped_images']}")
    for name, why in summary['skipped_examples']:
        print(f'  skipped {name}: {why}')


# ----------------------------------------------------------------------------------------------
# Reading prepared files: nothing read from a file may run code.

class _Refused(pickle.UnpicklingError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds only pickle's own data types (list, str, int, ...): any class or function that a
    pickle names (the way `__reduce__` payloads run code) is refused."""

    def find_class(self, module, name):
        raise _Refused(f'it names {module}.{name}, and only a list of path strings is allowed')


def read_paths_pickle(path):
    """A prepared {SPLIT}_paths_*.pkl -> list of str, read without running anything the file names.
    Anything else (code, other types, a truncated or empty file) raises ValueError naming the file."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f'image paths file not found: {path} (run 00_create_input_files.py)') from None
    try:
        paths = _DataOnlyUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise ValueError(f'{path}: refused: not a plain image-path pickle ({e})') from None
    except Exception as e:  # noqa: BLE001 - truncated/garbled pickles fail in many ways; one line for all
        raise ValueError(f'{path}: not a readable image-path pickle (truncated or damaged: '
                         f'{e.__class__.__name__}); re-run 00_create_input_files.py') from None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        got = type(paths).__name__ if not isinstance(paths, list) else 'a list holding non-strings'
        raise ValueError(f'{path}: refused: expected a list of image path strings, got {got}')
    return paths


def read_word_map(path):
    """A WORDMAP_*.json -> {word: id}, checked: an object of string keys and distinct integer ids
    holding the special tokens (ValueError naming the file otherwise)."""
    word_map = read_json(path, 'word map')
    if (not isinstance(word_map, dict) or not all(type(v) is int and v >= 0 for v in word_map.values())
            or len(set(word_map.values())) != len(word_map) or not set(SPECIAL_TOKENS) <= set(word_map)):
        raise ValueError(f'{path}: not a word map (expected an object word -> distinct id, with '
                         f"{', '.join(SPECIAL_TOKENS)})")
    return word_map


def _check_hdf5(path, num_images):
    """ValueError unless `path` is an HDF5 file with uint8 'images' [num_images, 3, S, S] (checked once
    here, so that a bad file is one line, not a traceback from a DataLoader worker)."""
    import h5py
    try:
        with h5py.File(path, 'r') as h:
            images = h.get('images')
            ok = (isinstance(images, h5py.Dataset) and images.dtype == np.uint8 and images.ndim == 4
                  and images.shape[0] == num_images and images.shape[1] == 3)
    except OSError as e:
        raise ValueError(f'{path}: not a readable HDF5 file ({str(e).splitlines()[0]})') from None
    if not ok:
        raise ValueError(f"{path}: expected a uint8 dataset 'images' [{num_images}, 3, S, S] "
                         '(re-run 00_create_input_files.py --hdf5)')


def _id_table(path, what, ndim):
    """A prepared JSON file of token ids (ndim 2) or lengths (ndim 1) -> long tensor, or ValueError."""
    data = read_json(path, what)
    try:
        table = torch.tensor(data, dtype=torch.long)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        table = None
    if table is None or table.dim() != ndim or (ndim == 1 and not isinstance(data, list)):
        raise ValueError(f'{path}: expected {"rows of integer token ids" if ndim == 2 else "a list of integers"} '
                         f'({what} of 00_create_input_files.py)')
    return table


# ----------------------------------------------------------------------------------------------
# Datasets over prepared files

class CaptionDataset(Dataset):
    """A prepared split (as written by 00_create_input_files.py).

    Per caption (default, the tutorial's): item -> (image, caption [L], caplen [1]) for TRAIN, and
    (image, caption, caplen, all captions of the image [cpi, L]) for VAL/TEST.
    Per image (`per_image=True`): item -> (image, captions [cpi, L], caplens [cpi]), so the encoder
    runs once per image for all of its captions.

    The image comes from `features` (a FeatureCache: fp16 [C, h, w]), else the split's HDF5 file when
    `source` is 'hdf5' (or 'auto' and the file exists), else from the image paths; `transform` turns
    decoded images into tensors. HDF5 files are opened lazily in each DataLoader worker.
    """

    def __init__(self, data_folder, data_name, split, transform=None, per_image=False, source='auto',
                 features=None):
        split = split.upper()
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        self.split, self.transform, self.per_image, self.features = split, transform, per_image, features
        self.data_folder, self.data_name = data_folder, data_name
        f = lambda kind, ext: os.path.join(data_folder, f'{split}_{kind}_{data_name}.{ext}')  # noqa: E731
        check_complete_set(data_folder, data_name)
        self.paths = read_paths_pickle(f('paths', 'pkl'))
        self.captions = _id_table(f('CAPTIONS', 'json'), 'captions file', 2)
        self.caplens = _id_table(f('CAPLENS', 'json'), 'caption lengths file', 1)
        self.refs_path = f('REFS', 'json')
        if len(self.paths) == 0 or len(self.captions) % len(self.paths) or len(self.captions) != len(self.caplens):
            raise ValueError(f'{data_folder}: {split} files of {data_name} disagree: {len(self.paths)} images, '
                             f'{len(self.captions)} captions, {len(self.caplens)} lengths')
        self.cpi = len(self.captions) // len(self.paths)
        self.hdf5_path = f('IMAGES', 'hdf5')
        if source == 'hdf5' and not os.path.exists(self.hdf5_path):
            raise FileNotFoundError(f'{self.hdf5_path} not found: run 00_create_input_files.py with --hdf5')
        self.use_hdf5 = features is None and (source == 'hdf5' or (source == 'auto' and os.path.exists(self.hdf5_path)))
        if self.use_hdf5:
            _check_hdf5(self.hdf5_path, len(self.paths))
        self._h5 = None   # opened on first use in each process (h5py handles do not survive fork)
        if features is not None and len(features) != len(self.paths):
            raise ValueError(f'feature cache has {len(features)} images, {split} has {len(self.paths)}')

    @property
    def num_images(self):
        return len(self.paths)

    def refs(self):
        """Every raw reference sentence per image ([N] lists of strings)."""
        return read_json(self.refs_path, 'references file')

    def image(self, i):
        """The encoder input of image i: features fp16 [C, h, w], or a transformed image [3, S, S]."""
        if self.features is not None:
            return self.features[i]
        if self.use_hdf5:
            if self._h5 is None:
                import h5py
                self._h5 = h5py.File(self.hdf5_path, 'r')['images']
            img = torch.from_numpy(self._h5[i])                          # uint8 [3, S, S]
        else:
            img = load_image(self.paths[i], self.transform.size if self.transform else None)
        return self.transform(img) if self.transform else img

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_h5'] = None
        return state

    def __len__(self):
        return len(self.paths) if self.per_image else len(self.captions)

    def __getitem__(self, i):
        if self.per_image:
            rows = slice(i * self.cpi, (i + 1) * self.cpi)
            return self.image(i), self.captions[rows], self.caplens[rows]
        img = self.image(i // self.cpi)
        if self.split == 'TRAIN':
            return img, self.captions[i], self.caplens[i:i + 1]
        first = (i // self.cpi) * self.cpi
        return img, self.captions[i], self.caplens[i:i + 1], self.captions[first:first + self.cpi]


class Indexed(Dataset):
    """Item i -> (i, *dataset[i]): batches that say which items they hold (self-critical training
    looks up each image's references)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


# ----------------------------------------------------------------------------------------------
# Feature cache: a frozen encoder runs once over a split; training reads fp16 features from disk.

class FeatureCache:
    """fp16 encoder features [N, C, h, w] in a .npy file. Item -> fp16 tensor [C, h, w].

    Items are read with os.pread at their offset, so memory use stays at a batch's worth whatever
    the cache size (a memory map would keep every page it touched resident in the process), and the
    file handle works in any number of DataLoader workers."""

    def __init__(self, path):
        self.path, self._fd, self._pid = path, None, None
        try:   # allow_pickle stays False: an object array is refused, never unpickled
            header = np.load(path, mmap_mode='r')          # only to read shape, dtype and data offset
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f'{path}: not a feature cache ({e}); delete it to rebuild') from None
        if not header.flags.c_contiguous or header.dtype != np.float16 or header.ndim != 4:
            raise ValueError(f'{path}: not a feature cache (expected a C-ordered float16 [N, C, h, w] array)')
        self.shape, self.offset = header.shape, header.offset
        self.item_bytes = int(np.prod(self.shape[1:])) * 2
        del header

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if self._fd is None or self._pid != os.getpid():   # one descriptor per process
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self.item_bytes, self.offset + i * self.item_bytes)
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).reshape(self.shape[1:]).copy())

    def __getstate__(self):
        return {**self.__dict__, '_fd': None, '_pid': None}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def feature_cache_path(dataset, encoder):
    """Where the features of `dataset` (a CaptionDataset) under `encoder` are cached: the name holds
    the encoder, its input size and a hash of its weights and of the split's image list, so a
    changed encoder or re-prepared data never reuses a stale cache."""
    h = hashlib.sha1((state_dict_digest(encoder) + json.dumps(dataset.paths)).encode()).hexdigest()[:10]
    return os.path.join(dataset.data_folder, 'features',
                        f'{dataset.split}_FEATURES_{dataset.data_name}_{encoder.name}_{encoder.image_size}px_{h}.npy')


PROGRESS_SECONDS = 15   # without a terminal (logs, nohup), a progress line at most this often


@torch.inference_mode()
def build_feature_cache(encoder, dataset, path, device, batch_size=32, workers=0, progress=True):
    """Run the (frozen, eval-mode) `encoder` once over every image of `dataset` (per-image
    CaptionDataset over images) and store its native feature maps as fp16 [N, C, h, w] at `path`.

    The file's size is known after the first batch: it is checked against the free disk space and
    allocated at once, so a full disk is an OSError naming both sizes (not a Bus error from a
    sparse memory map later). Any failure removes the partial file; one a killed run left is
    removed by the next."""
    from torch.utils.data import DataLoader
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp(folder)
    loader = DataLoader(_Images(dataset), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == 'cuda', generator=torch.Generator())  # leaves the global RNG alone
    encoder.eval()
    out, n = None, dataset.num_images
    desc = f'caching {dataset.split} features'
    bar = tqdm(loader, desc=desc, unit='batch', disable=None if progress else True, leave=False)
    plain = progress and bar.disable   # not a terminal: tqdm is silent, so print plain lines
    start = last = time.time()
    with atomic_path(path) as tmp:
        i = 0
        for images in bar:
            feats = encoder.features(images.to(device, non_blocking=True))   # [B, C, h, w]
            if out is None:
                shape = (n, *feats.shape[1:])
                check_free_space(folder, int(np.prod(shape)) * 2 + 4096, f'the {dataset.split} feature cache')
                try:
                    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float16, shape=shape)
                    _allocate(tmp)
                except OSError as e:   # numpy's own errors name no file
                    raise OSError(e.errno, e.strerror, path) from None
            out[i:i + len(feats)] = feats.half().cpu().numpy()
            i += len(feats)
            if plain and (time.time() - last >= PROGRESS_SECONDS or i == n):
                last = time.time()
                print(f'{desc}: {i}/{n} images ({100 * i // max(n, 1)}%), {last - start:.0f} s', flush=True)
        out.flush()
        del out                                        # closed; renamed to `path` when the block exits
    return FeatureCache(path)


def _allocate(path):
    """Give a (sparse) file its blocks now: ENOSPC here instead of SIGBUS on a memory-mapped write."""
    with open(path, 'r+b') as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):   # file system without it
                return
            raise OSError(e.errno, e.strerror, path) from None


class _Images(Dataset):
    """Just the images of a CaptionDataset (for feature caching)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return self.dataset.num_images

    def __getitem__(self, i):
        return self.dataset.image(i)

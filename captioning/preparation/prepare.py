"""The preparation pipeline behind 00_create_input_files.py: check the images, build the word map,
encode the captions and write the prepared files, published all at once.

Prepared files (in one folder, base = '{dataset}_{cpi}_cap_per_img_{min_word_freq}_min_word_freq'):
    WORDMAP_{base}.json              word -> id; <pad> = 0, then words, then <unk>, <start>, <end>
    {SPLIT}_CAPTIONS_{base}.json     [N * cpi][max_len + 2] ids: <start> w ... <end> <pad> ...
    {SPLIT}_CAPLENS_{base}.json      [N * cpi] true lengths including <start> and <end>
    {SPLIT}_paths_{base}.pkl         [N] image paths; image i owns caption rows [i * cpi, (i + 1) * cpi)
    {SPLIT}_REFS_{base}.json         [N] lists of every raw reference sentence (for scoring)
    {SPLIT}_IMAGES_{base}.hdf5       optional: 'images' uint8 [N, 3, S, S]
    TOKENIZER_{base}.json            {"tokenizer": "words" | "jieba" | "chars"} (captioning/text.py; absent = words)
with SPLIT in TRAIN, VAL, TEST.
The readers of these files (CaptionDataset, read_paths_pickle, read_word_map) are in datasets.py.
"""
import collections
import contextlib
import multiprocessing
import os
import pickle
import random
import shutil
import tempfile

from PIL import Image
from tqdm import tqdm

from captioning import text
from datasets import resized_uint8
from utils import SPECIAL_TOKENS, SPLITS, atomic_path, data_base_name, remove_stale_temp, write_json


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

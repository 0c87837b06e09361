"""Step 3: score a checkpoint on a split with the field's caption metrics.

    python 03_evaluate.py --checkpoint runs/.../BEST_checkpoint_....pt --split TEST --beam-sizes 1 3 5
    python 03_evaluate.py --karpathy-json data/dataset_flickr8k.json --image-folder data/Flicker8k_Dataset \\
        --split val --beam-sizes 1 3 5 --out metrics.json
    python 03_evaluate.py --coco-json annotations/captions_val2017.json --image-folder val2017 \
        --checkpoint runs/.../BEST_checkpoint_....pt      # every image of an official COCO caption file

Each image is captioned once per beam size (the encoder runs once per image) and scored against
every raw reference sentence it has: BLEU-1..4 with nltk always; BLEU-1..4, METEOR, ROUGE-L and
CIDEr with the COCO caption toolkit (pycocoevalcap, Java) when installed. Under torchrun
(`torchrun --nproc_per_node=N 03_evaluate.py ...`) each process captions its share of the images and
the first one scores them all, once. Next to the scores, per beam
size, the repetition and diversity of the captions (metrics.diversity_scores): the share that repeat
a word trigram, the distinct words used, the share of distinct captions, the mean length; and the share
of bad endings (metrics.bad_ending_rate: the caption's last word ends under 2% of its occurrences in
the dataset's TRAIN references, read from the prepared TRAIN_REFS file or the Karpathy JSON's train
split; left out for --coco-json, which has no TRAIN split). These are scores of generated captions,
unlike the teacher-forced numbers some tutorials report. Captions and references
are segmented with the checkpoint's tokenizer (captioning/text.py): for Chinese (jieba) BLEU, ROUGE-L and CIDEr
are computed on jieba segments without the English PTB tokenizer, and METEOR (English-only) is left out.
"""
import argparse
import os
import sys
import time

import datasets
import utils
from captioning import text
from captioning.decoding import files, loading, options, quantize, runtime, search, tags
from captioning.preparation import formats
from captioning.scale import exports, sharding
from captioning.scoring import metrics

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
CHECKPOINT = loading.DEFAULT_CHECKPOINTS   # the model to score (several paths: their ensemble)
WORD_MAP = None                            # the tutorial's WORDMAP_*.json when CHECKPOINT is its .pth.tar
DATA_FOLDER = 'data'                       # prepared files (00_create_input_files.py) ...
DATA_NAME = ''                             # ... their base name ('' = the only one in DATA_FOLDER)
KARPATHY_JSON = ''                         # or straight from a Karpathy split JSON ...
COCO_JSON = ''                             # ... or every image of an official COCO caption file ...
IMAGE_FOLDER = ''                          # ... and its image folder
ALLOW_OUTSIDE_PATHS = False                # accept image paths that leave IMAGE_FOLDER (absolute, '..')
SPLIT = 'TEST'                             # TEST, VAL or TRAIN (Karpathy names test/val/train work too)
BEAM_SIZES = [3]                           # one row of results per beam size
LENGTH_NORM = search.DEFAULT_LENGTH_NORM  # rank beams by score / length ** LENGTH_NORM
NO_REPEAT_NGRAM = search.DEFAULT_NO_REPEAT_NGRAM   # forbid repeating n-grams of this size (0 = off)
MIN_LEN = 1                                # at least this many words (a caption of no words is no answer)
MIRROR = False                             # also decode each photo's mirror image (test-time augmentation)
BAD_ENDINGS = 'avoid'                      # avoid: never end on a word that rarely ends a sentence ('a', 'red') | allow
ALLOW_UNK = False                          # let captions contain <unk> (rare words)
MAX_LEN = 50
PRECISION = 'auto'                         # decoder weights: auto | fp32 | int8 (captioning/decoding/quantize.py)
RUNTIME = 'auto'                           # the encoder's engine: auto | torch | onnx (captioning/decoding/runtime.py)
BATCH_SIZE = 32
WORKERS = 2                                # readers decoding the next images while the model runs (0: none;
                                           # 2 threads measured fastest on 2 cores: docs/speed.md, bench_files.py)
LOADER = 'threads'                         # the readers: threads | processes (DataLoader workers)
MAX_IMAGES = 0                             # score only the first N images (0 = all)
METRICS = 'auto'                           # auto (COCO toolkit when installed) | coco | nltk
OUT = ''                                   # write metrics.json here ('' = do not)
RESULTS_JSON = ''                          # also write the captions in the COCO results format here ('' = do not)
TAGS = False                               # record the encoder's ImageNet tags with each caption in --out
DEVICE = 'auto'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model_arguments(p, CHECKPOINT, WORD_MAP)
    p.add_argument('--data-folder', default=DATA_FOLDER, help='prepared files (default: %(default)s)')
    p.add_argument('--data-name', default=DATA_NAME, help="their base name ('' = the only one)")
    p.add_argument('--karpathy-json', default=KARPATHY_JSON, help='evaluate from a Karpathy split JSON instead')
    p.add_argument('--coco-json', default=COCO_JSON,
                   help='score every image of an official COCO caption file (captions_val2017.json) against '
                        'all of its references instead (--split is then ignored)')
    p.add_argument('--image-folder', default=IMAGE_FOLDER, help='images of --karpathy-json or --coco-json')
    p.add_argument('--allow-outside-paths', action=argparse.BooleanOptionalAction, default=ALLOW_OUTSIDE_PATHS,
                   help="accept image paths that leave --image-folder (absolute, '..') (default: %(default)s)")
    p.add_argument('--split', default=SPLIT, help='(default: %(default)s)')
    p.add_argument('--beam-sizes', type=int, nargs='+', default=BEAM_SIZES, help='(default: %(default)s)')
    options.add_decoding_arguments(p, length_norm=LENGTH_NORM, no_repeat_ngram=NO_REPEAT_NGRAM, min_len=MIN_LEN,
                                   max_len=MAX_LEN, allow_unk=ALLOW_UNK, bad_endings=BAD_ENDINGS, mirror=MIRROR,
                                   precision=PRECISION, runtime=RUNTIME)
    options.add_generation_arguments(p, num_captions=False)
    p.add_argument('--batch-size', type=int, default=BATCH_SIZE, help='(default: %(default)s)')
    options.add_reading_arguments(p, WORKERS, LOADER)
    p.add_argument('--max-images', type=int, default=MAX_IMAGES, help='(default: all)')
    p.add_argument('--metrics', choices=('auto', 'coco', 'nltk'), default=METRICS, help='(default: %(default)s)')
    p.add_argument('--out', default=OUT, help='metrics.json path')
    p.add_argument('--results-json', default=RESULTS_JSON,
                   help='also write the captions as COCO results, [{"image_id", "caption"}]: the ids of --coco-json '
                        "or the Karpathy JSON's cocoid, else each image's place in the split (with PATH.ids.json "
                        'mapping them to images); several --beam-sizes: one file each, PATH with .beamK')
    p.add_argument('--tags', action=argparse.BooleanOptionalAction, default=TAGS,
                   help="record the encoder's ImageNet tags with each caption in --out (default: %(default)s)")
    p.add_argument('--device', default=DEVICE, help='(default: %(default)s)')
    return p.parse_args(argv)


def split_images(args):
    """-> (image paths, reference sentences per image, SPLIT, image ids: the COCO file's, the Karpathy
    JSON's cocoid, or None when the images have none) from a COCO file, a Karpathy JSON or prepared files."""
    split = formats.SPLIT_NAMES.get(args.split.lower(), args.split.upper())
    if split not in utils.SPLITS:
        raise ValueError(f"--split {args.split!r}: expected one of {', '.join(utils.SPLITS)}")
    if args.coco_json:
        if not args.image_folder or args.karpathy_json:
            raise ValueError('--coco-json needs --image-folder (and no --karpathy-json)')
        if os.path.splitext(args.coco_json)[1].lower() != '.json':
            raise ValueError(f'--coco-json {args.coco_json}: expected a .json caption annotation file')
        records = formats.read_caption_table(args.coco_json, args.image_folder, val_fraction=0, test_fraction=0,
                                              allow_outside=args.allow_outside_paths)
        paths, refs, split = [r.path for r in records], [r.raws for r in records], os.path.basename(args.coco_json)
        by_name = formats.coco_image_ids(args.coco_json)
        ids = [by_name[r.name] for r in records]
    elif args.karpathy_json:
        if not args.image_folder:
            raise ValueError('--karpathy-json needs --image-folder')
        records = [r for r in formats.read_karpathy(args.karpathy_json, args.image_folder,
                                                     allow_outside=args.allow_outside_paths) if r.split == split]
        paths, refs = [r.path for r in records], [r.raws for r in records]
        ids = [r.image_id for r in records] if all(r.image_id is not None for r in records) else None
    else:
        name = args.data_name or utils.find_data_name(args.data_folder)
        datasets.check_complete_set(args.data_folder, name)
        paths = datasets.read_paths_pickle(os.path.join(args.data_folder, f'{split}_paths_{name}.pkl'))
        refs = utils.read_json(os.path.join(args.data_folder, f'{split}_REFS_{name}.json'), 'references file')
        ids = None
    if not paths:
        if args.karpathy_json:
            raise ValueError(f'split {split} has no images in {args.karpathy_json}')
        sizes = datasets.split_sizes(args.data_folder, name)
        have = ', '.join(f'{s} ({n} images)' for s, n in sizes.items() if n) or 'none'
        raise ValueError(f'split {split} of {name} has no images; splits with images: {have}. Choose one with --split')
    n = args.max_images or len(paths)
    return paths[:n], refs[:n], split, ids[:n] if ids is not None else None


def train_references(args):
    """-> (the TRAIN references of the evaluated dataset, one list per image, for the bad-ending
    statistics; or None, why not)."""
    if args.coco_json:
        return None, 'a COCO caption file has no TRAIN split'
    if args.karpathy_json:
        refs = [r.raws for r in formats.read_karpathy(args.karpathy_json, args.image_folder,
                                                       allow_outside=args.allow_outside_paths) if r.split == 'TRAIN']
    else:
        name = args.data_name or utils.find_data_name(args.data_folder)
        refs = utils.read_json(os.path.join(args.data_folder, f'TRAIN_REFS_{name}.json'), 'references file')
    return (refs, '') if refs else (None, 'the dataset has no TRAIN references')


def check_args(args):
    """Flags are range-checked before any work."""
    for key, low, why in (('batch_size', 1, 'at least 1'), ('max_len', 1, 'at least 1'), ('workers', 0, '0 or more'),
                          ('min_len', 0, '0 or more'), ('no_repeat_ngram', 0, '0 (off) or more'),
                          ('max_images', 0, '0 (all) or more')):
        if getattr(args, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be {why}")
    if min(args.beam_sizes) < 1:
        raise ValueError(f'--beam-sizes {min(args.beam_sizes)}: must be at least 1 (1 = greedy)')
    for k in args.beam_sizes:
        options.check_generation(args, k)
    for path, flag in ((args.out, '--out'), (args.results_json, '--results-json')):
        if path:
            utils.check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        paths, refs, split, image_ids = split_images(args)
        train_refs, no_endings = train_references(args)
        rank, world, device = utils.init_distributed(args.device)   # one process, or one of torchrun's
        args.runtime = runtime.resolve(args.runtime, device)    # torch | onnx
        encoder, decoder, word_map, config = loading.load_captioner(args.checkpoint, device, args.word_map, args.mirror,
                                                                    args.runtime, args.onnx_cache)
        decoder, precision = quantize.apply_precision(decoder, args.precision, device)   # once, at load
        tokenizer = text.checkpoint_tokenizer(config)   # how captions are joined and scored
        no_end_after, endings_note = loading.bad_endings_setting(args.bad_endings, decoder, word_map, config)
        text.tokenize('', tokenizer)                    # jieba missing: say so now, not after captioning
        decode_kw = options.decode_settings(args, decoder, word_map, tokenizer)
        guide = tags.guide_for(args.guide, args.sample, encoder, word_map,
                               loading.checkpoint_paths(args.checkpoint)[0])
        if args.metrics == 'coco':
            ok, why = metrics.coco_status() if tokenizer == 'words' else metrics.segmented_status()
            if not ok:
                raise RuntimeError(f'--metrics coco: {why}')
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    print(f'evaluating {loading.checkpoint_label(args.checkpoint)} on {split}: {len(paths)} images, '
          f"beam sizes {args.beam_sizes}, {device}, encoder in {'onnxruntime' if args.runtime == 'onnx' else 'PyTorch'}, "
          f'decoder {precision}, bad endings '
          f"{'avoided' if no_end_after is not None else 'allowed'}{', mirrored views' if args.mirror else ''}")
    if endings_note:
        print(f'note: {endings_note}', file=sys.stderr)
    start = time.time()
    results, failures = sharding.caption_paths(
        encoder, decoder, word_map, paths, args.beam_sizes, args.batch_size, args.workers, device, rank, world,
        max_len=args.max_len, length_norm=args.length_norm, no_repeat_ngram_size=args.no_repeat_ngram,
        min_len=args.min_len, allow_unk=args.allow_unk, no_end_after=no_end_after, tag=args.tags, guide=guide,
        guide_margin=tags.GUIDE_MARGIN, loader=args.loader, **decode_kw)
    seconds = time.time() - start
    if results is None:   # another torchrun process: the first scores every share
        return 0
    for path, err in failures:
        print(f'warning: skipped {path}: {err}', file=sys.stderr)
    scored = [i for i, r in enumerate(results) if r is not None]
    gts = {i: refs[i] for i in scored}
    table, captions, note = [], [], ''
    endings = metrics.ending_counts(train_refs, tokenizer) if train_refs else None
    for k in args.beam_sizes:
        res = {i: [text.join_words(results[i][k]['words'], tokenizer)] for i in scored}
        scores, note = metrics.score_captions(gts, res, coco={'auto': 'auto', 'coco': True, 'nltk': False}[args.metrics],
                                              tokenizer=tokenizer)
        table.append({'beam_size': k, 'metrics': scores,
                      'diversity': metrics.diversity_scores([res[i][0] for i in scored], tokenizer),
                      'bad_endings': metrics.bad_ending_rate([res[i][0] for i in scored], endings, tokenizer)
                      if endings else None})
        captions += [caption_entry(paths[i], k, res[i][0], results[i][k], word_map) for i in scored]
        if args.results_json:
            try:
                write_results(args, k, image_ids, paths, {i: res[i][0] for i in scored})
            except OSError as e:
                print(f'error: {utils.describe_error(e)}', file=sys.stderr)
                return 1
        empty = [i for i in scored if not results[i][k]['words']]
        if empty:
            print(f'warning: beam {k}: {len(empty)} empty caption(s), e.g. {paths[empty[0]]}: '
                  f'{files.empty_reason(results[empty[0]][k])}', file=sys.stderr)
    print_table(table)
    if endings is None:
        print(f'(bad endings not measured: {no_endings})')
    print(f'({note}; {len(scored)} images, {len(failures)} skipped; captioning took {seconds:.1f} s)')
    if args.out:
        try:
            utils.write_json(args.out, {'split': split, 'num_images': len(scored),
                                        'checkpoint': loading.checkpoint_label(args.checkpoint), 'precision': precision,
                                        'runtime': args.runtime,
                                        'bad_endings_decoding': 'avoided' if no_end_after is not None else 'allowed',
                                        'mirror': args.mirror, 'guide': args.guide if guide else 'off',
                                        'generation': {k: getattr(args, k) for k in GENERATION_FLAGS},
                                        'results': table, 'note': note, 'captions': captions}, indent=1)
        except OSError as e:   # the scores above are printed; the file is all or nothing
            print(f'error: {utils.describe_error(e)}', file=sys.stderr)
            return 1
        print(f'wrote {args.out}')
    return 0


GENERATION_FLAGS = ('sample', 'temperature', 'top_k', 'top_p', 'seed', 'diversity_groups', 'diversity_strength',
                    'prefix')


def caption_entry(path, beam_size, caption, hyp, word_map):
    """One caption of metrics.json: image, beam size, caption; the encoder's tags (--tags) and the tag
    words that guided it, when there are."""
    entry = {'image': path, 'beam_size': beam_size, 'caption': caption}
    if hyp.get('tags'):
        entry['tags'] = [{'label': t['label'], 'p': t['p']} for t in hyp['tags']]
    if hyp.get('guided'):
        rev = {v: k for k, v in word_map.items()}
        entry['guided_by'] = [[rev[i] for i in c] for c in hyp['guided']]
    return entry


def write_results(args, beam_size, image_ids, paths, captions):
    """--results-json for one beam size: {image index: caption} -> the COCO results format, with the
    images' own ids, or their places in the split and the mapping file beside it."""
    path = args.results_json
    if len(args.beam_sizes) > 1:
        stem, ext = os.path.splitext(path)
        path = f'{stem}.beam{beam_size}{ext or ".json"}'
    ids = image_ids or list(range(len(paths)))
    mapping = None if image_ids else {ids[i]: paths[i] for i in captions}
    n = exports.write_results(path, ((ids[i], c) for i, c in captions.items()), ids_file=mapping)
    print(f"wrote {n} COCO results to {path}{f' (ids: {path}{exports.IDS_SUFFIX})' if mapping else ''}")


# Columns of the repetition/diversity part of the table: (key, header, format)
DIVERSITY_COLUMNS = (('repeated_trigrams', 'rep3', '.4f'), ('distinct_words', 'words', 'd'),
                     ('unique_captions', 'unique', '.4f'), ('mean_length', 'length', '.2f'))


def print_table(table):
    """One row per beam size: the scores, then repetition and diversity (rep3: share of captions that
    repeat a word trigram; words: distinct words used; unique: distinct captions / images) and, when
    measured, badend: the share of captions with a bad ending (metrics.bad_ending_rate)."""
    keys = [k for k in metrics.COCO_KEYS if k in table[0]['metrics']]
    endings = table[0].get('bad_endings') is not None
    print(f"{'beam':>4} " + ' '.join(f'{k:>8}' for k in keys) + ' |' +
          ' '.join(f'{h:>7}' for _, h, _ in DIVERSITY_COLUMNS) + (f" {'badend':>7}" if endings else ''))
    for row in table:
        print(f"{row['beam_size']:>4} " + ' '.join(f"{row['metrics'][k]:>8.4f}" for k in keys) + ' |' +
              ' '.join(f"{row['diversity'][k]:>7{f}}" for k, _, f in DIVERSITY_COLUMNS) +
              (f" {row['bad_endings']:>7.4f}" if endings else ''))


if __name__ == '__main__':
    sys.exit(main())

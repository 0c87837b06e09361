"""Step 0: turn a captioned image dataset into the files that training and evaluation read.

    python 00_create_input_files.py                       # the embedded synthetic set (no download)
    python 00_create_input_files.py --dataset coco --karpathy-json data/dataset_coco.json \\
        --image-folder data/coco2014                       # COCO 2014 with Karpathy's split
    python 00_create_input_files.py --dataset flickr8k --karpathy-json data/dataset_flickr8k.json \\
        --image-folder data/Flicker8k_Dataset
    python 00_create_input_files.py --dataset mycaps --captions-file captions.csv --image-folder photos
    python 00_create_input_files.py --dataset flickr8k_cn \
        --captions-file ../shared/datasets/flickr8k-cn/flickr8kzhc.caption.txt \
        --train-list ../shared/datasets/flickr8k-cn/flickr8ktrain.txt \
        --val-list ../shared/datasets/flickr8k-cn/flickr8kval.txt \
        --image-folder ../shared/datasets/flickr8k/images --output-folder data/flickr8k_cn   # jieba (auto)
    python 00_create_input_files.py --dataset aic --captions-file caption_train_annotations_20170902.json \
        --image-folder aic/train --val-captions-file caption_validation_annotations_20170910.json \
        --val-image-folder aic/val                         # AI Challenger 2017 (COCO's captions_*2017.json alike)
    python 00_create_input_files.py --language zh         # the synthetic set with Chinese captions

Edit the constants below or pass flags (flags win). Outputs are described in captioning/preparation/prepare.py.
"""
import argparse
import os
import sys
import time

import utils
from captioning import text
from captioning.preparation import formats, prepare, synthetic

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
DATASET = 'synthetic'       # coco | flickr8k | flickr30k | synthetic | any name for your own captions
KARPATHY_JSON = ''          # Karpathy split JSON, e.g. 'data/dataset_coco.json' (synthetic: generated)
CAPTIONS_FILE = ''          # your own captions instead: CSV/JSONL image,caption[,split], Flickr8k.token.txt,
                            # Flickr8k-CN's *.caption.txt, AI Challenger JSON or COCO captions_*.json
TRAIN_LIST = ''             # optional split lists for CAPTIONS_FILE: image names or ids, one per line
VAL_LIST = ''               # (e.g. Flickr8k-CN's flickr8ktrain.txt / flickr8kval.txt); unlisted images
TEST_LIST = ''              # are left out
VAL_CAPTIONS_FILE = ''      # a separate validation captions file (AI Challenger, COCO val2017): VAL
VAL_IMAGE_FOLDER = ''       # ... and its image folder ('' = IMAGE_FOLDER)
TOKENIZER = 'auto'          # words (Unicode words) | jieba (Chinese) | chars | auto: jieba for mostly-CJK captions
ALLOW_OUTSIDE_PATHS = False # accept image names that leave IMAGE_FOLDER (absolute, '..')
LANGUAGE = 'en'             # synthetic captions: en | zh
IMAGE_FOLDER = ''           # folder the image file names are relative to (COCO: the one holding train2014/)
OUTPUT_FOLDER = 'data'      # where the prepared files go
CAPTIONS_PER_IMAGE = 5      # captions kept per image (sampled down, or up by repetition, with SEED)
MIN_WORD_FREQ = 5           # words seen at most this many times in TRAIN become <unk>
MAX_LEN = 50                # captions with more words are dropped
HDF5 = False                # also store the images resized to IMAGE_SIZE in an HDF5 file per split
IMAGE_SIZE = 256            # HDF5 image side (use your encoder's input size: resnet 256, efficientnet_lite0 224)
SEED = 0                    # caption sampling, own-caption splits and the synthetic scenes
SKIP_MISSING = False        # leave out missing or undecodable images instead of stopping
VAL_FRACTION = 0.1          # own captions without a split column: share of images for VAL ...
TEST_FRACTION = 0.1         # ... and for TEST
SYNTHETIC_IMAGES = 2500     # synthetic set size (80% TRAIN, 10% VAL, 10% TEST)
SYNTHETIC_IMAGE_SIZE = 128  # synthetic image side in pixels
WORKERS = 0                 # processes for checking/resizing images (0: one per core, up to 8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default=DATASET, help='coco, flickr8k, flickr30k, synthetic, or a name for '
                   'your own captions; it names the output files (default: %(default)s)')
    p.add_argument('--karpathy-json', default=KARPATHY_JSON, help='Karpathy split JSON (dataset_*.json)')
    p.add_argument('--captions-file', default=CAPTIONS_FILE,
                   help='your own captions: CSV or JSONL of image,caption[,split] rows, or Flickr8k.token.txt')
    p.add_argument('--image-folder', default=IMAGE_FOLDER, help='folder holding the images')
    p.add_argument('--train-list', default=TRAIN_LIST, help='--captions-file split list: image names/ids of TRAIN')
    p.add_argument('--val-list', default=VAL_LIST, help='... of VAL')
    p.add_argument('--test-list', default=TEST_LIST, help='... of TEST (images in no given list are left out)')
    p.add_argument('--val-captions-file', default=VAL_CAPTIONS_FILE,
                   help='a separate validation captions file (AI Challenger, COCO val2017) for VAL')
    p.add_argument('--val-image-folder', default=VAL_IMAGE_FOLDER, help="its images ('' = --image-folder)")
    p.add_argument('--tokenizer', choices=('auto', *text.TOKENIZERS), default=TOKENIZER,
                   help='words: Unicode words; jieba: Chinese segmentation; chars: one token per CJK character; '
                        'auto: jieba when the captions are mostly CJK, else words (default: %(default)s)')
    p.add_argument('--allow-outside-paths', action=argparse.BooleanOptionalAction, default=ALLOW_OUTSIDE_PATHS,
                   help="accept image paths that leave --image-folder (absolute, '..') (default: %(default)s)")
    p.add_argument('--language', choices=synthetic.LANGUAGES, default=LANGUAGE,
                   help='synthetic captions in English or Chinese (default: %(default)s)')
    p.add_argument('--output-folder', default=OUTPUT_FOLDER, help='where to write (default: %(default)s)')
    p.add_argument('--captions-per-image', type=int, default=CAPTIONS_PER_IMAGE, help='(default: %(default)s)')
    p.add_argument('--min-word-freq', type=int, default=MIN_WORD_FREQ,
                   help='a word enters the vocabulary when seen MORE than this many times in TRAIN '
                        '(default: %(default)s)')
    p.add_argument('--max-len', type=int, default=MAX_LEN, help='drop captions longer than this '
                   '(default: %(default)s)')
    p.add_argument('--hdf5', action=argparse.BooleanOptionalAction, default=HDF5,
                   help='also write {SPLIT}_IMAGES_*.hdf5 with uint8 images (default: %(default)s)')
    p.add_argument('--image-size', type=int, default=IMAGE_SIZE, help='HDF5 image side (default: %(default)s)')
    p.add_argument('--seed', type=int, default=SEED, help='(default: %(default)s)')
    p.add_argument('--skip-missing', action=argparse.BooleanOptionalAction, default=SKIP_MISSING,
                   help='leave out missing or undecodable images instead of stopping (default: %(default)s)')
    p.add_argument('--val-fraction', type=float, default=VAL_FRACTION,
                   help='own captions without a split column: share of images for VAL (default: %(default)s)')
    p.add_argument('--test-fraction', type=float, default=TEST_FRACTION,
                   help='... and for TEST (default: %(default)s)')
    p.add_argument('--synthetic-images', type=int, default=SYNTHETIC_IMAGES,
                   help='synthetic set size, split 80/10/10 (default: %(default)s)')
    p.add_argument('--synthetic-image-size', type=int, default=SYNTHETIC_IMAGE_SIZE, help='(default: %(default)s)')
    p.add_argument('--workers', type=int, default=WORKERS, help='image-checking processes (0: auto)')
    return p.parse_args(argv)


def read_records(args):
    """The source dataset as ImageRecords, from the synthetic generator, a caption table or Karpathy JSON."""
    if args.captions_file:
        if not args.image_folder:
            raise SystemExit('--captions-file needs --image-folder (where the images named in it are)')
        lists = {s: p for s, p in (('TRAIN', args.train_list), ('VAL', args.val_list), ('TEST', args.test_list)) if p}
        return formats.read_caption_table(args.captions_file, args.image_folder, args.seed, args.val_fraction,
                                           args.test_fraction, args.tokenizer, args.allow_outside_paths, lists or None,
                                           args.val_captions_file or None, args.val_image_folder or None)
    if args.train_list or args.val_list or args.test_list or args.val_captions_file:
        raise SystemExit('--train-list/--val-list/--test-list/--val-captions-file go with --captions-file')
    if args.dataset == 'synthetic' and not args.karpathy_json:
        n = args.synthetic_images
        n_val = n_test = max(1, n // 10)
        folder = os.path.join(args.output_folder, 'synthetic_source' + ('' if args.language == 'en' else '_' + args.language))
        print(f'generating {n} synthetic scenes in {folder} ...')
        args.karpathy_json, args.image_folder = synthetic.generate(
            folder, n - n_val - n_test, n_val, n_test, args.synthetic_image_size, args.seed, args.language)
    if not args.karpathy_json:
        raise SystemExit(f'--dataset {args.dataset} needs --karpathy-json (or --captions-file for your own captions)')
    if not args.image_folder:
        raise SystemExit('--karpathy-json needs --image-folder (where the images are)')
    return formats.read_karpathy(args.karpathy_json, args.image_folder, args.tokenizer, args.allow_outside_paths)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        records = read_records(args)
        summary = prepare.prepare_dataset(
            records, args.dataset, args.output_folder, args.captions_per_image, args.min_word_freq,
            args.max_len, args.hdf5, args.image_size, args.seed, args.skip_missing, args.workers or None)
    except (ValueError, OSError, ImportError) as e:   # bad input; a missing extra; a full disk, a file-size limit, a read-only folder
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    prepare.print_summary(summary, args.output_folder)
    for split, s in summary['splits'].items():
        if not s['images']:   # e.g. a Karpathy file without its test split
            print(f'warning: split {split} is empty; training needs TRAIN and VAL, 03_evaluate.py then needs '
                  f'--split with a split that has images', file=sys.stderr)
    print(f'done in {time.time() - start:.1f} s. Next: python 01_train.py --data-folder {args.output_folder}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

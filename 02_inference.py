"""Step 2: caption your own photos with a trained checkpoint (beam search, CPU or GPU).

    python 02_inference.py --img my_photo.jpg                  # the provided Flickr8k checkpoint
    python 02_inference.py --img photos/ --beam-size 5 --visualize --out outputs/photos
    python 02_inference.py --img photos/ --checkpoint runs/.../BEST_checkpoint_....pt

A folder is searched recursively for jpg/jpeg/png/bmp/webp files (any letter case). Writes
captions.json and captions.csv (image, caption, score) to --out and prints them; --visualize also
saves one attention figure per image (the image, then each word with where the model looked).
Files that cannot be decoded are skipped with a warning and listed at the end.
"""
import argparse
import csv
import os
import sys
import time

import caption
import text
import utils
from datasets import list_images, load_image

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
IMG = os.path.join(caption.REPO_DIR, 'assets', 'samples')   # an image file or a folder of images
CHECKPOINT = caption.PROVIDED_CHECKPOINT   # the provided Flickr8k model, or your BEST_checkpoint_*.pt
BEAM_SIZE = 3                              # 1 = greedy
LENGTH_NORM = caption.DEFAULT_LENGTH_NORM  # rank beams by score / length ** LENGTH_NORM
NO_REPEAT_NGRAM = 0                        # forbid repeating n-grams of this size (0 = off)
MIN_LEN = 0                                # at least this many words
ALLOW_UNK = False                          # let captions contain <unk> (rare words)
MAX_LEN = 50                               # at most this many words
BATCH_SIZE = 16                            # images per batch
WORKERS = 0                                # DataLoader workers decoding images
OUT = 'outputs/inference'                  # folder for captions.json/csv and attention figures
VISUALIZE = False                          # save attention figures
DEVICE = 'auto'                            # auto | cpu | cuda


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--img', default=IMG, help='image file or folder (default: %(default)s)')
    p.add_argument('--checkpoint', default=CHECKPOINT, help='(default: %(default)s)')
    p.add_argument('--beam-size', type=int, default=BEAM_SIZE, help='(default: %(default)s)')
    p.add_argument('--length-norm', type=float, default=LENGTH_NORM,
                   help='length normalisation exponent (default: %(default)s)')
    p.add_argument('--no-repeat-ngram', type=int, default=NO_REPEAT_NGRAM, help='(default: %(default)s)')
    p.add_argument('--min-len', type=int, default=MIN_LEN, help='(default: %(default)s)')
    p.add_argument('--allow-unk', action=argparse.BooleanOptionalAction, default=ALLOW_UNK,
                   help='let captions contain <unk> (default: %(default)s)')
    p.add_argument('--max-len', type=int, default=MAX_LEN, help='(default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=BATCH_SIZE, help='(default: %(default)s)')
    p.add_argument('--workers', type=int, default=WORKERS, help='(default: %(default)s)')
    p.add_argument('--out', default=OUT, help='output folder (default: %(default)s)')
    p.add_argument('--visualize', action=argparse.BooleanOptionalAction, default=VISUALIZE,
                   help='save attention figures (default: %(default)s)')
    p.add_argument('--device', default=DEVICE, help='auto, cpu or cuda (default: %(default)s)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        paths = list_images(args.img)
        if not paths:
            raise FileNotFoundError(f'no jpg/jpeg/png/bmp/webp images in {args.img}')
        device = utils.get_device(args.device)
        encoder, decoder, word_map, config = caption.load_captioner(args.checkpoint, device)
        tokenizer = text.checkpoint_tokenizer(config)   # Chinese captions are joined without spaces
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    start = time.time()
    results, failures = caption.caption_paths(
        encoder, decoder, word_map, paths, (args.beam_size,), args.batch_size, args.workers, device,
        max_len=args.max_len, length_norm=args.length_norm, no_repeat_ngram_size=args.no_repeat_ngram,
        min_len=args.min_len, allow_unk=args.allow_unk)
    seconds = time.time() - start
    rows = []
    for path, res in zip(paths, results):
        if res is not None:
            hyp = res[args.beam_size]
            rows.append({'image': path, 'caption': text.join_words(hyp['words'], tokenizer), 'score': round(hyp['score'], 4),
                         'finished': hyp['finished']})
            print(f"{path}: {rows[-1]['caption']}")
    os.makedirs(args.out, exist_ok=True)
    utils.write_json(os.path.join(args.out, 'captions.json'), rows, indent=1)
    with utils.atomic_path(os.path.join(args.out, 'captions.csv')) as tmp:
        with open(tmp, 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=['image', 'caption', 'score', 'finished'])
            writer.writeheader()
            writer.writerows(rows)
    if args.visualize and not decoder.has_attention:
        print(f"note: --visualize draws attention maps, and the {config['decoder']} decoder has no attention: "
              'no figures written')
    elif args.visualize:
        used = set()
        for path, res in zip(paths, results):
            if res is not None:
                hyp = res[args.beam_size]
                words = hyp['words'] + (['<end>'] if hyp['finished'] else [])
                caption.save_attention_figure(load_image(path), words, hyp['alphas'],
                                              os.path.join(args.out, caption.figure_name(path, used)))
    for path, err in failures:
        print(f'warning: skipped {path}: {err}', file=sys.stderr)
    print(f"\n{len(rows)} image(s) captioned in {seconds:.2f} s on {device} (beam {args.beam_size}, "
          f"checkpoint {args.checkpoint}); {len(failures)} skipped. Outputs: {os.path.abspath(args.out)}"
          f"{' (captions.json, captions.csv, *_attention.png)' if args.visualize and decoder.has_attention else ' (captions.json, captions.csv)'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Step 2: caption your own photos with a trained checkpoint (beam search, CPU or GPU).

    python 02_inference.py --img my_photo.jpg                  # the provided Flickr8k pair (an ensemble)
    python 02_inference.py --img photos/ --beam-size 5 --visualize --out outputs/photos
    python 02_inference.py --img photos/ --checkpoint runs/.../BEST_checkpoint_....pt
    python 02_inference.py --img a.jpg b.jpg more_photos/     # several files and folders

A folder is searched recursively for jpg/jpeg/png/bmp/webp files (any letter case). Writes
captions.json and captions.csv (image, caption, score) to --out and prints them; --visualize also
saves one attention figure per image (the image, then each word with where the model looked).
Files that cannot be decoded are skipped with a warning and listed at the end; when none can be,
the exit status is 1. The output folder is checked for writing before any captioning.
"""
import argparse
import csv
import os
import sys
import time

import caption
import quantize
import text
import utils
from datasets import list_images, load_image

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
IMG = os.path.join(caption.REPO_DIR, 'assets', 'samples')   # an image file or a folder of images
CHECKPOINT = caption.DEFAULT_CHECKPOINTS   # the provided Flickr8k pair (an ensemble), or [your BEST_checkpoint_*.pt]
BEAM_SIZE = 3                              # 1 = greedy
LENGTH_NORM = caption.DEFAULT_LENGTH_NORM  # rank beams by score / length ** LENGTH_NORM
NO_REPEAT_NGRAM = caption.DEFAULT_NO_REPEAT_NGRAM   # forbid repeating n-grams of this size (0 = off)
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
    p.add_argument('--img', nargs='+', default=[IMG], help='image files and/or folders (default: %(default)s)')
    p.add_argument('--checkpoint', nargs='+', default=CHECKPOINT,
                   help='a checkpoint, or several to decode as an ensemble (their mean word distribution; they '
                        'must share the word map) (default: %(default)s)')
    p.add_argument('--beam-size', type=int, default=BEAM_SIZE, help='(default: %(default)s)')
    p.add_argument('--length-norm', type=float, default=LENGTH_NORM,
                   help='length normalisation exponent (default: %(default)s)')
    p.add_argument('--no-repeat-ngram', type=int, default=NO_REPEAT_NGRAM,
                   help='forbid repeating any n-gram of this size, 0 = off (default: %(default)s)')
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
    quantize.add_argument(p)
    return p.parse_args(argv)


# flag -> (lowest allowed value, how it is meant); checked before any work
RANGES = {'beam_size': (1, 'at least 1 (1 = greedy)'), 'batch_size': (1, 'at least 1'),
          'max_len': (1, 'at least 1'), 'workers': (0, '0 or more'), 'min_len': (0, '0 or more'),
          'no_repeat_ngram': (0, '0 (off) or more')}


def check_args(args):
    for key, (low, why) in RANGES.items():
        if getattr(args, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be {why}")
    if args.min_len > args.max_len:
        raise ValueError(f'--min-len {args.min_len} is above --max-len {args.max_len}')
    utils.check_writable_folder(args.out, '--out')   # before minutes of captioning, not after


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        paths = list_images(args.img)
        if not paths:
            raise FileNotFoundError(f"no jpg/jpeg/png/bmp/webp images in {' '.join(args.img)}")
        device = utils.get_device(args.device)
        encoder, decoder, word_map, config = caption.load_captioner(args.checkpoint, device)
        decoder, precision = quantize.apply_precision(decoder, args.precision, device)   # once, at load
        tokenizer = text.checkpoint_tokenizer(config)   # Chinese captions are joined without spaces
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
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
    for path, err in failures:
        print(f'warning: skipped {path}: {err}', file=sys.stderr)
    if not rows:
        print(f'error: none of the {len(paths)} image(s) could be decoded (see the warnings above); nothing written',
              file=sys.stderr)
        return 1
    figures, error = 0, None
    try:
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
                    figures += 1
    except OSError as e:   # disk full, file-size limit, a folder made read-only meanwhile: the summary still comes
        error = utils.describe_error(e)
    print(f"\n{len(rows)} image(s) captioned in {seconds:.2f} s on {device} (beam {args.beam_size}, {precision}, "
          f"checkpoint {caption.checkpoint_label(args.checkpoint)}); {len(failures)} skipped. "
          f"Outputs: {os.path.abspath(args.out)}"
          f"{' (captions.json, captions.csv, *_attention.png)' if args.visualize and decoder.has_attention else ' (captions.json, captions.csv)'}")
    if error:
        print(f"error: {error}{f' ({figures} attention figure(s) written)' if args.visualize else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    status = main()
    # Every output is written and closed by now: skip the interpreter's teardown of torch (0.8 s of
    # a 3.5 s command here), which does nothing this command needs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

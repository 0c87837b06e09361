"""Step 2: caption your own photos with a trained checkpoint (beam search, CPU or GPU).

    python 02_inference.py --img my_photo.jpg                  # the provided Flickr8k pair (an ensemble)
    python 02_inference.py --img photos/ --beam-size 5 --visualize --out outputs/photos
    python 02_inference.py --img photos/ --checkpoint runs/.../BEST_checkpoint_....pt
    python 02_inference.py --img a.jpg b.jpg more_photos/     # several files and folders
    python 02_inference.py --img photo.jpg --checkpoint flickr8k-cn   # the provided Chinese pair

    torchrun --nproc_per_node=4 02_inference.py --img big/ --out out/   # shared over 4 processes/GPUs

A folder is searched recursively for jpg/jpeg/png/bmp/webp files (any letter case). Each batch's
captions are appended to captions.jsonl in --out as they come (image, caption, score, finished), and
at the end captions.json and captions.csv are written from it and printed; --visualize also saves one
attention figure per image as its batch is done (the image, then each word with where the model looked).
Memory stays flat however many images there are.

Running the same command again continues an interrupted run: images already in captions.jsonl are
skipped, so a kill loses at most the batch in flight. A run with other settings (checkpoint, beam
size, decoding flags) refuses to add to an old captions.jsonl; --overwrite starts over. Under
torchrun each process captions its share (whole batches of the image list) into its own part file,
and the last step merges them into captions.jsonl in the order one process would have written.
Files that cannot be decoded are skipped with a warning; when no image has a caption, the exit
status is 1. The output folder is checked for writing before any captioning.
"""
import argparse
import os
import sys
import time

import utils
from captioning import text
from captioning.decoding import attention_figures, files, loading, options, quantize, search
from captioning.scale import streaming
from datasets import list_images, load_image

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
IMG = os.path.join(loading.REPO_DIR, 'assets', 'samples')   # an image file or a folder of images
CHECKPOINT = loading.DEFAULT_CHECKPOINTS   # the provided Flickr8k pair (an ensemble), or [your BEST_checkpoint_*.pt]
WORD_MAP = None                            # the tutorial's WORDMAP_*.json when CHECKPOINT is its .pth.tar
BEAM_SIZE = 3                              # 1 = greedy
LENGTH_NORM = search.DEFAULT_LENGTH_NORM  # rank beams by score / length ** LENGTH_NORM
NO_REPEAT_NGRAM = search.DEFAULT_NO_REPEAT_NGRAM   # forbid repeating n-grams of this size (0 = off)
MIN_LEN = 1                                # at least this many words (a caption of no words is no answer)
BAD_ENDINGS = 'avoid'                      # avoid: never end on a word that rarely ends a sentence ('a', 'red') | allow
MIRROR = False                             # also decode each photo's mirror image (test-time augmentation)
ALLOW_UNK = False                          # let captions contain <unk> (rare words)
MAX_LEN = 50                               # at most this many words
PRECISION = 'auto'                         # decoder weights: auto | fp32 | int8 (captioning/decoding/quantize.py)
BATCH_SIZE = 16                            # images per batch
WORKERS = 0                                # DataLoader workers decoding images
OUT = 'outputs/inference'                  # folder for captions.json/csv and attention figures
VISUALIZE = False                          # save attention figures
DEVICE = 'auto'                            # auto | cpu | cuda


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--img', nargs='+', default=[IMG], help='image files and/or folders (default: %(default)s)')
    options.add_model_arguments(p, CHECKPOINT, WORD_MAP)
    p.add_argument('--beam-size', type=int, default=BEAM_SIZE, help='(default: %(default)s)')
    options.add_decoding_arguments(p, length_norm=LENGTH_NORM, no_repeat_ngram=NO_REPEAT_NGRAM, min_len=MIN_LEN,
                                   max_len=MAX_LEN, allow_unk=ALLOW_UNK, bad_endings=BAD_ENDINGS, mirror=MIRROR,
                                   precision=PRECISION)
    p.add_argument('--batch-size', type=int, default=BATCH_SIZE, help='(default: %(default)s)')
    p.add_argument('--workers', type=int, default=WORKERS, help='(default: %(default)s)')
    p.add_argument('--out', default=OUT, help='output folder (default: %(default)s)')
    p.add_argument('--visualize', action=argparse.BooleanOptionalAction, default=VISUALIZE,
                   help='save attention figures (default: %(default)s)')
    p.add_argument('--device', default=DEVICE, help='auto, cpu or cuda (default: %(default)s)')
    p.add_argument('--overwrite', action='store_true',
                   help='start over: remove the captions an earlier run left in --out instead of continuing it')
    return p.parse_args(argv)


# Flags that change the captions: a run with other values refuses to add to an earlier run's captions.jsonl
SETTING_FLAGS = ('beam_size', 'length_norm', 'no_repeat_ngram', 'min_len', 'max_len', 'allow_unk', 'precision',
                 'bad_endings', 'mirror')


def run_settings(args):
    """What makes the captions what they are (stored in captions.settings.json next to captions.jsonl)."""
    word_map = {'word_map': streaming.file_settings([args.word_map])} if args.word_map else {}
    return {'checkpoint': streaming.file_settings(loading.checkpoint_paths(args.checkpoint)), **word_map,
            **{k: getattr(args, k) for k in SETTING_FLAGS if hasattr(args, k)}}


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
        rank, world, device = utils.init_distributed(args.device)   # one process, or one of torchrun's
        encoder, decoder, word_map, config = loading.load_captioner(args.checkpoint, device, args.word_map, args.mirror)
        decoder, precision = quantize.apply_precision(decoder, args.precision, device)   # once, at load
        tokenizer = text.checkpoint_tokenizer(config)   # Chinese captions are joined without spaces
        no_end_after, endings_note = loading.bad_endings_setting(args.bad_endings, decoder, word_map, config)
        run = streaming.Run(args.out, run_settings(args), rank, world, args.overwrite)
        todo = run.open(paths, args.batch_size)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    if rank == 0 and loading.provided_note(args.checkpoint):
        print(f'note: {loading.provided_note(args.checkpoint)}', file=sys.stderr)
    if rank == 0 and endings_note:
        print(f'note: {endings_note}', file=sys.stderr)
    log = os.path.join(args.out, streaming.JSONL)
    if run.skipped and rank == 0:
        print(f'resuming: {run.skipped} of {len(paths)} image(s) already have a caption in {log}; skipped '
              '(--overwrite starts over)')
    draw = args.visualize and decoder.has_attention
    if args.visualize and not draw and rank == 0:
        print(f"note: --visualize draws attention maps, and the {config['decoder']} decoder has no attention: "
              'no figures written')
    names = figure_names(paths) if draw else {}
    start = time.time()
    failures, captioned, figures, error = [], 0, 0, None
    progress = streaming.Progress(len(todo), 'captioning' if world == 1 else f'captioning (rank {rank} of {world})')
    try:
        for indices, hyps, bad in files.caption_batches(
                encoder, decoder, word_map, todo, (args.beam_size,), args.batch_size, args.workers, device,
                max_len=args.max_len, length_norm=args.length_norm, no_repeat_ngram_size=args.no_repeat_ngram,
                min_len=args.min_len, allow_unk=args.allow_unk, no_end_after=no_end_after):
            failures += [(todo[i], err) for i, err in bad]
            hyps = hyps.get(args.beam_size, [])
            records = [{'image': todo[i], 'caption': text.join_words(hyp['words'], tokenizer),
                        'score': round(hyp['score'], 4), 'finished': hyp['finished']} for i, hyp in zip(indices, hyps)]
            try:   # figures first: a kill before the captions are appended redoes the batch, figures included
                for i, hyp in zip(indices, hyps) if draw else ():
                    words = hyp['words'] + (['<end>'] if hyp['finished'] else [])
                    attention_figures.save_attention_figure(load_image(todo[i]), words, hyp['alphas'],
                                                  os.path.join(args.out, names[todo[i]]))
                    figures += 1
            finally:   # a figure that does not fit (disk full) still leaves the batch's captions written
                run.append(records)
                captioned += len(records)
                for record in records:
                    progress.write(f"{record['image']}: {record['caption']}")
                for i, hyp in zip(indices, hyps):
                    if not hyp['words']:
                        print(f"warning: {todo[i]}: empty caption: {files.empty_reason(hyp)}", file=sys.stderr)
            progress.update(len(indices) + len(bad))
    except OSError as e:   # disk full, file-size limit, a folder made read-only meanwhile: the summary still comes
        error = utils.describe_error(e)
    finally:
        progress.close()
    seconds = time.time() - start
    for path, err in failures:
        print(f'warning: skipped {path}: {err}', file=sys.stderr)
    try:
        total, failed = run.finish(paths, failed=error is not None)
        if failed and not error:
            error = 'another process of this torchrun failed (see its error)'
    except (OSError, ValueError) as e:
        total, error = None, error or utils.describe_error(e)
    print(f"\n{captioned} image(s) captioned in {seconds:.2f} s on {device} (beam {args.beam_size}, {precision}, "
          f"checkpoint {loading.checkpoint_label(args.checkpoint)}"
          f"{f', process {rank} of {world}' if world > 1 else ''}); {len(failures)} skipped"
          f"{f'; {run.skipped} captioned before' if run.skipped else ''}.")
    if error:
        print(f"error: {error}{f' ({figures} attention figure(s) written)' if args.visualize else ''}; "
              f'the captions so far are kept: run the same command again to continue', file=sys.stderr)
        return 1
    if total is None:   # a rank other than 0: rank 0 merges and writes the outputs
        return 0
    if total == 0:
        print(f'error: none of the {len(paths)} image(s) could be decoded (see the warnings above); nothing written',
              file=sys.stderr)
        return 1
    print(f"{total} caption(s) in {os.path.abspath(args.out)} (captions.jsonl, captions.json, captions.csv"
          f"{', *_attention.png' if draw else ''})")
    return 0


def figure_names(paths):
    """image path -> its attention figure's name, unique over the whole list (so the same on every
    process and in every resumed run)."""
    used = set()
    return {path: attention_figures.figure_name(path, used) for path in paths}


if __name__ == '__main__':
    status = main()
    # Every output is written and closed by now: skip the interpreter's teardown of torch (0.8 s of
    # a 3.5 s command here), which does nothing this command needs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

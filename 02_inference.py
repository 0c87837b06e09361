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
from captioning.decoding import attention_figures, files, loading, options, quantize, runtime, search, tags
from captioning.preparation import formats
from captioning.scale import exports, streaming
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
RUNTIME = 'auto'                           # the encoder's engine: auto | torch | onnx (captioning/decoding/runtime.py)
BATCH_SIZE = 16                            # images per batch
WORKERS = 2                                # readers decoding the next images while the model runs (0: none;
                                           # 2 threads measured fastest on 2 cores: docs/speed.md, bench_files.py)
LOADER = 'threads'                         # the readers: threads | processes (DataLoader workers)
OUT = 'outputs/inference'                  # folder for captions.json/csv and attention figures
VISUALIZE = False                          # save attention figures
TAGS = True                                # record what the encoder recognises (its ImageNet tags) per photo
SIDECAR = 'none'                           # txt: NAME.txt beside each NAME.jpg holding its caption(s)
SIDECAR_DIR = ''                           # ... or the same tree under this folder (read-only collections)
COCO_JSON = ''                             # caption the images of a COCO annotation file (in --img's folder)
DEVICE = 'auto'                            # auto | cpu | cuda


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--img', nargs='+', default=[IMG], help='image files and/or folders (default: %(default)s)')
    options.add_model_arguments(p, CHECKPOINT, WORD_MAP)
    p.add_argument('--beam-size', type=int, default=BEAM_SIZE, help='(default: %(default)s)')
    options.add_decoding_arguments(p, length_norm=LENGTH_NORM, no_repeat_ngram=NO_REPEAT_NGRAM, min_len=MIN_LEN,
                                   max_len=MAX_LEN, allow_unk=ALLOW_UNK, bad_endings=BAD_ENDINGS, mirror=MIRROR,
                                   precision=PRECISION, runtime=RUNTIME)
    options.add_generation_arguments(p)
    p.add_argument('--tags', action=argparse.BooleanOptionalAction, default=TAGS,
                   help="record the encoder's ImageNet tags of each photo in captions.jsonl (default: %(default)s)")
    p.add_argument('--sidecar', choices=('none', 'txt'), default=SIDECAR,
                   help='txt: write NAME.txt beside each NAME.jpg with its caption (every caption, one a line, '
                        'with --num-captions); an existing .txt is kept unless --overwrite (default: %(default)s)')
    p.add_argument('--sidecar-dir', default=SIDECAR_DIR,
                   help='write the sidecars in the same tree under this folder instead (default: beside the photos)')
    p.add_argument('--coco-json', default=COCO_JSON,
                   help='caption the images an official COCO caption file lists (found under --img, one folder) '
                        f'and also write {exports.RESULTS_NAME} in --out: the COCO results format')
    p.add_argument('--batch-size', type=int, default=BATCH_SIZE, help='(default: %(default)s)')
    options.add_reading_arguments(p, WORKERS, LOADER)
    p.add_argument('--out', default=OUT, help='output folder (default: %(default)s)')
    p.add_argument('--visualize', action=argparse.BooleanOptionalAction, default=VISUALIZE,
                   help='save attention figures (default: %(default)s)')
    p.add_argument('--device', default=DEVICE, help='auto, cpu or cuda (default: %(default)s)')
    p.add_argument('--overwrite', action='store_true',
                   help='start over: remove the captions an earlier run left in --out instead of continuing it '
                        '(and replace existing sidecar .txt files)')
    return p.parse_args(argv)


# Flags that change the captions: a run with other values refuses to add to an earlier run's captions.jsonl
SETTING_FLAGS = ('beam_size', 'length_norm', 'no_repeat_ngram', 'min_len', 'max_len', 'allow_unk', 'precision',
                 'bad_endings', 'mirror', 'num_captions', 'sample', 'temperature', 'top_k', 'top_p', 'seed',
                 'diversity_groups', 'diversity_strength', 'prefix', 'guide', 'runtime')


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
    options.check_generation(args, args.beam_size)
    if args.sidecar_dir and args.sidecar != 'txt':
        raise ValueError('--sidecar-dir goes with --sidecar txt')
    if args.coco_json and len(args.img) != 1:
        raise ValueError('--coco-json takes one --img folder: the one its file names are in')
    utils.check_writable_folder(args.out, '--out')   # before minutes of captioning, not after
    if args.sidecar_dir:
        utils.check_writable_folder(args.sidecar_dir, '--sidecar-dir')


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        paths, image_ids = image_list(args)
        rank, world, device = utils.init_distributed(args.device)   # one process, or one of torchrun's
        args.runtime = runtime.resolve(args.runtime, device)    # torch | onnx: what captions.settings.json records
        encoder, decoder, word_map, config = loading.load_captioner(args.checkpoint, device, args.word_map, args.mirror,
                                                                    args.runtime, args.onnx_cache)
        decoder, precision = quantize.apply_precision(decoder, args.precision, device)   # once, at load
        tokenizer = text.checkpoint_tokenizer(config)   # Chinese captions are joined without spaces
        no_end_after, endings_note = loading.bad_endings_setting(args.bad_endings, decoder, word_map, config)
        decode_kw = options.decode_settings(args, decoder, word_map, tokenizer)
        guide = tags.guide_for(args.guide, args.sample, encoder, word_map,
                               loading.checkpoint_paths(args.checkpoint)[0])
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
    rev = {v: k for k, v in word_map.items()}
    sidecars = exports.Sidecars(exports.sidecar_root(paths), args.sidecar_dir, args.overwrite) \
        if args.sidecar == 'txt' else None
    start = time.time()
    failures, captioned, figures, error = [], 0, 0, None
    progress = streaming.Progress(len(todo), 'captioning' if world == 1 else f'captioning (rank {rank} of {world})')
    try:
        for indices, hyps, bad in files.caption_batches(
                encoder, decoder, word_map, todo, (args.beam_size,), args.batch_size, args.workers, device,
                max_len=args.max_len, length_norm=args.length_norm, no_repeat_ngram_size=args.no_repeat_ngram,
                min_len=args.min_len, allow_unk=args.allow_unk, no_end_after=no_end_after, tag=args.tags,
                guide=guide, guide_margin=tags.GUIDE_MARGIN, loader=args.loader, **decode_kw):
            failures += [(todo[i], err) for i, err in bad]
            hyps = hyps.get(args.beam_size, [])
            records = [caption_record(todo[i], hyp, args, decoder, rev, tokenizer, image_ids) for i, hyp in zip(indices, hyps)]
            try:   # figures first: a kill before the captions are appended redoes the batch, figures included
                for i, hyp in zip(indices, hyps) if draw else ():
                    words = hyp['words'] + (['<end>'] if hyp['finished'] else [])
                    attention_figures.save_attention_figure(load_image(todo[i]), words, hyp['alphas'],
                                                  os.path.join(args.out, names[todo[i]]))
                    figures += 1
            finally:   # a figure that does not fit (disk full) still leaves the batch's captions written
                run.append(records)
                captioned += len(records)
                for r in records if sidecars else ():
                    sidecars.write(r['image'], exports.sidecar_lines(r))
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
          f"encoder in {'onnxruntime' if args.runtime == 'onnx' else 'PyTorch'}, "
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
    try:
        written = finish_exports(args, sidecars, image_ids)
    except OSError as e:
        print(f'error: {utils.describe_error(e)}; the captions are in {args.out}', file=sys.stderr)
        return 1
    print(f"{total} caption(s) in {os.path.abspath(args.out)} (captions.jsonl, captions.json, captions.csv"
          f"{', *_attention.png' if draw else ''}{written})")
    return 0


def image_list(args):
    """-> (the image paths to caption, {path: COCO image id} with --coco-json, else None)."""
    if args.coco_json:
        folder = args.img[0]
        ids = {os.path.join(folder, name): i for name, i in formats.coco_image_ids(args.coco_json).items()}
        missing = [p for p in ids if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f'{len(missing)} image(s) of {args.coco_json} are not in {folder}, e.g. {missing[0]}')
        return list(ids), ids
    paths = list_images(args.img)
    if not paths:
        raise FileNotFoundError(f"no jpg/jpeg/png/bmp/webp images in {' '.join(args.img)}")
    return paths, None


def caption_record(image, hyp, args, decoder, rev, tokenizer, image_ids):
    """One line of captions.jsonl: image, caption, score, finished; with --num-captions the captions
    (each with its scores); the encoder's tags; the tag words that guided the caption."""
    out = {'image': image, 'caption': text.join_words(hyp['words'], tokenizer), 'score': round(hyp['score'], 4),
           'finished': hyp['finished']}
    if image_ids is not None:
        out['image_id'] = image_ids[image]
    if args.num_captions > 1:
        out['captions'] = [{'caption': text.join_words(c['words'], tokenizer), 'score': round(c['score'], 4),
                            'norm_score': round(c['norm_score'], 4)}
                           for c in files.alternatives(hyp, decoder, rev, args.num_captions)]
    if hyp.get('tags'):
        out['tags'] = [{'label': t['label'], 'p': t['p']} for t in hyp['tags']]
    if hyp.get('guided'):
        out['guided_by'] = [[rev[i] for i in c] for c in hyp['guided']]
    if hyp.get('dropped_tags'):   # confident, but no word of the model names them: no guide
        out['tags_without_words'] = hyp['dropped_tags']
    return out


def finish_exports(args, sidecars, image_ids):
    """After the merge (rank 0): every caption's sidecar (those an interrupted run or another process
    left unwritten too) and the COCO results. -> what to add to the final line."""
    log, said = os.path.join(args.out, streaming.JSONL), ''
    if sidecars is not None:
        for _, _, r in streaming.read_records(log):
            sidecars.write(r['image'], exports.sidecar_lines(r))
        said += f'; {sidecars.written} sidecar .txt written'
        if sidecars.kept:
            said += f', {len(sidecars.kept)} existing kept (--overwrite replaces them)'
    if image_ids is not None:
        path = os.path.join(args.out, exports.RESULTS_NAME)
        n = exports.write_results(path, ((r['image_id'], r['caption']) for _, _, r in streaming.read_records(log)
                                         if 'image_id' in r))
        said += f'; {n} COCO results in {exports.RESULTS_NAME}'
    return said


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

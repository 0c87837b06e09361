"""CPU latency per photo of a checkpoint in PyTorch and as its ONNX export (onnxruntime), side by side.

    python benchmarks/bench_onnx.py                                   # the provided Lite0 checkpoint
    python benchmarks/bench_onnx.py --checkpoint runs/<name>/BEST_checkpoint_<name>.pt --threads 2 --json

One photo at a time (batch 1, what a deployed captioner serves), beam 3 with 02_inference.py's
defaults: the encoder, the beam search (prepare + steps in Python over the decoder) and their sum,
per photo, median over --repeats passes over the sample photos (assets/samples) after a warm-up pass,
averaged over the photos; PyTorch and ONNX take turns photo by photo.
Both run with --threads intra-op threads (torch.set_num_threads; onnxruntime's intra_op_num_threads).
Decoding and resizing the photo (the same Python code for both) is timed apart. The export is
written to --onnx (default: benchmarks/.data/onnx/<checkpoint name>) unless it is already there.
The load average before and after is reported: on a shared machine the figures move with it.
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from common import environment, peak_rss_mb, report  # noqa: E402

import datasets  # noqa: E402
from captioning.decoding import loading, onnx_captioner, search  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default=loading.PROVIDED_CHECKPOINT, help='checkpoint (default: %(default)s)')
    p.add_argument('--onnx', default='', help='its export folder (default: benchmarks/.data/onnx/<name>)')
    p.add_argument('--images', default=os.path.join(REPO, 'assets', 'samples'), help='photo folder')
    p.add_argument('--beam-size', type=int, default=3)
    p.add_argument('--repeats', type=int, default=5, help='timed passes over the photos (median reported)')
    p.add_argument('--threads', type=int, default=1, help='intra-op threads of both runtimes')
    p.add_argument('--json', action='store_true')
    return p.parse_args(argv)


def time_photos(captioners, images, beam_size, repeats):
    """Per-photo encoder and beam-search seconds of each captioner, medians over the repeats (after one
    warm-up pass), and its captions. The captioners take turns photo by photo, so a shared machine's
    load falls on both alike. -> [((encoder seconds, search seconds), captions)] per captioner."""
    kw = dict(beam_size=beam_size, length_norm=search.DEFAULT_LENGTH_NORM,
              no_repeat_ngram_size=search.DEFAULT_NO_REPEAT_NGRAM)
    times = [([[] for _ in images], [[] for _ in images]) for _ in captioners]
    words = [[] for _ in captioners]
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for i, x in enumerate(images):
                for c, (encoder, decoder, word_map, _) in enumerate(captioners):
                    t0 = time.perf_counter()
                    feats = encoder(x.unsqueeze(0))
                    t1 = time.perf_counter()
                    hyp = search.beam_search(decoder, feats, word_map, **kw)[0]
                    t2 = time.perf_counter()
                    if rep == 0:
                        words[c].append(decoder.words(hyp['tokens'], {v: k for k, v in word_map.items()}))
                    else:
                        times[c][0][i].append(t1 - t0)
                        times[c][1][i].append(t2 - t1)
    return [(([statistics.median(t) for t in enc], [statistics.median(t) for t in search]), w)
            for (enc, search), w in zip(times, words)]


def main(argv=None):
    args = parse_args(argv)
    problem = onnx_captioner.missing('onnxruntime', 'onnx', 'onnxscript')
    if problem:
        print(f'error: this benchmark needs the ONNX extras: {problem}', file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    name = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out = args.onnx or os.path.join(HERE, '.data', 'onnx', name)
    if not os.path.exists(os.path.join(out, onnx_captioner.META_FILE)):
        sys.path.insert(0, os.path.join(REPO, 'tools'))
        import export_onnx
        if export_onnx.main([args.checkpoint, out, '--no-check']) != 0:
            return 1
    load_before = os.getloadavg()
    torch_model = loading.load_captioner(args.checkpoint, 'cpu')
    onnx_model = onnx_captioner.load_onnx_captioner(out, threads=args.threads)
    try:
        paths = datasets.list_images([args.images])
    except (OSError, ValueError) as e:
        paths = []
        print(f'error: {e}', file=sys.stderr)
    if not paths:
        print(f'error: no photos in {args.images}', file=sys.stderr)
        return 1
    transform = datasets.image_transform(torch_model[0])
    t0 = time.perf_counter()
    images = [transform(datasets.load_image(p)) for p in paths]
    prep_ms = (time.perf_counter() - t0) / len(paths) * 1000
    ((pt_enc, pt_search), pt_words), ((ox_enc, ox_search), ox_words) = time_photos(
        [torch_model, onnx_model], images, args.beam_size, args.repeats)
    load_after = os.getloadavg()

    def ms(values):
        return round(statistics.mean(values) * 1000, 1)
    result = {
        'checkpoint': os.path.relpath(args.checkpoint, REPO), 'photos': len(paths), 'beam_size': args.beam_size,
        'repeats': args.repeats, 'threads': args.threads,
        'pytorch_encoder_ms': ms(pt_enc), 'pytorch_beam_search_ms': ms(pt_search),
        'pytorch_total_ms': ms([a + b for a, b in zip(pt_enc, pt_search)]),
        'onnx_encoder_ms': ms(ox_enc), 'onnx_beam_search_ms': ms(ox_search),
        'onnx_total_ms': ms([a + b for a, b in zip(ox_enc, ox_search)]),
        'decode_and_resize_ms': round(prep_ms, 1),
        'captions_equal': f'{sum(a == b for a, b in zip(pt_words, ox_words))} of {len(paths)}',
        'load_average_1min_before_after': [round(load_before[0], 2), round(load_after[0], 2)],
        'peak_rss_mb': peak_rss_mb(), **environment(torch.device('cpu')),
        'onnxruntime': __import__('onnxruntime').__version__,
    }
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

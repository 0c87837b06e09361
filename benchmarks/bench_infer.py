"""Inference throughput: encoder and beam search per batch size and beam size, medians of repeats.

    python benchmarks/bench_infer.py                              # random ResNet101 + sat model, the sample photos
    python benchmarks/bench_infer.py --decoder show_tell          # a random model with another decoder
    python benchmarks/bench_infer.py --checkpoint checkpoints/flickr8k_efficientnet_lite0_fp16.pt
    python benchmarks/bench_infer.py --images DIR --batch-sizes 1 32 --beam-sizes 1 3 5 --tutorial --json

For each (batch size, beam size): encoder ms per image, beam search seconds, decode ms per image per
step (beam-search time / decoding steps summed over the batch's images), images/s end to end (encoder
+ beam search on decoded, transformed images) and the beam search's time relative to the encoder's.
A random model (no --checkpoint) rarely emits <end>, so it decodes --max-len steps per image.
--tutorial also times benchmarks/tutorial_reference.py's one-image-at-a-time beam search.
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import environment, peak_rss_mb, profile_table, report, setup  # noqa: E402
from tutorial_reference import tutorial_beam_search  # noqa: E402

import datasets  # noqa: E402
import models  # noqa: E402
from captioning.decoders import lstm, registry  # noqa: E402
from captioning.decoding import loading, options, quantize, search  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', nargs='+', default=[],
                   help='trained checkpoint, or several (an ensemble) (default: a random model)')
    p.add_argument('--encoder', default='resnet101', help='random model: encoder')
    p.add_argument('--vocab-size', type=int, default=2631, help='random model: vocabulary')
    p.add_argument('--decoder', default='sat', choices=list(registry.DECODERS),
                   help='random model: decoder, with its default sizes (a checkpoint names its own)')
    p.add_argument('--images', default=os.path.join(os.path.dirname(HERE), 'assets', 'samples'),
                   help='image folder (cycled to fill a batch)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    p.add_argument('--beam-sizes', type=int, nargs='+', default=[1, 3, 5])
    p.add_argument('--max-len', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3, help='timed repeats (median reported)')
    p.add_argument('--tutorial', action='store_true', help='also time the tutorial beam search')
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--json', action='store_true')
    quantize.add_argument(p)
    options.add_mirror_argument(p)
    p.add_argument('--profile', action='store_true', help='print a torch.profiler table of each beam search')
    return p.parse_args(argv)


def median_time(fn, repeats, device):
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def load_model(args, device):
    if args.checkpoint:
        encoder, decoder, word_map, config = loading.load_captioner(args.checkpoint, device, mirror=args.mirror)
        name = loading.checkpoint_label(args.checkpoint, basename=True) + (' (mirrored too)' if args.mirror else '')
        return encoder, decoder, word_map, f"{name} ({config['decoder']})"
    torch.manual_seed(0)
    encoder = models.Encoder(args.encoder, 'none')
    decoder = registry.build_decoder(args.decoder, args.vocab_size, encoder.encoder_dim)
    word_map = {f'w{i}': i for i in range(args.vocab_size - 3)}
    word_map.update({'<start>': args.vocab_size - 3, '<end>': args.vocab_size - 2, '<unk>': args.vocab_size - 1})
    return encoder.to(device).eval(), decoder.to(device).eval(), word_map, f'random {args.encoder} + {args.decoder}'


@torch.inference_mode()
def main(argv=None):
    args = parse_args(argv)
    device = setup(args.device, args.threads)
    encoder, decoder, word_map, model_name = load_model(args, device)
    decoder, precision = quantize.apply_precision_or_exit(decoder, args.precision, device)
    transform = datasets.image_transform(encoder)
    paths = datasets.list_images(args.images)
    pool = [transform(datasets.load_image(p, transform.size)) for p in paths]
    rows = []
    for B in args.batch_sizes:
        images = torch.stack([pool[i % len(pool)] for i in range(B)]).to(device)
        enc_s, enc = median_time(lambda: encoder(images), args.repeats, device)
        for k in args.beam_sizes:
            beam_s, hyps = median_time(lambda: search.beam_search(decoder, enc, word_map, beam_size=k,
                                                                   max_len=args.max_len), args.repeats, device)
            steps = sum(h['steps'] for h in hyps)
            if args.profile:
                print(f'beam search, batch {B}, beam {k}:', file=sys.stderr)
                print(profile_table(lambda: search.beam_search(decoder, enc, word_map, beam_size=k,
                                                                max_len=args.max_len)), file=sys.stderr)
            rows.append({'batch_size': B, 'beam_size': k, 'encoder_ms_per_image': round(enc_s / B * 1000, 2),
                         'beam_s': round(beam_s, 4), 'decode_steps': steps,
                         'decode_ms_per_image_step': round(beam_s / steps * 1000, 3),
                         'images_per_s': round(B / (enc_s + beam_s), 2),
                         'beam_over_encoder': round(beam_s / enc_s, 3)})
    if args.tutorial and not isinstance(decoder, lstm.ShowAttendTell):
        print('note: --tutorial times the tutorial\'s beam search, which needs the sat decoder: skipped',
              file=sys.stderr)
    elif args.tutorial:
        enc1 = encoder(torch.stack(pool[:1]).to(device))
        for k in args.beam_sizes:
            tut_s, (_, steps) = median_time(lambda: tutorial_beam_search(decoder, enc1, word_map, k, args.max_len),
                                            args.repeats, device)
            rows.append({'batch_size': 1, 'beam_size': k, 'tutorial_formulation': True, 'beam_s': round(tut_s, 4),
                         'decode_steps': steps, 'decode_ms_per_image_step': round(tut_s / steps * 1000, 3)})
    result = {'benchmark': 'infer', 'model': model_name, 'precision': precision, 'image_size': encoder.image_size,
              'grid': getattr(encoder, 'encoded_image_size', None), 'max_len': args.max_len, 'results': rows,
              'peak_rss_mb': peak_rss_mb(), **environment(device)}
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The self-critical reward's cost against the training step it serves.

    python benchmarks/bench_cider.py                                   # the synthetic set, random tiny model
    python benchmarks/bench_cider.py --data-folder data/flickr8k \\
        --init-from checkpoints/flickr8k_efficientnet_lite0_fp16.pt    # Flickr8k TRAIN refs, the shipped model

Builds 01_train.py's Trainer with --objective scst (cached features; the cache must exist or is built
first), then times, each as the median of --repeats runs:
  reward_build_s  tokenising the TRAIN references and building cider.CiderD (once per run)
  reward_ms       CIDEr-D of one batch of samples (--batch-size captions -> images x --samples
                  samples), drawn by the model from the data's first batch
  step_ms         one whole self-critical training step (Trainer.train_step: sampling, reward,
                  re-scoring, backward, optimiser)
and the share of the step the reward takes. --json prints one JSON object.
"""
import argparse
import importlib
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_train import ensure_synthetic_data  # noqa: E402
from common import environment, peak_rss_mb, report, setup  # noqa: E402

from captioning.decoders.interface import words_of  # noqa: E402
from captioning.decoding.search import sample_captions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-folder', default='', help='prepared dataset (default: synthetic set under benchmarks/.data)')
    p.add_argument('--init-from', default='', help='checkpoint for the model (default: a random one, see --encoder)')
    p.add_argument('--encoder', default='resnet18', help='without --init-from (default: %(default)s)')
    p.add_argument('--image-size', type=int, default=64, help='without --init-from (default: %(default)s)')
    p.add_argument('--dim', type=int, default=0, help="without --init-from: embedding, attention and LSTM size "
                   "(0: the decoder's own)")
    p.add_argument('--batch-size', type=int, default=32, help='captions per step: whole images (default: %(default)s)')
    p.add_argument('--samples', type=int, default=5, help='samples per image (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    p.add_argument('--repeats', type=int, default=10, help='timed steps (the median is reported)')
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    return p.parse_args(argv)


def median_ms(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def main(argv=None):
    args = parse_args(argv)
    device = setup(args.device, args.threads)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    folder = args.data_folder or ensure_synthetic_data()
    train = importlib.import_module('01_train')
    model = (['--init-from', args.init_from] if args.init_from else
             ['--encoder', args.encoder, '--encoder-weights', 'none', '--image-size', str(args.image_size),
              *(a for k in ('--emb-dim', '--attention-dim', '--decoder-dim') for a in (k, str(args.dim)) if args.dim)])
    argv = ['--data-folder', folder, *model, '--objective', 'scst', '--scst-samples', str(args.samples),
            '--batch-size', str(args.batch_size), '--workers', '0', '--device', args.device, '--cache-features',
            '--out-dir', os.path.join(HERE, '.data', 'bench_cider_run'), '--overwrite']
    trainer = train.Trainer(argv, 0, 1, device)
    trainer.train_encoder.train()
    trainer.train_model.train()
    objective = trainer.objective

    build = []                                   # the reward's one-time cost, twice (the first warms caches)
    for _ in range(2):
        start = time.perf_counter()
        trainer._train_reward()
        build.append(time.perf_counter() - start)

    trainer.sampler.set_epoch(0)
    loader = iter(trainer.train_loader)
    idx, x, _, _ = next(loader)
    enc = trainer.encode(trainer.encoder, x)
    u = torch.rand(len(idx) * args.samples, objective.max_len, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    tokens, lengths, _ = sample_captions(trainer.decoder, enc, trainer.word_map, args.samples, objective.max_len,
                                         uniforms=u)
    rev = {v: k for k, v in trainer.word_map.items()}
    images = idx.repeat_interleave(args.samples).tolist()
    cands = [words_of(row[:n], rev) for row, n in zip(tokens.tolist(), lengths.tolist())]
    reward_ms, _ = median_ms(lambda: objective.reward.scores(images, cands), args.warmup + args.repeats, sync)
    score_ms, _ = median_ms(lambda: objective.score(idx.repeat_interleave(args.samples), tokens, lengths),
                            args.warmup + args.repeats, sync)

    def step():
        try:
            batch = next(step.loader)
        except StopIteration:
            step.loader = iter(trainer.train_loader)
            batch = next(step.loader)
        trainer.train_step(*batch)
        trainer.state['step'] += 1
    step.loader = loader
    for _ in range(args.warmup):
        step()
    step_ms, steps = median_ms(step, args.repeats, sync)
    result = {'benchmark': 'cider_reward', 'data_name': trainer.config['data_name'],
              'decoder': trainer.config['decoder'], 'train_images': trainer.train_set.num_images,
              'ngrams': len(objective.reward.ids), 'images_per_step': len(idx), 'samples_per_image': args.samples,
              'mean_sample_words': round(sum(map(len, cands)) / len(cands), 2),
              'reward_build_s': round(min(build), 3), 'reward_ms': round(reward_ms, 3),
              'reward_with_word_ids_ms': round(score_ms, 3), 'step_ms': round(step_ms, 1),
              'step_ms_each': [round(t, 1) for t in steps],
              'reward_share_of_step': round(score_ms / step_ms, 4), 'peak_rss_mb': peak_rss_mb(),
              **environment(device)}
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

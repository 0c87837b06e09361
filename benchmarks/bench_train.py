"""Training throughput: captions/s of the optimisation step, median of several timed windows.

    python benchmarks/bench_train.py --synthetic-features              # decoder only, tutorial's Flickr8k setting
    python benchmarks/bench_train.py --synthetic-features --decoder show_tell   # any decoder of the registry
    python benchmarks/bench_train.py --synthetic-features --tutorial   # the same, the tutorial's way
    python benchmarks/bench_train.py --data-folder DIR --source cache  # 01_train.py's step from the feature cache
    python benchmarks/bench_train.py --data-folder DIR --source images # ... encoder on images, once per image
    python benchmarks/bench_train.py --data-folder DIR --source images --tutorial   # encoder once per caption

--synthetic-features: random 14x14x2048 features (frozen ResNet101's shape), a 2,631-word
vocabulary and Flickr8k-like caption lengths, batch 32, dims 512/512/512 (--dim; for the decoders
that have them: emb_dim, attention_dim, decoder_dim, and clipcap's lm_dim): no data or cache needed.
Without it, the prepared dataset in --data-folder (default: the synthetic set, built on first use
under benchmarks/.data) is trained through 01_train.py's own Trainer.train_step. --tutorial runs
benchmarks/tutorial_reference.py: attention projection recomputed every step, padded outputs, and
(with images) the encoder run once per caption. --json prints one JSON object.
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

from common import environment, peak_rss_mb, profile_table, report, setup  # noqa: E402
from tutorial_reference import tutorial_loss  # noqa: E402

from captioning.decoders import interface, registry  # noqa: E402

FLICKR8K_WORDS_MEAN, FLICKR8K_WORDS_SD = 11.8, 3.8     # caption length in words (Flickr8k train)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--synthetic-features', action='store_true', help='decoder from random features')
    p.add_argument('--tutorial', action='store_true', help='the tutorial formulation (the "before"; decoder sat)')
    p.add_argument('--decoder', default='sat', choices=list(registry.DECODERS), help='(default: %(default)s)')
    p.add_argument('--data-folder', default='', help='prepared dataset (default: synthetic set under benchmarks/.data)')
    p.add_argument('--data-name', default='')
    p.add_argument('--source', choices=('cache', 'images'), default='cache', help='features from the cache or images')
    p.add_argument('--encoder', default='resnet101')
    p.add_argument('--encoder-weights', default='none', help='none (random: same speed) | imagenet | file')
    p.add_argument('--image-size', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=32, help='captions per step')
    p.add_argument('--vocab-size', type=int, default=2631)
    p.add_argument('--dim', type=int, default=512, help='embedding, attention and LSTM size (0: the decoder\'s own sizes)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first')
    p.add_argument('--steps', type=int, default=5, help='steps per timed window')
    p.add_argument('--windows', type=int, default=5, help='timed windows (the median is reported)')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.add_argument('--profile', action='store_true', help='also print a torch.profiler table of one window')
    return p.parse_args(argv)


def timed(step, n_captions, args, device):
    """Run `step` (returns captions done) for warm-up + windows; median captions/s."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if args.profile:
        print(profile_table(lambda: [step() for _ in range(args.steps)]), file=sys.stderr)
    rates = []
    for _ in range(args.windows):
        start, done = time.perf_counter(), 0
        for _ in range(args.steps):
            done += step()
        sync()
        rates.append(done / (time.perf_counter() - start))
    return statistics.median(rates), rates


def synthetic_feature_batches(vocab_size, batch_size, device, n=8, seed=0):
    """n batches of (features [B, 14, 14, 2048], captions [B, 52], lengths [B]): random features of a
    frozen ResNet101's shape, one image per caption as the tutorial, and Flickr8k-like caption lengths
    (<start> words <end>, then random filler that the lengths mask out). Also bench_tutorial.py's input."""
    g = torch.Generator().manual_seed(seed)
    V, B = vocab_size, batch_size
    batches = []
    for _ in range(n):
        words = (torch.randn(B, generator=g) * FLICKR8K_WORDS_SD + FLICKR8K_WORDS_MEAN).round().clamp(3, 35).long()
        lengths = words + 2
        caps = torch.randint(1, V - 3, (B, 52), generator=g)
        caps[:, 0] = V - 2
        caps[torch.arange(B), lengths - 1] = V - 1
        feats = torch.randn(B, 14, 14, 2048, generator=g)
        batches.append((feats.to(device), caps.to(device), lengths.to(device)))
    return batches


def synthetic_features_bench(args, device):
    V, B = args.vocab_size, args.batch_size
    decoder = registry.build_decoder(args.decoder, V, 2048, dropout=0.5, **dims(args)).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4, fused=device.type in ('cpu', 'cuda'))  # as 01_train
    batches = synthetic_feature_batches(V, B, device)
    state = {'i': 0}

    def step():
        feats, caps, lengths = batches[state['i'] % len(batches)]
        state['i'] += 1
        if args.tutorial:
            loss = tutorial_loss(decoder, feats, caps, lengths)
        else:
            loss = interface.caption_loss(decoder(feats, caps, lengths))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(decoder.parameters(), 5.0)
        optimizer.step()
        return B
    return timed(step, B, args, device), {'mode': 'synthetic-features', 'vocab_size': V, 'grid': '14x14x2048',
                                          'parameters': sum(p.numel() for p in decoder.parameters())}


def dims(args):
    """--dim for each size setting the chosen decoder has."""
    if not args.dim:                    # 0: the decoder's own sizes (dot_attention 256/512/768, show_tell 256/256)
        return {}
    fields = registry.decoder_fields(args.decoder)
    return {k: args.dim for k in ('emb_dim', 'attention_dim', 'decoder_dim', 'lm_dim') if k in fields}


def ensure_synthetic_data():
    folder = os.path.join(HERE, '.data', 'synthetic')
    if not os.path.exists(os.path.join(folder, 'WORDMAP_synthetic_5_cap_per_img_5_min_word_freq.json')):
        importlib.import_module('00_create_input_files').main(['--output-folder', folder])
    return folder


def dataset_bench(args, device):
    """01_train.py's Trainer on a prepared dataset; --tutorial: encoder per caption + tutorial decoder."""
    folder = args.data_folder or ensure_synthetic_data()
    train = importlib.import_module('01_train')
    argv = ['--data-folder', folder, '--encoder', args.encoder, '--encoder-weights', args.encoder_weights,
            '--batch-size', str(args.batch_size), '--workers', str(args.workers), '--device', args.device,
            '--decoder', args.decoder, *[a for k, v in dims(args).items() for a in ('--' + k.replace('_', '-'), str(v))],
            '--out-dir', os.path.join(HERE, '.data', 'bench_run'),
            '--cache-features' if args.source == 'cache' and not args.tutorial else '--no-cache-features']
    if args.data_name:
        argv += ['--data-name', args.data_name]
    if args.image_size:
        argv += ['--image-size', str(args.image_size)]
    if args.tutorial:
        argv += ['--no-channels-last']          # the tutorial's encoder memory layout
    trainer = train.Trainer(argv, 0, 1, device)
    trainer.train_encoder.train()
    trainer.train_model.train()
    info = {'mode': f"dataset/{'tutorial-images' if args.tutorial else args.source}",
            'data_name': trainer.config['data_name'], 'encoder': trainer.encoder.name,
            'image_size': trainer.encoder.image_size, 'grid': trainer.encoder.encoded_image_size,
            'captions_per_step': trainer.images_per_batch * trainer.cpi}
    if args.tutorial:
        from torch.utils.data import DataLoader

        import datasets
        ds = datasets.CaptionDataset(folder, trainer.config['data_name'], 'TRAIN',
                                     datasets.ImageTransform(**trainer.encoder.transform_config()))
        loader = iter(DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                 generator=torch.Generator().manual_seed(0)))
        info['captions_per_step'] = args.batch_size

        def step():
            imgs, caps, lens = next(loader)
            with torch.no_grad():
                enc = trainer.encoder(imgs.to(device))                  # once per caption
            loss = tutorial_loss(trainer.decoder, enc, caps.to(device), lens.to(device))
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(trainer.params, 5.0)
            trainer.optimizer.step()
            return len(caps)
    else:
        trainer.sampler.set_epoch(0)
        loader = iter(trainer.train_loader)

        def step():
            idx, x, caps, lens = next(loader)
            return trainer.train_step(idx, x, caps, lens)[2] * trainer.cpi   # images -> captions
    return timed(step, args.batch_size, args, device), info


def main(argv=None):
    args = parse_args(argv)
    if args.tutorial and args.decoder != 'sat':
        print('error: --tutorial is the tutorial\'s Show, Attend and Tell: use it with --decoder sat', file=sys.stderr)
        return 2
    device = setup(args.device, args.threads)
    (rate, rates), info = (synthetic_features_bench if args.synthetic_features else dataset_bench)(args, device)
    result = {'benchmark': 'train', 'decoder': args.decoder, **info, 'tutorial_formulation': args.tutorial, 'captions_per_s': round(rate, 2),
              'window_captions_per_s': [round(r, 2) for r in rates], 'batch_size': args.batch_size,
              'dims': args.dim, 'peak_rss_mb': peak_rss_mb(), **environment(device)}
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

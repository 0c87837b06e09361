"""Preparation time of 00_create_input_files.py: median of several runs into a fresh folder.

    python benchmarks/bench_prep.py                                    # an 8,000-image synthetic source
    python benchmarks/bench_prep.py --hdf5
    python benchmarks/bench_prep.py --karpathy-json ../shared/datasets/flickr8k/dataset_flickr8k.json \\
        --image-folder ../shared/datasets/flickr8k/images --dataset flickr8k [--hdf5] --json

'seconds' times the preparation inside one process (imports done); 'wall_seconds' times a fresh
`python 00_create_input_files.py ...` as a user runs it (interpreter start and imports included).
"""
import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from common import peak_rss_mb, report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--karpathy-json', default='')
    p.add_argument('--image-folder', default='')
    p.add_argument('--dataset', default='synthetic')
    p.add_argument('--synthetic-images', type=int, default=8000, help='size of the default synthetic source')
    p.add_argument('--hdf5', action='store_true')
    p.add_argument('--image-size', type=int, default=256)
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--json', action='store_true')
    return p.parse_args(argv)


def synthetic_source(n):
    """A synthetic Karpathy JSON + 224 px images, generated once under benchmarks/.data."""
    from captioning.preparation import synthetic
    folder = os.path.join(HERE, '.data', f'prep_source_{n}')
    json_path = os.path.join(folder, 'dataset_synthetic.json')
    if not os.path.exists(json_path):
        synthetic.generate(folder, n - 2 * (n // 10), n // 10, n // 10, image_size=224, seed=0)
    return json_path, os.path.join(folder, 'images')


def main(argv=None):
    args = parse_args(argv)
    if args.karpathy_json:
        source, images = args.karpathy_json, args.image_folder
    else:
        source, images = synthetic_source(args.synthetic_images)
    prep = importlib.import_module('00_create_input_files')
    flags = ['--dataset', args.dataset, '--karpathy-json', source, '--image-folder', images,
             '--image-size', str(args.image_size)] + (['--hdf5'] if args.hdf5 else [])
    seconds, wall = [], []
    for _ in range(args.runs):
        out = tempfile.mkdtemp(prefix='bench_prep_')
        try:
            start = time.perf_counter()
            assert prep.main(flags + ['--output-folder', out]) == 0
            seconds.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(out)
        out = tempfile.mkdtemp(prefix='bench_prep_')
        try:
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(REPO, '00_create_input_files.py'), *flags,
                            '--output-folder', out], check=True, capture_output=True)
            wall.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(out)
    summary = json.load(open(source))
    n_images = len(summary['images'])
    n_captions = sum(len(i['sentences']) for i in summary['images'])
    result = {'benchmark': 'prep', 'source': os.path.basename(source), 'images': n_images, 'captions': n_captions,
              'hdf5': args.hdf5, 'image_size': args.image_size if args.hdf5 else None,
              'seconds': round(statistics.median(seconds), 2), 'wall_seconds': round(statistics.median(wall), 2),
              'runs': args.runs, 'peak_rss_mb': peak_rss_mb(), 'cpus': os.cpu_count()}
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

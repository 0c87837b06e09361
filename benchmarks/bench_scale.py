"""Scale: 00's time and peak memory on COCO-size sets, 02's memory growth and speed over thousands of
photos, and 02's resume after a kill -9. Every step runs the real script in a fresh process.

    python benchmarks/bench_scale.py                                      # the full sizes (an idle machine)
    python benchmarks/bench_scale.py --prep-sizes 10000 --infer-sizes 500 1000 2000 --resume-images 1000

The images are hard links to a few real Flickr8k photos (--images), under benchmarks/.data/scale:
  - 00: a Karpathy JSON shaped like dataset_coco.json (train/restval/val/test in COCO's proportions,
    5 captions per image, a Zipf-distributed vocabulary of --vocab-size words) over --prep-sizes images;
    `00_create_input_files.py --dataset coco` on it: seconds and peak RSS.
  - 02: `02_inference.py` over --infer-sizes images with a tiny model made here (resnet18 at 64 px, a
    32-unit decoder, one epoch on 24 synthetic images: about random), so the figures are about the
    pipeline (listing, reading, the log, the merge), not a model; peak RSS, images/s (the captioning
    part of the run) and the RSS growth per 1,000 images (a least-squares slope over the sizes).
  - resume: the same run over --resume-images images killed with SIGKILL at about half, then run
    again; every image must be captioned exactly once.

What the hard links cannot show: disk and JPEG-decode throughput of a real collection (a few files
stay in the page cache), GPU speed, and a real model's cost per image (the tiny one is chosen so the
pipeline shows). Peak RSS is the largest process of each run (the script or one of its workers).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from common import report  # noqa: E402

DATA = os.path.join(HERE, '.data', 'scale')
FLICKR8K = os.path.join(REPO, '..', 'shared', 'datasets', 'flickr8k', 'images')   # this workplace's copy
SAMPLES = os.path.join(REPO, 'assets', 'samples')                                  # elsewhere: the samples
COCO_SPLITS = {'train': 82783, 'restval': 30504, 'val': 5000, 'test': 5000}   # Karpathy's COCO: 123,287 images
TINY = ['--encoder', 'resnet18', '--encoder-weights', 'none', '--image-size', '64', '--encoded-image-size', '2',
        '--emb-dim', '16', '--attention-dim', '16', '--decoder-dim', '32', '--workers', '0']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', default=FLICKR8K if os.path.isdir(FLICKR8K) else SAMPLES,
                   help='folder of real photos to hard-link (default: %(default)s)')
    p.add_argument('--distinct', type=int, default=8, help='how many of them (default: %(default)s)')
    p.add_argument('--prep-sizes', type=int, nargs='*', default=[10000, 50000, 123287])
    p.add_argument('--vocab-size', type=int, default=25000, help='words of the generated captions')
    p.add_argument('--infer-sizes', type=int, nargs='*', default=[1000, 5000, 20000])
    p.add_argument('--resume-images', type=int, default=5000, help='0: no resume check')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--max-len', type=int, default=20, help="02's --max-len (the tiny model rarely ends early)")
    p.add_argument('--json', action='store_true')
    return p.parse_args(argv)


def run_measured(cmd, **kw):
    """Run cmd in a wrapper that reports the peak RSS of cmd's own process tree (os.wait4)."""
    wrapper = ('import json, os, subprocess, sys\n'
               'p = subprocess.Popen(sys.argv[1:])\n'
               '_, status, usage = os.wait4(p.pid, 0)\n'
               'print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "rss_mb": round(usage.ru_maxrss / 1024)}),'
               ' file=sys.stderr)\n')
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', wrapper, *cmd], capture_output=True, text=True, **kw)
    seconds = time.perf_counter() - start
    info = json.loads(done.stderr.strip().splitlines()[-1])
    if info['rc'] != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({info['rc']}): {done.stderr[-2000:]}")
    return done.stdout, seconds, info['rss_mb']


def real_photos(args):
    """`--distinct` real photos copied once under DATA (hard links to them then stay on one file system)."""
    folder = os.path.join(DATA, 'originals')
    names = sorted(f for f in os.listdir(args.images) if f.lower().endswith(('.jpg', '.jpeg', '.png')))
    if len(names) < args.distinct:
        raise SystemExit(f'error: --images {args.images}: needs {args.distinct} photos, has {len(names)}')
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names[:args.distinct]:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            shutil.copyfile(os.path.join(args.images, name), path)
        paths.append(path)
    return paths


def link_folder(folder, names, originals):
    """Hard links `folder`/name -> originals[i % len] (made once)."""
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.link(originals[i % len(originals)], path)


def coco_like(n, originals, vocab_size, seed=0):
    """A Karpathy JSON of n COCO-named images (COCO's split proportions) over hard links -> (json, image folder)."""
    folder = os.path.join(DATA, f'coco_{n}')
    path = os.path.join(folder, 'dataset_coco.json')
    if os.path.exists(path):
        return path, os.path.join(folder, 'images')
    rng = np.random.default_rng(seed)
    counts = {s: round(c * n / sum(COCO_SPLITS.values())) for s, c in COCO_SPLITS.items()}
    counts['train'] += n - sum(counts.values())
    splits = [s for s, c in counts.items() for _ in range(c)]
    words = np.array([f'w{i}' for i in range(vocab_size)])
    probs = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    probs /= probs.sum()
    lengths = rng.integers(8, 16, size=5 * n)
    tokens = rng.choice(vocab_size, size=int(lengths.sum()), p=probs)
    ends = np.cumsum(lengths)
    images, names = [], []
    for i, split in enumerate(splits):
        sub = 'val2014' if split in ('val', 'test', 'restval') else 'train2014'
        name = f'COCO_{sub}_{i:012d}.jpg'
        names.append(os.path.join(sub, name))
        sentences = []
        for j in range(5 * i, 5 * i + 5):
            toks = words[tokens[ends[j] - lengths[j]:ends[j]]].tolist()
            sentences.append({'tokens': toks, 'raw': ' '.join(toks).capitalize() + '.', 'imgid': i, 'sentid': j})
        images.append({'filepath': sub, 'filename': name, 'imgid': i, 'split': split, 'cocoid': i,
                       'sentids': list(range(5 * i, 5 * i + 5)), 'sentences': sentences})
    link_folder(os.path.join(folder, 'images'), names, originals)
    with open(path + '.tmp', 'w') as f:
        json.dump({'images': images, 'dataset': 'coco'}, f)
    os.replace(path + '.tmp', path)
    return path, os.path.join(folder, 'images')


def tiny_checkpoint():
    """A tiny model trained for one epoch on 24 synthetic images (about random), made once."""
    folder = os.path.join(DATA, 'tiny')
    ckpt = os.path.join(folder, 'run', 'BEST_checkpoint_synthetic_5_cap_per_img_2_min_word_freq.pt')
    if not os.path.exists(ckpt):
        py = sys.executable
        subprocess.run([py, os.path.join(REPO, '00_create_input_files.py'),
                        '--output-folder', os.path.join(folder, 'data'),
                        '--synthetic-images', '30', '--synthetic-image-size', '64', '--min-word-freq', '2'],
                       check=True, capture_output=True)
        subprocess.run([py, os.path.join(REPO, '01_train.py'), '--data-folder', os.path.join(folder, 'data'),
                        '--out-dir', os.path.join(folder, 'run'), '--epochs', '1', '--batch-size', '20', *TINY],
                       check=True, capture_output=True)
    return ckpt


def prep(n, originals, args):
    source, images = coco_like(n, originals, args.vocab_size)
    out = os.path.join(DATA, f'prepared_{n}')
    shutil.rmtree(out, ignore_errors=True)
    try:
        _, seconds, rss = run_measured([sys.executable, os.path.join(REPO, '00_create_input_files.py'),
                                        '--dataset', 'coco', '--karpathy-json', source, '--image-folder', images,
                                        '--output-folder', out])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {'images': n, 'captions': 5 * n, 'seconds': round(seconds, 1), 'peak_rss_mb': rss}


def infer_cmd(folder, out, ckpt, args):
    return [sys.executable, os.path.join(REPO, '02_inference.py'), '--img', folder, '--checkpoint', ckpt,
            '--out', out, '--batch-size', str(args.batch_size), '--max-len', str(args.max_len), '--device', 'cpu']


def photo_folder(n, originals):
    folder = os.path.join(DATA, f'photos_{n}')
    link_folder(folder, [f'photo_{i:07d}.jpg' for i in range(n)], originals)
    return folder


def infer(n, originals, ckpt, args):
    out = os.path.join(DATA, f'captions_{n}')
    shutil.rmtree(out, ignore_errors=True)
    stdout, seconds, rss = run_measured(infer_cmd(photo_folder(n, originals), out, ckpt, args) + ['--overwrite'])
    m = re.search(r'(\d+) image\(s\) captioned in ([\d.]+) s', stdout)
    captioned, captioning_s = int(m.group(1)), float(m.group(2))
    count = sum(1 for _ in open(os.path.join(out, 'captions.jsonl')))
    shutil.rmtree(out, ignore_errors=True)
    return {'images': n, 'captions': count, 'peak_rss_mb': rss, 'seconds': round(seconds, 1),
            'images_per_s': round(captioned / captioning_s, 1)}


def resume(n, originals, ckpt, args):
    """Kill -9 at about half, run the same command again, count the captions."""
    out = os.path.join(DATA, 'resume')
    shutil.rmtree(out, ignore_errors=True)
    cmd = infer_cmd(photo_folder(n, originals), out, ckpt, args)
    log = os.path.join(out, 'captions.jsonl')
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = 0
    while proc.poll() is None and lines < n // 2:
        time.sleep(0.2)
        if os.path.exists(log):
            with open(log, 'rb') as f:
                lines = f.read().count(b'\n')
    killed = proc.poll() is None   # False: the run ended before half was seen (too small to kill)
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(log, 'rb') as f:
        at_kill = f.read().count(b'\n')
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r'resuming: (\d+) of', done.stdout)
    images = [json.loads(line)['image'] for line in open(log, encoding='utf-8')]
    result = {'images': n, 'killed': killed, 'captions_at_kill': at_kill,
              'skipped_on_resume': int(m.group(1)) if m else 0,
              'captions_after': len(images), 'distinct_images': len(set(images)),
              'every_image_once': len(images) == len(set(images)) == n}
    shutil.rmtree(out, ignore_errors=True)
    return result


def slope_mb_per_1000(rows):
    """Least-squares slope of peak RSS over images, per 1,000 images."""
    if len(rows) < 2:
        return None
    x = np.array([r['images'] for r in rows], dtype=float)
    y = np.array([r['peak_rss_mb'] for r in rows], dtype=float)
    return round(float(np.polyfit(x, y, 1)[0] * 1000), 3)


def main(argv=None):
    args = parse_args(argv)
    originals = real_photos(args)
    load = os.getloadavg()
    result = {'benchmark': 'scale', 'cpus': os.cpu_count(), 'load_avg_1m_at_start': round(load[0], 2),
              'distinct_photos': len(originals)}
    result['prep'] = [prep(n, originals, args) for n in args.prep_sizes]
    ckpt = tiny_checkpoint() if args.infer_sizes or args.resume_images else None
    result['infer'] = [infer(n, originals, ckpt, args) for n in args.infer_sizes]
    result['infer_rss_growth_mb_per_1000_images'] = slope_mb_per_1000(result['infer'])
    if args.resume_images:
        result['resume'] = resume(args.resume_images, originals, ckpt, args)
    result['load_avg_1m_at_end'] = round(os.getloadavg()[0], 2)
    report(result, args.json)
    return 0 if not args.resume_images or result['resume']['every_image_once'] else 1


if __name__ == '__main__':
    sys.exit(main())

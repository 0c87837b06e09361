"""Image files on disk -> captions with 02_inference.py: photos/s and peak memory, per runtime, batch size,
reader (--workers/--loader), photo size, with the page cache warm and (as root) cold.

    python benchmarks/bench_files.py                          # 200 Flickr8k photos + 200 12 MP JPEGs
    python benchmarks/bench_files.py --photos 100 --large 50 --runtimes torch onnx --batch-sizes 1 16 --json

Photos: --photos distinct files of --images (the Flickr8k folder of this workplace, read in place,
never copied), and --large 12 MP (4000 x 3000) JPEGs made once by upscaling the first of them into
benchmarks/.data/files_12mp/ (git-ignored; JPEG quality 90, about 2 MB each). Every run is a fresh
`02_inference.py` process (the default model: the provided pair, --precision auto) over the whole set
into a new --out; photos/s is its own "captioned in S s" line (loading the model is not counted),
peak memory the process's maximum resident size (os.wait4). "cold" drops the page cache before the
run (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only; skipped otherwise).

Stages (--stages, in this process, the same threads): per photo, reading the file's bytes, decoding
and resizing it (datasets.ImageFiles, one thread), the encoder and the beam search on batches of
--stage-batch: what bounds the pipeline, and how far it is from that bound.
"""
import argparse
import json
import os
import re
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

IMAGES = os.path.join(REPO, '..', 'shared', 'datasets', 'flickr8k', 'images')
LARGE_DIR = os.path.join(HERE, '.data', 'files_12mp')
LARGE_SIZE = (4000, 3000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', default=IMAGES, help='folder of photos (default: %(default)s)')
    p.add_argument('--photos', type=int, default=200, help='distinct photos of --images (default: %(default)s)')
    p.add_argument('--large', type=int, default=200, help='12 MP upscales (0: none) (default: %(default)s)')
    p.add_argument('--runtimes', nargs='+', default=['torch', 'onnx'], help='(default: %(default)s)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16], help='(default: %(default)s)')
    p.add_argument('--readers', nargs='+', default=['0', 'threads:1', 'processes:1'],
                   help="02's reading: 0 (in the main thread), threads:N, processes:N (default: %(default)s)")
    p.add_argument('--caches', nargs='+', default=['warm', 'cold'], help='(default: %(default)s)')
    p.add_argument('--repeats', type=int, default=1, help='runs per setting, median reported (default: %(default)s)')
    p.add_argument('--stages', action=argparse.BooleanOptionalAction, default=True,
                   help='also time the stages in this process (default: %(default)s)')
    p.add_argument('--stage-batch', type=int, default=16)
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='more flags for 02_inference.py')
    p.add_argument('--json', action='store_true')
    return p.parse_args(argv)


def make_large(sources, n):
    """n 12 MP JPEGs upscaled from `sources`, made once into LARGE_DIR -> their paths."""
    from PIL import Image
    os.makedirs(LARGE_DIR, exist_ok=True)
    out = []
    for src in sources[:n]:
        path = os.path.join(LARGE_DIR, os.path.splitext(os.path.basename(src))[0] + '_12mp.jpg')
        if not os.path.exists(path):
            with Image.open(src) as im:
                big = im.convert('RGB').resize(LARGE_SIZE, Image.BICUBIC)
            tmp = path + f'.{os.getpid()}.tmp'
            big.save(tmp, 'JPEG', quality=90)
            os.replace(tmp, path)
        out.append(path)
    return out


def drop_caches():
    """Drop the page cache (root); False when this process may not."""
    try:
        os.sync()
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
        return True
    except OSError:
        return False


def run_02(paths, runtime, batch_size, reader, extra):
    """One 02_inference.py process over `paths` -> (captioned, seconds captioning, process wall seconds,
    the process's peak resident memory in MB)."""
    out = tempfile.mkdtemp(prefix='bench_files_')
    loader, workers = reader.split(':') if ':' in reader else ('threads', reader)
    cmd = [sys.executable, os.path.join(REPO, '02_inference.py'), '--img', *paths, '--out', os.path.join(out, 'o'),
           '--runtime', runtime, '--batch-size', str(batch_size), '--workers', workers, '--loader', loader,
           '--no-tags', '--guide', 'off', *extra]
    t0 = time.perf_counter()
    with open(os.path.join(out, 'stdout'), 'w+') as so, open(os.path.join(out, 'stderr'), 'w+') as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)          # the child's own peak resident size
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    shutil.rmtree(out, ignore_errors=True)
    m = re.search(r'(\d+) image\(s\) captioned in ([\d.]+) s', stdout)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f'02_inference.py failed ({proc.returncode}): {stderr[-2000:]}')
    return int(m.group(1)), float(m.group(2)), wall, round(usage.ru_maxrss / 1024)


def stages(paths, runtime, batch):
    """Per photo ms: read bytes, decode + resize (one thread), encoder and beam search at `batch`."""
    import torch

    import datasets
    from captioning.decoding import loading, quantize, runtime as runtimes, search
    encoder, decoder, word_map, config = loading.load_captioner(loading.DEFAULT_CHECKPOINTS, 'cpu', runtime=runtime)
    decoder, _ = quantize.apply_precision(decoder, 'auto', 'cpu')
    t0 = time.perf_counter()
    for p in paths:
        with open(p, 'rb') as f:
            f.read()
    read = (time.perf_counter() - t0) / len(paths)
    files = datasets.ImageFiles(paths, datasets.image_transform(encoder))
    t0 = time.perf_counter()
    items = [files[i][0] for i in range(len(paths))]
    decode = (time.perf_counter() - t0) / len(paths)
    enc_t, search_t = 0.0, 0.0
    with torch.inference_mode():
        for i in range(0, len(items), batch):
            x = torch.stack(items[i:i + batch])
            t0 = time.perf_counter()
            feats = encoder(x)
            t1 = time.perf_counter()
            search.decode(decoder, feats, word_map, beam_size=3, length_norm=search.DEFAULT_LENGTH_NORM,
                          no_repeat_ngram_size=search.DEFAULT_NO_REPEAT_NGRAM, min_len=1)
            enc_t += t1 - t0
            search_t += time.perf_counter() - t1
    del runtimes
    return {'read_ms': round(read * 1000, 2), 'decode_resize_ms': round(decode * 1000, 1),
            'encoder_ms': round(enc_t / len(items) * 1000, 1), 'search_ms': round(search_t / len(items) * 1000, 1)}


def main(argv=None):
    args = parse_args(argv)
    import torch

    from common import environment
    names = sorted(n for n in os.listdir(args.images) if n.lower().endswith(('.jpg', '.jpeg')))
    small = [os.path.join(args.images, n) for n in names[:args.photos]]
    sets = {f'flickr8k {args.photos} x 224px': small}
    if args.large:
        sets[f'{args.large} x 12MP JPEG'] = make_large(small or [os.path.join(args.images, n) for n in names],
                                                       args.large)
    can_drop = 'cold' not in args.caches or drop_caches()
    caches = [c for c in args.caches if c == 'warm' or can_drop]
    rows = []
    load_before = os.getloadavg()
    for set_name, paths in sets.items():
        for cache in caches:
            for runtime in args.runtimes:
                for batch in args.batch_sizes:
                    for reader in args.readers:
                        runs = []
                        for _ in range(args.repeats):
                            if cache == 'warm':
                                for p in paths:                 # into the page cache
                                    with open(p, 'rb') as f:
                                        f.read()
                            else:
                                drop_caches()
                            runs.append(run_02(paths, runtime, batch, reader, args.extra))
                        n = runs[0][0]
                        seconds = statistics.median(r[1] for r in runs)
                        row = {'photos': set_name, 'cache': cache, 'runtime': runtime, 'batch': batch,
                               'reader': reader, 'photos_per_s': round(n / seconds, 2),
                               'ms_per_photo': round(seconds / n * 1000, 1),
                               'photos_per_min_per_core': round(n / seconds * 60 / os.cpu_count(), 1),
                               'peak_rss_mb': max(r[3] for r in runs),
                               'process_wall_s': round(statistics.median(r[2] for r in runs), 1)}
                        rows.append(row)
                        print(json.dumps(row) if args.json else
                              f"{set_name:>22} {cache:>4} {runtime:>5} batch {batch:>2} {reader:>11}: "
                              f"{row['photos_per_s']:6.2f} photos/s ({row['ms_per_photo']} ms/photo), "
                              f"peak RSS {row['peak_rss_mb']} MB", flush=True)
    stage_rows = {}
    if args.stages:
        torch.set_num_threads(torch.get_num_threads())
        for set_name, paths in sets.items():
            for runtime in args.runtimes:
                stage_rows[f'{set_name}, {runtime}'] = stages(paths, runtime, args.stage_batch)
                print(f'stages {set_name}, {runtime} (batch {args.stage_batch}, warm): '
                      f"{stage_rows[f'{set_name}, {runtime}']}", flush=True)
    load_after = os.getloadavg()
    result = {'rows': rows, 'stages': stage_rows, 'cold_cache': can_drop,
              'load_average_1min_before_after': [round(load_before[0], 2), round(load_after[0], 2)],
              'processor': processor(), **environment(torch.device('cpu'))}
    print(json.dumps(result) if args.json else json.dumps({k: v for k, v in result.items() if k != 'rows'}))
    return 0


def processor():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor()


if __name__ == '__main__':
    sys.exit(main())

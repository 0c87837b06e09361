"""GPU check: run every CUDA path of the suite once, in a few minutes on one GPU, and print one table.

    make gpu-check                  # or: python benchmarks/gpu_check.py [--keep DIR]

Rows: an AMP training step (an epoch of a 48-image synthetic set, then validation) for every decoder
in bf16 and in fp16 (with its GradScaler; fp16 is forced by reporting no bf16 support), training on
images with --compile, with a fine-tuned encoder, self-critical training, DDP over NCCL with torchrun
on the GPUs present (two or more, each caching its share of the features; with one it is a skip),
feature caching and batched inference (02_inference.py, batch 64) with their images/s, 02 under
torchrun (two or more GPUs), evaluation, and the web server answering a photo on the GPU. Any failure makes
the exit status 1; without a CUDA GPU it says so in one line and exits 2. Not part of `make test`.
The tiny models are random (sizes of the tests); the throughput rows use the provided Lite0 encoder
and the provided pair of checkpoints, over hard links to the sample photos.
"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

TINY = ['--encoder', 'resnet18', '--encoder-weights', 'none', '--image-size', '64', '--encoded-image-size', '2',
        '--workers', '2', '--log-every', '1']
SIZES = {'emb_dim': '16', 'attention_dim': '16', 'decoder_dim': '32'}
TINY_LM = ['--lm-dim', '16', '--lm-layers', '1', '--lm-heads', '2', '--prefix-length', '2']
THROUGHPUT_IMAGES = 640
WORKERS = str(min(4, os.cpu_count() or 1))   # image-decoding workers of the throughput rows
DEVICE = ['cuda']   # --device cpu: a dry run of the check's own plumbing (no GPU path is checked then)


class Skip(Exception):
    """A row that cannot run on this machine (not a failure)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--keep', default='', help='work in this folder and keep it (default: a temporary one)')
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda',
                   help='cpu: a dry run of this script on CPU (checks no GPU path) (default: %(default)s)')
    return p.parse_args(argv)


def quiet(fn, *args):
    """fn(*args) with its output captured; a non-zero status raises with the output's last line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = fn(*args)
        except SystemExit as e:   # argparse refusing a flag: a failed row, not the end of the check
            rc = e.code
    if rc not in (0, None):
        lines = [line for line in out.getvalue().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f'exit status {rc}')
    return out.getvalue()


def decoder_flags(name):
    from captioning.decoders import registry
    fields = registry.decoder_fields(name)
    flags = ['--decoder', name] + (TINY_LM if 'lm_dim' in fields else [])
    for key, value in SIZES.items():
        if key in fields:
            flags += [f"--{key.replace('_', '-')}", value]
    return flags


def finite_losses(run):
    with open(os.path.join(run, 'steps.jsonl')) as f:
        losses = [json.loads(line)['loss'] for line in f]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f'losses {losses}')
    return f'{len(losses)} steps, last loss {losses[-1]:.3f}'


def train(work, data, name, *flags, fp16=False, model=TINY):
    """01_train.py in this process (an epoch and its validation) on CUDA."""
    import torch
    run = os.path.join(work, 'runs', name)
    argv = ['--data-folder', data, '--out-dir', run, '--epochs', '1', '--batch-size', '40', '--device', DEVICE[0],
            '--val-beam-size', '2', *model, *flags]
    real = torch.cuda.is_bf16_supported
    if fp16:
        torch.cuda.is_bf16_supported = lambda *a, **k: False   # 01_train picks fp16 and its GradScaler
    try:
        quiet(importlib.import_module('01_train').main, argv)
    finally:
        torch.cuda.is_bf16_supported = real
    return finite_losses(run)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp(work, data):
    import torch
    gpus = torch.cuda.device_count()
    if gpus < 2 or DEVICE[0] != 'cuda':
        raise Skip(f'{gpus} GPU: NCCL DDP needs two or more (one process per GPU)')
    run, fresh = os.path.join(work, 'runs', 'ddp'), os.path.join(work, 'data_ddp')   # no cache yet: every
    shutil.copytree(data, fresh, ignore=shutil.ignore_patterns('features'))         # rank encodes its share
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus}',
           os.path.join(REPO, '01_train.py'), '--data-folder', fresh, '--out-dir', run, '--epochs', '1',
           '--batch-size', '20', '--device', DEVICE[0], '--amp', *TINY, *decoder_flags('sat')]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ['torchrun failed'])[-1])
    return f'{gpus} processes, ' + finite_losses(run)


def sharded_inference(work, photos):
    """02_inference.py under torchrun, one process per GPU (NCCL), then its merged captions counted."""
    import torch
    gpus = torch.cuda.device_count()
    if gpus < 2 or DEVICE[0] != 'cuda':
        raise Skip(f'{gpus} GPU: sharded inference needs two or more')
    out = os.path.join(work, 'sharded')
    lite0 = os.path.join(REPO, 'checkpoints', 'flickr8k_efficientnet_lite0_fp16.pt')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus}',
           os.path.join(REPO, '02_inference.py'), '--img', photos, '--out', out, '--batch-size', '64',
           '--workers', WORKERS, '--checkpoint', lite0, '--overwrite']
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ['torchrun failed'])[-1])
    with open(os.path.join(out, 'captions.jsonl')) as f:
        count = sum(1 for _ in f)
    if count != THROUGHPUT_IMAGES:
        raise RuntimeError(f'{count} captions for {THROUGHPUT_IMAGES} photos')
    return f'{gpus} processes, {count} captions merged, {seconds:.0f} s with start-up (Lite0)'


def linked_photos(folder, n):
    """n hard links to the sample photos (one file system: made under the work folder)."""
    import datasets
    samples = os.path.join(REPO, 'assets', 'samples')
    names = sorted(n for n in os.listdir(samples) if n.lower().endswith(datasets.IMAGE_EXTENSIONS))
    originals = os.path.join(folder, 'originals')
    os.makedirs(originals, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(samples, name), os.path.join(originals, name))
    photos = os.path.join(folder, 'photos')
    os.makedirs(photos, exist_ok=True)
    for i in range(n):
        name = names[i % len(names)]
        os.link(os.path.join(originals, name), os.path.join(photos, f'{i:05d}_{name}'))
    return photos


class Photos:
    """The part of a per-image CaptionDataset that build_feature_cache reads, over image files."""
    split = 'photos'

    def __init__(self, paths, transform):
        self.paths, self.transform, self.num_images = paths, transform, len(paths)

    def image(self, i):
        import datasets
        return self.transform(datasets.load_image(self.paths[i], self.transform.size))


def feature_caching(work, photos):
    """build_feature_cache with the provided Lite0 encoder over the linked photos, batch 64."""
    import torch

    import datasets
    from captioning.decoding import loading
    device = torch.device(DEVICE[0])
    encoder = loading.load_captioner(loading.PROVIDED_CHECKPOINT, device)[0]
    ds = Photos(datasets.list_images(photos), datasets.image_transform(encoder))
    path = os.path.join(work, 'features.npy')
    start = time.perf_counter()
    cache = datasets.build_feature_cache(encoder, ds, path, device, batch_size=64, workers=int(WORKERS),
                                         progress=False)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if len(cache) != ds.num_images or not torch.isfinite(cache[0].float()).all():
        raise RuntimeError('the cache does not hold every image, or holds non-finite features')
    return f'{ds.num_images / seconds:.0f} images/s ({ds.num_images} images, Lite0 at {encoder.image_size} px)'


def inference(work, photos):
    """02_inference.py with the provided pair on CUDA, batch 64."""
    out = quiet(importlib.import_module('02_inference').main,
                ['--img', photos, '--out', os.path.join(work, 'captions'), '--batch-size', '64', '--workers', WORKERS,
                 '--device', DEVICE[0]])
    m = re.search(rf'(\d+) image\(s\) captioned in ([\d.]+) s on {DEVICE[0]}', out)
    if not m or int(m.group(1)) != THROUGHPUT_IMAGES:
        raise RuntimeError(f'unexpected summary: {out.strip().splitlines()[-1:]}')
    return f'{int(m.group(1)) / float(m.group(2)):.0f} images/s (provided pair, beam 3, batch 64)'


def evaluation(work, data):
    out = quiet(importlib.import_module('03_evaluate').main,
                ['--checkpoint', os.path.join(work, 'runs', 'sat_bf16', f'BEST_checkpoint_{_name(data)}.pt'),
                 '--data-folder', data, '--split', 'TEST', '--metrics', 'nltk', '--device', DEVICE[0]])
    return out.strip().splitlines()[-1][:60]


def _name(data):
    return next(p for p in os.listdir(data) if p.startswith('WORDMAP_'))[8:-5]


def server(work):
    """04_serve.py on CUDA in its own process: /healthz names the GPU, a photo gets a caption."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, '04_serve.py'), '--port', str(port),
                             '--device', DEVICE[0]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, health = f'http://127.0.0.1:{port}', None
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError((proc.stdout.read().strip().splitlines() or ['the server exited'])[-1])
            try:
                with urllib.request.urlopen(f'{base}/healthz', timeout=2) as r:
                    health = json.load(r)
                break
            except OSError:
                time.sleep(0.5)
        if not health or not health['device'].startswith(DEVICE[0]):
            raise RuntimeError(f'/healthz: {health}')
        with open(os.path.join(REPO, 'assets', 'samples', 'chelsea_cat.jpg'), 'rb') as f:
            photo = f.read()
        boundary = 'gpu-check-boundary'
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="cat.jpg"\r\n'
                f'Content-Type: image/jpeg\r\n\r\n').encode() + photo + f'\r\n--{boundary}--\r\n'.encode()
        request = urllib.request.Request(f'{base}/api/caption', data=body, method='POST',
                                         headers={'Content-Type': f'multipart/form-data; boundary={boundary}'})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.load(r)
        ms = (time.perf_counter() - start) * 1000
        if not answer.get('caption'):
            raise RuntimeError(f'answer without a caption: {answer}')
        return f"{ms:.0f} ms: {answer['caption'][:40]!r}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()


def main(argv=None):
    args = parse_args(argv)
    import torch
    DEVICE[0] = args.device
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(f'gpu-check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): '
              'nothing checked', file=sys.stderr)
        return 2
    from captioning.decoders import registry
    work = args.keep or tempfile.mkdtemp(prefix='gpu_check_')
    os.makedirs(work, exist_ok=True)
    rows, began = [], time.perf_counter()

    def check(name, fn, *fn_args, **kw):
        start = time.perf_counter()
        try:
            status, note = 'ok', fn(*fn_args, **kw) or ''
        except Skip as e:
            status, note = 'skip', str(e)
        except Exception as e:  # noqa: BLE001 - every failure is a row of the table
            lines = str(e).strip().splitlines()
            status, note = 'FAIL', f"{e.__class__.__name__}: {lines[-1] if lines else ''}"
        rows.append((name, status, time.perf_counter() - start, note))
        print(f'{name:<28} {status:<5} {rows[-1][2]:6.1f} s  {note}', file=sys.stderr, flush=True)

    try:
        data = os.path.join(work, 'data')
        quiet(importlib.import_module('00_create_input_files').main,
              ['--output-folder', data, '--synthetic-images', '60', '--synthetic-image-size', '64',
               '--min-word-freq', '2'])
        for name in registry.DECODERS:
            check(f'train {name} bf16', train, work, data, f'{name}_bf16', '--amp', *decoder_flags(name))
            check(f'train {name} fp16', train, work, data, f'{name}_fp16', '--amp', *decoder_flags(name), fp16=True)
        check('train images --compile', train, work, data, 'compile', '--amp', '--compile', '--no-cache-features',
              *decoder_flags('sat'))
        best = os.path.join(work, 'runs', 'sat_bf16', f'BEST_checkpoint_{_name(data)}.pt')
        check('train --fine-tune-encoder', train, work, data, 'finetune', '--amp', '--fine-tune-encoder',
              *decoder_flags('sat'))
        check('train scst', train, work, data, 'scst', '--amp', '--objective', 'scst', '--init-from', best,
              '--scst-samples', '2', model=['--workers', '2', '--log-every', '1'])
        check('DDP nccl (torchrun)', ddp, work, data)
        photos = linked_photos(work, THROUGHPUT_IMAGES)
        check('feature caching batch 64', feature_caching, work, photos)
        check('inference batch 64', inference, work, photos)
        check('inference torchrun (nccl)', sharded_inference, work, photos)
        check('evaluation', evaluation, work, data)
        check('server', server, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    where = (f'{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda})'
             if DEVICE[0] == 'cuda' else 'CPU: a dry run of the plumbing, no GPU path checked')
    print(f'\nGPU check on {where}, torch {torch.__version__}, {time.perf_counter() - began:.0f} s')
    print(f"{'check':<28} {'status':<6} {'seconds':>8}  result")
    for name, status, seconds, note in rows:
        print(f'{name:<28} {status:<6} {seconds:8.1f}  {note}')
    failed = [name for name, status, _, _ in rows if status == 'FAIL']
    print(f'{len(rows) - len(failed)} of {len(rows)} passed or skipped'
          + (f"; FAILED: {', '.join(failed)}" if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

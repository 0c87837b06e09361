"""Small shared helpers: atomic file writes, state dicts, seeding, devices,
meters and the distributed (torchrun) plumbing.

Nothing here does work at import time.
"""
import contextlib
import errno
import glob
import hashlib
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist

SPECIAL_TOKENS = ('<pad>', '<start>', '<end>', '<unk>')
SPLITS = ('TRAIN', 'VAL', 'TEST')   # the splits of prepared data (00_create_input_files.py)


def file_digest(path, algorithm='sha1'):
    """Hex digest of a file's bytes (sha1 by default; any hashlib name), read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def data_base_name(dataset, captions_per_image, min_word_freq):
    """The tutorial's base name for prepared files, e.g. 'coco_5_cap_per_img_5_min_word_freq'."""
    return f'{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq'


def find_data_name(data_folder):
    """Return the base name of the one prepared dataset in `data_folder` (found by its WORDMAP file)."""
    names = sorted(os.path.basename(p)[len('WORDMAP_'):-len('.json')]
                   for p in glob.glob(os.path.join(data_folder, 'WORDMAP_*.json')))
    if not names:
        if glob.glob(os.path.join(data_folder, '*_CAPTIONS_*.json')):   # split files, no word map: publishing was cut
            raise FileNotFoundError(f'{data_folder!r} holds an incomplete set (split files but no WORDMAP_*.json: '
                                    '00_create_input_files.py was interrupted); re-run 00')
        raise FileNotFoundError(f'no prepared dataset in {data_folder!r} (no WORDMAP_*.json): '
                                'run 00_create_input_files.py first, or pass --data-folder')
    if len(names) > 1:
        raise ValueError(f'{data_folder!r} holds several prepared datasets ({", ".join(names)}): '
                         'choose one with --data-name')
    return names[0]


# ----------------------------------------------------------------------------------------------
# Atomic writes: a file either has its old content or its complete new content, never a part.

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is renamed over `path`, on error removed.

    The temporary name holds this process's id ('.NAME.PID.XXXX.tmp'), so that one left by a killed
    process can be told from one still being written (remove_stale_temp)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.{os.getpid()}.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


_TEMP_RE = re.compile(r'^\.(?:.+\.(\d+)\.[^.]+\.tmp|staging-(\d+)-.+)$')


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_stale_temp(folder):
    """Remove the temporary files ('.NAME.PID.XXXX.tmp') and staging folders ('.staging-PID-XXXX')
    that killed processes left in `folder`; those of live processes stay. Returns the bytes freed."""
    freed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            m = _TEMP_RE.match(entry.name)
            if not m or pid_alive(int(m.group(1) or m.group(2))):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    freed += sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(entry.path) for f in fs)
                    shutil.rmtree(entry.path)
                else:
                    freed += entry.stat(follow_symlinks=False).st_size
                    os.remove(entry.path)
    return freed


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path, obj, indent=None):
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)


def read_json(path, what='JSON file'):
    """Read JSON with an error that names the file and the place of a syntax error."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f'{what} not found: {path}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})') from None


def append_jsonl(path, record):
    """Append one JSON record as a line (logs: a crash loses at most the line being written)."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


# ----------------------------------------------------------------------------------------------
# State dicts (captioning/checkpoint.py saves and loads the files).

def half_state_dict(state_dict):
    """fp32 floating tensors -> fp16 (for small shipped checkpoints); other tensors unchanged."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def float_state_dict(state_dict):
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def state_dict_digest(module):
    """Short hash of a module's weights (names a feature cache after the exact encoder; checks the
    pretrained encoder an exported checkpoint expects)."""
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


# ----------------------------------------------------------------------------------------------
# Reproducibility

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """All RNG states as tensors and primitives (safe for weights_only loading)."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuplify(state['python']))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------
# Devices and distributed training

def get_device(name='auto', local_rank=0):
    """'auto' -> CUDA when present (the process's local GPU under torchrun), else CPU."""
    if name == 'auto':
        name = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    elif name == 'cuda':
        name = f'cuda:{local_rank}'
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda was asked for but no CUDA GPU is visible')
    return device


def init_distributed(device_name='auto'):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1).

    Returns (rank, world_size, device). 'nccl' on GPUs, 'gloo' on CPU.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = get_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    """Sum a tensor over processes (in place; no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Meters

class AverageMeter:
    """Running average of a value (as in the tutorial and torchvision's references)."""

    def __init__(self):
        self.val = self.avg = self.sum = self.count = 0.0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / max(self.count, 1)


def topk_accuracy(scores, targets, k):
    """Percentage of rows of `scores` [N, V] whose top-k contains `targets` [N]."""
    top = scores.topk(k, dim=1).indices                      # [N, k]
    correct = top.eq(targets.view(-1, 1)).any(dim=1).sum()   # scalar
    return correct.item() * 100.0 / max(targets.numel(), 1)


def format_size(num_bytes):
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if num_bytes < 1024 or unit == 'TB':
            return f'{num_bytes:.1f} {unit}' if unit != 'B' else f'{num_bytes} B'
        num_bytes /= 1024


def truncate_jsonl(path, keep):
    """Rewrite a JSON-lines log keeping the records for which keep(record) is true (atomically;
    a torn last line, as a kill leaves, is dropped too)."""
    if not os.path.exists(path):
        return
    kept, changed = [], False
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                changed = True
                continue
            if keep(record):
                kept.append(line if line.endswith('\n') else line + '\n')
            else:
                changed = True
    if changed:
        with atomic_path(path) as tmp:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.writelines(kept)


# ----------------------------------------------------------------------------------------------
# Faults of the file system, as one line each

_CONTROL_RE = re.compile(r'\x1b\[[0-9;]*[A-Za-z]|[\x00-\x1f\x7f]')   # terminal codes and line breaks
_DISK_ERRNOS = {errno.ENOSPC: 'the disk is full', errno.EFBIG: 'the file-size limit was reached',
                errno.EROFS: 'the file system is read-only', errno.EDQUOT: 'the disk quota is used up',
                errno.EACCES: 'permission denied', errno.EPERM: 'not permitted'}


def allocate_blocks(path):
    """Give a (sparse) file its blocks now: ENOSPC here instead of SIGBUS on a memory-mapped write."""
    with open(path, 'r+b') as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):   # file system without it
                return
            raise OSError(e.errno, e.strerror, path) from None


def without_control(message):
    """`message` on one line, its terminal control codes and line breaks replaced by spaces."""
    return _CONTROL_RE.sub(' ', str(message))


def describe_error(error):
    """One line for an exception: for file-system faults, what failed, where, and (disk full) the free space."""
    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
        where = error.filename or ''
        if where and os.path.basename(where).startswith('.') and where.endswith('.tmp'):
            where = os.path.dirname(where) or '.'   # a temporary name means nothing to the user: its folder
        text = f'cannot write {where}: {_DISK_ERRNOS[error.errno]} ({error.strerror})' if where else \
            f'{_DISK_ERRNOS[error.errno]} ({error.strerror})'
        if error.errno == errno.ENOSPC and where:
            with contextlib.suppress(OSError):
                text += f'; {format_size(shutil.disk_usage(os.path.dirname(os.path.abspath(where))).free)} free there'
        return text
    return without_control(error).strip() or error.__class__.__name__


def check_writable_folder(folder, what='output folder'):
    """Create `folder` if needed and make sure a file can be written in it (ValueError if not)."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f'.write-check.{os.getpid()}.', suffix='.tmp', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f'{what} {folder}: cannot write there ({e.strerror})') from None


def check_free_space(folder, needed, what):
    """OSError(ENOSPC) naming the needed and available bytes when `folder`'s disk cannot hold `needed` more."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(errno.ENOSPC, f'{what} needs {format_size(needed)} ({needed} bytes) but only '
                      f'{format_size(free)} ({free} bytes) are free in {folder}')

"""Which engine runs the encoder: PyTorch or onnxruntime (`--runtime {auto,torch,onnx}` of 02, 03, 04
and the benchmarks), and the cache of ONNX encoders exported from checkpoints.

    --runtime torch   everything in PyTorch (today's captions exactly, with --precision fp32)
    --runtime onnx    the encoder (and its ImageNet head, for the tags) in onnxruntime on the CPU; the
                      decoder and the beam search stay in PyTorch
    --runtime auto    onnx on the CPU when onnxruntime, onnx and onnxscript are installed (one line
                      says so when they are not, and PyTorch runs); PyTorch on a GPU

Why only the encoder: measured on this repository's Intel Xeon (docs/speed.md, bench_onnx.py and
bench_files.py), onnxruntime runs the EfficientNet-Lite encoders several times faster than eager
PyTorch, while the beam search over an ONNX decoder step is slower than over PyTorch's (each step is
a small graph: the per-call overhead of a session and the numpy round trips outweigh its arithmetic),
and the int8 decoder (--precision) is PyTorch's. So the decoder, int8 or fp32, its guided search and
everything else after the encoder are unchanged; ensembles and --mirror get one ONNX encoder per
member inside ensemble.EnsembleEncoder.

The cache. An encoder is exported once per checkpoint file (torch.onnx dynamo export, a few seconds to
a minute) into

    <cache>/<sha256 of the checkpoint file's bytes>-<variant>/encoder.onnx + entry.json

where <cache> is --onnx-cache, else $CAPTIONING_ONNX_CACHE, else $XDG_CACHE_HOME/captioning/onnx, else
~/.cache/captioning/onnx, and <variant> digests what else shapes the graph (encoder, sizes, whether it
has the ImageNet head, torch version, opset, this format). entry.json records the checkpoint's digest
and the sha256 and size of encoder.onnx; both files are written atomically, entry.json last. An entry
is used only when its folder and files are this user's plain files (no links), entry.json matches,
and encoder.onnx has the recorded digest and loads: anything else (truncated, edited, from another
checkpoint or torch) is exported again over it, never trusted. Nothing is ever read from anywhere
else (no ONNX file beside a checkpoint, no path named inside a cache file).
"""
import hashlib
import json
import os
import sys

import torch
from torch import nn

import utils

RUNTIMES = ('auto', 'torch', 'onnx')
PROJECT = 'captioning'
CACHE_ENV = 'CAPTIONING_ONNX_CACHE'
ENTRY_FORMAT = 1
ENTRY_FILE, MODEL_FILE = 'entry.json', 'encoder.onnx'
NEEDS = ('onnxruntime', 'onnx', 'onnxscript')
_noted = set()


def add_arguments(parser, default='auto'):
    """--runtime and --onnx-cache, as 02, 03, 04 and the benchmarks spell them."""
    parser.add_argument('--runtime', choices=RUNTIMES, default=default,
                        help='what runs the encoder: onnx (onnxruntime, on the CPU: several times faster here), '
                             'torch (PyTorch), or auto (onnx on the CPU when onnxruntime, onnx and onnxscript are '
                             'installed, else torch; torch on a GPU). The decoder always runs in PyTorch '
                             '(captioning/decoding/runtime.py) (default: %(default)s)')
    parser.add_argument('--onnx-cache', default=None,
                        help=f'folder of the ONNX encoders exported from checkpoints (default: ${CACHE_ENV}, else '
                             '$XDG_CACHE_HOME/captioning/onnx, else ~/.cache/captioning/onnx)')


def problem():
    """The one line saying which ONNX packages are missing, or None."""
    from captioning.decoding import onnx_captioner
    return onnx_captioner.missing(*NEEDS)


def note(line):
    """Print a note once per process (to stderr)."""
    if line not in _noted:
        _noted.add(line)
        print(f'note: {line}', file=sys.stderr)


def resolve(runtime, device):
    """-> 'torch' or 'onnx': what `runtime` means on `device` with the packages installed here.
    ValueError / ImportError (one line) for onnx on a GPU or without onnxruntime; auto falls back to
    torch with one note when the packages are missing."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    if runtime == 'torch':
        return 'torch'
    device = torch.device(device)
    if device.type != 'cpu':
        if runtime == 'onnx':
            raise ValueError(f'--runtime onnx runs the encoder in onnxruntime on the CPU, and the model is on {device}: '
                             'use --runtime torch (or auto), or --device cpu')
        return 'torch'
    missing = problem()
    if missing:
        if runtime == 'onnx':
            raise ImportError(f'--runtime onnx: {missing}')
        note(f'--runtime auto: the encoder runs in PyTorch: {missing}')
        return 'torch'
    return 'onnx'


def cache_dir(chosen=None):
    """The cache folder: `chosen` (--onnx-cache), else $CAPTIONING_ONNX_CACHE, else
    $XDG_CACHE_HOME/captioning/onnx (an absolute XDG_CACHE_HOME only, as the spec says), else ~/.cache/..."""
    folder = chosen or os.environ.get(CACHE_ENV)
    if not folder:
        xdg = os.environ.get('XDG_CACHE_HOME', '')
        base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser('~'), '.cache')
        folder = os.path.join(base, PROJECT, 'onnx')
    return os.path.abspath(os.path.expanduser(folder))


def file_sha256(path):
    """sha256 of a file's bytes (a checkpoint, an exported model)."""
    return utils.file_digest(path, 'sha256')


def variant(encoder):
    """What shapes the exported graph besides the checkpoint's bytes (a short digest, and its fields)."""
    from captioning.decoding import onnx_captioner
    fields = {'format': ENTRY_FORMAT, 'encoder': encoder.name, 'image_size': encoder.image_size,
              'encoded_image_size': encoder.encoded_image_size, 'encoder_dim': encoder.encoder_dim,
              'head': getattr(encoder, 'imagenet_head', None) is not None, 'torch': torch.__version__,
              'opset': onnx_captioner.OPSET}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16], fields


def _plain(path):
    """Whether `path` is this user's own file or folder, not a link (nothing planted in a shared cache)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat
    if stat.S_ISLNK(st.st_mode):
        return False
    return not hasattr(os, 'getuid') or st.st_uid == os.getuid()


def check_entry(folder, checkpoint_sha256, fields):
    """-> None when the entry in `folder` can be used, else why not (one line)."""
    entry_path, model_path = os.path.join(folder, ENTRY_FILE), os.path.join(folder, MODEL_FILE)
    if not os.path.exists(entry_path):
        return 'not exported yet'
    if not all(_plain(p) for p in (folder, entry_path, model_path)):
        return 'not a plain file of this user'
    try:
        with open(entry_path, encoding='utf-8') as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return f'{ENTRY_FILE} does not parse'
    if not isinstance(entry, dict) or entry.get('checkpoint_sha256') != checkpoint_sha256 or \
            entry.get('variant') != fields:
        return 'made from another checkpoint or another version'
    try:
        if os.path.getsize(model_path) != entry.get('size') or file_sha256(model_path) != entry.get('sha256'):
            return f'{MODEL_FILE} is not the file exported (truncated or changed)'
    except OSError:
        return f'{MODEL_FILE} is missing'
    return None


class _Graph(nn.Module):
    """What is exported: images -> (features [B, g, g, C][, ImageNet probabilities [B, 1000]])."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        features, probs = self.encoder.encode(images, classify=True)
        return (features, probs) if probs is not None else (features,)


@torch.no_grad()
def export(encoder, folder, checkpoint_sha256, fields):
    """Export the (CPU, fp32, eval) encoder into `folder`: encoder.onnx, then entry.json."""
    from captioning.decoding import onnx_captioner
    encoder = encoder.float().cpu().eval()
    B = torch.export.Dim('images', min=1)
    images = torch.randn(2, 3, encoder.image_size, encoder.image_size)   # 2: a size of 1 reads as a constant
    outputs = ['features'] + (['probs'] if fields['head'] else [])
    model_path = os.path.join(folder, MODEL_FILE)
    onnx_captioner._export(_Graph(encoder), (images,), model_path, ['images'], outputs, ({0: B},))
    entry = {'checkpoint_sha256': checkpoint_sha256, 'variant': fields, 'outputs': outputs,
             'size': os.path.getsize(model_path), 'sha256': file_sha256(model_path),
             'transform': encoder.transform_config()}
    with utils.atomic_path(os.path.join(folder, ENTRY_FILE)) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(entry, f)
    return entry


def session(path, threads=None):
    """An onnxruntime CPU session with `threads` intra-op threads (default: torch's)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # the threads sleep between calls instead of spinning: PyTorch's decoder runs next on the same cores
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


class OnnxEncoder(nn.Module):
    """An exported encoder behind models.Encoder's captioning calls (forward, encode, transform_config,
    name and sizes): images [B, 3, S, S] -> [B, g, g, C] and, with the head, ImageNet probabilities.
    Runs on the CPU; its inputs and outputs are torch tensors."""
    runtime = 'onnx'

    def __init__(self, encoder, path, threads=None):
        super().__init__()
        self.session = session(path, threads)
        self.path = path
        self.name, self.image_size = encoder.name, encoder.image_size
        self.encoded_image_size, self.encoder_dim = encoder.encoded_image_size, encoder.encoder_dim
        self._transform = encoder.transform_config()
        self.has_probs = getattr(encoder, 'imagenet_head', None) is not None
        # tags.has_head reads this attribute; the head itself runs inside the graph
        self.imagenet_head = encoder.imagenet_head if self.has_probs else None

    def transform_config(self):
        return dict(self._transform)

    def encode(self, images, classify=False):
        import numpy as np
        outs = self.session.run(None, {'images': np.ascontiguousarray(images.detach().float().cpu().numpy())})
        features = torch.from_numpy(outs[0])
        probs = torch.from_numpy(outs[1]) if classify and self.has_probs else None
        return features, probs

    def forward(self, images):
        return self.encode(images)[0]


def onnx_encoder(encoder, checkpoint_path, cache=None, threads=None):
    """The ONNX encoder of a loaded models.Encoder from `checkpoint_path`: from the cache when a valid
    entry is there, else exported into it first (module docstring)."""
    digest = file_sha256(checkpoint_path)
    key, fields = variant(encoder)
    folder = os.path.join(cache_dir(cache), f'{digest[:32]}-{key}')
    why = check_entry(folder, digest, fields)
    if why is None:
        try:
            return OnnxEncoder(encoder, os.path.join(folder, MODEL_FILE), threads)
        except Exception as e:  # noqa: BLE001 - a file onnxruntime cannot load is rebuilt like any other
            why = f'onnxruntime cannot load it ({type(e).__name__})'
    if why != 'not exported yet':
        note(f'{folder}: {why}; exporting it again')
    else:
        note(f'exporting the encoder of {os.path.basename(checkpoint_path)} to ONNX once (cached in {folder})')
    if os.path.islink(folder):
        os.remove(folder)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    export(encoder, folder, digest, fields)
    return OnnxEncoder(encoder, os.path.join(folder, MODEL_FILE), threads)

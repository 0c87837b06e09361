"""Read torch files that pickle whole modules (the tutorial's checkpoints) without running code.

torch.save of a module pickles its class by name; a plain unpickler imports and calls what a pickle
names, which is how a pickle runs code. Here the pickle is first disassembled (pickletools, nothing
built) to list the classes and functions it names. Those that are the tutorial's models
(models.Encoder, models.Attention, models.DecoderWithAttention), torch.nn module classes,
torchvision's ResNet blocks and torch.optim optimizers become inert holders (`Holder`): objects that
only keep what the pickle assigns to them (parameters, buffers, settings), with none of the real
classes' methods. Torch 0.4's module backend becomes None, a pickled defaultdict a plain dict, a
NumPy scalar a Python number. Any other class or function (os.system, ...) is refused before
anything is called, as one line that names it.

Both torch file formats: the zip one (torch >= 1.6) through torch.load(weights_only=True), PyTorch's
restricted unpickler, with the holders allowlisted for that one load; the legacy one (torch 0.4-1.5),
which weights_only cannot read when it holds modules, through LegacyReader, a restricted unpickler
of the same rules.
"""
import _compat_pickle
import collections
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile

import torch

import utils

TUTORIAL_CLASSES = ('models.Encoder', 'models.Attention', 'models.DecoderWithAttention')
TORCHVISION_BLOCKS = ('torchvision.models.resnet.Bottleneck', 'torchvision.models.resnet.BasicBlock')
# module and optimizer classes of any torch version: torch.nn.modules.<file>.<Class>, torch.optim.<file>.<Class>
HOLDER_RE = re.compile(r'torch\.(nn\.modules|optim)\.[A-Za-z_]\w*\.[A-Z]\w*')
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c        # the first pickle of a legacy (non-zip) torch file


class Holder:
    """What a pickled module or optimizer becomes: the attributes the pickle gives it, nothing more."""
    pickled_as = '?'

    def __init__(self, *args, **kwargs):       # REDUCE-style construction: arguments are dropped
        pass

    def __repr__(self):
        return f'<inert {self.pickled_as}>'


def _no_backend(*args):
    """torch 0.4's module backend (torch.nn.backends.thnn): nothing needed."""
    return None


def _plain_dict(*args):
    """collections.defaultdict(dict) of an optimizer's state, and dict(...): a plain dict."""
    return dict(*args[1:]) if args and not isinstance(args[0], (dict, list, tuple)) else dict(*args)


class _NumpyDType:
    """numpy.dtype as pickled: the type code kept as text, nothing of NumPy called."""

    def __init__(self, code=None, *args):
        self.code = code

    def __setstate__(self, state):
        self.state = state


def _numpy_scalar(dtype, data=b''):
    """numpy.core.multiarray.scalar(dtype, bytes) for numeric dtypes -> a Python int or float."""
    import numpy as np
    code = getattr(dtype, 'code', None)
    if not isinstance(code, str) or not re.fullmatch(r'[<>=|]?[biuf]\d{1,2}', code):
        raise ValueError(f'a NumPy scalar of type {code!r}')
    order = dtype.state[1] if isinstance(getattr(dtype, 'state', None), tuple) and len(dtype.state) > 1 else '<'
    np_type = np.dtype(code).newbyteorder(order if order in '<>' else '=')
    if not isinstance(data, (bytes, bytearray)) or len(data) != np_type.itemsize:
        raise ValueError('a NumPy scalar without its bytes')
    return np.frombuffer(bytes(data), dtype=np_type)[0].item()


SPECIAL_GLOBALS = {
    'torch.nn.backends.thnn._get_thnn_function_backend': _no_backend,
    'collections.defaultdict': _plain_dict,
    'builtins.dict': _plain_dict,
    'numpy.dtype': _NumpyDType,
    'numpy.core.multiarray.scalar': _numpy_scalar,
    'numpy._core.multiarray.scalar': _numpy_scalar,
}


def holder_class(name):
    return type(name.rsplit('.', 1)[1], (Holder,), {'pickled_as': name, '__module__': __name__})


# ----------------------------------------------------------------------------------------------
# Reading the file

def _normalised(module, name):
    """A GLOBAL as torch's unpickler resolves it (Python 2 names of protocol-2 pickles mapped)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f'{module}.{name}'


def _pickle_globals(f, path):
    """The globals one pickle names, read by disassembly (nothing built or called)."""
    names = []
    try:
        for op, arg, _ in pickletools.genops(f):
            if op.name == 'GLOBAL':
                names.append(_normalised(*arg.split(' ', 1)))
            elif op.name in ('STACK_GLOBAL', 'INST', 'OBJ', 'EXT1', 'EXT2', 'EXT4'):
                raise ValueError(f'{path}: refused: its pickle builds objects with {op.name}, which the '
                                 'restricted reader does not accept (no code runs)')
    except (ValueError, EOFError) as e:
        if str(e).startswith(f'{path}: refused'):
            raise
        raise ValueError(f'{path}: truncated or damaged ({utils.describe_error(e)})') from None
    return names


def _legacy_prefix(f, path):
    """Skip a legacy torch file's magic number, protocol and system-info pickles; ValueError if the
    first is not the magic number."""
    first = [(op.name, arg) for op, arg, _ in pickletools.genops(f)]
    if not any(name.startswith('LONG') and arg == LEGACY_MAGIC for name, arg in first):
        raise ValueError(f'{path}: not a torch checkpoint (neither a zip archive nor a legacy torch file)')
    for _ in range(2):
        _pickle_globals(f, path)


def checkpoint_globals(path):
    """The classes and functions (as 'module.name') that a torch file's main pickle names, in either
    format, found without unpickling. ValueError naming the file for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                pkls = [n for n in z.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
                if len(pkls) != 1:
                    raise ValueError(f'{path}: a zip archive, but not a torch checkpoint (no data.pkl)')
                data = z.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f'{path}: truncated or damaged zip archive ({utils.describe_error(e)})') from None
        return _pickle_globals(io.BytesIO(data), path)
    with open(path, 'rb') as f:
        if f.read(1) != b'\x80':
            raise ValueError(f'{path}: not a torch checkpoint (neither a zip archive nor a pickle)')
        f.seek(0)
        try:
            _legacy_prefix(f, path)
        except (EOFError, ValueError) as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f'{path}: truncated or damaged ({utils.describe_error(e)})') from None
        return _pickle_globals(f, path)


def allowed_globals(names):
    """[(object, 'module.name')] for torch.serialization.safe_globals: holders for the tutorial's,
    torch.nn's, torchvision's ResNet blocks' and torch.optim's classes, and the few special globals;
    every other name is left to torch's own allowlist (tensors, storages, OrderedDict, ...)."""
    out = []
    for name in sorted(set(names)):
        if name in SPECIAL_GLOBALS:
            out.append((SPECIAL_GLOBALS[name], name))
        elif name in TUTORIAL_CLASSES or name in TORCHVISION_BLOCKS or HOLDER_RE.fullmatch(name):
            out.append((holder_class(name), name))
    return out


def read(path):
    """A torch file (either format) -> its object, with the allowlisted classes as Holders and no code
    run. ValueError with one line naming the file and, for a refused class or function, its name.

    The zip format is read by torch.load(weights_only=True) with the holders allowlisted for this
    load. The legacy format cannot be: torch.save recorded every module class there as a persistent
    id ('module', class, source file, source), which torch's restricted unpickler refuses ("Only
    persistent_load of storage is allowed"), so legacy files go through LegacyReader."""
    names = checkpoint_globals(path)
    try:
        if zipfile.is_zipfile(path):
            with warnings.catch_warnings(), torch.serialization.safe_globals(allowed_globals(names)):
                warnings.simplefilter('ignore')
                return torch.load(path, map_location='cpu', weights_only=True)
        return LegacyReader(path).load()
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
        message = utils.describe_error(e)
        refused = re.search(r'GLOBAL ([\w.]+)', message)
        if refused:
            raise ValueError(f'{path}: refused: it pickles {refused.group(1)}, and only tensors, plain data and '
                             "the tutorial's model and optimizer classes (as inert holders of their weights) are "
                             'loaded (no code runs)') from None
        first = message.splitlines()[0][:300] if message else e.__class__.__name__
        raise ValueError(f'{path}: could not be read as a tutorial checkpoint ({first})') from None


class _Storage:
    """A storage of a legacy file: bytes allocated when first named, filled after the pickle."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel = dtype, numel
        self.bytes = torch.UntypedStorage(numel * _element_size(dtype))


def _element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's job for legacy files, the view checked against its storage
    first (Tensor.set_ itself does not check bounds)."""
    ints = (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)))
    if not isinstance(storage, _Storage) or not ints:
        raise ValueError('a tensor that is not a view of a storage')
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise ValueError(f'a tensor of size {list(size)} beyond its storage of {storage.numel} elements')
    return torch.empty(0, dtype=storage.dtype).set_(storage.bytes, offset, size, stride)


def _parameter(data=None, requires_grad=True, *rest):
    """Parameter(tensor, requires_grad) of torch 0.4 and _rebuild_parameter(tensor, requires_grad,
    hooks) of later ones: the tensor (the hooks, never run here, are dropped)."""
    if not isinstance(data, torch.Tensor):
        raise ValueError('a Parameter without a tensor')
    return data


def _encode(text, encoding='latin1'):
    """_codecs.encode(str, 'latin1'): how protocol-2 pickles write bytes."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise ValueError('bytes in an unexpected encoding')
    return text.encode('latin1')


STORAGE_TYPES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
                 'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                 'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                 'BoolStorage': torch.bool}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


LEGACY_GLOBALS = {'torch._utils._rebuild_tensor_v2': _rebuild_tensor, 'torch._utils._rebuild_parameter': _parameter,
                  'torch.nn.parameter.Parameter': _parameter, 'collections.OrderedDict': collections.OrderedDict,
                  'builtins.set': set, '_codecs.encode': _encode}


class LegacyReader:
    """A legacy (non-zip) torch file read without torch's pickle of arbitrary globals: find_class
    gives holders and the few functions above, and refuses anything else naming it; persistent ids
    are module sources (the class itself is kept) and storages, whose bytes follow the pickle as
    (int64 element count, raw little-endian data) in the order of the storage-key pickle."""

    def __init__(self, path):
        self.path, self.file_size = path, os.path.getsize(path)
        self.storages = {}

    def find_class(self, module, name):
        full = _normalised(module, name)
        if full in LEGACY_GLOBALS:
            return LEGACY_GLOBALS[full]
        if module == 'torch' and name in STORAGE_TYPES:
            return _StorageType(STORAGE_TYPES[name])
        allowed = dict((n, obj) for obj, n in allowed_globals([full]))
        if full in allowed:
            return allowed[full]
        raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {full}')

    def persistent_load(self, pid):
        kind = pid[0].decode('ascii') if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes) else \
            (pid[0] if isinstance(pid, tuple) and pid else None)
        if kind == 'module' and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], Holder):
            return pid[1]
        if kind != 'storage' or len(pid) != 6 or not isinstance(pid[1], _StorageType):
            raise pickle.UnpicklingError('a persistent id that is neither a storage nor a module class')
        _, storage_type, key, _location, numel, view = pid
        if view is not None:
            raise pickle.UnpicklingError('a storage view (a tensor saved from part of a storage), which this reader '
                                         "does not take: load and re-save the file with the tutorial's torch")
        if not isinstance(numel, int) or numel < 0 or numel * _element_size(storage_type.dtype) > self.file_size:
            raise pickle.UnpicklingError('a storage of unexpected size (larger than the file)')
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, numel)
        return self.storages[key]

    def _unpickle(self, f):
        """One pickle from `f`, through this reader's find_class and persistent_load."""
        reader = self

        class Restricted(pickle._Unpickler):   # the Python one: its BUILD can be checked
            dispatch = dict(pickle._Unpickler.dispatch)

            def find_class(self, module, name):
                return reader.find_class(module, name)

            def persistent_load(self, pid):
                return reader.persistent_load(pid)

            def load_build(self):
                """BUILD (set an object's attributes) only on holders, never on the functions above."""
                if not isinstance(self.stack[-2], (Holder, _NumpyDType)):
                    raise pickle.UnpicklingError(f'refused to set attributes of {type(self.stack[-2]).__name__}')
                pickle._Unpickler.load_build(self)
            dispatch[pickle.BUILD[0]] = load_build

        return Restricted(f, encoding='utf-8').load()

    def load(self):
        with open(self.path, 'rb') as f:
            magic, _protocol, sys_info = (self._unpickle(f) for _ in range(3))
            if magic != LEGACY_MAGIC:
                raise ValueError('not a legacy torch file (no magic number)')
            if not (isinstance(sys_info, dict) and sys_info.get('little_endian', True)):
                raise ValueError('saved on a big-endian machine, which this reader does not take')
            obj = self._unpickle(f)
            keys = self._unpickle(f)                     # the storage keys: plain strings
            if not isinstance(keys, list) or set(keys) != set(self.storages):
                raise ValueError('the storage list does not match the tensors')
            for key in keys:
                storage = self.storages[key]
                count = int.from_bytes(f.read(8), 'little', signed=True)
                data = f.read(storage.bytes.nbytes())
                if count != storage.numel or len(data) != storage.bytes.nbytes():
                    raise ValueError('truncated: a storage is shorter than its tensors need')
                if data:
                    storage.bytes.copy_(torch.UntypedStorage.from_buffer(data, dtype=torch.uint8))
        return obj

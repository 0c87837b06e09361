"""Import the checkpoints of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning (its
BEST_checkpoint_*.pth.tar and WORDMAP_*.json) as checkpoints of this suite, without running their code.

The tutorial's train.py saved whole modules with torch.save: {'epoch', 'epochs_since_improvement',
'bleu-4', 'encoder': models.Encoder, 'decoder': models.DecoderWithAttention, 'encoder_optimizer',
'decoder_optimizer'}. Such a file names classes that a plain unpickler would import and call. Here it
is read by torch.load(weights_only=True), PyTorch's restricted unpickler, which reads both torch file
formats (the zip one of torch >= 1.6 and the legacy one of torch 0.4-1.5, storages included), with
one addition: the pickle is first disassembled (pickletools, nothing executed) and the classes it names
that are the tutorial's models (models.Encoder, models.Attention, models.DecoderWithAttention), torch.nn
module classes, torchvision's ResNet blocks and torch.optim optimizers are allowlisted for this one
load as inert holders (`Holder`): objects that only keep what the pickle assigns to them (their
parameters, buffers and settings), with no methods of the real classes. Torch 0.4's module backend
becomes None, a pickled defaultdict a plain dict, a NumPy scalar a Python number. Any other class or
function (os.system, ...) is refused by torch's unpickler when the pickle reaches it, before anything
is called, and reported as one line that names it.

The holders' weights become a format-2 checkpoint (checkpoint.py): the encoder as this suite's
torchvision ResNet (resnet101 for the tutorial's own; the depth is read from the blocks) at the
tutorial's 256 x 256 input with ImageNet normalisation and its 14 x 14 pooled grid; the decoder as
`sat`, whose parameter names are the tutorial's; the word map inside; epoch and the tutorial's
VAL BLEU-4 recorded (its validate() scores teacher-forced word ids, not generated captions).
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

import checkpoint
import utils

TUTORIAL = 'a-PyTorch-Tutorial-to-Image-Captioning'
TUTORIAL_CLASSES = ('models.Encoder', 'models.Attention', 'models.DecoderWithAttention')
TORCHVISION_BLOCKS = ('torchvision.models.resnet.Bottleneck', 'torchvision.models.resnet.BasicBlock')
# module and optimizer classes of any torch version: torch.nn.modules.<file>.<Class>, torch.optim.<file>.<Class>
HOLDER_RE = re.compile(r'torch\.(nn\.modules|optim)\.[A-Za-z_]\w*\.[A-Z]\w*')
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c        # the first pickle of a legacy (non-zip) torch file
SPECIAL_TOKENS = ('<pad>', '<start>', '<end>', '<unk>')
IMAGE_SIZE = 256                             # the tutorial's input side; ImageNet mean/std (the resnet spec's)
RESNETS = {(False, (2, 2, 2, 2)): 'resnet18', (False, (3, 4, 6, 3)): 'resnet34',
           (True, (3, 4, 6, 3)): 'resnet50', (True, (3, 4, 23, 3)): 'resnet101', (True, (3, 8, 36, 3)): 'resnet152'}
RESNET_CHILDREN = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}
# what train.py uses and the file does not hold
TUTORIAL_SETTINGS = {'alpha_c': 1.0, 'grad_clip': 5.0, 'batch_size': 32, 'decoder_lr': 4e-4, 'encoder_lr': 1e-4,
                     'select_by': 'BLEU-4'}


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


def read_tutorial_file(path):
    """A tutorial checkpoint file -> its top-level dict, modules and optimizers as Holders (no code
    runs). ValueError with one line naming the file and, for a refused class or function, its name.

    The zip format is read by torch.load(weights_only=True) with the holders allowlisted for this
    load. The legacy format cannot be: torch.save recorded every module class there as a persistent
    id ('module', class, source file, source), which torch's restricted unpickler refuses ("Only
    persistent_load of storage is allowed"), so legacy files go through LegacyReader below."""
    names = checkpoint_globals(path)
    try:
        if zipfile.is_zipfile(path):
            with warnings.catch_warnings(), torch.serialization.safe_globals(allowed_globals(names)):
                warnings.simplefilter('ignore')
                obj = torch.load(path, map_location='cpu', weights_only=True)
        else:
            obj = LegacyReader(path).load()
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
        message = utils.describe_error(e)
        refused = re.search(r'GLOBAL ([\w.]+)', message)
        if refused:
            raise ValueError(f'{path}: refused: it pickles {refused.group(1)}, and only tensors, plain data and '
                             "the tutorial's model and optimizer classes (as inert holders of their weights) are "
                             'loaded (no code runs)') from None
        raise ValueError(f'{path}: could not be read as a tutorial checkpoint ({message.splitlines()[0][:300]})') from None
    is_tutorial = (isinstance(obj, dict) and getattr(obj.get('encoder'), 'pickled_as', '') == 'models.Encoder'
                   and getattr(obj.get('decoder'), 'pickled_as', '') == 'models.DecoderWithAttention')
    if not is_tutorial:
        raise ValueError(f"{path}: not a checkpoint of the tutorial (expected 'encoder' and 'decoder' holding its "
                         'models.Encoder and models.DecoderWithAttention)')
    return obj


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
        self.path = path
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
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError('a storage of unexpected size')
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
            _legacy_prefix(f, self.path)                 # magic number, protocol version, system info
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


def looks_like_tutorial(path):
    """True when a file's pickle names the tutorial's DecoderWithAttention (found without unpickling)."""
    try:
        return 'models.DecoderWithAttention' in checkpoint_globals(path)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# Holders -> state_dicts

def holder_state(holder, where, prefix='', seen=None):
    """A module Holder -> {name: tensor} as nn.Module.state_dict() names them (parameters, persistent
    buffers, submodules), or ValueError naming what is not a module's content."""
    seen = set() if seen is None else seen
    if not isinstance(holder, Holder) or id(holder) in seen:
        raise ValueError(f'{where}: {prefix or "the module"} is not a module of the tutorial or torch.nn')
    seen.add(id(holder))
    attrs = vars(holder)
    skip = attrs.get('_non_persistent_buffers_set') or set()
    state = {}
    for kind in ('_parameters', '_buffers'):
        entries = attrs.get(kind) or {}
        if not isinstance(entries, dict):
            raise ValueError(f'{where}: {prefix}{kind} is not a dict')
        for name, value in entries.items():
            if value is None or name in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f'{where}: {prefix}{name} is not a tensor')
            state[prefix + str(name)] = value.detach().clone() if isinstance(value, torch.nn.Parameter) else value
    modules = attrs.get('_modules') or {}
    if not isinstance(modules, dict):
        raise ValueError(f'{where}: {prefix}_modules is not a dict')
    for name, child in modules.items():
        if child is not None:
            state.update(holder_state(child, where, f'{prefix}{name}.', seen))
    return state


def _module_attr(holder, name, default=None):
    """An attribute of a Holder, or of its submodule `name` (held in _modules)."""
    attrs = vars(holder)
    return attrs.get(name, (attrs.get('_modules') or {}).get(name, default))


def _shape_check(state, expected, where, what):
    """ValueError naming the first entry missing, extra or of another shape than `expected`'s."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: not the tutorial's {what}: " +
                         (f'{len(missing)} entries missing (e.g. {missing[0]})' if missing else
                          f'{len(extra)} unexpected entries (e.g. {extra[0]})'))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: {what} entry {k} has shape {list(state[k].shape)}, expected {list(v.shape)}")


def convert_decoder(holder, where):
    """The tutorial's DecoderWithAttention Holder -> (sat decoder_args, state_dict): the names are the same."""
    from decoders import build_decoder
    state = holder_state(holder, where)
    for key in ('embedding.weight', 'attention.encoder_att.weight', 'decode_step.weight_hh'):
        if key not in state or state[key].dim() != 2:
            raise ValueError(f"{where}: the decoder has no 2-d {key}: not the tutorial's DecoderWithAttention")
    (V, E), (A, C), D = state['embedding.weight'].shape, state['attention.encoder_att.weight'].shape, \
        state['decode_step.weight_hh'].size(1)
    dropout = getattr(_module_attr(holder, 'dropout'), 'p', 0.5)
    dropout = float(dropout) if isinstance(dropout, (int, float)) and 0 <= dropout < 1 else 0.5
    with torch.device('meta'):
        decoder = build_decoder('sat', V, C, emb_dim=E, attention_dim=A, decoder_dim=D, dropout=dropout,
                                alpha_c=TUTORIAL_SETTINGS['alpha_c'])
    _shape_check(state, decoder.state_dict(), where, 'DecoderWithAttention')
    return decoder.args(), {k: v.float() for k, v in state.items()}


def convert_encoder(holder, where):
    """The tutorial's Encoder Holder (resnet = a torchvision ResNet's children without avgpool/fc, then
    adaptive pooling) -> (encoder name, grid side, this suite's Encoder state_dict)."""
    from models import Encoder
    state = {}
    for key, value in holder_state(holder, where).items():
        parts = key.split('.', 2)
        if len(parts) < 3 or parts[0] != 'resnet' or parts[1] not in RESNET_CHILDREN:
            raise ValueError(f"{where}: encoder entry {key} is not in a ResNet's layers: not the tutorial's Encoder")
        state[f'backbone.{RESNET_CHILDREN[parts[1]]}.{parts[2]}'] = value
    bottleneck = any('.conv3.' in k for k in state)
    blocks = tuple(len({k.split('.')[2] for k in state if k.startswith(f'backbone.layer{i}.')}) for i in range(1, 5))
    name = RESNETS.get((bottleneck, blocks))
    if name is None:
        raise ValueError(f'{where}: an encoder of {"bottleneck" if bottleneck else "basic"} blocks {list(blocks)}, '
                         'which is no torchvision ResNet (18, 34, 50, 101, 152)')
    grid = vars(holder).get('enc_image_size')
    if not isinstance(grid, int):
        size = getattr(_module_attr(holder, 'adaptive_pool'), 'output_size', 14)
        grid = size[0] if isinstance(size, (tuple, list)) and size else size
    if not isinstance(grid, int) or not 1 <= grid <= 64:
        raise ValueError(f'{where}: the encoder pools to {grid!r} cells, not a grid side')
    with torch.device('meta'):
        expected = Encoder(name, 'none', grid, IMAGE_SIZE, channels_last=False).state_dict()
    for k, v in expected.items():   # torch 0.4.0's BatchNorm had no batch counter (unused in eval mode)
        if k.endswith('num_batches_tracked') and k not in state:
            state[k] = torch.zeros((), dtype=v.dtype)
    _shape_check(state, expected, where, f'Encoder ({name})')
    return name, grid, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_word_map(path):
    """The tutorial's WORDMAP_*.json -> {word: id} with ids 0..n-1 and the special tokens, or ValueError."""
    word_map = utils.read_json(path, 'word map')
    ok = (isinstance(word_map, dict) and all(isinstance(k, str) and type(v) is int for k, v in word_map.items())
          and sorted(word_map.values()) == list(range(len(word_map))) and set(SPECIAL_TOKENS) <= set(word_map))
    if not ok:
        raise ValueError(f'{path}: not a word map (expected an object word -> ids 0..n-1 with '
                         f"{', '.join(SPECIAL_TOKENS)})")
    return word_map


def _number(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def convert(obj, word_map, where='checkpoint', word_map_path=''):
    """A tutorial checkpoint dict (read_tutorial_file) and its word map -> a format-2 checkpoint dict."""
    from models import DECODER_SETTINGS
    decoder_args, decoder_state = convert_decoder(obj['decoder'], where)
    encoder, grid, encoder_state = convert_encoder(obj['encoder'], where)
    if decoder_args['encoder_dim'] != _feature_dim(encoder):
        raise ValueError(f"{where}: the decoder attends to {decoder_args['encoder_dim']}-d features; {encoder} gives "
                         f'{_feature_dim(encoder)}')
    if len(word_map) != decoder_args['vocab_size']:
        raise ValueError(f"{word_map_path or 'word map'}: {len(word_map)} words, but the checkpoint's decoder has "
                         f"{decoder_args['vocab_size']}: pass the WORDMAP_*.json it was trained with")
    base = os.path.basename(word_map_path)
    data_name = base[len('WORDMAP_'):-len('.json')] if base.startswith('WORDMAP_') and base.endswith('.json') else ''
    epoch, bleu4 = _number(obj.get('epoch')), _number(obj.get('bleu-4'))
    fine_tuned = obj.get('encoder_optimizer') is not None
    config = {**TUTORIAL_SETTINGS, 'encoder': encoder, 'encoder_weights': 'imagenet', 'image_size': IMAGE_SIZE,
              'encoded_image_size': grid, 'channels_last': True, 'decoder': 'sat', 'decoder_args': decoder_args,
              'tokenizer': 'words', 'data_folder': '', 'data_name': data_name, 'fine_tune_encoder': fine_tuned,
              'fine_tune_from': 'layer2' if fine_tuned else '', 'objective': 'xe', 'converted_from': TUTORIAL,
              **{k: decoder_args.get(k) for k in DECODER_SETTINGS}}
    return {'format': checkpoint.FORMAT, 'config': config, 'word_map': word_map, 'decoder': decoder_state,
            'encoder': encoder_state, 'epoch': epoch, 'best_score': bleu4,
            # the tutorial's validate(): BLEU-4 of teacher-forced word ids, not of generated captions
            'val_metrics': {'bleu4_teacher_forced': bleu4} if bleu4 is not None else {},
            'tutorial': {'epochs_since_improvement': _number(obj.get('epochs_since_improvement'))}}


def _feature_dim(encoder):
    from models import ENCODERS
    return ENCODERS[encoder].dim


def convert_file(path, word_map_path):
    """tools/convert_tutorial.py's and --word-map's work: tutorial checkpoint + word map -> checkpoint dict."""
    word_map = read_word_map(word_map_path)
    return convert(read_tutorial_file(path), word_map, path, word_map_path)


def load_checkpoint(path, word_map_path=None):
    """A checkpoint for captioning: the tutorial's file converted in memory when `word_map_path` is
    given, else this suite's (checkpoint.load), with a line saying what to do when it is the tutorial's."""
    if word_map_path:
        return convert_file(path, word_map_path)
    try:
        return checkpoint.load(path)
    except ValueError:
        if not looks_like_tutorial(path):
            raise
    folder = os.path.dirname(path) or '.'
    found = sorted(f for f in os.listdir(folder) if f.startswith('WORDMAP_') and f.endswith('.json'))
    word_map = os.path.join(folder, found[0]) if len(found) == 1 else 'WORDMAP_....json'
    raise ValueError(f"{path}: a checkpoint of the tutorial ({TUTORIAL}): add --word-map {word_map} (the word "
                     f'map it was trained with) to convert it as it loads, or convert it once: python '
                     f'tools/convert_tutorial.py {path} {word_map} OUT.pt')

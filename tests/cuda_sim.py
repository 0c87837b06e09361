"""A simulated CUDA device: the suite's own code runs with device='cuda', unchanged, on a machine
without a GPU, and every place where tensors of two devices meet fails with the line that did it.

    from cuda_sim import simulated_cuda
    with simulated_cuda() as sim:           # or the `cuda_sim` fixture of conftest.py
        main(['--device', 'cuda', ...])     # 01_train.py, 02, 03, the server's Captioner...
    assert not sim.errors                   # every simulated failure, even one the code caught

How it works. Every tensor stays a plain CPU tensor (autograd, kernels and values are the CPU's),
and "device memory" is a label on storages: a tensor is on the simulated GPU when its storage was
made there (a factory with device='cuda', .to('cuda') / .cuda(), or an op with a CUDA input).
Views share their base's storage, so they share its device, as on a GPU. A TorchFunctionMode sees
every call of the torch API made from Python (functions, methods, operators, indexing, property
reads such as .device / .is_cuda / .grad) and

- answers .device, .is_cuda, .is_cpu and .get_device() from the label (cuda:0 or the real device);
- before running an op, checks its tensor arguments as the CUDA kernels do: tensors of two devices
  (cuda:0 and a CPU tensor that is not a 0-dim scalar, or a CPU torch.Generator) raise
  SimulatedCudaError, "Expected all tensors to be on the same device ...", naming the op, the
  argument and the first line of this repository on the stack. The rules PyTorch relaxes are
  kept: CPU 0-dim tensors mix with CUDA ones; CPU index tensors index a CUDA tensor; copy_ / .to
  cross devices; pack_padded_sequence's lengths and PackedSequence.batch_sizes live on the CPU;
- labels the outputs of ops with a CUDA input, and of factories given device='cuda' (run with
  device='cpu'); .to('cuda') / .cuda() copy (a new storage), .cpu() / .to('cpu') copy back;
- refuses .numpy() / np.asarray() of a CUDA tensor (TypeError, as torch does), while .item(),
  .tolist(), float() and bool() work (and count as synchronisations);
- applies CUDA autocast (torch.autocast('cuda', ...)) to ops with CUDA inputs: the op lists of
  PyTorch's CUDA autocast (lower precision: linear, matmul, bmm, conv, lstm_cell, ...; fp32:
  softmax, log_softmax, layer_norm, losses, sum, exp, pow, ...; promote), cast above autograd as the
  real autocast does, so the dtypes that meet downstream are a GPU's;
- pinned memory: .pin_memory() copies and marks the copy; .is_pinned() reads the mark; the
  DataLoader's pin_memory=True path runs. Host-to-device copies are counted (sim.stats), with
  non_blocking ones from pinned and from pageable memory apart. A device-to-host copy made with
  non_blocking=True is "in flight" until a synchronisation (torch.cuda.synchronize(), .item(),
  a blocking copy): reading it before that raises SimulatedCudaError;
- answers the torch.cuda calls the code makes (is_available, device_count, is_bf16_supported,
  synchronize, get_device_name / properties / capability, set_device, current_device, memory
  figures from the labelled storages, RNG state, streams) and torch.accelerator's (the DataLoader's
  pin-memory thread); any other torch.cuda call that would start the real driver raises
  SimulationGap naming it. cuDNN is off (nn.LSTM takes the native path: see below).

Threads started while the simulation is on (a DataLoader's pin-memory thread, the server's model
thread, uvicorn) run under it too; `python tests/cuda_sim.py SCRIPT [ARGS...]` runs a whole script
under it (benchmarks/gpu_check.py --launcher starts the server's process that way).

What it cannot show (docs/gpu.md): kernels and their numerics (every op runs the CPU's kernel;
cuDNN, fused and flash kernels never run), speed, real memory (the figures count the storages
labelled here, not the caching allocator), NCCL and multi-GPU work, torch.compile on CUDA, CUDA
streams beyond the in-flight rule, and device checks inside PyTorch's own C++ (an op's internals
run on the CPU: only the arguments the Python code passes are checked).
"""
import contextlib
import linecache
import os
import sys
import threading
import types
import weakref

import torch
from torch.overrides import TorchFunctionMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
CUDA0 = torch.device('cuda', 0)
DEVICE_NAME = 'Simulated CUDA device (tests/cuda_sim.py, CPU kernels)'


class SimulatedCudaError(RuntimeError):
    """A device mismatch (or another CUDA-only failure) the simulation found."""


class SimulationGap(RuntimeError):
    """Code asked the real CUDA driver for something the simulation does not answer."""


# ---- CUDA autocast's op lists (aten names; torch/testing/_internal/autocast_test_lists.py of the
# installed PyTorch lists the same ops: tests/test_cuda_sim.py checks that none is missing) ----
AUTOCAST_LOWER = frozenset({
    '_convolution', 'conv1d', 'conv2d', 'conv3d', 'conv_tbc', 'conv_transpose1d', 'conv_transpose2d',
    'conv_transpose3d', 'convolution', 'cudnn_convolution', 'cudnn_convolution_transpose', 'prelu', 'addmm',
    'addmv', 'addr', 'matmul', 'einsum', 'mm', 'mv', 'chain_matmul', 'addbmm', 'baddbmm', 'bmm',
    '_thnn_fused_lstm_cell', '_thnn_fused_gru_cell', 'lstm_cell', 'gru_cell', 'rnn_tanh_cell', 'rnn_relu_cell',
    'linear', 'linalg_vecdot', 'linalg_multi_dot', '__matmul__', '__rmatmul__',
    'scaled_dot_product_attention', '_scaled_dot_product_flash_attention',
    # cuDNN's RNN casts under autocast (_cudnn_rnn): nn.LSTM / GRU / RNN on a GPU
    'lstm', 'gru', 'rnn_tanh', 'rnn_relu',
    # a Python composite of the ops above (its linears and bmms run in the lower precision)
    'multi_head_attention_forward'})
AUTOCAST_FP32 = frozenset({
    'acos', 'asin', 'cosh', 'erfinv', 'exp', 'expm1', 'log', 'log10', 'log2', 'log1p', 'reciprocal', 'rsqrt',
    'sinh', 'tan', 'pow', '__pow__', 'softplus', 'layer_norm', 'rms_norm', 'group_norm', 'norm',
    'frobenius_norm', 'nuclear_norm', 'cosine_similarity', 'poisson_nll_loss', 'cosine_embedding_loss',
    'nll_loss', 'nll_loss2d', 'hinge_embedding_loss', 'kl_div', 'l1_loss', 'smooth_l1_loss', 'huber_loss',
    'mse_loss', 'margin_ranking_loss', 'multilabel_margin_loss', 'soft_margin_loss', 'triplet_margin_loss',
    'multi_margin_loss', 'binary_cross_entropy_with_logits', 'dist', 'pdist', 'cdist', 'renorm', 'logsumexp',
    # Python composites whose every step is fp32 under CUDA autocast (log_softmax + nll_loss; a norm)
    'cross_entropy', 'cross_entropy_loss', 'normalize'})
AUTOCAST_FP32_OPT_DTYPE = frozenset({'softmax', 'log_softmax', 'cumprod', 'cumsum', 'prod', 'sum',
                                     'linalg_vector_norm', 'linalg_matrix_norm'})
AUTOCAST_PROMOTE = frozenset({'addcdiv', 'addcmul', 'atan2', 'bilinear', 'cross', 'dot', 'vdot', 'grid_sampler',
                              'index_put', 'tensordot', 'scatter_add'})
AUTOCAST_BANNED = frozenset({'binary_cross_entropy'})

# Calls that only read metadata, or that the simulation leaves as they are.
PASSTHROUGH = frozenset({
    'size', 'dim', 'numel', 'stride', 'is_contiguous', 'storage_offset', 'element_size', 'data_ptr',
    'untyped_storage', 'storage', '_typed_storage', '__len__', '__hash__', 'is_floating_point', 'is_complex',
    'requires_grad_', 'retain_grad', 'register_hook', '__reduce_ex__', '__setstate__', '__repr__', '__str__',
    '__format__', '__dir__', 'nelement', 'ndimension', 'has_names', 'is_shared', 'is_signed', 'backward',
    '_is_view', 'is_inference', 'share_memory_', '_has_compatible_shallow_copy_type', 'is_same_size',
    'is_set_to', '_version', 'get_autocast_dtype', 'is_autocast_enabled'})
GETTERS_PLAIN = frozenset({'shape', 'dtype', 'requires_grad', 'is_leaf', 'grad_fn', 'names', 'layout', 'ndim',
                           'output_nr', '_version', 'itemsize', 'nbytes', 'is_sparse', 'is_quantized', 'is_meta',
                           'is_nested', 'is_mkldnn', 'is_mps', 'is_xpu', 'is_mtia', 'is_ipu', 'is_xla',
                           'is_vulkan', 'is_maia', 'is_sparse_csr', 'is_complex', '_backward_hooks', '_base',
                           '_cdata', 'T', 'mT', 'H', 'mH', 'real', 'imag', 'data', '_grad_fn', '_grad',
                           '_post_accumulate_grad_hooks', '__dict__', 'retains_grad', 'volatile'})
# Creation functions: their tensor arguments give data or a shape, never a second device to check.
CREATION = frozenset({'tensor', 'as_tensor', 'asarray', 'new_tensor', 'zeros_like', 'ones_like', 'empty_like',
                      'full_like', 'rand_like', 'randn_like', 'randint_like', 'new_zeros', 'new_ones', 'new_empty',
                      'new_full', 'new_empty_strided', 'from_numpy', 'scalar_tensor', 'empty_strided'})
# Ops whose result the host waits for (a synchronisation: earlier asynchronous copies have landed).
SYNCING = frozenset({'item', 'tolist', '__bool__', '__int__', '__float__', '__index__', '__complex__', 'nonzero',
                     'masked_select', 'unique', 'unique_consecutive', '_unique2', 'argwhere', 'equal'})
INDEXING = frozenset({'__getitem__', '__setitem__', 'index_put_', 'index_put', '_index_put_impl_'})
RNNS = frozenset({'lstm', 'gru', 'rnn_tanh', 'rnn_relu'})


class State:
    """What one simulation holds: the errors it raised (also those the code caught), counters,
    the memory labelled as device memory, and the answers of torch.cuda."""

    def __init__(self, bf16=True, device_count=1, total_memory=80 * 2 ** 30):
        self.active = False
        self.bf16, self.device_count, self.total_memory = bf16, device_count, total_memory
        self.errors, self.gaps = [], []
        self.stats = dict.fromkeys(('h2d_blocking', 'h2d_async_pinned', 'h2d_async_pageable', 'd2h_blocking',
                                    'd2h_async', 'pinned', 'synchronize', 'autocast_casts', 'ops'), 0)
        self.allocated = self.peak = 0
        self.epoch = 0                      # synchronisations so far (the in-flight rule)
        self.labelled = weakref.WeakSet()   # the storages made device memory (unlabelled when it ends)
        self.rng = torch.get_rng_state()    # what torch.cuda.get_rng_state answers

    def free(self, nbytes):
        self.allocated -= nbytes

    def sync(self):
        self.epoch += 1
        self.stats['synchronize'] += 1


_STATE = None   # the simulation in progress


def _storage(t):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):   # sparse, nested, functorch wrappers
        return None


def is_cuda(t):
    """Whether tensor `t` lives on the simulated GPU."""
    st = _storage(t)
    return st is not None and getattr(st, '_sim_cuda', False)


def _label(t):
    st = _storage(t)
    if st is None or getattr(st, '_sim_cuda', False):
        return
    st._sim_cuda = True
    state = _STATE
    if state is not None:
        state.labelled.add(st)
        n = st.nbytes()
        state.allocated += n
        state.peak = max(state.peak, state.allocated)
        weakref.finalize(st, state.free, n)


def _in_flight(t):
    """Mark a host tensor as the target of a non-blocking copy from the GPU (until the next sync)."""
    st = _storage(t)
    st._sim_in_flight = _STATE.epoch
    _STATE.labelled.add(st)


def _real_device(t):
    return torch._C.TensorBase.device.__get__(t)


def device_of(t):
    return CUDA0 if is_cuda(t) else _real_device(t)


def _tensors(obj, depth=0):
    """The tensors (and generators) of an argument: lists and tuples are searched, PackedSequence
    without its batch_sizes (CPU by design)."""
    if isinstance(obj, (torch.Tensor, torch.Generator)):
        yield obj
    elif isinstance(obj, (list, tuple)) and depth < 3:
        if type(obj).__name__ == 'PackedSequence':
            obj = (obj.data, obj.sorted_indices, obj.unsorted_indices)
        for x in obj:
            yield from _tensors(x, depth + 1)


def _label_outputs(out, depth=0):
    if isinstance(out, torch.Tensor):
        _label(out)
    elif isinstance(out, (list, tuple)) and depth < 3:
        if type(out).__name__ == 'PackedSequence':   # batch_sizes stays on the CPU, as on a GPU
            out = (out.data, out.sorted_indices, out.unsorted_indices)
        for x in out:
            _label_outputs(x, depth + 1)


# ---- where: the line of this repository that made the call ----

def _where():
    f = sys._getframe(1)
    outside = None   # the innermost frame outside torch and this module (a library calling torch)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name != HERE and not name.startswith(TORCH_DIR):
            if outside is None:
                outside = f
            if name.startswith(REPO + os.sep) and f'{os.sep}.venv{os.sep}' not in name and \
                    f'{os.sep}site-packages{os.sep}' not in name:
                line = linecache.getline(name, f.f_lineno).strip()
                where = f'{os.path.relpath(name, REPO)}:{f.f_lineno}: {line}'
                if outside is not f:
                    where += f' (inside {outside.f_code.co_filename}:{outside.f_lineno})'
                return where
        f = f.f_back
    if outside is not None:
        return f'{outside.f_code.co_filename}:{outside.f_lineno}'
    return 'an unknown place'


def _fail(message, error=SimulatedCudaError):
    text = f'{message} [simulated CUDA] at {_where()}'
    if _STATE is not None:
        _STATE.errors.append(text)
    raise error(text)


def _describe(t):
    if isinstance(t, torch.Generator):
        return f'a {t.device.type} torch.Generator'
    return f'a {device_of(t)} tensor of shape {list(t.shape)} ({str(t.dtype)[6:]})'


def _check(name, items):
    """items: (what, tensor or generator) of one op. Raise when CUDA and another device meet."""
    cuda, other = None, None
    for what, t in items:
        if isinstance(t, torch.Generator):
            if t.device.type != 'cuda':
                other = other or (what, t)
            continue
        if is_cuda(t):
            cuda = cuda or (what, t)
        elif not (t.dim() == 0 and _real_device(t).type == 'cpu'):   # a CPU scalar mixes with CUDA
            other = other or (what, t)
    if cuda is not None and other is not None:
        if isinstance(other[1], torch.Generator):
            _fail(f"Expected a 'cuda' device type for generator but found '{other[1].device.type}' "
                  f'({name}: {other[0]} is {_describe(other[1])}, {cuda[0]} is {_describe(cuda[1])})')
        _fail(f'Expected all tensors to be on the same device, but found at least two devices, '
              f'{CUDA0} and {device_of(other[1])}! ({name}: {other[0]} is {_describe(other[1])}, '
              f'{cuda[0]} is {_describe(cuda[1])})')
    return cuda is not None


def _check_in_flight(items):
    epoch = _STATE.epoch
    for what, t in items:
        if isinstance(t, torch.Tensor):
            st = _storage(t)
            if st is not None and getattr(st, '_sim_in_flight', None) == epoch:
                _fail(f'{what} was copied from the GPU with non_blocking=True and is read before any '
                      'synchronisation: its values may not have arrived (torch.cuda.synchronize(), or a '
                      'blocking copy, first)')


def _named(args, kwargs):
    items = []
    for i, a in enumerate(args):
        items += [(f'argument {i}', t) for t in _tensors(a)]
    for k, v in kwargs.items():
        items += [(f'argument {k!r}', t) for t in _tensors(v)]
    return items


# ---- autocast, as CUDA's (applied to ops with CUDA inputs while torch.autocast('cuda') is on) ----

def _eligible(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and is_cuda(t)


def _cast(obj, dtype, depth=0):
    if _eligible(obj):
        if obj.dtype != dtype:
            _STATE.stats['autocast_casts'] += 1
            out = obj.to(dtype)
            _label(out)
            return out
        return obj
    if isinstance(obj, (list, tuple)) and depth < 2 and type(obj).__name__ != 'PackedSequence':
        cast = [_cast(x, dtype, depth + 1) for x in obj]
        return type(obj)(cast) if type(obj) in (list, tuple) else obj
    return obj


def _autocast(name, args, kwargs):
    if not torch.is_autocast_enabled('cuda'):
        return args, kwargs
    if name in AUTOCAST_BANNED:
        _fail(f'torch.nn.functional.{name} and torch.nn.BCELoss are unsafe to autocast (CUDA autocast refuses '
              'them; use binary_cross_entropy_with_logits)')
    if name in AUTOCAST_LOWER:
        dtype = torch.get_autocast_dtype('cuda')
    elif name in AUTOCAST_FP32:
        dtype = torch.float32
    elif name in AUTOCAST_FP32_OPT_DTYPE:
        first = next((t for t in _tensors(args) if isinstance(t, torch.Tensor)), None)
        if first is not None and _eligible(first) and kwargs.get('dtype') is None and \
                not any(isinstance(a, torch.dtype) for a in args):
            kwargs = {**kwargs, 'dtype': torch.float32}
        return args, kwargs
    elif name in AUTOCAST_PROMOTE:
        floats = [t.dtype for t in _tensors((args, kwargs)) if _eligible(t)]
        if not floats:
            return args, kwargs
        dtype = torch.float32 if torch.float32 in floats else floats[0]
    else:
        return args, kwargs
    return tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kwargs.items()}


# ---- the special calls ----

def _check_index(device):
    if device.index is not None and not 0 <= device.index < _STATE.device_count:
        _fail(f'CUDA error: invalid device ordinal ({device}; the simulation has {_STATE.device_count} GPU(s))')


def _move(t, target, dtype, non_blocking, copy, memory_format):
    """t.to(...) between the CPU and the simulated GPU (target None: the same device)."""
    src = is_cuda(t)
    dst = src if target is None else target.type == 'cuda'
    if target is not None and target.type not in ('cpu', 'cuda'):
        return torch._C.TensorBase.to(t, target, dtype or t.dtype, non_blocking, copy, memory_format=memory_format)
    if target is not None and target.type == 'cuda':
        _check_index(target)
    kw = {'memory_format': memory_format} if memory_format is not None else {}
    if src == dst:
        if not src:
            _check_in_flight([('the tensor', t)])
        out = torch._C.TensorBase.to(t, dtype=dtype or t.dtype, non_blocking=non_blocking, copy=copy, **kw)
        if src:
            _label(out)
        return out
    out = torch._C.TensorBase.to(t, dtype=dtype or t.dtype, copy=True, **kw)   # a new storage: the other device
    stats = _STATE.stats
    if dst:   # host -> device
        _check_in_flight([('the tensor', t)])
        if not non_blocking:
            stats['h2d_blocking'] += 1
        elif getattr(_storage(t), '_sim_pinned', False):
            stats['h2d_async_pinned'] += 1
        else:
            stats['h2d_async_pageable'] += 1
        _label(out)
    elif non_blocking:   # device -> host, asynchronous: in flight until the next synchronisation
        stats['d2h_async'] += 1
        _in_flight(out)
    else:
        stats['d2h_blocking'] += 1
        _STATE.sync()
    return out


def _to(func, args, kwargs):
    t, rest, kw = args[0], list(args[1:]), dict(kwargs)
    copy = kw.pop('copy', False)
    bools = [a for a in rest if isinstance(a, bool)]
    rest = [a for a in rest if not isinstance(a, bool)]
    if rest and isinstance(rest[0], torch.Tensor):
        other = rest[0]
        target, dtype = device_of(other), other.dtype
        non_blocking = bools[0] if bools else kw.get('non_blocking', False)
        copy = bools[1] if len(bools) > 1 else copy
        memory_format = kw.get('memory_format')
    else:
        if bools:
            kw['non_blocking'] = bools[0]
            copy = bools[1] if len(bools) > 1 else copy
        target, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kw)
    return _move(t, target, dtype, non_blocking, copy, memory_format)


def _cuda_method(func, args, kwargs):
    t = args[0]
    device = args[1] if len(args) > 1 else kwargs.get('device')
    target = torch.device('cuda', device) if isinstance(device, int) else torch.device(device or 'cuda')
    non_blocking = args[2] if len(args) > 2 else kwargs.get('non_blocking', False)
    return _move(t, target, None, non_blocking, False, kwargs.get('memory_format'))


def _cpu_method(func, args, kwargs):
    return _move(args[0], torch.device('cpu'), None, False, False, kwargs.get('memory_format'))


def _type(func, args, kwargs):
    t = args[0]
    if len(args) == 1 and not kwargs:
        name = func(*args)
        return name.replace('torch.', 'torch.cuda.', 1) if is_cuda(t) else name
    wanted = args[1] if len(args) > 1 else kwargs.get('dtype')
    if isinstance(wanted, str) and '.cuda.' in wanted:
        return _move(t, CUDA0, None, kwargs.get('non_blocking', False), False, None).type(wanted.replace('.cuda', ''))
    if isinstance(wanted, str) and is_cuda(t):
        return _move(t, torch.device('cpu'), None, False, False, None).type(wanted)
    out = func(*args, **kwargs)
    if is_cuda(t):
        _label(out)
    return out


def _numpy(func, args, kwargs):
    t = args[0]
    force = func.__name__ == 'numpy' and kwargs.get('force', args[1] if len(args) > 1 else False)
    if is_cuda(t):
        if force:
            _STATE.sync()
            return func(t.clone(), force=True)
        _fail(f"can't convert {CUDA0} device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
              'memory first.', TypeError)
    _check_in_flight([('the tensor', t)])
    return func(*args, **kwargs)


def _pin_memory(func, args, kwargs):
    t = args[0]
    if is_cuda(t):
        _fail(f"cannot pin '{t.type()}' only dense CPU tensors can be pinned")
    out = t.clone(memory_format=torch.contiguous_format)
    _storage(out)._sim_pinned = True
    _STATE.stats['pinned'] += 1
    return out


def _is_pinned(func, args, kwargs):
    return bool(getattr(_storage(args[0]), '_sim_pinned', False)) and not is_cuda(args[0])


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get('non_blocking', False)
    to_gpu, from_gpu = is_cuda(dst), is_cuda(src)
    if not from_gpu:
        _check_in_flight([('the source', src)])
    out = func(*args, **kwargs)
    stats = _STATE.stats
    if to_gpu and not from_gpu:
        key = 'h2d_blocking' if not non_blocking else \
            'h2d_async_pinned' if getattr(_storage(src), '_sim_pinned', False) else 'h2d_async_pageable'
        stats[key] += 1
    elif from_gpu and not to_gpu:
        if non_blocking:
            stats['d2h_async'] += 1
            _in_flight(dst)
        else:
            stats['d2h_blocking'] += 1
            _STATE.sync()
    return out


def _type_as(func, args, kwargs):
    other = args[1] if len(args) > 1 else kwargs['other']
    return _move(args[0], device_of(other), other.dtype, False, False, None)


def _get_device(func, args, kwargs):
    return 0 if is_cuda(args[0]) else func(*args, **kwargs)


def _record_stream(func, args, kwargs):
    if not is_cuda(args[0]):
        _fail('record_stream needs a CUDA tensor')


def _indexing(func, args, kwargs):
    """x[i], x[i] = v, index_put(_): CPU index tensors may index a CUDA tensor (PyTorch moves them);
    the indexed tensor and the values follow the usual rule."""
    name = func.__name__
    t = args[0]
    index = args[1] if len(args) > 1 else kwargs.get('indices')
    index_items = list(_tensors(index))
    gpu = is_cuda(t)
    if not gpu and any(is_cuda(i) for i in index_items if isinstance(i, torch.Tensor)):
        _fail(f'indices should be either on cpu or on the same device as the indexed tensor (cpu) ({name}: '
              f'the index is on {CUDA0})')
    values = args[2] if len(args) > 2 else kwargs.get('values', kwargs.get('value'))
    items = [('the indexed tensor', t)]
    advanced = bool(index_items) or isinstance(index, list) or \
        (isinstance(index, tuple) and any(isinstance(i, (list, torch.Tensor)) for i in index))
    if isinstance(values, torch.Tensor) and (advanced or name != '__setitem__'):
        items.append(('the values', values))   # basic slicing assigns by copy_, which crosses devices
    _check_in_flight(items + [('the index', i) for i in index_items])
    _check(name, items)
    if gpu and name == 'index_put' and isinstance(values, torch.Tensor) and torch.is_autocast_enabled('cuda'):
        args, kwargs = _autocast('index_put', args, kwargs)
    out = func(*args, **kwargs)
    if gpu:
        _label_outputs(out)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and is_cuda(i) for i in index_items):
            _STATE.sync()   # a CUDA mask: its nonzero() waits for the device
    return out


def _rnn(func, args, kwargs):
    """_VF.lstm / gru / rnn_*: the packed form's batch_sizes (argument 1) must be a CPU tensor."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        if is_cuda(args[1]):
            _fail(f'batch_sizes should always be on CPU ({func.__name__})')
        rest = (args[0],) + tuple(args[2:])
        return _generic(func, args, kwargs, items=_named(rest, kwargs))
    return _generic(func, args, kwargs)


def _pack_padded(func, args, kwargs):
    """pack_padded_sequence / _pack_padded_sequence: the lengths are a list or a CPU tensor."""
    lengths = args[1] if len(args) > 1 else kwargs.get('lengths')
    if func.__name__ == '_pack_padded_sequence' and isinstance(lengths, torch.Tensor) and is_cuda(lengths):
        _fail(f"'lengths' argument should be a 1D CPU int64 tensor, but got 1D {CUDA0} "
              f'{str(lengths.dtype)[6:].capitalize()} tensor')
    items = _named((args[0],) + tuple(args[2:]), {k: v for k, v in kwargs.items() if k != 'lengths'})
    if not _check(func.__name__, items):
        return func(*args, **kwargs)
    out = func(*args, **kwargs)
    if func.__name__ == '_pack_padded_sequence':   # (data, batch_sizes): batch_sizes stays on the CPU
        _label(out[0])
    else:
        _label_outputs(out)
    return out


def _pad_packed(func, args, kwargs):
    """_pad_packed_sequence(data, batch_sizes, ...): batch_sizes on the CPU; it returns (padded, lengths on the CPU)."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor) and is_cuda(args[1]):
        _fail('batch_sizes should always be on CPU (_pad_packed_sequence)')
    out = func(*args, **kwargs)
    if is_cuda(args[0]):
        _label(out[0])
    return out


SPECIAL = {'to': _to, 'cuda': _cuda_method, 'cpu': _cpu_method, 'type': _type, 'numpy': _numpy,
           '__array__': _numpy, 'pin_memory': _pin_memory, 'is_pinned': _is_pinned, 'copy_': _copy_,
           'get_device': _get_device, 'type_as': _type_as, 'record_stream': _record_stream,
           '_pack_padded_sequence': _pack_padded, 'pack_padded_sequence': _pack_padded,
           '_pad_packed_sequence': _pad_packed, **{n: _indexing for n in INDEXING}, **{n: _rnn for n in RNNS}}


def _creation(func, name, args, kwargs):
    """A function given device=...: made on the CPU, labelled when the device is CUDA."""
    target = kwargs.get('device')
    if target is None:
        sources = [t for t in _tensors(args[:1]) if isinstance(t, torch.Tensor)]
        gpu = bool(sources) and is_cuda(sources[0])
        out = func(*args, **kwargs)
        if gpu:
            _label_outputs(out)
        return out
    target = torch.device('cuda', target) if isinstance(target, int) else torch.device(target)
    if target.type != 'cuda':
        _check_in_flight(_named(args, kwargs))
        out = func(*args, **kwargs)
        sources = [t for t in _tensors(args) if isinstance(t, torch.Tensor)]
        if name in ('as_tensor', 'asarray') and sources and is_cuda(sources[0]) and \
                _storage(out) is _storage(sources[0]):
            out = out.clone()   # as_tensor(cuda_tensor, device='cpu') is a copy on a GPU
            _STATE.sync()
        return out
    _check_index(target)
    generator = kwargs.get('generator')
    if isinstance(generator, torch.Generator) and generator.device.type != 'cuda':
        _fail(f"Expected a 'cuda' device type for generator but found '{generator.device.type}' ({name})")
    inputs = {id(_storage(t)) for t in _tensors((args, kwargs)) if isinstance(t, torch.Tensor)}
    out = func(*args, **{**kwargs, 'device': 'cpu'})
    if isinstance(out, torch.Tensor) and id(_storage(out)) in inputs:   # as_tensor(cpu_tensor, device='cuda')
        out = out.clone()
    if isinstance(out, torch.Tensor) and inputs and not is_cuda(out):
        _STATE.stats['h2d_blocking'] += 1
    _label_outputs(out)
    return out


def _generic(func, args, kwargs, items=None):
    name = getattr(func, '__name__', '')
    items = _named(args, kwargs) if items is None else items
    _check_in_flight(items)
    if not _check(name, items):
        return func(*args, **kwargs)
    args, kwargs = _autocast(name, args, kwargs)
    out = func(*args, **kwargs)
    _label_outputs(out)
    if name in SYNCING:
        _STATE.sync()
    return out


def _getter(func, args, kwargs):
    attr = getattr(func.__self__, '__name__', '')
    if attr in GETTERS_PLAIN:
        return func(*args, **kwargs)
    t = args[0]
    if attr == 'device':
        return CUDA0 if is_cuda(t) else func(*args, **kwargs)
    if attr == 'is_cuda':
        return is_cuda(t)
    if attr == 'is_cpu':
        return not is_cuda(t) and func(*args, **kwargs)
    if attr == 'grad':   # the engine makes gradients on their tensor's device
        g = func(*args, **kwargs)
        if g is not None and is_cuda(t):
            _label(g)
        return g
    return func(*args, **kwargs)


def _setter(func, args, kwargs):
    attr = getattr(func.__self__, '__name__', '')
    if attr == 'grad' and isinstance(args[1], torch.Tensor) and is_cuda(args[0]) != is_cuda(args[1]):
        _fail(f'assigned grad has data located on {device_of(args[1])}, whereas the tensor is on {device_of(args[0])}')
    return func(*args, **kwargs)


def _handle(func, args, kwargs):
    name = getattr(func, '__name__', '')
    if name == '__get__':
        return _getter(func, args, kwargs)
    if name == '__set__':
        return _setter(func, args, kwargs)
    if name in PASSTHROUGH:
        return func(*args, **kwargs)
    _STATE.stats['ops'] += 1
    special = SPECIAL.get(name)
    if special is not None:
        return special(func, args, kwargs)
    if name in CREATION or 'device' in kwargs:
        return _creation(func, name, args, kwargs)
    if name in SYNCING:
        t = args[0] if args else None
        if isinstance(t, torch.Tensor) and is_cuda(t):
            _STATE.sync()
    return _generic(func, args, kwargs)


class SimulatedCudaMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _STATE is None or not _STATE.active:
            return func(*args, **kwargs)
        return _handle(func, args, kwargs)


# ---- torch.cuda and torch.accelerator, answered ----

class _Stream:
    def __init__(self, device=None, *args, **kwargs):
        self.device = CUDA0

    def synchronize(self):
        _STATE.sync()

    def wait_stream(self, other):
        pass

    def query(self):
        return True

    def is_capturing(self):
        return False


class _Event:
    def __init__(self, enable_timing=False, *args, **kwargs):
        import time
        self._time, self._clock = None, time.perf_counter

    def record(self, stream=None):
        self._time = self._clock()

    def synchronize(self):
        _STATE.sync()

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end._time - self._time) * 1000.0


class _DeviceContext:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cuda_answers(state):
    def properties(device=None):
        return types.SimpleNamespace(name=DEVICE_NAME, total_memory=state.total_memory, major=9, minor=0,
                                     multi_processor_count=132, is_integrated=False, is_multi_gpu_board=False)

    def check_device(device=None):
        index = device.index if isinstance(device, torch.device) else device
        if isinstance(index, str):
            index = torch.device(index).index
        if index is not None and not 0 <= int(index) < state.device_count:
            _fail(f'CUDA error: invalid device ordinal ({device})')

    def set_device(device):
        check_device(device)

    def get_rng_state(device='cuda'):
        return state.rng.clone()

    def set_rng_state(new_state, device='cuda'):
        state.rng = new_state.clone()

    def lazy_init():
        frame = sys._getframe(1)
        gap = f'torch.cuda.{frame.f_code.co_name} is not answered by the simulation (tests/cuda_sim.py)'
        state.gaps.append(gap)
        raise SimulationGap(gap)

    def reset_peak(device=None):
        state.peak = state.allocated

    return {
        'is_available': lambda: True,
        'device_count': lambda: state.device_count,
        'is_bf16_supported': lambda including_emulation=True: state.bf16,
        'synchronize': lambda device=None: state.sync(),
        'current_device': lambda: 0,
        'set_device': set_device,
        'get_device_name': lambda device=None: (check_device(device), DEVICE_NAME)[1],
        'get_device_properties': properties,
        'get_device_capability': lambda device=None: (9, 0),
        'memory_allocated': lambda device=None: state.allocated,
        'max_memory_allocated': lambda device=None: state.peak,
        'memory_reserved': lambda device=None: state.allocated,
        'max_memory_reserved': lambda device=None: state.peak,
        'reset_peak_memory_stats': reset_peak,
        'reset_max_memory_allocated': reset_peak,
        'empty_cache': lambda: None,
        'mem_get_info': lambda device=None: (state.total_memory - state.allocated, state.total_memory),
        'get_rng_state': get_rng_state,
        'get_rng_state_all': lambda: [get_rng_state() for _ in range(state.device_count)],
        'set_rng_state': set_rng_state,
        'set_rng_state_all': lambda states: set_rng_state(states[0]),
        'manual_seed': lambda seed: None,
        'manual_seed_all': lambda seed: None,
        'seed': lambda: None,
        'seed_all': lambda: None,
        'is_initialized': lambda: True,
        '_lazy_init': lazy_init,
        'current_stream': lambda device=None: _Stream(),
        'default_stream': lambda device=None: _Stream(),
        'Stream': _Stream,
        'Event': _Event,
        'device': _DeviceContext,
        'stream': lambda stream=None: contextlib.nullcontext(),
        'is_current_stream_capturing': lambda: False,
    }


def _accelerator_answers(state):
    return {'is_available': lambda: True, 'current_accelerator': lambda check_available=False: torch.device('cuda'),
            'device_count': lambda: state.device_count, 'current_device_index': lambda: 0,
            'current_device_idx': lambda: 0, 'set_device_index': lambda device: None,
            'set_device_idx': lambda device: None, 'synchronize': lambda device=None: state.sync(),
            'current_stream': lambda device=None: _Stream()}


def _group_by_device_and_dtype(tensorlistlist, with_indices=False):
    """torch's grouping of optimizer / GradScaler / clip_grad tensors, by the simulated devices."""
    groups = {}
    for i, t in enumerate(tensorlistlist[0]):
        key = (device_of(t), t.dtype)
        if key not in groups:
            groups[key] = ([[] for _ in tensorlistlist], [])
        for j, tensors in enumerate(tensorlistlist):
            if len(tensors):   # an empty list (e.g. Adam's max_exp_avg_sqs without amsgrad) stays empty
                groups[key][0][j].append(tensors[i])
        groups[key][1].append(i)
    return groups


def _bootstrap_wrapper(original):
    def bootstrap_inner(self):
        if _STATE is not None and _STATE.active:
            with SimulatedCudaMode():
                return original(self)
        return original(self)
    return bootstrap_inner


@contextlib.contextmanager
def simulated_cuda(bf16=True, device_count=1, total_memory=80 * 2 ** 30):
    """Run the body as on a machine with `device_count` CUDA GPU(s) (see the module docstring).
    Yields the State: .errors (every simulated failure, even those the code caught), .gaps,
    .stats, .allocated / .peak. bf16: what torch.cuda.is_bf16_supported() answers (False: the
    fp16 + GradScaler path of 01_train.py --amp)."""
    global _STATE
    if _STATE is not None and _STATE.active:
        raise RuntimeError('a CUDA simulation is already running')
    state = State(bf16, device_count, total_memory)
    patches = []

    def patch(owner, name, value):
        had = name in vars(owner) if isinstance(owner, type) else hasattr(owner, name)
        old = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name, None)
        patches.append((owner, name, old, had))
        setattr(owner, name, value)

    import torch.cuda
    for name, value in _cuda_answers(state).items():
        patch(torch.cuda, name, value)
    if hasattr(torch, 'accelerator'):
        for name, value in _accelerator_answers(state).items():
            if hasattr(torch.accelerator, name):
                patch(torch.accelerator, name, value)
    from torch.utils import _foreach_utils
    original_group = _foreach_utils._group_tensors_by_device_and_dtype
    for module in list(sys.modules.values()):
        try:
            found = isinstance(module, types.ModuleType) and \
                vars(module).get('_group_tensors_by_device_and_dtype') is original_group
        except Exception:  # noqa: BLE001 - odd objects in sys.modules
            found = False
        if found:
            patch(module, '_group_tensors_by_device_and_dtype', _group_by_device_and_dtype)
    from torch.optim import Optimizer
    patch(Optimizer, '_group_tensors_by_device_and_dtype',
          staticmethod(lambda tensorlistlist, with_indices=False: _group_by_device_and_dtype(tensorlistlist)))
    patch(threading.Thread, '_bootstrap_inner', _bootstrap_wrapper(threading.Thread._bootstrap_inner))
    cudnn = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False   # nn.LSTM's cuDNN weights (flatten_parameters) have no CPU kernel
    _STATE, state.active = state, True
    try:
        with SimulatedCudaMode():
            yield state
    finally:
        state.active = False
        for st in list(state.labelled):   # a later simulation starts with no device memory
            for mark in ('_sim_cuda', '_sim_in_flight'):
                if hasattr(st, mark):
                    delattr(st, mark)
        torch.backends.cudnn.enabled = cudnn
        for owner, name, value, had in reversed(patches):
            if had:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        _STATE = None


def main(argv=None):
    """python tests/cuda_sim.py SCRIPT [ARGS...]: run a script (e.g. 04_serve.py --device cuda) under
    the simulation, as a launcher (benchmarks/gpu_check.py --launcher). Exit status: the script's, or
    3 when the simulation recorded a failure that the script caught and did not fail on."""
    import runpy
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(main.__doc__)
        return 0 if argv else 2
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(script)
    if REPO not in sys.path:
        sys.path.insert(1, REPO)
    status = 0
    with simulated_cuda() as sim:
        try:
            runpy.run_path(script, run_name='__main__')
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    for problem in sim.errors + sim.gaps:
        print(f'simulated CUDA: {problem}', file=sys.stderr)
    return status or (3 if sim.errors or sim.gaps else 0)


if __name__ == '__main__':
    sys.exit(main())

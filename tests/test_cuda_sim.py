"""The CUDA paths, on the simulated device of tests/cuda_sim.py (no GPU needed).

First, that the simulation is honest: each classic first-GPU-run failure, planted on purpose, fails
here and names its line, while what CUDA allows keeps working; a tensor planted in the real training
code is caught there; and a simulated run changes no number (it gives the CPU's results exactly).
Then the suite's own code with device='cuda', unchanged: training for every decoder (cross-entropy
under autocast bf16 with its validation, then self-critical from it under fp16 with the GradScaler,
both through the pinned-memory DataLoader and a feature cache built on the device), the beam search
(batched, ensembles, bad endings, no-repeat) and the sampler, equal to the CPU's; 02's batch pipeline
(pinned memory, non-blocking copies, attention figures), 03 and the server's captioning call, equal
to the CPU's; int8 refusing CUDA as designed; the benchmarks' CUDA paths. (sat's training, encoder
fine-tuning, fp16 cross-entropy and bf16 self-critical training run in tests/test_gpu_check.py's
simulated dry run of benchmarks/gpu_check.py; the ONNX runtime's fallback to the CPU in
tests/test_onnx.py.)
"""
import contextlib
import copy
import importlib
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, script, train_flags
from cuda_sim import (AUTOCAST_BANNED, AUTOCAST_FP32, AUTOCAST_FP32_OPT_DTYPE, AUTOCAST_LOWER, AUTOCAST_PROMOTE,
                      SimulatedCudaError, SimulationGap, simulated_cuda)
from test_beam_search import WORD_MAP, C, decoder, features

from captioning import checkpoint
from captioning.decoders import registry
from captioning.decoding import ensemble, quantize, search

HERE = 'tests/test_cuda_sim.py'
NAMES = list(registry.DECODERS)
train_script = script('01_train')


def caught(fn, error=SimulatedCudaError):
    with pytest.raises(error) as info:
        fn()
    return str(info.value)


def here(offset=1):
    """'tests/test_cuda_sim.py:N:' for the line `offset` lines below the caller's."""
    return f'{HERE}:{sys._getframe(1).f_lineno + offset}:'


# ----------------------------------------------------------------------------------------------
# The simulation is honest

def test_each_classic_first_gpu_run_failure_is_caught_and_names_its_line():
    with simulated_cuda() as sim:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.is_bf16_supported()
        x = torch.randn(3, 4, device='cuda')
        assert x.device == torch.device('cuda', 0) and x.is_cuda and x.get_device() == 0
        assert x.type() == 'torch.cuda.FloatTensor' and (x[1:] * 2).t().is_cuda   # views and results stay

        mask = torch.zeros(3, 4, dtype=torch.bool)                 # a mask made without device=
        where = here()
        message = caught(lambda: x.masked_fill(mask, 0.0))
        assert message.startswith('Expected all tensors to be on the same device') and 'cuda:0 and cpu' in message
        assert where in message and 'x.masked_fill(mask, 0.0)' in message

        where = here()
        assert where in caught(lambda: x + torch.arange(4))          # an index made without device=

        def helper(t):                                             # a device hard-coded to the CPU
            return t + torch.zeros(t.shape, device='cpu')
        where = here(-1)
        assert where in caught(lambda: helper(x))

        class Model(torch.nn.Module):
            def __init__(self, as_buffer):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(4))
                if as_buffer:
                    self.register_buffer('offset', torch.arange(4.0))
                else:
                    self.offset = torch.arange(4.0)                # a plain attribute: .to() leaves it behind
            def forward(self, t):
                return t * self.w + self.offset
        Model(as_buffer=True).to('cuda')(x)
        where = here(-2)
        assert where in caught(lambda: Model(as_buffer=False).to('cuda')(x))

        where = here()
        message = caught(lambda: x.numpy(), TypeError)               # .numpy() of a CUDA tensor
        assert "can't convert cuda:0 device type tensor to numpy" in message and where in message
        caught(lambda: np.asarray(x), TypeError)
        assert x.cpu().numpy().shape == (3, 4) and not x.cpu().is_cuda

        g = torch.Generator().manual_seed(0)                      # a CPU generator for a CUDA draw
        message = caught(lambda: torch.rand(3, device='cuda', generator=g))
        assert "Expected a 'cuda' device type for generator" in message
        caught(lambda: torch.index_select(x, 0, torch.tensor([0, 2])))   # kernels that want one device

        # what CUDA allows keeps working
        assert isinstance(x.sum().item(), float) and len(x.tolist()) == 3 and bool(x[0, 0] == x[0, 0])
        assert (x + torch.tensor(2.0)).is_cuda                     # a CPU 0-dim tensor is a scalar
        assert x[torch.tensor([0, 2])].is_cuda and x[torch.tensor([True, False, True])].shape == (2, 4)
        assert x.to('cuda') is x and x.cpu().to('cuda').is_cuda and x.new_zeros(2).is_cuda

        # a copy from the GPU made with non_blocking=True is read before any synchronisation
        pinned = torch.ones(5).pin_memory()
        assert pinned.is_pinned() and not torch.ones(5).is_pinned()
        back = pinned.to('cuda', non_blocking=True).to('cpu', non_blocking=True)
        where = here()
        assert where in caught(lambda: back + 1)
        torch.cuda.synchronize()
        assert (back + 1).sum().item() == 10

        # dtypes under autocast meet as on a GPU: a bf16 result added into an fp32 buffer by index_add_
        lin = torch.nn.Linear(4, 4).cuda()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            h = lin(x)
        assert h.dtype == torch.bfloat16 and h.is_cuda
        with pytest.raises(RuntimeError, match='same (scalar type|dtype)|dtype'):
            torch.zeros(3, 4, device='cuda').index_add_(0, torch.tensor([0, 1, 2], device='cuda'), h)

        # torch.cuda's answers, and a call it does not answer
        before = torch.cuda.memory_allocated()
        big = torch.empty(2 ** 18, device='cuda')                  # 1 MiB
        assert torch.cuda.memory_allocated() - before == 2 ** 20 and torch.cuda.max_memory_allocated() >= 2 ** 20
        del big
        assert torch.cuda.memory_allocated() == before
        assert 'Simulated' in torch.cuda.get_device_name(0)
        caught(lambda: torch.cuda.ipc_collect(), SimulationGap)
    assert len(sim.errors) == 9 and len(sim.gaps) == 1             # every failure above is on the record
    # after the simulation: nothing left behind
    assert not torch.cuda.is_available() and x.device.type == 'cpu' and torch.backends.cudnn.enabled
    assert (x + torch.arange(4)).shape == (3, 4)


def test_autocast_follows_the_cuda_op_lists_of_this_pytorch():
    """The op lists of CUDA autocast in the installed PyTorch's own test lists are all in the
    simulation's, each in its category; and the dtypes that come out are CUDA autocast's."""
    path = os.path.join(os.path.dirname(torch.__file__), 'testing', '_internal', 'autocast_test_lists.py')
    source = open(path, encoding='utf-8').read()
    cuda = source[source.index('class AutocastTestLists'):]
    cuda = cuda[:cuda.find('\nclass ', 1) if '\nclass ' in cuda[1:] else len(cuda)]
    wanted = {'torch_fp16': AUTOCAST_LOWER, 'nn_fp16': AUTOCAST_LOWER, 'linalg_fp16': AUTOCAST_LOWER,
              'methods_fp16': AUTOCAST_LOWER, 'torch_fp32': AUTOCAST_FP32 | AUTOCAST_FP32_OPT_DTYPE,
              'nn_fp32': AUTOCAST_FP32, 'methods_fp32': AUTOCAST_FP32, 'torch_need_autocast_promote': AUTOCAST_PROMOTE,
              'banned': AUTOCAST_BANNED}
    for section, ours in wanted.items():
        block = re.search(rf'self\.{section} = \[(.*?)\n        \]', cuda, re.S)
        assert block, section
        names = set(re.findall(r'^\s+(?:#\s*)?\("(\w+)"', block.group(1), re.M))
        assert names and names <= ours, (section, sorted(names - ours))

    with simulated_cuda() as sim:
        x = torch.randn(5, 4, device='cuda')
        lin, cell = torch.nn.Linear(4, 3).cuda(), torch.nn.LSTMCell(4, 6).cuda()
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast('cuda', dtype=dtype):
                y = lin(x)
                h, c = cell(x)
                assert y.dtype == dtype and h.dtype == dtype and c.dtype == dtype
                assert F.softmax(y, dim=1).dtype == torch.float32 and y.sum().dtype == torch.float32
                assert F.cross_entropy(y, torch.tensor([0, 1, 2, 0, 1], device='cuda')).dtype == torch.float32
                assert F.layer_norm(y, (3,)).dtype == torch.float32 and torch.exp(y).dtype == torch.float32
                assert (y + 1).dtype == dtype and torch.cat([y, x[:, :3]]).dtype == torch.float32
                assert torch.mm(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.float32   # CPU: not cast
        assert (lin(x).dtype, sim.stats['autocast_casts'] > 0) == (torch.float32, True)      # off again
    assert not sim.errors


@pytest.fixture(scope='module')
def sim_data(synth_data, tmp_path_factory):
    """A copy of the tiny synthetic set without feature caches (they are built by the runs)."""
    folder, name = synth_data
    fresh = tmp_path_factory.mktemp('sim_data') / 'data'
    shutil.copytree(folder, fresh, ignore=shutil.ignore_patterns('features'))
    return str(fresh), name


def run_01(data, out, *flags, device=None, bf16=True):
    """01_train.py for one step of the 48 TRAIN images (and its validation on 2 VAL images) -> (status,
    output, State of the simulation or None)."""
    folder, _ = data
    argv = ['--data-folder', folder, '--out-dir', str(out), '--epochs', '1', '--batch-size', '240',
            '--val-max-images', '2', '--val-beam-size', '2', *flags]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if device is None:
            return train_script.main(argv), printed.getvalue(), None
        with simulated_cuda(bf16=bf16) as sim:
            rc = train_script.main([*argv, '--device', device])
    return rc, printed.getvalue(), sim


def test_a_cpu_tensor_planted_in_the_training_code_is_caught_there(sim_data, tmp_path, monkeypatch):
    """Not a simulation that cannot fail: a tensor made without device= in the decoder's own code
    (here, patched in) stops the simulated run at that line."""
    from captioning.decoders import lstm
    real = lstm.ShowAttendTell.init_hidden_state

    def planted(self, encoder_out):
        h, c = real(self, encoder_out)
        return h + torch.zeros(h.size(1)), c                      # the planted line
    monkeypatch.setattr(lstm.ShowAttendTell, 'init_hidden_state', planted)
    with pytest.raises(SimulatedCudaError, match=re.escape(f"{HERE}:{planted.__code__.co_firstlineno + 2}:")):
        run_01(sim_data, tmp_path / 'planted', *train_flags('sat'), '--max-steps', '1', device='cuda')


def test_a_simulated_run_gives_the_cpus_numbers_exactly(sim_data, tmp_path_factory, tmp_path):
    """fp32 training (one step, validation, BEST), feature cache included, on the simulated device
    and on the CPU, each from a copy of the data without a cache: the same losses, scores, weights
    and cache bytes. The simulation changes where tensors are said to live, never what they hold."""
    copies = []
    for side in ('cpu', 'sim'):
        folder = tmp_path_factory.mktemp(f'exact_{side}') / 'data'
        shutil.copytree(sim_data[0], folder, ignore=shutil.ignore_patterns('features'))
        copies.append((str(folder), sim_data[1]))
    rc, _, _ = run_01(copies[0], tmp_path / 'cpu', *train_flags('sat'))
    assert rc == 0
    rc, _, sim = run_01(copies[1], tmp_path / 'sim', *train_flags('sat'), device='cuda')
    assert rc == 0 and not sim.errors and not sim.gaps
    assert sim.stats['h2d_async_pinned'] > 0 and sim.stats['h2d_async_pageable'] == 0   # pinned, non-blocking
    name = sim_data[1]
    cpu, gpu = (checkpoint.load(str(tmp_path / side / f'BEST_checkpoint_{name}.pt')) for side in ('cpu', 'sim'))
    assert all(torch.equal(cpu['decoder'][k], gpu['decoder'][k].cpu()) for k in cpu['decoder'])
    for log in ('steps.jsonl', 'metrics.jsonl'):
        rows = [[json.loads(line) for line in open(tmp_path / side / log)] for side in ('cpu', 'sim')]
        drop = ('captions_per_s', 'train_seconds', 'val_seconds')
        assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == \
            [{k: v for k, v in r.items() if k not in drop} for r in rows[1]]
    caches = [sorted(os.listdir(os.path.join(folder, 'features'))) for folder, _ in copies]
    assert caches[0] == caches[1] and len(caches[0]) == 2
    for file in caches[0]:
        assert open(os.path.join(copies[0][0], 'features', file), 'rb').read() == \
            open(os.path.join(copies[1][0], 'features', file), 'rb').read()


# ----------------------------------------------------------------------------------------------
# Training: every decoder, both objectives, both autocast dtypes

@pytest.mark.parametrize('name', [n for n in NAMES if n != 'sat'])
def test_training_on_simulated_cuda(name, sim_data, tmp_path):
    """Cross-entropy under autocast bf16 (forward, loss, backward, fused Adam; validation with the
    beam search) from the pinned DataLoader and the feature cache, then a step of self-critical
    training from its BEST under fp16 with the GradScaler (sampling, CIDEr-D reward, re-scoring).
    sat, the default decoder, runs the same rows (and fp16 cross-entropy, bf16 self-critical, a
    fine-tuned encoder) in tests/test_gpu_check.py's simulated dry run of make gpu-check."""
    rc, printed, sim = run_01(sim_data, tmp_path / 'xe', *train_flags(name), '--amp', device='cuda')
    assert rc == 0 and not sim.errors and not sim.gaps, sim.errors + sim.gaps
    assert 'device cuda:0, mixed precision: bf16' in printed and sim.stats['autocast_casts'] > 0
    assert sim.stats['h2d_async_pinned'] > 0 and sim.stats['h2d_async_pageable'] == 0
    best = tmp_path / 'xe' / f'BEST_checkpoint_{sim_data[1]}.pt'
    rc, printed, sim = run_01(sim_data, tmp_path / 'scst', '--objective', 'scst', '--init-from', str(best),
                              '--scst-samples', '2', '--scst-max-len', '8', '--workers', '0', '--log-every', '1',
                              '--amp', '--batch-size', '120', '--max-steps', '1', device='cuda', bf16=False)
    assert rc == 0 and not sim.errors and not sim.gaps, sim.errors + sim.gaps
    assert 'mixed precision: fp16 with a GradScaler' in printed
    saved = checkpoint.load(str(tmp_path / 'scst' / f'checkpoint_{sim_data[1]}.pt'))
    assert saved['scaler'] and saved['scaler']['scale'] > 0                      # the GradScaler stepped
    steps = [json.loads(line) for line in open(tmp_path / 'scst' / 'steps.jsonl')]
    assert steps and all(np.isfinite(s['loss']) and np.isfinite(s['reward']) for s in steps)


# ----------------------------------------------------------------------------------------------
# Decoding: the beam search and the sampler, equal to the CPU's

def _search_everything(dec, enc):
    """What the suite asks of the search: a batch of images with beams, no-repeat, bad endings,
    min_len and length normalisation; the sampler (self-critical training's) with uniforms."""
    beams = search.beam_search(dec, enc, WORD_MAP, beam_size=3, max_len=6, no_repeat_ngram_size=2,
                               no_end_after=[WORD_MAP['a']], min_len=2, length_norm=0.5)
    uniforms = torch.rand(enc.size(0) * 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        samples = search.sample_captions(dec, enc, WORD_MAP, n=2, max_len=6, uniforms=uniforms)
    return beams, samples


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def _host(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host(x) for x in obj)
    return obj


@pytest.mark.parametrize('name', NAMES)
def test_search_and_sampling_on_simulated_cuda_equal_the_cpu(name):
    dec, enc = decoder(1, name=name), features(3, 2)
    pair = ensemble.EnsembleDecoder([decoder(1, name=name), decoder(11, name='sat')], [(4, C), (4, C)]).eval()
    packed = torch.cat([enc.reshape(3, -1), features(3, 102).reshape(3, -1)], 1).unsqueeze(1)

    def both(dec, pair, enc, packed):   # the decoder alone; in an ensemble with a SAT decoder
        return [_search_everything(dec, enc),
                search.beam_search(pair, packed, WORD_MAP, beam_size=2, max_len=6, no_repeat_ngram_size=2)]
    cpu = both(dec, pair, enc, packed)
    with simulated_cuda() as sim:
        on_gpu = _host(both(copy.deepcopy(dec).to('cuda'), copy.deepcopy(pair).cuda(), enc.to('cuda'), packed.cuda()))
    assert not sim.errors and not sim.gaps
    _same(cpu, on_gpu)


# ----------------------------------------------------------------------------------------------
# 02, 03, the server, int8

def torch_engine(script_module):
    """['--runtime', 'torch'] where the script has --runtime (the encoder in PyTorch on the CPU too, as
    it is on a GPU: the CPU run is then the same computation as the simulated one), else []."""
    return ['--runtime', 'torch'] if hasattr(script_module.parse_args([]), 'runtime') else []


@pytest.mark.parametrize('loader', ['processes', 'threads'])
def test_02_batch_pipeline_on_simulated_cuda_equals_the_cpu(tiny_checkpoint, tmp_path, loader):
    """Batches read ahead (by a DataLoader worker process through the pin-memory thread, or by reader
    threads), copied with non_blocking=True, the batched beam search with bad endings and no-repeat,
    attention figures from CUDA alphas: the CPU run's captions. With DataLoader workers the batches
    travel pinned; the reader threads give pageable batches, whose non-blocking copy a GPU makes
    synchronously (not a mismatch; counted, and said in docs/gpu.md)."""
    infer = script('02_inference')
    has_loader = hasattr(infer.parse_args([]), 'loader')
    if loader == 'threads' and not has_loader:
        pytest.skip('02_inference.py has no --loader: its readers are DataLoader workers only')
    photos = os.path.join(REPO, 'assets', 'samples')
    argv = ['--img', photos, '--checkpoint', tiny_checkpoint, '--batch-size', '2', '--workers', '1',
            '--visualize', '--max-len', '12', *torch_engine(infer), *(['--loader', loader] if has_loader else [])]
    assert infer.main([*argv, '--out', str(tmp_path / 'cpu'), '--device', 'cpu']) == 0
    with simulated_cuda() as sim:
        assert infer.main([*argv, '--out', str(tmp_path / 'gpu'), '--device', 'cuda']) == 0
    assert not sim.errors and not sim.gaps
    if loader == 'processes':
        assert sim.stats['pinned'] >= 3 and sim.stats['h2d_async_pinned'] >= 3 and sim.stats['h2d_async_pageable'] == 0
    else:
        assert sim.stats['h2d_async_pinned'] + sim.stats['h2d_async_pageable'] >= 3
    rows = [json.load(open(tmp_path / side / 'captions.json')) for side in ('cpu', 'gpu')]
    assert len(rows[0]) == 5 and rows[0] == rows[1]
    assert sorted(p.name for p in (tmp_path / 'gpu').glob('*_attention.png')) == \
        sorted(p.name for p in (tmp_path / 'cpu').glob('*_attention.png'))


def test_03_on_simulated_cuda_equals_the_cpu(tiny_checkpoint, synth_data, tmp_path):
    evaluate = script('03_evaluate')
    folder, _ = synth_data
    argv = ['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'TEST', '--metrics', 'nltk',
            '--beam-sizes', '1', '2', '--max-len', '12', *torch_engine(evaluate)]
    assert evaluate.main([*argv, '--device', 'cpu', '--out', str(tmp_path / 'cpu.json')]) == 0
    with simulated_cuda() as sim:
        assert evaluate.main([*argv, '--device', 'cuda', '--out', str(tmp_path / 'gpu.json')]) == 0
    assert not sim.errors and not sim.gaps
    cpu, gpu = (json.load(open(tmp_path / f'{side}.json')) for side in ('cpu', 'gpu'))
    assert cpu['num_images'] == 6 and cpu == gpu


def test_the_servers_captioning_call_on_simulated_cuda_equals_the_cpu(tiny_checkpoint):
    """04_serve.py's API with the model on the device: the model thread (started under the simulation)
    loads, encodes and searches there; the answer equals the CPU server's, attention maps included."""
    import dataclasses
    pytest.importorskip('fastapi', reason='the web server extras are not installed '
                                          '(pip install -r requirements-extras.txt)')
    pytest.importorskip('httpx2', reason="FastAPI's test client needs httpx2 (pip install -r requirements-dev.txt)")
    from fastapi.testclient import TestClient
    serve = script('04_serve')
    engine = {'runtime': 'torch'} if 'runtime' in {f.name for f in dataclasses.fields(serve.Settings)} else {}
    with open(os.path.join(REPO, 'assets', 'samples', 'coffee.jpg'), 'rb') as f:
        photo = f.read()

    def ask(device):
        with TestClient(serve.create_app(tiny_checkpoint, device=device, max_len=10, **engine)) as client:
            health = client.get('/healthz').json()
            r = client.post('/api/caption', files={'image': ('coffee.jpg', photo)}, data={'beam_size': '2'})
        assert r.status_code == 200, r.text
        answer = r.json()
        for key in ('ms', 'model_ms'):
            answer.pop(key)
        return health['device'], answer
    cpu = ask('cpu')
    with simulated_cuda() as sim:
        gpu = ask('cuda')
    assert not sim.errors and not sim.gaps
    assert (cpu[0], gpu[0]) == ('cpu', 'cuda:0') and gpu[1]['caption'] and gpu[1]['attention']['maps']
    assert gpu[1] == cpu[1]


def test_int8_and_the_onnx_encoder_refuse_cuda_and_auto_stays_in_pytorch_there(tiny_checkpoint, tmp_path, capsys,
                                                                                cuda_sim):
    """As designed: --precision int8 (CPU only) and --runtime onnx (onnxruntime on the CPU) are one
    error line on a GPU; their `auto` takes fp32 and PyTorch there."""
    on_gpu = decoder(0).cuda()
    with pytest.raises(ValueError, match='int8 quantization runs on the CPU only'):
        quantize.apply_precision(on_gpu, 'int8', 'cuda')
    assert quantize.resolve('auto', on_gpu, 'cuda') == 'fp32'
    infer = script('02_inference')
    photo = os.path.join(REPO, 'assets', 'samples', 'coffee.jpg')
    refusals = [(['--precision', 'int8'], 'int8 quantization runs on the CPU only')]
    if torch_engine(infer):
        from captioning.decoding import runtime
        assert runtime.resolve('auto', 'cuda') == 'torch'
        refusals.append((['--runtime', 'onnx'], 'runtime onnx runs the encoder in onnxruntime on the CPU'))
    for flags, message in refusals:
        assert infer.main(['--img', photo, '--checkpoint', tiny_checkpoint, '--out', str(tmp_path), '--device', 'cuda',
                           *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith('error:') and len(err.splitlines()) == 1
    assert not cuda_sim.errors and not cuda_sim.gaps


def test_the_benchmarks_cuda_paths_on_simulated_cuda(capsys):
    """bench_infer.py with --tutorial (the tutorial's beam search, benchmarks/tutorial_reference.py) and
    bench_train.py --tutorial, tiny, with --device cuda. This found the tutorial reference's search
    making its beams' tokens and scores on the CPU (tutorial_reference.py, fixed: on the features'
    device)."""
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    bench_infer, bench_train = (importlib.import_module(n) for n in ('bench_infer', 'bench_train'))
    with simulated_cuda() as sim:
        bench_infer.main(['--decoder', 'sat', '--encoder', 'resnet18', '--vocab-size', '40', '--batch-sizes', '2',
                          '--beam-sizes', '2', '--max-len', '5', '--repeats', '1', '--tutorial', '--device', 'cuda',
                          '--json'])
        bench_train.main(['--synthetic-features', '--tutorial', '--dim', '16', '--batch-size', '8', '--vocab-size',
                          '40', '--warmup', '1', '--steps', '1', '--windows', '1', '--device', 'cuda', '--json'])
    assert not sim.errors and not sim.gaps, sim.errors
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    assert len(printed) == 2 and all(p['device'] == 'cuda:0' for p in printed)

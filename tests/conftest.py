"""Shared fixtures: a tiny prepared synthetic dataset and a tiny trained checkpoint, made once per
test session on CPU with random weights (no network)."""
import contextlib
import importlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Small settings shared by the training tests: a random resnet18 on 64 px images (2x2 features).
TINY_MODEL = ['--encoder', 'resnet18', '--encoder-weights', 'none', '--image-size', '64',
              '--encoded-image-size', '2', '--emb-dim', '16', '--attention-dim', '16', '--decoder-dim', '32',
              '--workers', '0', '--log-every', '1']


def script(name):
    """Import a numbered script (e.g. '01_train') as a module."""
    return importlib.import_module(name)


@pytest.fixture(scope='session', autouse=True)
def onnx_cache(tmp_path_factory):
    """The ONNX encoders that --runtime auto exports (captioning/decoding/runtime.py) go into one folder of
    this test session, not the user's ~/.cache (subprocesses inherit it)."""
    folder = str(tmp_path_factory.mktemp('onnx_cache'))
    old = os.environ.get('CAPTIONING_ONNX_CACHE')
    os.environ['CAPTIONING_ONNX_CACHE'] = folder
    yield folder
    if old is None:
        os.environ.pop('CAPTIONING_ONNX_CACHE', None)
    else:
        os.environ['CAPTIONING_ONNX_CACHE'] = old


@pytest.fixture(scope='session')
def synth_data(tmp_path_factory):
    """(data folder, data name) of a prepared 60-image synthetic set (48 TRAIN, 6 VAL, 6 TEST)."""
    folder = tmp_path_factory.mktemp('synth')
    rc = script('00_create_input_files').main(['--output-folder', str(folder), '--synthetic-images', '60',
                                               '--synthetic-image-size', '64', '--min-word-freq', '2'])
    assert rc == 0
    return str(folder), 'synthetic_5_cap_per_img_2_min_word_freq'


@pytest.fixture(scope='session')
def tiny_checkpoint(synth_data, tmp_path_factory):
    """Path of a BEST checkpoint trained for one epoch on the tiny synthetic set."""
    folder, name = synth_data
    out = tmp_path_factory.mktemp('run')
    rc = script('01_train').main(['--data-folder', folder, '--out-dir', str(out), '--epochs', '1',
                                  '--batch-size', '20', *TINY_MODEL])
    assert rc == 0
    return str(out / f'BEST_checkpoint_{name}.pt')


@pytest.fixture
def cuda_sim():
    """The simulated CUDA device of tests/cuda_sim.py around one test (docs/gpu.md): code given
    device='cuda' runs on the CPU, and tensors of two devices meeting fail with the line that did it.
    Yields the simulation's State (.errors, .gaps, .stats)."""
    from cuda_sim import simulated_cuda
    with simulated_cuda() as sim:
        yield sim


# Tiny sizes for every decoder in the registry (each takes the settings it has).
TINY_DECODER = {'emb_dim': 4, 'attention_dim': 5, 'decoder_dim': 6, 'dropout': 0.0, 'max_len': 16,
                'lm_dim': 8, 'lm_layers': 2, 'lm_heads': 2, 'prefix_length': 2, 'clip_length': 2,
                'mapping_layers': 1, 'mapping_heads': 2, 'num_heads': 2}


def tiny_decoder(name, vocab_size, encoder_dim, seed=0, **settings):
    """A small random decoder of registry entry `name` in eval mode (no dropout)."""
    import torch

    from captioning.decoders import registry
    fields = registry.decoder_fields(name)
    settings = {k: v for k, v in {**TINY_DECODER, **settings}.items() if k in fields}
    torch.manual_seed(seed)
    return registry.build_decoder(name, vocab_size, encoder_dim, **settings).eval()


# Small sizes of the ClipCap scratch LM for 01_train.py
TINY_LM = ['--lm-dim', '16', '--lm-layers', '1', '--lm-heads', '2', '--prefix-length', '2']


def train_flags(name):
    """TINY_MODEL for 01_train.py with decoder `name` (only the settings it has)."""
    from captioning.decoders import registry
    flags, fields, i = ['--decoder', name], registry.decoder_fields(name), 0
    if 'lm_dim' in fields:
        flags += TINY_LM
    while i < len(TINY_MODEL):
        flag = TINY_MODEL[i]
        if flag.startswith('--') and flag[2:].replace('-', '_') in ('emb_dim', 'attention_dim', 'decoder_dim'):
            if flag[2:].replace('-', '_') in fields:
                flags += TINY_MODEL[i:i + 2]
            i += 2
            continue
        flags.append(flag)
        i += 1
    return flags


@contextlib.contextmanager
def served(app):
    """An ASGI app under uvicorn in a thread of this process, on a free 127.0.0.1 port -> its base URL."""
    import socket
    import threading
    import time

    import uvicorn
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning', access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, 'the server did not start'
        time.sleep(0.05)
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        srv.should_exit = True
        thread.join(timeout=30)

"""--runtime {auto,torch,onnx} (captioning/decoding/runtime.py): which engine runs the encoder, the cache of
exported encoders (keyed by the checkpoint's digest, rebuilt when stale or corrupt, read from nowhere
else), captions equal to PyTorch's for every exportable decoder and an ensemble, and 02's resume."""
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import REPO, script
from test_onnx import EXPORTABLE, tiny_checkpoint

from captioning.decoding import files, loading, runtime

SAMPLES = os.path.join(REPO, 'assets', 'samples')


def need_onnx():
    for package in runtime.NEEDS:
        pytest.importorskip(package)


def hide_onnxruntime(monkeypatch):
    """As if onnxruntime were not installed (its import fails)."""
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    monkeypatch.setattr(runtime, '_noted', set())


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('runtime_cache'))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """name -> a tiny random checkpoint of that decoder (made once per module)."""
    made = {}

    def get(name, seed=0):
        if (name, seed) not in made:
            folder = tmp_path_factory.mktemp(f'rt_{name}_{seed}')
            made[name, seed] = tiny_checkpoint(name, folder / 'c.pt', seed=seed)
        return made[name, seed]
    return get


def captions(checkpoint, run, cache, mirror=False, paths=None):
    encoder, decoder, word_map, config = loading.load_captioner(checkpoint, 'cpu', mirror=mirror, runtime=run,
                                                                onnx_cache=cache)
    assert config['runtime'] == run
    paths = paths or sorted(os.path.join(SAMPLES, f) for f in os.listdir(SAMPLES) if f.endswith('.jpg'))
    results, failures = files.caption_paths(encoder, decoder, word_map, paths, beam_sizes=(3,), batch_size=2,
                                            progress=False, min_len=4, max_len=12)
    assert not failures
    return [r[3]['words'] for r in results], encoder


# ----------------------------------------------------------------------------------------------
# Selection

def test_auto_picks_onnxruntime_on_cpu_when_installed():
    need_onnx()
    assert runtime.resolve('auto', 'cpu') == 'onnx'
    assert runtime.resolve('onnx', 'cpu') == 'onnx'
    assert runtime.resolve('torch', 'cpu') == 'torch'


def test_auto_picks_pytorch_without_onnxruntime(monkeypatch, capsys):
    hide_onnxruntime(monkeypatch)
    assert runtime.resolve('auto', 'cpu') == 'torch'
    assert runtime.resolve('auto', 'cpu') == 'torch'
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'onnxruntime' in err[0] and 'pip install' in err[0]     # one line, once
    with pytest.raises(ImportError, match='--runtime onnx: onnxruntime'):
        runtime.resolve('onnx', 'cpu')


def test_pytorch_on_cuda():
    assert runtime.resolve('auto', torch.device('cuda')) == 'torch'
    assert runtime.resolve('auto', 'cuda:0') == 'torch'
    with pytest.raises(ValueError, match='--runtime onnx runs the encoder in onnxruntime on the CPU'):
        runtime.resolve('onnx', 'cuda')
    with pytest.raises(ValueError, match='choose from'):
        runtime.resolve('tensorrt', 'cpu')


def test_cache_folder_conventions(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert runtime.cache_dir() == str(tmp_path / 'xdg' / 'captioning' / 'onnx')
    monkeypatch.setenv('XDG_CACHE_HOME', 'relative/ignored')          # the XDG spec: only absolute paths
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert runtime.cache_dir() == str(tmp_path / 'home' / '.cache' / 'captioning' / 'onnx')
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / 'env'))
    assert runtime.cache_dir() == str(tmp_path / 'env')
    assert runtime.cache_dir(str(tmp_path / 'flag')) == str(tmp_path / 'flag')


# ----------------------------------------------------------------------------------------------
# Captions

@pytest.mark.parametrize('name', EXPORTABLE)
def test_onnx_captions_equal_pytorch(name, checkpoints, cache):
    need_onnx()
    ckpt = checkpoints(name)
    ours, encoder = captions(ckpt, 'onnx', cache)
    assert isinstance(encoder, runtime.OnnxEncoder)
    theirs, _ = captions(ckpt, 'torch', cache)
    assert ours == theirs and len({tuple(c) for c in ours}) > 1


def test_ensemble_and_mirror_on_onnx(checkpoints, cache):
    need_onnx()
    pair = [checkpoints('sat'), checkpoints('sat', seed=1)]
    ours, encoder = captions(pair, 'onnx', cache)
    assert all(isinstance(m, runtime.OnnxEncoder) for m in encoder.members)     # one per member, packed
    assert ours == captions(pair, 'torch', cache)[0]
    mirrored, encoder = captions(pair[0], 'onnx', cache, mirror=True)
    assert encoder.mirror and mirrored == captions(pair[0], 'torch', cache, mirror=True)[0]


def test_tags_from_the_onnx_encoder(tiny_checkpoint, cache):
    """The ImageNet head's probabilities are the graph's second output (a stock encoder's head)."""
    need_onnx()
    from captioning.decoding import tags
    encoder, _, _, _ = loading.load_model(tiny_checkpoint, 'cpu', runtime='onnx', onnx_cache=cache)
    reference, _, _, _ = loading.load_model(tiny_checkpoint, 'cpu')
    x = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    with torch.inference_mode():
        f1, p1 = tags.encode(encoder, x)
        f0, p0 = tags.encode(reference, x)
    torch.testing.assert_close(f1, f0, atol=1e-4, rtol=1e-4)
    assert (p0 is None) == (p1 is None) and tags.has_head(encoder) == tags.has_head(reference)
    if p0 is not None:
        torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The cache

def count_exports(monkeypatch):
    calls = []
    real = runtime.export

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)
    monkeypatch.setattr(runtime, 'export', counted)
    return calls


def entry_folder(cache, ckpt):
    digest = runtime.file_sha256(ckpt)
    [name] = [n for n in os.listdir(cache) if n.startswith(digest[:32])]
    return os.path.join(cache, name)


def test_cache_reused_rebuilt_when_corrupt_or_stale(checkpoints, tmp_path, monkeypatch):
    need_onnx()
    cache = str(tmp_path / 'cache')
    ckpt = str(tmp_path / 'c.pt')
    shutil.copy(checkpoints('show_tell'), ckpt)
    calls = count_exports(monkeypatch)
    first, _ = captions(ckpt, 'onnx', cache)
    assert len(calls) == 1
    assert captions(ckpt, 'onnx', cache)[0] == first and len(calls) == 1          # reused: no export
    folder = entry_folder(cache, ckpt)
    model = os.path.join(folder, runtime.MODEL_FILE)

    with open(model, 'r+b') as f:                                                 # truncated
        f.truncate(os.path.getsize(model) // 2)
    assert captions(ckpt, 'onnx', cache)[0] == first and len(calls) == 2
    assert runtime.check_entry(folder, runtime.file_sha256(ckpt), runtime.variant(
        loading.load_model(ckpt, 'cpu')[0])[1]) is None

    with open(model, 'r+b') as f:                                                 # same size, other bytes
        f.seek(os.path.getsize(model) // 2)
        f.write(b'\0' * 64)
    assert captions(ckpt, 'onnx', cache)[0] == first and len(calls) == 3

    with open(os.path.join(folder, runtime.ENTRY_FILE), 'w') as f:                 # entry.json garbled
        f.write('{not json')
    assert captions(ckpt, 'onnx', cache)[0] == first and len(calls) == 4

    shutil.copy(checkpoints('show_tell', seed=1), ckpt)                           # the checkpoint changed
    changed, _ = captions(ckpt, 'onnx', cache)
    assert len(calls) == 5 and changed == captions(ckpt, 'torch', cache)[0] and changed != first


def test_never_loaded_from_an_unchosen_path(checkpoints, tmp_path, monkeypatch):
    """An ONNX file beside the checkpoint, or a link in the cache to a file elsewhere, is never read:
    the encoder is exported into the chosen cache, whose entries are this user's plain files only."""
    need_onnx()
    cache, elsewhere = tmp_path / 'cache', tmp_path / 'elsewhere'
    ckpt = str(tmp_path / 'c.pt')
    shutil.copy(checkpoints('sat'), ckpt)
    (tmp_path / 'encoder.onnx').write_bytes(b'planted beside the checkpoint')
    calls = count_exports(monkeypatch)
    captions(ckpt, 'onnx', str(cache))
    assert len(calls) == 1 and (tmp_path / 'encoder.onnx').read_bytes() == b'planted beside the checkpoint'

    # the entry's folder replaced by a link to a copy elsewhere (valid files, but not where the user chose)
    folder = entry_folder(str(cache), ckpt)
    shutil.copytree(folder, elsewhere)
    shutil.rmtree(folder)
    os.symlink(elsewhere, folder)
    opened = []
    real_session = runtime.session
    monkeypatch.setattr(runtime, 'session', lambda path, threads=None: opened.append(path) or real_session(path, threads))
    captions(ckpt, 'onnx', str(cache))
    assert len(calls) == 2 and not os.path.islink(folder)
    assert all(os.path.realpath(p).startswith(str(cache)) for p in opened)

    # a file of the entry linked to one elsewhere
    model = os.path.join(folder, runtime.MODEL_FILE)
    os.remove(model)
    os.symlink(elsewhere / runtime.MODEL_FILE, model)
    captions(ckpt, 'onnx', str(cache))
    assert len(calls) == 3 and not os.path.islink(model)


# ----------------------------------------------------------------------------------------------
# 02_inference.py

def test_02_runtime_setting_and_resume(checkpoints, cache, tmp_path, capsys, monkeypatch):
    need_onnx()
    infer = script('02_inference')
    ckpt = checkpoints('sat')
    out = str(tmp_path / 'out')
    base = ['--img', SAMPLES, '--checkpoint', ckpt, '--out', out, '--onnx-cache', cache, '--batch-size', '2',
            '--precision', 'fp32']
    assert infer.main(base + ['--runtime', 'torch']) == 0
    settings_path = os.path.join(out, 'captions.settings.json')
    assert json.load(open(settings_path))['runtime'] == 'torch'
    lines = open(os.path.join(out, 'captions.jsonl')).read()
    capsys.readouterr()

    assert infer.main(base + ['--runtime', 'onnx']) == 1                         # another engine: refused
    assert 'runtime' in capsys.readouterr().err
    assert infer.main(base + ['--runtime', 'torch']) == 0                         # the same: resumes
    assert 'resuming: 5 of 5' in capsys.readouterr().out

    # a run recorded before the setting existed was PyTorch's
    settings = json.load(open(settings_path))
    del settings['runtime']
    json.dump(settings, open(settings_path, 'w'))
    assert infer.main(base + ['--runtime', 'onnx']) == 1
    assert infer.main(base + ['--runtime', 'torch']) == 0
    assert open(os.path.join(out, 'captions.jsonl')).read() == lines

    # auto on the CPU is onnx here: the same captions, recorded as onnx; resumes under auto or onnx
    out2 = str(tmp_path / 'out2')
    assert infer.main([*base[:5], out2, *base[6:], '--runtime', 'auto']) == 0
    assert json.load(open(os.path.join(out2, 'captions.settings.json')))['runtime'] == 'onnx'
    assert [json.loads(x)['caption'] for x in open(os.path.join(out2, 'captions.jsonl'))] == \
        [json.loads(x)['caption'] for x in lines.splitlines()]
    assert infer.main([*base[:5], out2, *base[6:], '--runtime', 'onnx']) == 0

    # without onnxruntime, auto says so in one line and runs PyTorch (so it cannot add to the onnx run)
    hide_onnxruntime(monkeypatch)
    capsys.readouterr()
    out3 = str(tmp_path / 'out3')
    assert infer.main([*base[:5], out3, *base[6:], '--runtime', 'auto']) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if 'onnxruntime' in x]
    assert len(notes) == 1 and notes[0].startswith('note: --runtime auto: the encoder runs in PyTorch')
    assert json.load(open(os.path.join(out3, 'captions.settings.json')))['runtime'] == 'torch'
    assert infer.main([*base[:5], out2, *base[6:], '--runtime', 'auto']) == 1


# ----------------------------------------------------------------------------------------------
# Reading the next batch while the model runs (--workers N --loader threads)

def test_thread_readers_keep_the_order_and_the_failures(tmp_path):
    import datasets
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not a jpeg')
    paths = sorted(os.path.join(SAMPLES, f) for f in os.listdir(SAMPLES) if f.endswith('.jpg'))
    paths = paths[:2] + [str(bad)] + paths[2:]
    dataset = datasets.ImageFiles(paths, datasets.ImageTransform(size=32, mean=[0.5] * 3, std=[0.5] * 3))
    threaded = list(files.thread_batches(dataset, 2, 2, datasets.collate_image_files))
    plain = [datasets.collate_image_files([dataset[i] for i in range(s, min(s + 2, len(paths)))])
             for s in range(0, len(paths), 2)]
    assert [(b[1], [i for i, _ in b[2]]) for b in threaded] == [(b[1], [i for i, _ in b[2]]) for b in plain]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(threaded, plain))
    assert [i for b in threaded for i, _ in b[2]] == [2]
    with pytest.raises(ValueError, match='loader'):
        next(files.caption_batches(None, None, {}, paths, loader='fibers'))

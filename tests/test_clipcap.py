"""ClipCap (captioning/decoders/clipcap.py): a pretrained GPT-2 given as a save_pretrained folder, its BPE captions,
frozen-LM checkpoints, the original ClipCap's state_dicts, and the CLIP encoder. Every model is a
tiny random one built here (no downloads). The decoder interface itself is checked for every
decoder, this one included, by test_decoders.py and test_beam_search.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('transformers')

from conftest import REPO, script  # noqa: E402

import models  # noqa: E402
from captioning import checkpoint  # noqa: E402
from captioning.decoders import clipcap, interface, registry  # noqa: E402
from captioning.decoding import files, loading, search  # noqa: E402

MERGES = [('Ġ', 'a'), ('Ġ', 'd'), ('Ġd', 'o'), ('Ġdo', 'g'), ('r', 'u'), ('Ġ', 'ru'), ('Ġru', 'n'), ('n', 's'),
          ('Ġ', 't'), ('Ġt', 'h'), ('Ġth', 'e'), ('i', 'n'), ('Ġ', 'in')]
WORD_MAP = {'<pad>': 0, 'a': 1, 'dog': 2, 'runs': 3, 'the': 4, 'in': 5, 'café': 6, 't3': 7, '!': 8,
            '<unk>': 9, '<start>': 10, '<end>': 11}


def byte_alphabet():
    """GPT-2's byte -> character table, in its vocabulary order (so '!' is token 0, as in GPT-2)."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def gpt2_tokenizer():
    from transformers import GPT2Tokenizer
    vocab = {c: i for i, c in enumerate(byte_alphabet())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab['<|endoftext|>'] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=MERGES)


def save_gpt2(folder, seed=0, tokenizer=True):
    """A tiny random GPT-2 (+ tokenizer) written with save_pretrained, as a downloaded one would be."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = gpt2_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return str(folder)


def save_clip(folder, projection_dim=512):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def lm_folder(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp('gpt2'))


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp('clip'))


def pretrained(lm, mapping='mlp', freeze_lm=False, word_map=WORD_MAP, C=6, seed=0):
    torch.manual_seed(seed)
    dec = registry.build_decoder('clipcap', len(word_map), C, lm=lm, mapping=mapping, freeze_lm=freeze_lm,
                                 prefix_length=3, clip_length=2, mapping_layers=2, dropout=0.0)
    dec.use_word_map(word_map)
    return dec.eval()


def word_caption(words, word_map=WORD_MAP, pad=None, L=12):
    """<start> words <end> then padding (`pad`: the id used, default <pad>) -> ids [L], length."""
    ids = [word_map['<start>']] + [word_map[w] for w in words] + [word_map['<end>']]
    return ids + [word_map['<pad>'] if pad is None else pad] * (L - len(ids)), len(ids)


# ----------------------------------------------------------------------------------------------
# Captions as GPT-2 tokens

def test_word_pieces_equal_tokenizing_the_joined_caption(lm_folder):
    """Each word's pieces (those of " w") put together give exactly what GPT-2's tokenizer gives for
    the whole caption " w1 w2 ...", so converting word-id captions inside forward() is exact."""
    dec, tok = pretrained(lm_folder), gpt2_tokenizer()
    eos = tok.eos_token_id
    sentences = [['a', 'dog', 'runs'], ['the', 'dog', 'runs', 'in', 'the', 'café'], ['t3', 'a', '!', 'dog'], []]
    rows = [word_caption(s) for s in sentences]
    lm_caps, lm_lengths = dec.lm_captions(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))
    for words, caps, n in zip(sentences, lm_caps.tolist(), lm_lengths.tolist()):
        joined = tok.encode(' ' + ' '.join(words), add_special_tokens=False) if words else []
        assert caps[:n] == [eos] + joined + [eos]
    assert tok.encode(' !', add_special_tokens=False) == [220, 0]      # '!' is token 0, as in GPT-2


def test_unk_is_left_out_and_lengths_cut_the_caption(lm_folder):
    dec, tok = pretrained(lm_folder), gpt2_tokenizer()
    caps, n = word_caption(['a', '<unk>', 'dog'])
    lm_caps, lm_len = dec.lm_captions(torch.tensor([caps]), torch.tensor([[n]]))
    assert lm_caps[0, :int(lm_len)].tolist() == [tok.eos_token_id] + tok.encode(' a dog') + [tok.eos_token_id]


def test_padding_never_masks_a_real_token(lm_folder):
    """GPT-2's token 0 ('!') is a real token: it is a target like any other; and with a scratch LM a
    word with id 0 (<pad> elsewhere) is too. Only lengths end captions: what follows never counts."""
    dec = pretrained(lm_folder)
    caps, n = word_caption(['!', 'dog', '!'])
    feats = torch.randn(1, 4, 6)
    out = dec(feats, torch.tensor([caps]), torch.tensor([n]))
    tok = gpt2_tokenizer()
    expected = tok.encode(' ! dog !', add_special_tokens=False) + [tok.eos_token_id]
    assert out.targets.tolist() == expected and expected.count(0) == 2
    assert out.scores.shape == (len(expected), len(tok))

    word_map = {'a': 0, 'b': 1, 'c': 2, '<unk>': 3, '<start>': 4, '<end>': 5, '<pad>': 6}
    torch.manual_seed(0)
    scratch = registry.build_decoder('clipcap', 7, 6, lm_dim=8, lm_layers=1, lm_heads=2, prefix_length=2,
                                     dropout=0.0).eval()
    rows = [word_caption(['a', 'b', 'a'], word_map, pad=pad, L=8)[0] for pad in (0, 6, 2)]   # any filler
    lengths = torch.tensor([5, 5, 5])
    outs = [scratch(feats, torch.tensor([r]), lengths[:1]) for r in rows]
    assert outs[0].targets.tolist() == [0, 1, 0, 5]
    for o in outs[1:]:
        assert torch.equal(o.targets, outs[0].targets) and torch.equal(o.scores, outs[0].scores)
    assert interface.caption_loss(outs[0]).item() == pytest.approx(
        F.cross_entropy(outs[0].scores, outs[0].targets).item())


def test_pretrained_lm_teacher_forcing_equals_step_by_step(lm_folder):
    """The BPE path: forward's log-probabilities equal step()'s fed the same LM tokens."""
    dec = pretrained(lm_folder, mapping='transformer')
    sentences = [['a', 'dog', 'runs'], ['the', 'café'], ['t3', '!', 'in', 'the', 'dog']]
    rows = [word_caption(s) for s in sentences]
    caps, lengths = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    feats = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = dec(feats, caps, lengths)
        lm_caps, lm_lengths = dec.lm_captions(caps, lengths)
        lm_caps = lm_caps[out.sort_ind]
        memory = dec.prepare(feats[out.sort_ind], 1)
        state = dec.init_state(memory, 1)
        per_t = []
        for t in range(out.decode_lengths[0]):
            logp, state, _ = dec.step(lm_caps[:, t], state, memory)
            per_t.append(logp)
    expected = torch.cat([per_t[t][:sum(n > t for n in out.decode_lengths)] for t in range(out.decode_lengths[0])])
    assert torch.allclose(F.log_softmax(out.scores, dim=1), expected, atol=1e-5)


def test_search_uses_the_lm_tokens_and_decodes_them_to_words(lm_folder):
    dec, tok = pretrained(lm_folder), gpt2_tokenizer()
    eos = tok.eos_token_id
    assert dec.special_tokens(WORD_MAP) == (eos, eos, [])
    rev = {v: k for k, v in WORD_MAP.items()}
    assert dec.words(tok.encode(' The dog, runs!'), rev) == ['the', 'dog', 'runs']
    feats = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(2))
    for hyp in search.beam_search(dec, feats, WORD_MAP, beam_size=3, max_len=6):
        assert eos not in hyp['tokens'] and len(hyp['tokens']) <= 6
        assert all(0 <= t < len(tok) for t in hyp['tokens'])
    with pytest.raises(ValueError, match='positions'):   # the LM's 128 positions: a clear error, not an index error
        search.beam_search(dec, feats, WORD_MAP, beam_size=1, max_len=200, min_len=200)


def test_a_gpt2_whose_first_token_is_end_of_text_still_captions(lm_folder):
    """End-of-text is GPT-2's start token too, and a barely trained ClipCap emits it first: the search
    needs one token by default, and a caption that is still empty says why."""
    dec, tok = pretrained(lm_folder), gpt2_tokenizer()
    eos = tok.eos_token_id
    head = torch.nn.Linear(dec.gpt.config.n_embd, dec.gpt.config.vocab_size)
    head.weight = dec.gpt.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()[eos] = 100.0                                     # end-of-text first, by far
    dec.gpt.lm_head = head
    feats = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
    rev = {v: k for k, v in WORD_MAP.items()}
    assert [h['tokens'] for h in search.beam_search(dec, feats, WORD_MAP, min_len=0)] == [[], []]
    for hyp in search.beam_search(dec, feats, WORD_MAP, beam_size=3, max_len=6):
        assert len(hyp['tokens']) == 1 and hyp['tokens'][0] != eos and hyp['finished']
        hyp['words'] = dec.words(hyp['tokens'], rev)
        assert (files.empty_reason(hyp) is None) == bool(hyp['words'])
    assert 'min-len 0' in files.empty_reason({'tokens': [], 'words': []})
    space = tok.encode(' ')
    assert dec.words(space, rev) == [] and 'decode to no words' in files.empty_reason({'tokens': space, 'words': []})


def test_pretrained_lm_refuses_captions_without_spaces(lm_folder):
    dec = pretrained(lm_folder)
    with pytest.raises(ValueError, match='use --lm scratch'):
        dec.use_word_map(WORD_MAP, 'jieba')


# ----------------------------------------------------------------------------------------------
# The LM given as a folder or name: what is missing is said in one line

def test_lm_folder_problems_are_one_line_errors(tmp_path):
    no_tok = save_gpt2(tmp_path / 'no_tokenizer', tokenizer=False)
    with pytest.raises(ValueError, match='lacks a tokenizer'):
        clipcap.load_pretrained_lm(no_tok, 0.1)
    os.remove(os.path.join(no_tok, 'model.safetensors'))
    with pytest.raises(ValueError, match=r'lacks weights \(model.safetensors'):
        clipcap.load_pretrained_lm(no_tok, 0.1)
    with pytest.raises(ValueError, match='no such folder'):
        clipcap.load_pretrained_lm(str(tmp_path / 'missing') + '/', 0.1)
    not_gpt2 = save_clip(tmp_path / 'clip_as_lm')                         # a CLIP (with a tokenizer) is no GPT-2
    gpt2_tokenizer().save_pretrained(not_gpt2)
    with pytest.raises(ValueError, match='clip_vision_model model; ClipCap here continues a GPT-2'):
        clipcap.load_pretrained_lm(not_gpt2, 0.1)


def test_missing_transformers_is_said_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)                # as if not installed
    with pytest.raises(ImportError, match='requirements-extras.txt'):
        registry.build_decoder('clipcap', 11, 6)


def test_decoder_modules_do_not_import_transformers():
    code = ('import sys, models; from captioning import checkpoint; from captioning.decoders import registry; '
            'from captioning.decoding import loading, search; '
            'assert "transformers" not in sys.modules, "imported"; assert "clipcap" in registry.DECODERS')
    for first in ('registry', 'clipcap'):                                  # the registry, whatever comes first
        subprocess.run([sys.executable, '-c', f'from captioning.decoders import {first}; ' + code], cwd=REPO,
                       check=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints: a frozen pretrained LM is named and digested, not stored

def test_frozen_lm_checkpoint_names_the_lm_and_checks_its_digest(tmp_path):
    folder = save_gpt2(tmp_path / 'gpt2', seed=0)
    dec = pretrained(folder, mapping='transformer', freeze_lm=True)
    assert not any(p.requires_grad for p in dec.gpt.parameters()) and all(p.requires_grad for p in dec.mapping.parameters())
    dec.train()
    assert not dec.gpt.training and dec.mapping.training                  # a frozen LM runs without dropout
    dec.eval()
    state = dec.state_dict()
    assert not any(k.startswith('gpt.') for k in state) and state['lm_digest'].dtype == torch.uint8
    assert torch.equal(state['lm_digest'], clipcap.weights_digest(dec.gpt))
    tuned = pretrained(folder, freeze_lm=False)
    assert any(k.startswith('gpt.') for k in tuned.state_dict())         # a tuned LM is saved whole

    again = pretrained(folder, mapping='transformer', freeze_lm=True, seed=5)
    again.load_state_dict(state)
    feats = torch.randn(2, 4, 6)
    caps, n = word_caption(['a', 'dog'])
    with torch.no_grad():
        assert torch.equal(dec(feats[:1], torch.tensor([caps]), torch.tensor([n])).scores,
                           again(feats[:1], torch.tensor([caps]), torch.tensor([n])).scores)

    save_gpt2(folder, seed=1)                                              # the LM's weights change
    changed = pretrained(folder, mapping='transformer', freeze_lm=True)
    with pytest.raises(ValueError, match='digest mismatch'):
        changed.load_state_dict(state)


def test_digest_error_through_the_inference_script(tmp_path, capsys):
    folder = save_gpt2(tmp_path / 'gpt2', seed=0)
    config = {'encoder': 'resnet18', 'encoder_weights': 'none', 'image_size': 64, 'encoded_image_size': 2,
              'decoder': 'clipcap', 'lm': folder, 'freeze_lm': True, 'prefix_length': 2, 'mapping': 'transformer',
              'clip_length': 2, 'mapping_layers': 1}
    encoder, dec = models.build_models(config, len(WORD_MAP), word_map=WORD_MAP)
    config['decoder_args'] = dec.args()
    path = tmp_path / 'frozen.pt'
    checkpoint.save_checkpoint(path, {'format': checkpoint.FORMAT, 'config': config, 'word_map': WORD_MAP,
                                 'encoder': encoder.state_dict(), 'decoder': dec.state_dict()})
    checkpoint.models_from_checkpoint(checkpoint.load(str(path)))          # loads while the LM is unchanged
    save_gpt2(folder, seed=3)
    image = os.path.join(REPO, 'assets', 'samples', 'coffee.jpg')
    assert script('02_inference').main(['--img', image, '--checkpoint', str(path), '--out', str(tmp_path / 'o')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'digest mismatch' in err and 'Traceback' not in err


# ----------------------------------------------------------------------------------------------
# The original ClipCap's state_dicts

def original_state(dec, mapping, rng):
    """A state_dict laid out as the original ClipCap saved one (random mapping weights, this decoder's
    GPT-2 plus the mask buffers older transformers saved), built from its names, not its code."""
    state = {k: v.clone() for k, v in dec.gpt.state_dict(prefix='gpt.').items()}
    n_pos = dec.gpt.config.n_positions
    for i in range(dec.gpt.config.n_layer):
        state[f'gpt.transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        state[f'gpt.transformer.h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    E, C, k = dec.gpt.config.n_embd, dec.cfg.encoder_dim, dec.cfg.prefix_length
    r = lambda *shape: torch.randn(*shape, generator=rng) * 0.3  # noqa: E731
    if mapping == 'mlp':
        state.update({'clip_project.model.0.weight': r(k * E // 2, C), 'clip_project.model.0.bias': r(k * E // 2),
                      'clip_project.model.2.weight': r(k * E, k * E // 2), 'clip_project.model.2.bias': r(k * E)})
        return state
    c = dec.cfg.clip_length
    state.update({'clip_project.linear.weight': r(c * E, C), 'clip_project.linear.bias': r(c * E),
                  'clip_project.prefix_const': r(k, E)})
    for i in range(dec.cfg.mapping_layers):
        p = f'clip_project.transformer.layers.{i}.'
        state.update({p + 'norm1.weight': 1 + r(E), p + 'norm1.bias': r(E), p + 'norm2.weight': 1 + r(E),
                      p + 'norm2.bias': r(E), p + 'attn.to_queries.weight': r(E, E),
                      p + 'attn.to_keys_values.weight': r(2 * E, E), p + 'attn.project.weight': r(E, E),
                      p + 'attn.project.bias': r(E), p + 'mlp.fc1.weight': r(2 * E, E), p + 'mlp.fc1.bias': r(2 * E),
                      p + 'mlp.fc2.weight': r(E, 2 * E), p + 'mlp.fc2.bias': r(E)})
    return state


def original_mapper(state, x, heads, c, k):
    """The paper's transformer mapper, from its description: x [B, C] -> c positions, the constant
    positions after them; per layer x += proj(attn(norm1 x)), x += fc2(relu(fc1(norm2 x))), with
    queries from to_queries and keys, values from to_keys_values; the last k positions out."""
    B = x.size(0)
    E = state['clip_project.prefix_const'].size(1)
    h = F.linear(x, state['clip_project.linear.weight'], state['clip_project.linear.bias']).view(B, c, E)
    h = torch.cat([h, state['clip_project.prefix_const'].expand(B, -1, -1)], dim=1)       # [B, n, E]
    n, d = h.size(1), E // heads
    i = 0
    while f'clip_project.transformer.layers.{i}.norm1.weight' in state:
        p = lambda name: state[f'clip_project.transformer.layers.{i}.{name}']  # noqa: E731
        y = F.layer_norm(h, (E,), p('norm1.weight'), p('norm1.bias'))
        q = (y @ p('attn.to_queries.weight').T).view(B, n, heads, d)
        kv = (y @ p('attn.to_keys_values.weight').T).view(B, n, 2, heads, d)
        att = torch.einsum('bnhd,bmhd->bnmh', q, kv[:, :, 0]) * d ** -0.5
        o = torch.einsum('bnmh,bmhd->bnhd', att.softmax(dim=2), kv[:, :, 1]).reshape(B, n, E)
        h = h + F.linear(o, p('attn.project.weight'), p('attn.project.bias'))
        y = F.layer_norm(h, (E,), p('norm2.weight'), p('norm2.bias'))
        h = h + F.linear(F.relu(F.linear(y, p('mlp.fc1.weight'), p('mlp.fc1.bias'))), p('mlp.fc2.weight'),
                         p('mlp.fc2.bias'))
        i += 1
    return h[:, c:]


@pytest.mark.parametrize('mapping', ['mlp', 'transformer'])
def test_original_clipcap_state_dicts_convert(mapping, lm_folder):
    """Old GPT-2 mask buffers are dropped (a current GPT2LMHeadModel rejects them), clip_project.*
    becomes the mapping, the settings are read from the weights, and the converted mapping computes
    what the original's did."""
    dec = pretrained(lm_folder, mapping=mapping)
    old = original_state(dec, mapping, torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match='attn.masked_bias'):
        dec.gpt.load_state_dict({k[4:]: v for k, v in old.items() if k.startswith('gpt.')})
    state, settings = clipcap.convert_clipcap_state(old)
    assert not any(clipcap.is_old_gpt2_buffer(k) for k in state)
    assert settings['mapping'] == mapping and settings['prefix_length'] == 3
    if mapping == 'transformer':
        assert (settings['clip_length'], settings['mapping_layers']) == (2, 2)
    dec.load_state_dict({**state, 'lm_digest': dec.lm_digest})            # strict: every key accounted for
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = dec.mapping(x)
        if mapping == 'mlp':
            hidden = torch.tanh(F.linear(x, old['clip_project.model.0.weight'], old['clip_project.model.0.bias']))
            want = F.linear(hidden, old['clip_project.model.2.weight'], old['clip_project.model.2.bias']).view(4, 3, -1)
        else:
            want = original_mapper(old, x, heads=8, c=2, k=3)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with pytest.raises(ValueError, match="unexpected key 'clip_project.weight'"):
        clipcap.convert_clipcap_state({**old, 'clip_project.weight': torch.zeros(1)})


def test_convert_tool_writes_a_checkpoint_that_captions(tmp_path, lm_folder, clip_folder, capsys):
    convert_clipcap = script('tools.convert_clipcap')
    dec = registry.build_decoder('clipcap', 4, 512, lm=lm_folder, mapping='transformer', prefix_length=3,
                                 clip_length=2, mapping_layers=1)
    old = original_state(dec, 'transformer', torch.Generator().manual_seed(9))
    torch.save(old, tmp_path / 'transformer_weights.pt')
    out = tmp_path / 'converted.pt'
    assert convert_clipcap.main([str(tmp_path / 'transformer_weights.pt'), str(out), '--lm', lm_folder,
                                 '--encoder-weights', clip_folder, '--freeze-lm']) == 0
    saved = torch.load(out, weights_only=True)
    assert not any(k.startswith('gpt.') for k in saved['decoder']) and saved['encoder'] is None
    encoder, decoder, word_map, config = loading.load_captioner(str(out), 'cpu')
    assert config['decoder_args']['mapping'] == 'transformer' and encoder.name == 'clip_vit_b32'
    image = os.path.join(REPO, 'assets', 'samples', 'coffee.jpg')
    results, failures = files.caption_paths(encoder, decoder, word_map, [image], (2,), progress=False, max_len=5)
    words = results[0][2]['words']
    assert not failures and words and all(isinstance(w, str) and w.strip() for w in words), results[0][2]

    tuned = {**old, 'gpt.transformer.h.0.mlp.c_fc.bias': old['gpt.transformer.h.0.mlp.c_fc.bias'] + 1}
    torch.save(tuned, tmp_path / 'tuned.pt')
    capsys.readouterr()
    assert convert_clipcap.main([str(tmp_path / 'tuned.pt'), str(tmp_path / 'x.pt'), '--lm', lm_folder,
                                 '--encoder-weights', clip_folder, '--freeze-lm']) == 1
    assert 'differs from --lm' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# CLIP ViT-B/32 as an encoder

def test_clip_encoder_gives_the_projected_embedding_as_a_one_cell_grid(clip_folder, tmp_path):
    from transformers import CLIPVisionModelWithProjection
    enc = models.Encoder('clip_vit_b32', clip_folder).eval()
    cfg = enc.transform_config()
    assert cfg['size'] == 224 and cfg['crop'] and cfg['mean'] == models.CLIP_MEAN and cfg['std'] == models.CLIP_STD
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = enc(x)
        ref = CLIPVisionModelWithProjection.from_pretrained(clip_folder).eval()(pixel_values=x).image_embeds
    assert out.shape == (2, 1, 1, 512)
    assert torch.allclose(out.view(2, 512), ref, atol=1e-5)
    assert models.named_weights('clip_vit_b32', clip_folder) and not models.named_weights('clip_vit_b32', 'none')
    with pytest.raises(ValueError, match='a CLIP with 64-d embeddings; clip_vit_b32 has 512'):
        models.Encoder('clip_vit_b32', save_clip(tmp_path / 'small', projection_dim=64))
    with pytest.raises(ValueError, match='no such folder'):
        models.Encoder('clip_vit_b32', str(tmp_path / 'nowhere'))


# ----------------------------------------------------------------------------------------------
# The end-to-end path: --lm FOLDER (and CLIP) through training, export and captioning

def test_train_with_a_gpt2_folder_then_caption(synth_data, tmp_path, lm_folder, clip_folder):
    train = script('01_train')
    folder, name = synth_data
    run = tmp_path / 'run'
    assert train.main(['--data-folder', folder, '--out-dir', str(run), '--decoder', 'clipcap', '--lm', lm_folder,
                       '--mapping', 'transformer', '--freeze-lm', '--prefix-length', '2', '--clip-length', '2',
                       '--mapping-layers', '1', '--encoder', 'clip_vit_b32', '--encoder-weights', clip_folder,
                       '--epochs', '1', '--batch-size', '20', '--workers', '0', '--log-every', '1']) == 0
    best = run / f'BEST_checkpoint_{name}.pt'
    saved = torch.load(best, weights_only=True)
    assert saved['config']['decoder_args']['lm'] == lm_folder and saved['config']['lm'] == lm_folder
    assert not any(k.startswith('gpt.') for k in saved['decoder'])        # the frozen GPT-2 is named, not stored
    steps = [json.loads(line) for line in open(run / 'steps.jsonl')]
    assert len(steps) == 12 and all(s['loss'] == s['loss'] for s in steps)
    exported = tmp_path / 'small.pt'
    assert script('tools.export_checkpoint').main([str(best), str(exported)]) == 0
    small = torch.load(exported, weights_only=True)
    assert small['encoder'] is None and small['encoder_delta'] == {}      # CLIP named too: nothing differs
    image = os.path.join(REPO, 'assets', 'samples', 'coffee.jpg')
    assert script('02_inference').main(['--img', image, '--checkpoint', str(exported),
                                        '--out', str(tmp_path / 'inf'), '--max-len', '8']) == 0
    rows = json.load(open(tmp_path / 'inf' / 'captions.json'))
    assert rows[0]['image'] == image and isinstance(rows[0]['caption'], str) and rows[0]['caption'].strip(), rows

"""caption.beam_search: exactness against exhaustive search, batching, and the tutorial's crashes."""
import itertools

import pytest
import torch
from conftest import tiny_decoder

from captioning.decoders import registry
from captioning.decoding.search import beam_search

WORD_MAP = {'<pad>': 0, 'a': 1, 'b': 2, '<unk>': 3, '<start>': 4, '<end>': 5}
V, C = len(WORD_MAP), 6
START, END = WORD_MAP['<start>'], WORD_MAP['<end>']
NAMES = list(registry.DECODERS)


def decoder(seed=0, end_bias=0.0, name='sat'):
    d = tiny_decoder(name, V, C, seed)
    with torch.no_grad():
        d.fc.weight.mul_(20)                   # peaky distributions, so the search matters
        d.fc.bias[END] += end_bias
    return d


def features(n, seed=1):
    return torch.randn(n, 2, 2, C, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sequence_logprob(dec, enc, tokens):
    """Summed log-probability of emitting `tokens` (a list) after <start>, step by step."""
    memory = dec.prepare(enc.reshape(1, -1, C), 1)
    state = dec.init_state(memory, 1)
    prev, total = START, 0.0
    for tok in tokens:
        logp, state, _ = dec.step(torch.tensor([prev]), state, memory)
        total += logp[0, tok].item()
        prev = tok
    return total


def words_allowed(allow_unk=False):
    """Tokens a caption may contain: never <start>/<pad>/<end> mid-caption, <unk> only when allowed."""
    banned = {START, END, WORD_MAP['<pad>']} | (set() if allow_unk else {WORD_MAP['<unk>']})
    return [t for t in range(V) if t not in banned]


def exhaustive(dec, enc, max_len, length_norm=0.0, allow_unk=False, min_len=1):
    """Best finished caption (min_len words or more then <end>, at most max_len tokens) by brute force."""
    best = None
    for n_words in range(min_len, max_len):
        for words in itertools.product(words_allowed(allow_unk), repeat=n_words):
            seq = list(words) + [END]
            score = sequence_logprob(dec, enc, seq)
            norm = score / len(seq) ** length_norm
            if best is None or norm > best[0]:
                best = (norm, score, list(words))
    return best


@pytest.mark.parametrize('length_norm, allow_unk', [(0.0, False), (1.0, False), (0.5, True)])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('name', NAMES)
def test_wide_beam_equals_exhaustive_search(name, seed, length_norm, allow_unk):
    dec, enc, max_len = decoder(seed, name=name), features(1, seed), 3
    norm, score, words = exhaustive(dec, enc[0], max_len, length_norm, allow_unk)
    k = V ** max_len                                    # wide enough to keep every prefix
    hyp = beam_search(dec, enc, WORD_MAP, beam_size=k, max_len=max_len, length_norm=length_norm,
                      allow_unk=allow_unk)[0]
    assert hyp['finished'] and hyp['tokens'] == words
    assert hyp['score'] == pytest.approx(score, abs=1e-4)
    assert hyp['norm_score'] == pytest.approx(norm, abs=1e-4)


@pytest.mark.parametrize('name', NAMES)
def test_greedy_is_argmax_decoding(name):
    dec, enc = decoder(3, name=name), features(1, 3)
    tokens, prev = [], START
    with torch.no_grad():
        memory = dec.prepare(enc.reshape(1, -1, C), 1)
        state = dec.init_state(memory, 1)
        for _ in range(20):
            logp, state, _ = dec.step(torch.tensor([prev]), state, memory)
            allowed = words_allowed() + ([END] if tokens else [])    # at least one word (min_len 1)
            prev = allowed[int(logp[0, allowed].argmax())]
            if prev == END:
                break
            tokens.append(prev)
    assert beam_search(dec, enc, WORD_MAP, beam_size=1, max_len=20)[0]['tokens'] == tokens


@pytest.mark.parametrize('beam_size', [1, 3, 5])
@pytest.mark.parametrize('name', NAMES)
def test_batched_equals_one_image_at_a_time(name, beam_size):
    dec, enc = decoder(4, end_bias=2.0, name=name), features(7, 4)
    together = beam_search(dec, enc, WORD_MAP, beam_size=beam_size, max_len=12)
    for i in range(len(enc)):
        alone = beam_search(dec, enc[i:i + 1], WORD_MAP, beam_size=beam_size, max_len=12)[0]
        assert together[i]['tokens'] == alone['tokens']
        assert together[i]['score'] == pytest.approx(alone['score'], abs=1e-5)
        assert [b['tokens'] for b in together[i]['beams']] == [b['tokens'] for b in alone['beams']]
        if dec.has_attention:
            assert torch.allclose(together[i]['alphas'], alone['alphas'], atol=1e-5)
        else:
            assert together[i]['alphas'] is None


@pytest.mark.parametrize('beam_size', [1, 3])
@pytest.mark.parametrize('name', NAMES)
def test_never_ending_model_still_returns_a_caption(name, beam_size):
    dec, enc = decoder(5, end_bias=float('-inf'), name=name), features(2, 5)      # <end> has probability 0
    hyps = beam_search(dec, enc, WORD_MAP, beam_size=beam_size, max_len=7)
    for hyp in hyps:
        assert not hyp['finished'] and len(hyp['tokens']) == 7
        assert hyp['alphas'].shape == (7, 4) if dec.has_attention else hyp['alphas'] is None
        assert hyp['score'] == pytest.approx(sequence_logprob(dec, enc[hyps.index(hyp)], hyp['tokens']), abs=1e-4)


@pytest.mark.parametrize('name', [n for n in NAMES if registry.DECODERS[n].has_attention])
def test_alphas_are_attention_distributions_per_token(name):
    dec, enc = decoder(6, end_bias=1.0, name=name), features(3, 6)
    for hyp in beam_search(dec, enc, WORD_MAP, beam_size=3, max_len=10):
        assert hyp['alphas'].shape == (len(hyp['tokens']) + hyp['finished'], 4)
        assert torch.allclose(hyp['alphas'].sum(1), torch.ones(len(hyp['alphas'])), atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_min_len_and_no_repeat_ngram(name):
    dec, enc = decoder(7, end_bias=3.0, name=name), features(4, 7)
    for hyp in beam_search(dec, enc, WORD_MAP, beam_size=3, max_len=15, min_len=4):
        assert len(hyp['tokens']) >= 4
    dec = decoder(8, end_bias=float('-inf'), name=name)
    for n, max_len in ((1, 3), (2, 8), (3, 12)):   # 3 words (a, b, <unk>): short enough to avoid repeats
        for hyp in beam_search(dec, enc, WORD_MAP, beam_size=2, max_len=max_len, no_repeat_ngram_size=n,
                               allow_unk=True):
            grams = [tuple(hyp['tokens'][i:i + n]) for i in range(len(hyp['tokens']) - n + 1)]
            assert len(grams) == len(set(grams))


@pytest.mark.parametrize('name', NAMES)
def test_a_caption_has_a_word_by_default_even_when_the_model_would_end_at_once(name):
    """<end> first by far (as a ClipCap whose first token is end-of-text): the search and the sampler
    still give every caption a word unless min_len 0 asks for the model's own choice."""
    from captioning.decoding.search import sample_captions
    dec, enc = decoder(9, end_bias=100.0, name=name), features(3, 9)
    assert all(h['tokens'] == [] and h['finished'] for h in beam_search(dec, enc, WORD_MAP, min_len=0))
    for k in (1, 3):
        assert all(len(h['tokens']) == 1 and h['finished'] for h in beam_search(dec, enc, WORD_MAP, beam_size=k))
    tokens, lengths, _ = sample_captions(dec, enc, WORD_MAP, n=2, max_len=5, generator=torch.Generator().manual_seed(0))
    assert lengths.tolist() == [2] * 6 and (tokens[:, 1] == END).all() and (tokens[:, 0] != END).all()

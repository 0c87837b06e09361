"""The beam search's groups and guides (decoding/search.py): constrained beam search against an
exhaustive search over the captions that satisfy the constraints, diverse beam search, a prefix, and
sampling with temperature / top-k / top-p, for every decoder and an ensemble; each with no setting
equal to the plain search exactly, and batched == one image at a time."""
import itertools

import pytest
import torch
from conftest import tiny_decoder

from captioning.decoders import registry
from captioning.decoding import ensemble
from captioning.decoding.search import MAX_CONSTRAINTS, beam_search, decode, sample_captions

WORD_MAP = {'<pad>': 0, 'a': 1, 'b': 2, 'c': 3, 'd': 4, '<unk>': 5, '<start>': 6, '<end>': 7}
V, C = len(WORD_MAP), 6
START, END, UNK = WORD_MAP['<start>'], WORD_MAP['<end>'], WORD_MAP['<unk>']
WORDS = [1, 2, 3, 4]
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
    memory = dec.prepare(enc.reshape(1, -1, C), 1)
    state = dec.init_state(memory, 1)
    prev, total = START, 0.0
    for tok in tokens:
        logp, state, _ = dec.step(torch.tensor([prev]), state, memory)
        total += logp[0, tok].item()
        prev = tok
    return total


def exhaustive(dec, enc, max_len, length_norm, keep):
    """Best finished caption (at least one word, then <end>, at most max_len tokens) among those
    `keep(words)` accepts, by brute force: (norm, score, words) or None."""
    best = None
    for n_words in range(1, max_len):
        for words in itertools.product(WORDS, repeat=n_words):
            if not keep(words):
                continue
            seq = list(words) + [END]
            score = sequence_logprob(dec, enc, seq)
            norm = score / len(seq) ** length_norm
            if best is None or norm > best[0]:
                best = (norm, score, list(words))
    return best


def same(a, b):
    """Two beam_search results agree: tokens, scores, finished and the n-best list."""
    assert [h['tokens'] for h in a] == [h['tokens'] for h in b]
    assert [h['finished'] for h in a] == [h['finished'] for h in b]
    for x, y in zip(a, b):
        assert x['score'] == pytest.approx(y['score'], rel=1e-6, abs=1e-5)
        assert [bm['tokens'] for bm in x['beams']] == [bm['tokens'] for bm in y['beams']]


# ----------------------------------------------------------------------------------------------
# Unchanged when not asked for

@pytest.mark.parametrize('name', NAMES)
def test_no_constraint_no_group_no_prefix_is_the_plain_search_exactly(name):
    dec, enc = decoder(2, end_bias=1.0, name=name), features(5, 2)
    plain = beam_search(dec, enc, WORD_MAP, beam_size=3, max_len=10, length_norm=0.5)
    for kw in ({'constraints': [[]] * 5}, {'constraints': None}, {'diversity_groups': 1, 'diversity_strength': 9.0},
               {'prefix': []}):
        same(beam_search(dec, enc, WORD_MAP, beam_size=3, max_len=10, length_norm=0.5, **kw), plain)


# ----------------------------------------------------------------------------------------------
# Constrained beam search

@pytest.mark.parametrize('length_norm', [0.0, 0.7])
@pytest.mark.parametrize('constraints', [[[3]], [[3, 4]], [[2], [4]]])
@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('name', NAMES)
def test_wide_constrained_beam_equals_exhaustive_search_over_satisfying_captions(name, seed, constraints,
                                                                                 length_norm):
    dec, enc, max_len = decoder(seed, name=name), features(1, seed), 4
    best = exhaustive(dec, enc[0], max_len, length_norm,
                      lambda words: all(any(t in words for t in options) for options in constraints))
    hyp = beam_search(dec, enc, WORD_MAP, beam_size=V ** max_len, max_len=max_len, length_norm=length_norm,
                      constraints=[constraints])[0]
    assert hyp['finished'] and hyp['tokens'] == best[2] and hyp['constraints_met'] == len(constraints)
    assert hyp['score'] == pytest.approx(best[1], abs=1e-4)
    assert hyp['norm_score'] == pytest.approx(best[0], abs=1e-4)


def test_the_margin_gives_up_a_constraint_that_costs_too_much():
    dec, enc, max_len = decoder(0), features(1, 0), 4
    free = exhaustive(dec, enc[0], max_len, 0.5, lambda words: True)
    rare = min(WORDS, key=lambda w: exhaustive(dec, enc[0], max_len, 0.5, lambda words: w in words)[0])
    forced = exhaustive(dec, enc[0], max_len, 0.5, lambda words: rare in words)
    assert forced[0] < free[0] and rare not in free[2]                  # forcing it costs something
    kw = dict(beam_size=V ** max_len, max_len=max_len, length_norm=0.5, constraints=[[[rare]]])
    cost = free[0] - forced[0]
    kept = beam_search(dec, enc, WORD_MAP, constraint_margin=cost + 1e-3, **kw)[0]
    dropped = beam_search(dec, enc, WORD_MAP, constraint_margin=cost - 1e-3, **kw)[0]
    assert kept['tokens'] == forced[2] and kept['constraints_met'] == 1
    assert dropped['tokens'] == free[2] and dropped['constraints_met'] == 0


@pytest.mark.parametrize('name', NAMES)
def test_constrained_batched_equals_one_image_at_a_time(name):
    dec, enc = decoder(4, end_bias=2.0, name=name), features(5, 4)
    constraints = [[[3]], [], [[2], [4]], [[1, 4]], [[4], [3], [2]]]
    kw = dict(beam_size=3, max_len=10, length_norm=0.5, no_repeat_ngram_size=2, no_end_after=[1])
    together = beam_search(dec, enc, WORD_MAP, constraints=constraints, **kw)
    for i in range(len(enc)):
        alone = beam_search(dec, enc[i:i + 1], WORD_MAP, constraints=constraints[i:i + 1], **kw)
        same([together[i]], alone)
        assert together[i]['constraints_met'] == alone[0]['constraints_met']
    for hyp, cs in zip(together, constraints):            # a beam of 3 meets these easily
        assert hyp['constraints_met'] == len(cs)
        assert all(any(t in hyp['tokens'] for t in options) for options in cs)
        assert hyp['tokens'][-1] != 1                      # the bad-ending rule still holds


def test_constraints_keep_the_rules_and_refuse_what_they_cannot_do():
    dec, enc = decoder(1), features(2, 1)
    hyp = beam_search(dec, enc[:1], WORD_MAP, beam_size=2, max_len=8, min_len=3, constraints=[[[4]]])[0]
    assert len(hyp['tokens']) >= 3 and 4 in hyp['tokens']
    with pytest.raises(ValueError, match='at most'):
        beam_search(dec, enc[:1], WORD_MAP, constraints=[[[1]] * (MAX_CONSTRAINTS + 1)])
    with pytest.raises(ValueError, match='do not combine'):
        beam_search(dec, enc[:1], WORD_MAP, beam_size=2, diversity_groups=2, constraints=[[[1]]])
    # a constraint only <unk> meets cannot be met: the search still ends, with the best caption it has
    hyp = beam_search(dec, enc[:1], WORD_MAP, beam_size=2, max_len=8, constraints=[[[UNK]]])[0]
    assert hyp['finished'] and hyp['constraints_met'] == 0 and hyp['steps'] < 8


def test_an_ensemble_takes_constraints_too():
    members = [decoder(s, end_bias=2.0) for s in (0, 1)]
    ens = ensemble.EnsembleDecoder(members, [(4, C)] * 2).eval()
    enc = features(2, 3)
    packed = torch.cat([enc.reshape(2, -1)] * 2, dim=1).unsqueeze(1)         # each member sees the same grid
    hyps = beam_search(ens, packed, WORD_MAP, beam_size=2, max_len=8, constraints=[[[3]], [[2], [4]]])
    assert [h['constraints_met'] for h in hyps] == [1, 2] and all(h['finished'] for h in hyps)
    assert 3 in hyps[0]['tokens'] and 2 in hyps[1]['tokens'] and 4 in hyps[1]['tokens']
    for hyp in beam_search(ens, packed, WORD_MAP, beam_size=2, max_len=8, prefix=[4, 1]):   # and a prefix
        assert hyp['tokens'][:2] == [4, 1] and len(hyp['tokens']) > 2
    samples = decode(ens, packed, WORD_MAP, sample=True, num_captions=2, max_len=8, prefix=[4, 1], seed=3)
    assert all(b['tokens'][:2] == [4, 1] for h in samples for b in h['beams'])


# ----------------------------------------------------------------------------------------------
# Diverse beam search

@pytest.mark.parametrize('name', NAMES)
def test_diverse_groups_start_differently_and_batch_like_one_at_a_time(name):
    dec, enc = decoder(5, end_bias=3.0, name=name), features(4, 5)
    kw = dict(beam_size=3, max_len=8, diversity_groups=3, diversity_strength=1e4)
    together = beam_search(dec, enc, WORD_MAP, **kw)
    for i, hyp in enumerate(together):
        firsts = [b['tokens'][0] for b in hyp['beams']]
        assert len(set(firsts)) == len(firsts)                                # one beam per group, each its own start
        assert len(hyp['beams']) >= 2 or not hyp['finished']
        assert [b['norm_score'] for b in hyp['beams']] == sorted((b['norm_score'] for b in hyp['beams']), reverse=True)
        same([hyp], beam_search(dec, enc[i:i + 1], WORD_MAP, **kw))
        for b in hyp['beams'] if hyp['finished'] else ():
            assert b['score'] == pytest.approx(sequence_logprob(dec, enc[i], b['tokens'] + [END]), rel=1e-6, abs=1e-4)


def test_diversity_groups_must_split_the_beam():
    with pytest.raises(ValueError, match='multiple'):
        beam_search(decoder(), features(1), WORD_MAP, beam_size=3, diversity_groups=2)


# ----------------------------------------------------------------------------------------------
# A prefix

@pytest.mark.parametrize('name', NAMES)
def test_a_prefix_starts_every_caption_and_is_scored(name):
    dec, enc = decoder(6, name=name), features(3, 6)
    kw = dict(beam_size=3, max_len=9, prefix=[4, 3])
    together = beam_search(dec, enc, WORD_MAP, **kw)
    for i, hyp in enumerate(together):
        assert hyp['tokens'][:2] == [4, 3] and len(hyp['tokens']) > 2      # the model says a word more
        ending = [END] if hyp['finished'] else []
        assert hyp['score'] == pytest.approx(sequence_logprob(dec, enc[i], hyp['tokens'] + ending), rel=1e-6, abs=1e-4)
        if dec.has_attention:
            assert hyp['alphas'].shape[0] == len(hyp['tokens'] + ending)   # a map for the prefix words too
        same([hyp], beam_search(dec, enc[i:i + 1], WORD_MAP, **kw))
    samples, lengths, _ = sample_captions(dec, enc, WORD_MAP, n=4, max_len=9, generator=torch.Generator(),
                                          prefix=[4, 3])
    assert (samples[:, :2] == torch.tensor([4, 3])).all() and (lengths > 2).all()


def test_a_prefix_of_tokens_no_caption_may_hold_is_refused():
    for prefix in ([UNK], [END], [V + 3]):
        with pytest.raises(ValueError, match='prefix'):
            beam_search(decoder(), features(1), WORD_MAP, prefix=prefix)


# ----------------------------------------------------------------------------------------------
# Sampling

@pytest.mark.parametrize('name', NAMES)
def test_sampling_is_reproducible_for_a_seed_and_keeps_the_rules(name):
    dec, enc = tiny_decoder(name, V, C, 7), features(3, 7)                 # not peaky: samples differ
    kw = dict(sample=True, num_captions=3, max_len=10, min_len=2, no_end_after=[1], temperature=1.5, top_p=0.95)
    first = decode(dec, enc, WORD_MAP, seed=1, keys=['x', 'y', 'z'], **kw)
    again = decode(dec, enc, WORD_MAP, seed=1, keys=['x', 'y', 'z'], **kw)
    other = decode(dec, enc, WORD_MAP, seed=2, keys=['x', 'y', 'z'], **kw)
    one = decode(dec, enc[1:2], WORD_MAP, seed=1, keys=['y'], **kw)           # its key, not its batch
    def captions(hyps):
        return [[b['tokens'] for b in h['beams']] for h in hyps]
    assert [h['beams'] for h in first] == [h['beams'] for h in again]
    assert captions(first[1:2]) == captions(one)
    assert [b['score'] for b in first[1]['beams']] == pytest.approx([b['score'] for b in one[0]['beams']], rel=1e-6)
    assert captions(first) != captions(other)
    for hyp in first:
        captions = [b['tokens'] for b in hyp['beams']]
        assert len(set(map(tuple, captions))) == len(captions) and hyp['tokens'] == captions[0]
        for tokens in captions:
            assert len(tokens) >= 2 and UNK not in tokens and START not in tokens
            assert len(tokens) == 10 or tokens[-1] != 1          # finished: not on the bad ending
    for hyp in decode(dec, enc, WORD_MAP, seed=3, sample=True, num_captions=4, max_len=10, no_repeat_ngram_size=2):
        for b in hyp['beams']:
            bigrams = list(zip(b['tokens'], b['tokens'][1:]))
            assert len(bigrams) == len(set(bigrams))


def test_top_k_one_is_greedy_and_defaults_draw_as_before():
    dec, enc = decoder(8), features(2, 8)
    greedy, _, _ = sample_captions(dec, enc, WORD_MAP, n=1, max_len=8, greedy=True)
    top1, _, _ = sample_captions(dec, enc, WORD_MAP, n=1, max_len=8, generator=torch.Generator().manual_seed(0),
                                 top_k=1)
    assert torch.equal(greedy, top1)
    u = torch.rand(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = sample_captions(dec, enc, WORD_MAP, n=2, max_len=8, uniforms=u)
    b = sample_captions(dec, enc, WORD_MAP, n=2, max_len=8, uniforms=u, temperature=1.0, top_k=0, top_p=1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match='temperature'):
        sample_captions(dec, enc, WORD_MAP, temperature=0.0)

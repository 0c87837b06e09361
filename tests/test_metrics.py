"""captioning/scoring/metrics.py: BLEU on the seed document's worked example, nltk agreement, the COCO toolkit."""
import math
from fractions import Fraction

import pytest
from nltk.translate.bleu_score import corpus_bleu

from captioning.scoring import metrics
from captioning.text import tokenize


def test_worked_example_modified_precisions():
    """Seed 000: 'the cat sat on the mat' vs 'the cat is on the mat' -> 5/6, 3/5, 1/4, 0/3."""
    p = metrics.modified_precisions('the cat sat on the mat', ['the cat is on the mat'])
    assert [Fraction(x.numerator, x.denominator) for x in p] == [Fraction(5, 6), Fraction(3, 5),
                                                                 Fraction(1, 4), Fraction(0, 3)]
    assert [(x.numerator, x.denominator) for x in p] == [(5, 6), (3, 5), (1, 4), (0, 3)]


def test_worked_example_bleu_scores():
    bleu, _ = metrics.NltkBleu().compute_score({0: ['the cat is on the mat']}, {0: ['the cat sat on the mat']})
    assert bleu[0] == pytest.approx(5 / 6)                       # same length: no brevity penalty
    assert bleu[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert bleu[2] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert bleu[3] == pytest.approx(0.0, abs=1e-9)                # no 4-gram matches


GTS = {1: ['A man rides a horse on the beach .', 'a person riding a horse', 'man on a brown horse near water'],
       2: ['Two dogs play in the snow', 'two dogs running through snow', 'dogs playing outside in winter'],
       3: ['a child eats an ice cream cone', 'a little girl with ice cream', 'kid eating ice cream']}
RES = {1: ['a man riding a horse on the beach'], 2: ['two dogs are playing in the snow'], 3: ['a girl eats ice cream']}


def test_agrees_with_nltk_corpus_bleu_on_every_reference():
    ours, _ = metrics.NltkBleu().compute_score(GTS, RES)
    refs = [[r.lower().replace(' .', '').split() for r in GTS[i]] for i in sorted(RES)]
    hyps = [RES[i][0].split() for i in sorted(RES)]
    for n, w in enumerate(metrics.BLEU_WEIGHTS):
        assert ours[n] == pytest.approx(corpus_bleu(refs, hyps, weights=w))
    assert ours[3] > 0.3
    # every reference counts: scoring against only the first reference gives less
    first_only, _ = metrics.NltkBleu().compute_score({i: g[:1] for i, g in GTS.items()}, RES)
    assert first_only[3] < ours[3]


def test_score_captions_without_coco_toolkit():
    scores, note = metrics.score_captions(GTS, RES, coco=False)
    assert scores['Bleu_4'] == scores['nltk_Bleu_4'] and 'METEOR' not in scores
    assert 'nltk only' in note


def test_coco_toolkit_keys_and_agreement():
    ok, why = metrics.coco_status()
    if not ok:
        pytest.skip(why)
    scores, note = metrics.score_captions(GTS, RES, coco=True)
    assert set(metrics.COCO_KEYS) <= set(scores)
    assert all(0 <= scores[k] <= 1 for k in metrics.COCO_KEYS if k != 'CIDEr') and scores['CIDEr'] > 0
    for n in (1, 2):   # same tokens, same clipped counts: the two BLEUs agree closely here
        assert scores[f'Bleu_{n}'] == pytest.approx(scores[f'nltk_Bleu_{n}'], abs=0.02)
    assert 'pycocoevalcap' in note


def test_coco_required_but_missing(monkeypatch):
    monkeypatch.setattr(metrics, 'coco_status', lambda: (False, 'pycocoevalcap is not installed'))
    with pytest.raises(RuntimeError, match='not installed'):
        metrics.score_captions(GTS, RES, coco=True)
    scores, note = metrics.score_captions(GTS, RES, coco='auto')
    assert 'not installed' in note and 'CIDEr' not in scores


# Written for the test: 'a dog runs on the grass and a dog runs' repeats 'a dog runs'; 'the the the the'
# repeats 'the the the' (overlapping); the last two captions are the same words up to case and punctuation.
CAPTIONS = ['a dog runs on the grass and a dog runs', 'the the the the', 'a cat sits on a mat',
            'A cat sits on a mat.', 'two dogs']


def test_repetition_and_diversity_of_hand_written_captions():
    d = metrics.diversity_scores(CAPTIONS)
    assert set(d) == set(metrics.DIVERSITY_KEYS)
    assert d['repeated_trigrams'] == pytest.approx(2 / 5)
    # a dog runs on the grass and | cat sits mat | two dogs -> 7 + 3 + 2
    assert d['distinct_words'] == 12
    assert d['unique_captions'] == pytest.approx(4 / 5)
    assert d['mean_length'] == pytest.approx((10 + 4 + 6 + 6 + 2) / 5)


def test_ngram_repetition_edges():
    assert not metrics.repeats_ngram(['a', 'b', 'a', 'b'])            # 'a b a', 'b a b': no trigram twice
    assert metrics.repeats_ngram(['a', 'b', 'a', 'b'], n=2)           # 'a b' twice
    assert not metrics.repeats_ngram(['a', 'a'])                      # shorter than a trigram
    assert metrics.repeated_ngram_rate([]) == 0.0 and metrics.unique_share([]) == 0.0
    zh = metrics.diversity_scores(['一只狗在草地上跑', '一只狗在草地上跑'], tokenizer='chars')
    assert (zh['distinct_words'], zh['unique_captions'], zh['mean_length']) == (8, 0.5, 8)


# Written for the test: in these TRAIN references 'red' occurs 50 times and ends 1 reference (2.0%:
# not a bad ending at the 2% threshold), 'white' occurs 51 times and ends 1 (1.96%: bad), 'grass' ends
# every reference it is in, 'a' and 'dog' end none.
ENDING_REFS = [['a red grass'] * 49 + ['the dog is red'], ['white grass'] * 50 + ['a dog in white']]


def test_bad_endings_are_last_words_that_rarely_end_a_train_reference():
    endings = metrics.ending_counts(ENDING_REFS)
    assert endings['red'] == (1, 50) and endings['white'] == (1, 51) and endings['grass'] == (99, 99)
    assert endings['a'] == (0, 50) and endings['dog'] == (0, 2)
    assert metrics.BAD_ENDING_SHARE == 0.02
    captions = ['a dog on the grass', 'the dog is red', 'a dog in white', 'a dog in a', '', 'a zebra', 'The GRASS.']
    bad = [metrics.bad_ending(tokenize(c), endings) for c in captions]
    assert bad == [False, False, True, True, True, True, False]       # '' has no ending; 'zebra' ends no reference
    assert metrics.bad_ending_rate(captions, endings) == pytest.approx(4 / 7)
    assert metrics.bad_ending_rate(captions, endings, threshold=0.01) == pytest.approx(3 / 7)   # 'white' passes
    assert metrics.bad_ending_rate([], endings) == 0.0


def test_bad_endings_in_chinese_use_the_tokenizer():
    refs = [['一只狗在草地上跑', '狗在跑'], ['两个人在草地上']]                      # chars: '跑' ends 2 of 2, '上' 1 of 2
    endings = metrics.ending_counts(refs, tokenizer='chars')
    assert endings['跑'] == (2, 2) and endings['上'] == (1, 2) and endings['在'] == (0, 3)
    captions = ['一只狗在跑', '一只狗在', '两个人在草地上']
    assert metrics.bad_ending_rate(captions, endings, tokenizer='chars') == pytest.approx(1 / 3)

"""Caption metrics behind one interface, pycocoevalcap's: `scorer.compute_score(gts, res)` with
gts = {image id: [reference sentences]} and res = {image id: [one generated sentence]}.

BLEU-1..4 with nltk always work (captions tokenised with text.tokenize). With the optional
pycocoevalcap package (and Java) `score_captions` also gives the COCO caption toolkit's BLEU-1..4,
METEOR, ROUGE-L and CIDEr through its PTB tokenizer: the numbers papers report. Values are fractions.

Chinese (tokenizer jieba or chars, captioning/text.py): references and candidates are segmented with that
tokenizer and the segments, joined by spaces, go straight to BLEU, ROUGE-L and CIDEr. The PTB
tokenizer is bypassed: it does not segment Chinese (an unsegmented sentence stays one "word") and
keeps full-width punctuation. METEOR is left out: its paraphrase tables and stemmer are English-only.
These three scorers are pure Python, so Chinese scoring needs pycocoevalcap but not Java.

Repetition and diversity of a set of generated captions (no references): `diversity_scores` gives
the share of captions that repeat a word trigram, the number of distinct words used, the share of
distinct captions and the mean caption length, on the same tokens as BLEU.

Truncated endings ("a man in a red"): `bad_ending_rate` gives the share of captions whose last word
rarely ends a TRAIN reference: under BAD_ENDING_SHARE (2%) of that word's occurrences in the TRAIN
references are at the end of one (`ending_counts`). On Flickr8k TRAIN: 'a' 0.004%, 'in' 0.09%,
'white' 0.7%, 'red' 0.8%, 'blue' 1.6% are bad endings; 'on' 2.1%, 'dog' 4.4%, 'shirt' 6.3%,
'ball' 43% are not. Words only, so any language and tokenizer works (jieba segments for Chinese).
"""
import contextlib
import importlib.util
import os
import shutil
import sys
import warnings

from nltk.translate.bleu_score import corpus_bleu, modified_precision

from captioning.text import tokenize

COCO_KEYS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')
DIVERSITY_KEYS = ('repeated_trigrams', 'distinct_words', 'unique_captions', 'mean_length')
BAD_ENDING_SHARE = 0.02   # a last word that ends under 2% of its TRAIN occurrences is a bad ending
BLEU_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]


class NltkBleu:
    """Corpus BLEU-1..4 (nltk) on the tokens of `tokenizer` (captioning/text.py), every reference of an image used."""

    def __init__(self, tokenizer='words'):
        self.tokenizer = tokenizer

    def method(self):
        return 'Bleu (nltk)'

    def compute_score(self, gts, res):
        """-> ([BLEU-1, BLEU-2, BLEU-3, BLEU-4], None)."""
        ids = sorted(res)
        refs = [[tokenize(r, self.tokenizer) for r in gts[i]] for i in ids]
        hyps = [tokenize(res[i][0], self.tokenizer) for i in ids]
        with warnings.catch_warnings():   # nltk warns when an n-gram order has no match (BLEU is then 0)
            warnings.simplefilter('ignore')
            return list(corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)), None


def modified_precisions(candidate, references, max_n=4, tokenizer='words'):
    """Clipped n-gram precisions (as Fractions) of one candidate against its references: the
    quantities BLEU is built from. candidate/references are sentences (strings)."""
    refs = [tokenize(r, tokenizer) for r in references]
    hyp = tokenize(candidate, tokenizer)
    return [modified_precision(refs, hyp, n) for n in range(1, max_n + 1)]


def segmented_status():
    """(True, '') when pycocoevalcap is installed (Chinese scoring needs no Java), else (False, why)."""
    if importlib.util.find_spec('pycocoevalcap') is None:
        return False, 'pycocoevalcap is not installed (pip install -r requirements-extras.txt)'
    return True, ''


def coco_status():
    """(True, '') when pycocoevalcap and Java are usable, else (False, why)."""
    if importlib.util.find_spec('pycocoevalcap') is None:
        return False, 'pycocoevalcap is not installed (pip install -r requirements-extras.txt)'
    if shutil.which('java') is None:
        return False, 'Java is not installed (METEOR and the PTB tokenizer of pycocoevalcap need it)'
    return True, ''


def coco_scores(gts, res):
    """The COCO caption toolkit's BLEU-1..4, METEOR, ROUGE-L and CIDEr (needs pycocoevalcap and Java)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _quiet():
        tok = PTBTokenizer()
        g = tok.tokenize({i: [{'caption': s} for s in gts[i]] for i in res})
        r = tok.tokenize({i: [{'caption': res[i][0]}] for i in res})
        out = {}
        for scorer, names in ((Bleu(4), COCO_KEYS[:4]), (Meteor(), ('METEOR',)), (Rouge(), ('ROUGE_L',)),
                              (Cider(), ('CIDEr',))):
            score, _ = scorer.compute_score(g, r)
            out.update(zip(names, score if isinstance(score, list) else [score]))
            if hasattr(scorer, 'close'):
                scorer.close()
    return {k: float(v) for k, v in out.items()}


@contextlib.contextmanager
def _quiet():
    """Silence stdout/stderr at the file-descriptor level (pycocoevalcap's Java tools print there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, 'w') as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def segmented_scores(gts, res, tokenizer):
    """BLEU-1..4, ROUGE-L and CIDEr of pycocoevalcap on `tokenizer` segments (Chinese), without the
    PTB tokenizer and without METEOR (English-only). Needs pycocoevalcap, not Java."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    def seg(s):
        return ' '.join(tokenize(s, tokenizer))
    g = {i: [seg(s) for s in gts[i]] for i in res}
    r = {i: [seg(res[i][0])] for i in res}
    out = {}
    with _quiet():
        for scorer, names in ((Bleu(4), COCO_KEYS[:4]), (Rouge(), ('ROUGE_L',)), (Cider(), ('CIDEr',))):
            score, _ = scorer.compute_score(g, r)
            out.update(zip(names, score if isinstance(score, list) else [score]))
    return {k: float(v) for k, v in out.items()}


def score_captions(gts, res, coco='auto', tokenizer='words'):
    """Score generated captions against all references.

    coco: 'auto' (the COCO toolkit when available), True (required) or False (nltk only).
    Returns (metrics, note): metrics has 'nltk_Bleu_1'..'nltk_Bleu_4' always and, from the COCO
    toolkit when used, 'Bleu_1'..'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'; without it 'Bleu_1'..'Bleu_4'
    repeat nltk's. `note` says which toolkit gave what.
    tokenizer: the checkpoint's (captioning/text.py); jieba/chars score on those segments without PTB and METEOR.
    """
    bleu, _ = NltkBleu(tokenizer).compute_score(gts, res)
    metrics = {f'nltk_Bleu_{n}': float(b) for n, b in enumerate(bleu, 1)}
    ok, why = (coco_status() if tokenizer == 'words' else segmented_status()) if coco else (False, 'disabled')
    if coco is True and not ok:
        raise RuntimeError(f'the COCO caption toolkit was required but {why}')
    if ok and tokenizer != 'words':
        metrics.update(segmented_scores(gts, res, tokenizer))
        return metrics, (f'BLEU/ROUGE-L/CIDEr: pycocoevalcap on {tokenizer} segments (PTB tokenizer bypassed); '
                         'METEOR left out (English-only); nltk_Bleu_*: nltk')
    if ok:
        metrics.update(coco_scores(gts, res))
        return metrics, 'BLEU/METEOR/ROUGE-L/CIDEr: pycocoevalcap (PTB tokenizer); nltk_Bleu_*: nltk'
    metrics.update({f'Bleu_{n}': metrics[f'nltk_Bleu_{n}'] for n in range(1, 5)})
    return metrics, f'BLEU from nltk only; METEOR, ROUGE-L and CIDEr need the COCO toolkit: {why}'


def repeats_ngram(tokens, n=3):
    """True when some n-gram occurs more than once in `tokens` (overlapping occurrences count:
    'a a a a' repeats the trigram 'a a a')."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


def repeated_ngram_rate(token_lists, n=3):
    """Share of captions (token lists) in which some n-gram occurs more than once."""
    return sum(repeats_ngram(t, n) for t in token_lists) / max(len(token_lists), 1)


def distinct_words(token_lists):
    """Vocabulary size of all the captions together."""
    return len({w for t in token_lists for w in t})


def unique_share(token_lists):
    """Distinct captions / captions (1.0: every image got its own caption)."""
    return len({tuple(t) for t in token_lists}) / max(len(token_lists), 1)


def mean_length(token_lists):
    """Mean caption length in tokens."""
    return sum(len(t) for t in token_lists) / max(len(token_lists), 1)


def diversity_scores(captions, tokenizer='words'):
    """Repetition and diversity of generated captions (sentences, one per image) on the tokens of
    `tokenizer` (captioning/text.py): {'repeated_trigrams': share of captions repeating a word trigram,
    'distinct_words': words used, 'unique_captions': distinct captions / images, 'mean_length': words}."""
    tokens = [tokenize(c, tokenizer) for c in captions]
    return {'repeated_trigrams': repeated_ngram_rate(tokens, 3), 'distinct_words': distinct_words(tokens),
            'unique_captions': unique_share(tokens), 'mean_length': mean_length(tokens)}


def ending_counts(references, tokenizer='words'):
    """References (one list of sentences per image: the TRAIN split's) -> {word: (references it ends,
    occurrences)} on the tokens of `tokenizer`: how often each word is the last of a reference."""
    ends, occurrences = {}, {}
    for image_refs in references:
        for sentence in image_refs:
            tokens = tokenize(sentence, tokenizer)
            for w in tokens:
                occurrences[w] = occurrences.get(w, 0) + 1
            if tokens:
                ends[tokens[-1]] = ends.get(tokens[-1], 0) + 1
    return {w: (ends.get(w, 0), n) for w, n in occurrences.items()}


def bad_ending(tokens, endings, threshold=BAD_ENDING_SHARE):
    """True when a caption's last word ends fewer than `threshold` of its occurrences in the references
    `endings` counts (ending_counts); a word they never hold and a caption of no words are bad too."""
    if not tokens:
        return True
    ends, occurrences = endings.get(tokens[-1], (0, 0))
    return ends < threshold * occurrences or occurrences == 0


def bad_ending_words(endings, threshold=BAD_ENDING_SHARE):
    """The words of `endings` (ending_counts) that are bad endings (bad_ending): those a caption
    should not end on (caption.beam_search's no_end_after, the scripts' --bad-endings avoid)."""
    return {w for w in endings if bad_ending([w], endings, threshold)}


def bad_ending_rate(captions, endings, tokenizer='words', threshold=BAD_ENDING_SHARE):
    """Share of captions (sentences) with a bad ending (bad_ending) on the tokens of `tokenizer`."""
    return sum(bad_ending(tokenize(c, tokenizer), endings, threshold) for c in captions) / max(len(captions), 1)

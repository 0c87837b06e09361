"""CIDEr-D without Java or per-pair Python loops: the COCO caption toolkit's number, fast enough to
be a training reward.

pycocoevalcap's `Cider` is CIDEr-D (Vedantam et al. 2015): n-grams of 1..4 words weighted by
tf-idf, where the document frequency of an n-gram is the number of images whose references
contain it and the idf is log(number of images) - log(max(1, df)); per n, the cosine of the
candidate's and a reference's vectors with each candidate weight clipped to the reference's
(sum of min(h, r) * r over the candidate's n-grams, divided by both norms), times a Gaussian
length penalty exp(-delta^2 / (2 * 6^2)); the mean over n, averaged over the references, x 10.
One quirk is kept on purpose, so the numbers agree: the toolkit's "length" counts bigrams
(len - 1), not words.

    CiderD(refs)                built ONCE from a corpus (one list of token lists per image): the
                                n-gram table, document frequencies, every reference's tf-idf
                                weights, norms and length are computed here
    .scores(images, candidates) CIDEr-D of each candidate (a token list) against the references of
                                its image (an index into refs): numpy over all pairs at once
    Cider().compute_score(gts, res)   pycocoevalcap's interface (space-separated token strings; df
                                from the references given), equal to it within 1e-6 per image

Training uses a CiderD of the TRAIN references as the self-critical reward (df from TRAIN, as
self-critical.pytorch); validation uses one of the scored VAL images' references for model
selection (df from them, as the toolkit). Tokens come from the data's tokenizer (captioning/text.py), not the
toolkit's PTB tokenizer, so 03_evaluate.py's CIDEr (PTB-tokenised) can differ slightly.
"""
import collections

import numpy as np

N_GRAM = 4       # n-grams of 1..4 tokens
SIGMA = 6.0      # width of the Gaussian length penalty (CIDEr-D)


def ngram_counts(tokens, n=N_GRAM):
    """[tokens] -> Counter of the token tuples of length 1..n (pycocoevalcap's precook)."""
    counts = collections.Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(tokens[i:] for i in range(k))))
    return counts


def _bigrams(num_tokens, n):
    """The toolkit's candidate/reference "length": its count of bigrams."""
    return max(num_tokens - 1, 0) if n >= 2 else 0


class CiderD:
    """The references of a corpus, prepared once for fast CIDEr-D scoring (see the module docstring).

    refs: one list per image of its references, each a list of tokens (strings). Memory is about
    30 bytes per (reference, distinct n-gram) pair: some 40 MB for Flickr8k's TRAIN."""

    def __init__(self, refs, n=N_GRAM, sigma=SIGMA):
        self.n, self.sigma = n, sigma
        self.num_images = len(refs)
        if not self.num_images:
            raise ValueError('CIDEr-D needs at least one image with references')
        self.ids = {}                                    # n-gram tuple -> id
        ent_ref, ent_gid, ent_tf, ref_len, ref_count = [], [], [], [], []
        df = []                                          # id -> number of images with it in a reference
        j = 0
        for i, image_refs in enumerate(refs):
            if not image_refs:
                raise ValueError(f'image {i} has no reference')
            seen = set()
            for tokens in image_refs:
                for gram, tf in ngram_counts(tokens, n).items():
                    g = self.ids.setdefault(gram, len(self.ids))
                    if g == len(df):
                        df.append(0)
                    ent_ref.append(j)
                    ent_gid.append(g)
                    ent_tf.append(tf)
                    seen.add(g)
                ref_len.append(_bigrams(len(tokens), n))
                j += 1
            for g in seen:
                df[g] += 1
            ref_count.append(len(image_refs))
        G = self.G = len(self.ids)
        self.log_images = np.log(float(self.num_images))
        self.idf = self.log_images - np.log(np.maximum(1.0, np.array(df, dtype=np.float64)))   # [G]
        self.order = np.array([len(k) - 1 for k in self.ids], dtype=np.int64)               # [G]: n-gram size - 1
        self.ref_count = np.array(ref_count, dtype=np.int64)                                 # [N]
        self.ref_start = np.concatenate([[0], np.cumsum(self.ref_count)])                    # [N+1]
        self.ref_len = np.array(ref_len, dtype=np.float64)                                   # [R]
        R = len(self.ref_len)
        ent_ref = np.array(ent_ref, dtype=np.int64)                                          # [E]
        ent_gid = np.array(ent_gid, dtype=np.int64)
        weight = np.array(ent_tf, dtype=np.float64) * self.idf[ent_gid]                      # [E] tf-idf
        image_of_ref = np.repeat(np.arange(self.num_images), self.ref_count)                 # [R]
        self.ref_norm = np.sqrt(np.bincount(ent_ref * n + self.order[ent_gid], weight ** 2,
                                            minlength=R * n)).reshape(R, n)                  # [R, n]
        # (image, n-gram) -> the references of that image holding it, with their weights: a sorted
        # key table (key = image * G + id) pointing into the entries, grouped by key.
        key = image_of_ref[ent_ref] * G + ent_gid
        order = np.argsort(key, kind='stable')
        key = key[order]
        self.ent_ref, self.ent_w = ent_ref[order], weight[order]                             # [E]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, dtype=np.int64)
        self.keys = key[first]                                                               # [K]
        self.ptr = np.r_[first, len(key)]                                                    # [K+1]

    def scores(self, images, candidates):
        """CIDEr-D of candidates[c] (a list of tokens) against the references of image images[c].
        -> float64 array [C]."""
        n, C = self.n, len(candidates)
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        if len(images) != C:
            raise ValueError(f'{len(images)} image indices for {C} candidates')
        if C == 0:
            return np.zeros(0)
        if images.min() < 0 or images.max() >= self.num_images:
            raise ValueError(f'image index out of range 0..{self.num_images - 1}')
        cand, gid, order, tf = [], [], [], []
        cand_len = np.empty(C)
        for c, tokens in enumerate(candidates):
            for gram, count in ngram_counts(tokens, n).items():
                cand.append(c)
                gid.append(self.ids.get(gram, -1))
                order.append(len(gram) - 1)
                tf.append(count)
            cand_len[c] = _bigrams(len(tokens), n)
        cand, gid = np.array(cand, dtype=np.int64), np.array(gid, dtype=np.int64)             # [M]
        order, known = np.array(order, dtype=np.int64), gid >= 0
        idf = np.where(known, self.idf[np.maximum(gid, 0)] if self.G else 0.0, self.log_images)
        vh = np.array(tf, dtype=np.float64) * idf                                            # [M]
        hyp_norm = np.sqrt(np.bincount(cand * n + order, vh ** 2, minlength=C * n)).reshape(C, n)

        # Pairs (candidate, one reference of its image): P = sum of the images' reference counts.
        nrefs = self.ref_count[images]                                                       # [C]
        pair_start = np.concatenate([[0], np.cumsum(nrefs)[:-1]])                            # [C]
        P = int(nrefs.sum())
        pair_cand = np.repeat(np.arange(C), nrefs)                                           # [P]
        pair_ref = self.ref_start[images][pair_cand] + np.arange(P) - pair_start[pair_cand]  # [P]

        # The candidate's n-grams that the image's references hold, expanded to one row per reference.
        m = np.flatnonzero(known) if len(self.keys) else np.zeros(0, dtype=np.int64)
        key = images[cand[m]] * self.G + gid[m]
        pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        hit = self.keys[pos] == key
        m, pos = m[hit], pos[hit]
        start, count = self.ptr[pos], self.ptr[pos + 1] - self.ptr[pos]
        rep = np.repeat(np.arange(len(m)), count)                                            # [H] -> match
        ent = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count) + start[rep]
        vr, h, ref = self.ent_w[ent], vh[m][rep], self.ent_ref[ent]
        c = cand[m][rep]
        pair = pair_start[c] + ref - self.ref_start[images[c]]                               # [H]
        val = np.bincount(pair * n + order[m][rep], np.minimum(h, vr) * vr, minlength=P * n).reshape(P, n)

        denom = hyp_norm[pair_cand] * self.ref_norm[pair_ref]                                # [P, n]
        val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
        delta = cand_len[pair_cand] - self.ref_len[pair_ref]                                 # [P]
        val *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        return np.bincount(pair_cand, val.mean(axis=1), minlength=C) / nrefs * 10.0


class Cider:
    """pycocoevalcap's Cider interface: compute_score(gts, res) with gts = {id: [reference, ...]},
    res = {id: [one candidate]}, sentences already tokenised (space separated); document
    frequencies from the references given. -> (corpus score, per-image scores in gts order)."""

    def __init__(self, n=N_GRAM, sigma=SIGMA):
        self.n, self.sigma = n, sigma

    def method(self):
        return 'CIDEr'

    def compute_score(self, gts, res):
        if set(gts) != set(res):
            raise ValueError('CIDEr: the candidates and references name different images')
        ids = list(gts)
        for i in ids:
            if not isinstance(res[i], list) or len(res[i]) != 1:
                raise ValueError(f'CIDEr: image {i!r} needs exactly one candidate, got {res[i]!r}')
        corpus = CiderD([[s.split() for s in gts[i]] for i in ids], self.n, self.sigma)
        scores = corpus.scores(range(len(ids)), [res[i][0].split() for i in ids])
        return float(scores.mean()), scores

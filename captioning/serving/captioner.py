"""The server's loaded model: a batch of image tensors -> JSON-ready answers (caption, beams, attention)."""
import math
import time

import torch

import datasets
import utils
from captioning.decoding import files, loading, quantize, search


class Captioner:
    """The loaded model and what turns a batch of image tensors into JSON-ready answers."""

    def __init__(self, settings):
        """settings: the server's (04_serve.Settings): checkpoint, word_map, device, precision, mirror,
        bad_endings, max_len, length_norm, no_repeat_ngram."""
        self.device = utils.get_device(settings.device)
        self.encoder, self.decoder, self.word_map, self.config = loading.load_captioner(
            settings.checkpoint, self.device, settings.word_map, settings.mirror)
        self.decoder, self.precision = quantize.apply_precision(self.decoder, settings.precision, self.device)  # once
        self.no_end_after, self.endings_note = loading.bad_endings_setting(settings.bad_endings, self.decoder,
                                                                           self.word_map, self.config)
        self.rev_word_map = {v: k for k, v in self.word_map.items()}
        self.transform = datasets.image_transform(self.encoder)
        self.has_attention = getattr(self.decoder, 'has_attention', True)
        self.max_len, self.length_norm = settings.max_len, settings.length_norm
        self.no_repeat_ngram = settings.no_repeat_ngram
        self.checkpoint = settings.checkpoint

    def __call__(self, items):
        """items: [(tensor [3, S, S], beam_size)] -> one answer dict per item (same order)."""
        start = time.perf_counter()
        with torch.inference_mode():
            enc = self.encoder(torch.stack([t for t, _ in items]).to(self.device))   # [B, g, g, C], once
            hyps = [None] * len(items)
            for k in sorted({k for _, k in items}):          # beam_search takes one beam size per call
                idx = [i for i, (_, kk) in enumerate(items) if kk == k]
                # one image at a time for an int8 decoder: a request's caption never depends on who
                # else was asking (search.search_images)
                found = search.search_images(self.decoder, enc[idx], self.word_map, beam_size=k,
                                              max_len=self.max_len, length_norm=self.length_norm,
                                              no_repeat_ngram_size=self.no_repeat_ngram, no_end_after=self.no_end_after)
                for i, hyp in zip(idx, found):
                    hyps[i] = hyp
        model_ms = (time.perf_counter() - start) * 1000
        return [dict(self.answer(hyp), batch_size=len(items), model_ms=model_ms) for hyp in hyps]

    def answer(self, hyp):
        words = self.decoder.words(hyp['tokens'], self.rev_word_map)
        out = {'caption': ' '.join(words), 'words': words, 'finished': bool(hyp['finished']),
               'beams': [{'caption': ' '.join(self.decoder.words(b['tokens'], self.rev_word_map)),
                          'score': round(float(b['score']), 4), 'norm_score': round(float(b['norm_score']), 4)}
                         for b in hyp['beams']],
               'attention': None}
        if not words:   # the search emits a token at least; a GPT-2's can decode to no words: say why
            out['note'] = f"empty caption: {files.empty_reason({**hyp, 'words': words})}"
        alphas = hyp.get('alphas')
        if self.has_attention and alphas is not None:
            alphas = alphas[:len(hyp['tokens'])].float()          # one map per word (the <end> map is left out)
            grid = int(round(math.sqrt(alphas.shape[1])))
            out['attention'] = {'grid': grid,
                                'maps': [[round(v, 5) for v in row] for row in alphas.tolist()]}
        return out

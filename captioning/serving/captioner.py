"""The server's loaded model: a batch of image tensors, each with its request's settings -> JSON-ready
answers (caption, alternatives, tags, attention)."""
import dataclasses
import math
import time

import torch

import datasets
import utils
from captioning import text
from captioning.decoding import files, loading, options, quantize, runtime, search, tags


@dataclasses.dataclass(frozen=True)
class Request:
    """What one request asks of the model besides its photo (04_serve.py's form fields). Requests with
    equal settings in a batch share one search."""
    beam_size: int = 3
    num_captions: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    diversity_groups: int = 1
    prefix: tuple = ()          # token ids (Captioner.prefix_tokens)
    guide: str = 'auto'

    def decode_kw(self):
        kw = {'beam_size': self.beam_size, 'num_captions': self.num_captions, 'sample': self.sample}
        if self.sample:
            kw.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        elif self.diversity_groups > 1:
            kw.update(diversity_groups=self.diversity_groups)
        if self.prefix:
            kw['prefix'] = list(self.prefix)
        return kw


class Captioner:
    """The loaded model and what turns a batch of image tensors into JSON-ready answers."""

    def __init__(self, settings):
        """settings: the server's (04_serve.Settings): checkpoint, word_map, device, precision, runtime,
        onnx_cache, mirror, bad_endings, max_len, length_norm, no_repeat_ngram."""
        self.device = utils.get_device(settings.device)
        self.runtime = runtime.resolve(getattr(settings, 'runtime', 'torch'), self.device)   # the encoder's engine
        self.encoder, self.decoder, self.word_map, self.config = loading.load_captioner(
            settings.checkpoint, self.device, settings.word_map, settings.mirror, self.runtime,
            getattr(settings, 'onnx_cache', None))
        self.decoder, self.precision = quantize.apply_precision(self.decoder, settings.precision, self.device)  # once
        self.no_end_after, self.endings_note = loading.bad_endings_setting(settings.bad_endings, self.decoder,
                                                                           self.word_map, self.config)
        self.rev_word_map = {v: k for k, v in self.word_map.items()}
        self.transform = datasets.image_transform(self.encoder)
        self.has_attention = getattr(self.decoder, 'has_attention', True)
        self.max_len, self.length_norm = settings.max_len, settings.length_norm
        self.no_repeat_ngram = settings.no_repeat_ngram
        self.checkpoint = settings.checkpoint
        self.tokenizer = text.checkpoint_tokenizer(self.config)
        self.tags_note = None if tags.has_head(self.encoder) else self.config.get('tags_note')
        self.guide_auto = not tags.is_chinese(self.word_map)                 # what guide 'auto' means here
        self.guide = tags.guide_for('on', False, self.encoder, self.word_map,
                                    loading.checkpoint_paths(settings.checkpoint)[0])

    def prefix_tokens(self, prefix):
        """A request's prefix words -> token ids (ValueError naming a word outside the word map)."""
        return tuple(options.prefix_tokens(prefix, self.decoder, self.word_map, self.tokenizer))

    def __call__(self, items):
        """items: [(tensor [3, S, S], Request)] -> one answer dict per item (same order)."""
        start = time.perf_counter()
        with torch.inference_mode():
            images = torch.stack([t for t, _ in items]).to(self.device)
            enc, probs = tags.encode(self.encoder, images)             # [B, g, g, C] and the tags, once
            found = self.guide.constraints(probs) if self.guide is not None and probs is not None else None
            hyps = [None] * len(items)
            for request in dict.fromkeys(r for _, r in items):          # one search per distinct setting
                idx = [i for i, (_, r) in enumerate(items) if r == request]
                guided = (found is not None and not request.sample and
                          (request.guide == 'on' or (request.guide == 'auto' and self.guide_auto)))
                # one image at a time for an int8 decoder: a request's caption never depends on who
                # else was asking (search.search_images)
                results = search.decode(self.decoder, enc[idx], self.word_map, max_len=self.max_len,
                                        length_norm=self.length_norm, no_repeat_ngram_size=self.no_repeat_ngram,
                                        no_end_after=self.no_end_after, per_image=True, keys=[''] * len(idx),
                                        guides=[found[i][0] for i in idx] if guided else None,
                                        guide_margin=tags.GUIDE_MARGIN, **request.decode_kw())
                for i, hyp in zip(idx, results):
                    hyps[i] = hyp
                    hyp['tags'] = tags.top_tags(probs[i:i + 1])[0] if probs is not None else None
        model_ms = (time.perf_counter() - start) * 1000
        return [dict(self.answer(hyp, request), batch_size=len(items), model_ms=model_ms)
                for hyp, (_, request) in zip(hyps, items)]

    def answer(self, hyp, request=Request()):
        words = self.decoder.words(hyp['tokens'], self.rev_word_map)
        out = {'caption': ' '.join(words), 'words': words, 'finished': bool(hyp['finished']),
               'beams': [{'caption': ' '.join(self.decoder.words(b['tokens'], self.rev_word_map)),
                          'score': round(float(b['score']), 4), 'norm_score': round(float(b['norm_score']), 4)}
                         for b in hyp['beams']],
               'captions': [{'caption': ' '.join(c['words']), 'score': round(float(c['score']), 4),
                             'norm_score': round(float(c['norm_score']), 4)}
                            for c in files.alternatives(hyp, self.decoder, self.rev_word_map, request.num_captions)],
               'tags': [{'label': t['label'], 'p': t['p']} for t in hyp['tags']] if hyp.get('tags') else None,
               'guided_by': [[self.rev_word_map[i] for i in c] for c in hyp['guided']] if hyp.get('guided') else None,
               'attention': None}
        if request.sample:
            out['seed'] = request.seed
        if not words:   # the search emits a token at least; a GPT-2's can decode to no words: say why
            out['note'] = f"empty caption: {files.empty_reason({**hyp, 'words': words})}"
        alphas = hyp.get('alphas')
        if self.has_attention and alphas is not None:
            alphas = alphas[:len(hyp['tokens'])].float()          # one map per word (the <end> map is left out)
            grid = int(round(math.sqrt(alphas.shape[1])))
            out['attention'] = {'grid': grid,
                                'maps': [[round(v, 5) for v in row] for row in alphas.tolist()]}
        return out

"""Self-critical sequence training (Rennie et al. 2017, "Self-critical Sequence Training for Image
Captioning"): the decoder is trained to raise the CIDEr-D of the captions it samples, with the
design of self-critical.pytorch's new_self_critical (Luo 2020) as the default baseline.

Per batch of images, `SelfCritical.forward` (the module 01_train.py wraps in DistributedDataParallel,
so sampling, reward and loss all run inside the wrapped forward):

1. samples n captions per image without autograd through the decoder's step interface
   (caption.sample_captions), from uniforms the caller draws (01_train.py: from the seed and step, so
   a resumed or multi-process run draws the same numbers);
2. rewards each with CIDEr-D against the image's TRAIN references (cider.CiderD, built once by
   `reward_corpus`); end-aware (the default of new runs, 01_train.py --scst-end-token), the end token
   is a word of those n-grams: see below;
3. baseline: the mean reward of the image's OTHER n - 1 samples ('mean', the default), or the reward
   of the image's greedy caption ('greedy', Rennie et al.'s original);
4. re-scores the samples with autograd by the decoder's teacher-forced forward (the same forward as
   cross-entropy training) and returns
       loss = -sum over samples of (reward - baseline) * sum_t log p(w_t | w_<t, image) / num_captions
   where num_captions is the number of samples in the (global) batch. The sum over a caption's tokens
   divided by the number of captions is the REINFORCE estimate of the gradient of the mean expected
   reward. (self-critical.pytorch divides by the number of tokens instead: a step-size difference of
   about the mean caption length, which Adam's normalisation mostly absorbs.)

With `dropout=True` (01_train.py --scst-dropout) the decoder keeps its dropout while sampling, as
self-critical.pytorch's does, and steps 1 and 4 are one: the samples are drawn with autograd and
their log-probabilities are differentiated under the very dropout masks that drew each word (no
re-scoring). The policy is then the decoder with a random mask per step, a regulariser against
fitting the TRAIN references.

The end-aware reward (as self-critical.pytorch scores: its CIDEr-D strings keep the end token): without it,
"a man in a red" can score as well as "a man in a red shirt" or better (every n-gram of the
short caption is in the references, and the length penalty is gentle), so cutting a caption short
costs nothing and self-critical training learns truncated endings. With `end_token`, every TRAIN
reference ends with the word '<end>' (`reward_corpus`) and so does every sample that emitted <end>:
"a red <end>" must now match a reference's n-grams up to its end, and it matches none that go on to
"a red ball <end>". The numbers are the COCO toolkit's CIDEr-D of those token lists (tests compare).
Runs from before the option keep the old reward when resumed (01_train.py).

Decisions:
- By default dropout is off in both sampling and re-scoring (the decoder stays in eval mode under
  this module): the log-probabilities differentiated are then exactly those of the distribution that
  drew the samples. With dropout on, a teacher-forced re-scoring would draw other dropout masks than
  the sampling steps did, so the gradient would belong to another policy; hence the single pass of
  `dropout=True`. (Re-scoring stays the default: it is what the provided checkpoints were trained
  with, and the pass without autograd keeps sampling cheap.)
- <start>, <pad> and <unk> are never sampled, nor <end> before `min_len` tokens (01_train.py --min-len,
  1 for new runs: no caption of no words); the re-scoring renormalises without them too, so it
  scores the samples under the very distribution they were drawn from.
- The doubly stochastic attention penalty (alpha_c, sat/dot_attention) is left out: it regularised
  the cross-entropy stage; under SCST the reward is the whole objective.
- repeat_bilstm trains too: REINFORCE needs only a sampling distribution and its log-probabilities,
  and its positions are sampled independently of the earlier words; samples are capped at its
  max_len positions (Decoder.step_limit).
"""
import torch
import torch.nn.functional as F
from torch import nn

from captioning.decoders.interface import words_of
from captioning.decoding.search import sample_captions
from captioning.scoring.cider import CiderD

BASELINES = ('mean', 'greedy')
END_WORD = '<end>'   # the end token as a word of the end-aware reward's n-grams


def reward_corpus(references, end_token):
    """The reward's CIDEr-D corpus: references (one list of token lists per TRAIN image), each ending
    with the word END_WORD when `end_token` (the end-aware reward)."""
    return CiderD([[list(r) + [END_WORD] for r in refs] for refs in references] if end_token else references)


class SelfCritical(nn.Module):
    """The self-critical objective around a decoder (see the module docstring).

    reward: a cider.CiderD of the TRAIN references (image index -> references), from reward_corpus
    with the same `end_token`; min_len: tokens before <end> may come."""

    def __init__(self, decoder, reward, word_map, samples=5, baseline='mean', max_len=20, dropout=False,
                 end_token=False, min_len=1):
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        if baseline == 'mean' and samples < 2:
            raise ValueError('the mean-of-the-other-samples baseline needs at least 2 samples per image')
        self.decoder, self.reward, self.word_map = decoder, reward, word_map
        self.rev_word_map = {v: k for k, v in word_map.items()}
        self.samples, self.baseline, self.dropout = samples, baseline, dropout
        if end_token != ((END_WORD,) in reward.ids):
            raise ValueError(f"the {'end-aware ' if end_token else ''}reward needs references that "
                             f"{'' if end_token else 'do not '}end with {END_WORD} (scst.reward_corpus)")
        self.end_token, self.min_len = end_token, min_len
        limit = decoder.step_limit()
        self.max_len = max_len if limit is None else min(max_len, limit)
        start, end, self.banned = decoder.special_tokens(word_map)
        if (start, end) != (word_map['<start>'], word_map['<end>']):
            raise ValueError('self-critical training needs a decoder over the prepared word map (e.g. '
                             'clipcap with --lm scratch), not one over its own vocabulary')

    def train(self, mode=True):
        """Dropout stays off in the decoder whatever the mode unless `dropout` (module docstring)."""
        super().train(mode)
        if not self.dropout:
            self.decoder.eval()
        return self

    def score(self, images, tokens, lengths):
        """CIDEr-D of each row of tokens [N, T] (lengths [N]) against the references of images [N]
        -> float64 [N] on the tokens' device. End-aware, a row that emitted <end> ends with END_WORD."""
        end = self.word_map['<end>']
        rows = [words_of(row[:n], self.rev_word_map) + ([END_WORD] if self.end_token and row[n - 1] == end else [])
                for row, n in zip(tokens.tolist(), lengths.tolist())]
        return torch.from_numpy(self.reward.scores(images.tolist(), rows)).to(tokens.device)

    def forward(self, features, images, uniforms, num_captions):
        """features [b, g, g, C] or [b, P, C] (with autograd when the encoder is fine-tuned); images [b]:
        TRAIN image indices (their references); uniforms [b * n, max_len] float64 in [0, 1): this
        batch's draws; num_captions: the loss normaliser (global samples / processes).

        -> (loss, sums float64 [4]: reward, baseline, words per sample, samples; sums over this batch)."""
        n, b = self.samples, features.size(0)
        one_pass = self.dropout and self.training
        tokens, lengths, logp = sample_captions(self.decoder, features if one_pass else features.detach(),
                                                self.word_map, n, self.max_len, uniforms=uniforms,
                                                grad=one_pass, min_len=self.min_len)   # [b*n, T], [b*n], [b*n]
        image_rows = images.repeat_interleave(n)                                  # [b*n]
        rewards = self.score(image_rows, tokens, lengths)                         # [b*n]
        if self.baseline == 'greedy':
            mode = self.decoder.training
            greedy, greedy_len, _ = sample_captions(self.decoder.eval(), features.detach(), self.word_map, 1,
                                                    self.max_len, greedy=True, min_len=self.min_len)   # no dropout
            self.decoder.train(mode)
            baseline = self.score(images, greedy, greedy_len).repeat_interleave(n)   # [b*n]
        else:
            r = rewards.view(b, n)
            baseline = ((r.sum(dim=1, keepdim=True) - r) / (n - 1)).view(-1)    # [b*n]: the other samples
        advantage = (rewards - baseline).float()
        words = ((tokens != self.word_map['<end>']) & (tokens != self.word_map['<pad>'])).sum()
        sums = torch.stack([rewards.sum(), baseline.sum(), words.double(),
                            torch.tensor(float(b * n), dtype=torch.float64, device=rewards.device)])
        if one_pass:                                                              # logp [b*n] has autograd
            return -(advantage * logp).sum() / num_captions, sums

        # Teacher-forced re-scoring of the samples: <start> + tokens, decode lengths = tokens emitted.
        start = torch.full((b * n, 1), self.word_map['<start>'], dtype=torch.long, device=tokens.device)
        captions = torch.cat([start, tokens], dim=1)                              # [b*n, T+1]
        out = self.decoder(features, captions, lengths + 1,
                           torch.arange(b, device=tokens.device).repeat_interleave(n))
        banned = torch.tensor(self.banned, dtype=torch.long, device=tokens.device)
        scores = out.scores.float().index_fill(1, banned, float('-inf'))         # [M, V] packed, time-major
        decode_lengths = torch.tensor(out.decode_lengths, device=scores.device)  # [N], sorted, descending
        steps = torch.arange(int(decode_lengths[0]), device=scores.device)
        step_caption = (steps.unsqueeze(1) < decode_lengths.unsqueeze(0)).nonzero()   # [M, 2]: (step, sorted caption)
        early = (step_caption[:, 0] < self.min_len).unsqueeze(1)                  # [M, 1]: <end> not yet allowed
        end_column = torch.arange(scores.size(1), device=scores.device) == self.word_map['<end>']   # [V]
        scores = scores.masked_fill(early & end_column, float('-inf'))          # as the sampler renormalised
        logp = F.log_softmax(scores, dim=1).gather(1, out.targets.unsqueeze(1)).squeeze(1)   # [M]
        caption_of = step_caption[:, 1]                                          # [M]: sorted caption
        seq_logp = logp.new_zeros(len(decode_lengths)).index_add(0, caption_of, logp)     # [N] in sorted order
        return -(advantage[out.sort_ind] * seq_logp).sum() / num_captions, sums

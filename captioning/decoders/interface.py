"""The interface every caption decoder implements (Decoder), its teacher-forced output, and the
helpers the decoders share.

Every decoder gives word log-probabilities through the same methods, so one beam search
(caption.beam_search), one training loop (01_train.py), one checkpoint format (captioning/checkpoint.py) and
one evaluation serve them all:

    memory = decoder.prepare(features, k)         # features [B, P, C] -> per-image tensors, once per image
    state = decoder.init_state(memory, k)         # k rows per image: row i * k + j is beam j of image i
    logp, state, alpha = decoder.step(tokens, state, memory)   # tokens [B*k] -> logp [B*k, V],
                                                  # alpha [B*k, P] (decoders with attention) or None
    state = decoder.select(state, rows)           # reorder / drop rows (beams)
    memory = decoder.select_memory(memory, keep)  # drop finished images
    out = decoder(features, captions, lengths, image_index)   # teacher forcing -> DecoderOutput

Memory stays indexed by image and state by row, so the beams of an image share its features.
Each decoder has a `Config` dataclass (its hyper-parameters; stored in checkpoints as
config['decoder_args']) and a name in decoders.DECODERS (the registry, which imports every decoder
module). Adding a decoder is a class and a registry line: nothing else changes. The tokens step()
scores are the word map's ids, except for ClipCap with a pretrained GPT-2 (captioning/decoders/clipcap.py), whose
special_tokens / words / use_word_map say how its BPE vocabulary relates to the word map.
"""
import collections
import dataclasses

import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

DecoderOutput = collections.namedtuple('DecoderOutput', 'scores targets decode_lengths penalty sort_ind')
DecoderOutput.__doc__ = """Teacher-forced output: scores [M, V] and targets [M] packed time-major over the
length-sorted captions (M = sum of decode lengths, pack_padded_sequence's order), decode_lengths
(list), penalty [N] (a per-caption regulariser already weighted, e.g. the doubly stochastic attention
term; None when the decoder has none) and sort_ind [N] (caption order)."""


class Decoder(nn.Module):
    """The interface (see the module docstring). Subclasses set Config and implement prepare,
    init_state, step and forward; select / select_memory index every tensor by default."""
    Config = None
    has_attention = False     # step() returns attention weights over the P grid cells

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.vocab_size = cfg, cfg.vocab_size

    def args(self):
        """The hyper-parameters as a dict (a checkpoint's config['decoder_args'])."""
        return dataclasses.asdict(self.cfg)

    def prepare(self, features, k=None):
        raise NotImplementedError

    def init_state(self, memory, k):
        raise NotImplementedError

    def step(self, tokens, state, memory):
        raise NotImplementedError

    def select(self, state, rows):
        return tuple(s[rows] for s in state)

    def select_memory(self, memory, keep):
        return tuple(m[keep] for m in memory)

    # The tokens step() scores are the word map's ids for every decoder here except ClipCap with a
    # pretrained GPT-2 (its BPE vocabulary): these three methods are where that difference lives.

    def special_tokens(self, word_map, allow_unk=False):
        """(start token, end token, ids never emitted) of the vocabulary step() scores: the word map's
        <start>, <end>, and <start>, <pad> (and <unk> unless allow_unk) never emitted."""
        never = ('<start>', '<pad>') + (() if allow_unk else ('<unk>',))
        return word_map['<start>'], word_map['<end>'], [word_map[w] for w in never if w in word_map]

    def words(self, tokens, rev_word_map):
        """Emitted tokens (list of ids) -> the caption's words."""
        return words_of(tokens, rev_word_map)

    def use_word_map(self, word_map, tokenizer='words'):
        """Told the prepared word map (and its tokenizer) before training: nothing to do when the word
        map is the decoder's vocabulary."""

    def step_limit(self):
        """The most decoding steps the decoder has (None: no limit); teacher forcing refuses longer
        captions."""
        return None


def words_of(tokens, rev_word_map):
    """Word ids -> words, without <start>/<end>/<pad>."""
    return [rev_word_map[t] for t in tokens if rev_word_map[t] not in ('<start>', '<end>', '<pad>')]


def sort_captions(captions, lengths, image_index):
    """Length-sort a batch of captions (pack_padded_sequence's order).

    -> (sorted captions [N, L], decode lengths (list, no step after <end>), the image row of each
    sorted caption [N], sort_ind [N], packed targets [M])."""
    lengths, sort_ind = lengths.view(-1).sort(descending=True)
    captions = captions[sort_ind]
    rows = sort_ind if image_index is None else image_index[sort_ind]
    decode_lengths = (lengths - 1).tolist()
    targets = pack_padded_sequence(captions[:, 1:], decode_lengths, batch_first=True).data
    return captions, decode_lengths, rows, sort_ind, targets


def caption_loss(out, label_smoothing=0.0, num_tokens=None, num_captions=None):
    """Cross-entropy over the packed targets plus the decoder's own per-caption penalty (the doubly
    stochastic attention term of Show, Attend and Tell: alpha_c * mean over pixels of
    (1 - sum_t alpha)^2, averaged over captions).

    `num_tokens` / `num_captions` normalise the sums (default: this batch's counts); distributed
    training passes the global counts divided by the world size, so that averaging gradients over
    processes gives exactly the gradient of the global batch."""
    num_tokens = out.targets.numel() if num_tokens is None else num_tokens
    num_captions = out.sort_ind.numel() if num_captions is None else num_captions
    loss = F.cross_entropy(out.scores, out.targets, reduction='sum', label_smoothing=label_smoothing) / num_tokens
    if out.penalty is not None:
        loss = loss + out.penalty.sum() / num_captions
    return loss

"""Ensembles: several trained captioners that decode as one (`--checkpoint A.pt B.pt` in 02, 03, 04).

At every decoding step the ensemble's word distribution is the mean of its members' distributions
(log of the mean probability, as self-critical.pytorch's ensembles), so the one beam search
(caption.beam_search) serves it unchanged. Members may have different encoders and input sizes
(the provided pair: EfficientNet-Lite0 at 224 px, Lite2 at 260 px): each member sees the image
resized by its own transform, exactly as when it runs alone, never a resize of another member's input.

To travel through code written for one encoder and one decoder (DataLoaders, the web server's
batching, beam_search), the members' inputs and features are packed into one tensor per image:

    image  -> datasets.PackedTransform    -> [sum_i 3 * S_i * S_i]      each member's transform, flattened
    images -> EnsembleEncoder             -> [B, 1, sum_i P_i * C_i]    each member's feature grid, flattened
    memory  = EnsembleDecoder.prepare(...)   unpacks them into each member's [B, P_i, C_i]

Members must share the word map and the tokenizer (the averaged distributions are over one
vocabulary). Attention maps, where shown, are the first member's.

Mirrored views (`--mirror` in 02, 03, 04; test-time augmentation): every member also sees the photo
flipped left to right, as one more member with the same weights. Each member's encoder runs twice,
on the image and on its mirror image; the packed features then hold [member 1, member 1 mirrored,
member 2, ...], and the decoder lists each member twice. One checkpoint with mirroring is an ensemble of two.
"""
import torch
import torch.nn.functional as F
from torch import nn

from captioning import text
from captioning.decoders.interface import Decoder


class EnsembleEncoder(nn.Module):
    """Packed images [B, sum_i 3 S_i^2] -> packed features [B, 1, sum_i P_i C_i] (module docstring)."""

    def __init__(self, members, mirror=False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mirror = bool(mirror)                                      # each member also sees the mirror image
        self.name = '+'.join(e.name for e in members) + ('+mirror' if mirror else '')
        self.image_size = max(e.image_size for e in members)           # what photos are decoded at

    def input_sizes(self):
        return [3 * e.image_size ** 2 for e in self.members]

    def feature_shapes(self):
        """[(P_i, C_i)]: each member's grid cells and channels (twice per member with mirroring)."""
        return [(e.encoded_image_size ** 2, e.encoder_dim) for e in self.members for _ in range(1 + self.mirror)]

    def forward(self, images):
        return self.encode(images)[0]

    def encode(self, images, classify=False):
        """-> (packed features [B, 1, sum P_i C_i], the mean of the members' ImageNet class
        probabilities [B, 1000] over every view with a head when `classify`, else None)."""
        B = images.size(0)
        parts = torch.split(images.reshape(B, -1), self.input_sizes(), dim=1)
        feats, probs = [], []
        for e, x in zip(self.members, parts):
            x = x.view(B, 3, e.image_size, e.image_size)
            for view in [x] + ([x.flip(-1)] if self.mirror else []):     # the image, its mirror: two passes of
                f, p = e.encode(view, classify)                           # B (one of 2B was slower on the CPU)
                feats.append(f.reshape(B, -1))
                if p is not None:
                    probs.append(p)
        packed = torch.cat(feats, dim=1).unsqueeze(1)                         # [B, 1, sum P_i C_i]
        return packed, (torch.stack(probs).mean(dim=0) if probs else None)


class EnsembleDecoder(Decoder):
    """Decoders behind the Decoder interface (decoders/interface.py) as one: step() gives
    log(sum_i w_i p_i), the weighted mean of the members' word distributions (equal weights by default)."""

    def __init__(self, members, feature_shapes, weights=None):
        nn.Module.__init__(self)
        if len(members) != len(feature_shapes):
            raise ValueError(f'{len(members)} decoders but {len(feature_shapes)} feature shapes')
        sizes = {d.vocab_size for d in members}
        if len(sizes) != 1:
            raise ValueError(f'ensemble members score different vocabularies (sizes {sorted(sizes)})')
        weights = [1.0 / len(members)] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or min(weights) <= 0:
            raise ValueError(f'ensemble weights {weights}: need one positive weight per member')
        self.members = nn.ModuleList(members)
        self.shapes = [tuple(s) for s in feature_shapes]
        self.vocab_size = members[0].vocab_size
        self.has_attention = members[0].has_attention
        self.register_buffer('log_weights', torch.tensor(weights).div(sum(weights)).log(), persistent=False)

    def args(self):
        return {'members': [d.args() for d in self.members], 'weights': self.log_weights.exp().tolist()}

    def prepare(self, features, k=None):
        """Packed features [B, 1, sum P_i C_i] (or [B, sum P_i C_i]) -> one memory per member."""
        B = features.size(0)
        parts = torch.split(features.reshape(B, -1), [p * c for p, c in self.shapes], dim=1)
        return tuple(d.prepare(x.view(B, p, c), k) for d, x, (p, c) in zip(self.members, parts, self.shapes))

    def init_state(self, memory, k):
        return tuple(d.init_state(m, k) for d, m in zip(self.members, memory))

    def step(self, tokens, state, memory):
        logps, states, alphas = [], [], []
        for d, s, m in zip(self.members, state, memory):
            logp, s, alpha = d.step(tokens, s, m)                             # [N, V]
            logps.append(F.log_softmax(logp.float(), dim=1))
            states.append(s)
            alphas.append(alpha)
        w = self.log_weights.to(logps[0].device).view(-1, 1, 1)
        logp = torch.logsumexp(torch.stack(logps) + w, dim=0)                 # [N, V]: log sum_i w_i p_i
        return logp, tuple(states), alphas[0]

    def select(self, state, rows):
        return tuple(d.select(s, rows) for d, s in zip(self.members, state))

    def select_memory(self, memory, keep):
        return tuple(d.select_memory(m, keep) for d, m in zip(self.members, memory))

    def special_tokens(self, word_map, allow_unk=False):
        return self.members[0].special_tokens(word_map, allow_unk)

    def words(self, tokens, rev_word_map):
        return self.members[0].words(tokens, rev_word_map)

    def step_limit(self):
        limits = [d.step_limit() for d in self.members if d.step_limit() is not None]
        return min(limits) if limits else None

    def forward(self, *args, **kwargs):
        raise RuntimeError('an ensemble only decodes (beam search, sampling): train its members one at a time')


def member_check(first_path, word_map, config):
    """-> check(path, word_map, config): ValueError naming `path` when a checkpoint cannot join the
    ensemble whose first member (`first_path`) has this word map and config: the members must share
    the word map and the tokenizer (loading.load_model calls it before building the models)."""
    tokenizer = text.checkpoint_tokenizer(config)

    def check(path, member_word_map, member_config):
        if member_word_map != word_map:
            raise ValueError(f'{path}: its word map differs from that of {first_path}: the checkpoints of an '
                             'ensemble must share one word map (train them on the same prepared data)')
        if text.checkpoint_tokenizer(member_config) != tokenizer:
            raise ValueError(f'{path}: tokenizer {text.checkpoint_tokenizer(member_config)!r}, but {first_path} '
                             f'uses {tokenizer!r}: the checkpoints of an ensemble must share one')
    return check


def assemble(members, device='cpu', mirror=False):
    """Loaded models -> (EnsembleEncoder, EnsembleDecoder, word map, the first member's config with
    'ensemble': the paths and 'mirror'), in eval mode on `device`. `members`: one (path, encoder,
    decoder, word_map, config) per checkpoint, as loading.load_model gives them. With `mirror` each
    member also decodes the mirror image (module docstring), and one checkpoint is enough. ValueError
    names the member that does not fit."""
    if len(members) < 2 and not mirror:
        raise ValueError('an ensemble needs at least two checkpoints')
    first_path, _, first_decoder, word_map, first_config = members[0]
    check = member_check(first_path, word_map, first_config)
    vocab = (first_decoder.vocab_size, first_decoder.special_tokens(word_map))
    for path, _, decoder, member_word_map, config in members[1:]:
        check(path, member_word_map, config)
        if (decoder.vocab_size, decoder.special_tokens(word_map)) != vocab:
            raise ValueError(f'{path}: its decoder scores another vocabulary than {first_path} (e.g. GPT-2 tokens)')
    encoder = EnsembleEncoder([m[1] for m in members], mirror).to(device).eval()
    decoders = [m[2] for m in members for _ in range(1 + bool(mirror))]    # the same module twice: shared weights
    decoder = EnsembleDecoder(decoders, encoder.feature_shapes()).to(device).eval()
    return encoder, decoder, word_map, {**first_config, 'ensemble': [str(m[0]) for m in members],
                                        'mirror': bool(mirror)}

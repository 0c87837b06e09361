"""A Transformer caption decoder (`--decoder transformer`) behind the decoder interface (interface.py).

The field's standard decoder since 2019 (e.g. Cornia et al.'s M2 and Huang et al.'s AoA use its
layout), in none of the seed systems:

    grid:   features [B, P, C] (P = g x g cells) -> Linear(C, d) -> LayerNorm, plus a 2-D sinusoidal
            position per cell (half of the d channels encode the row, half the column), once per image
    words:  embedding * sqrt(d) + a 1-D sinusoidal position, then `num_layers` pre-norm layers of
                x = x + SelfAttention(LN(x))          causal: a word sees itself and the words before it
                x = x + CrossAttention(LN(x), grid)   over the P cells
                x = x + FFN(LN(x))                    Linear(d, ffn) - ReLU - Linear(ffn, d)
            then LayerNorm and the output layer, whose weight IS the word embedding (tied), plus a bias

Beam search (caption.beam_search) runs it through the one Decoder interface:

    memory = prepare(features)   the cross-attention keys and values of every layer, computed once per
                                 image: (k_0, v_0, k_1, v_1, ...) each [B, H, P, d/H]
    state  = init_state(memory)  the KV cache of the self-attention, empty at first: (k_0, v_0, ...)
                                 each [B*k, H, t, d/H] after t steps; the interface's default select()
                                 reorders it with the beams (select, then step)
    step(tokens, state, memory)  one position: its queries attend to the cache plus themselves, and the
                                 k beams of an image share that image's memory (never copied per beam)

The attention map of each step (02's figures, 04's web page) is the mean over heads of the last
layer's cross-attention weights, [N, P]. Positions are sinusoidal, so there is no step limit and any
square grid works (7 x 7 EfficientNet-Lite0, 14 x 14 ResNet, 1 x 1 CLIP).
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning.decoders import interface


@dataclasses.dataclass
class TransformerConfig:
    vocab_size: int
    encoder_dim: int
    decoder_dim: int = 512        # model width d: word embedding (tied with the output layer), attention, residual
    num_layers: int = 3           # decoder layers
    num_heads: int = 8            # attention heads (decoder_dim must be a multiple of them)
    ffn_dim: int = 0              # hidden size of each layer's feed-forward block (0 = 4 x decoder_dim)
    dropout: float = 0.1          # on the embedded inputs, the attention weights and every residual branch


def sinusoid(positions, dim):
    """positions [n] (float) -> [n, dim] sin/cos features at geometric frequencies (Vaswani et al.):
    channel 2i is sin(p / 10000^(2i/dim)), channel 2i + 1 its cosine (an odd dim drops the last cosine)."""
    half = (dim + 1) // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) * 2 / max(dim, 1))
    angle = positions.float().unsqueeze(1) * freq                            # [n, half]
    return torch.stack([angle.sin(), angle.cos()], dim=2).flatten(1)[:, :dim]


def grid_positions(P, dim, device):
    """The 2-D position of each of P = g x g cells (row-major, as the encoders flatten their maps) ->
    [P, dim]: a sinusoid of the row in the first dim // 2 channels, of the column in the rest."""
    g = math.isqrt(P)
    if g * g != P:
        raise ValueError(f'the transformer decoder needs a square grid of cells, got {P} cells')
    cells = torch.arange(P, device=device)
    rows, cols = cells.div(g, rounding_mode='floor'), cells % g
    return torch.cat([sinusoid(rows, dim // 2), sinusoid(cols, dim - dim // 2)], dim=1)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with H heads, its weights returned (for the attention maps)."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def keys_values(self, x):
        """x [n, T, d] -> keys, values [n, H, T, d/H]."""
        n, T, _ = x.shape
        return (self.key(x).view(n, T, self.heads, self.head_dim).transpose(1, 2),
                self.value(x).view(n, T, self.heads, self.head_dim).transpose(1, 2))

    def forward(self, x, keys, values, mask=None):
        """x [N, T, d] queries; keys, values [n, H, S, d/H] with N = n * k: the k query rows of group i
        (rows i * k .. i * k + k - 1) attend to group i's keys, which they share; mask [T, S] (True =
        hidden) or None. -> out [N, T, d], weights [N, H, T, S]."""
        N, T, d = x.shape
        n, H, S, Dh = keys.shape
        k = N // n
        q = self.query(x).view(n, k, T, H, Dh).permute(0, 3, 1, 2, 4).reshape(n, H, k * T, Dh)   # [n, H, kT, Dh]
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(Dh)                          # [n, H, kT, S]
        if mask is not None:
            scores = scores.masked_fill(mask.repeat(k, 1), float('-inf'))
        weights = scores.softmax(dim=-1)
        out = torch.matmul(self.dropout(weights), values)                                       # [n, H, kT, Dh]
        out = out.view(n, H, k, T, Dh).permute(0, 2, 3, 1, 4).reshape(N, T, d)                 # [N, T, d]
        return self.out(out), weights.view(n, H, k, T, S).transpose(1, 2).reshape(N, H, T, S)


class DecoderLayer(nn.Module):
    """One pre-norm layer: causal self-attention (with a KV cache), cross-attention over the grid, FFN."""

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = MultiHeadAttention(d, heads, dropout)
        self.cross_attn = MultiHeadAttention(d, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache_k, cache_v, mem_k, mem_v):
        """x [N, T, d]: the positions after the t cached ones; cache_k/v [N, H, t, d/H] (t may be 0);
        mem_k/v [n, H, P, d/H], N = n * k. -> (x [N, T, d], new cache k/v [N, H, t + T, d/H],
        cross-attention weights [N, H, T, P])."""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)       # [N, H, t + T, Dh]
        T, S = x.size(1), k.size(2)
        mask = None
        if T > 1:   # query i (position S - T + i) sees keys 0 .. S - T + i
            mask = torch.arange(S, device=x.device) > torch.arange(S - T, S, device=x.device).unsqueeze(1)
        x = x + self.dropout(self.self_attn(h, k, v, mask)[0])
        att, weights = self.cross_attn(self.norm2(x), mem_k, mem_v)
        x = x + self.dropout(att)
        x = x + self.dropout(self.ffn(self.norm3(x)))
        return x, k, v, weights


class TransformerDecoder(interface.Decoder):
    """See the module docstring."""
    Config = TransformerConfig
    has_attention = True

    def __init__(self, cfg):
        super().__init__(cfg)
        d, H = cfg.decoder_dim, cfg.num_heads
        if H < 1 or d % H:
            raise ValueError(f'--decoder-dim {d} must be a multiple of --num-heads {H}')
        self.d, self.heads, self.head_dim = d, H, d // H
        self.grid_proj = nn.Linear(cfg.encoder_dim, d)
        self.grid_norm = nn.LayerNorm(d)
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(DecoderLayer(d, H, cfg.ffn_dim or 4 * d, cfg.dropout)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(d, cfg.vocab_size)
        nn.init.normal_(self.embedding.weight, std=d ** -0.5)
        self.fc.weight = self.embedding.weight                                 # tied input/output embeddings
        nn.init.zeros_(self.fc.bias)

    def embed(self, tokens, start):
        """tokens [N, T] at positions start .. start + T - 1 -> [N, T, d]."""
        pos = sinusoid(torch.arange(start, start + tokens.size(1), device=tokens.device), self.d)
        return self.dropout(self.embedding(tokens) * math.sqrt(self.d) + pos.to(self.embedding.weight.dtype))

    def prepare(self, features, k=None):
        """features [B, g, g, C] or [B, P, C] -> (k_0, v_0, k_1, v_1, ...): each layer's cross-attention
        keys and values [B, H, P, d/H] of the positioned grid, once per image."""
        enc = features.reshape(features.size(0), -1, features.size(-1))      # [B, P, C]
        grid = self.grid_norm(self.grid_proj(enc))                            # [B, P, d]
        grid = grid + grid_positions(enc.size(1), self.d, enc.device).to(grid.dtype)
        return tuple(t for layer in self.layers for t in layer.cross_attn.keys_values(grid))

    def init_state(self, memory, k):
        """An empty self-attention cache for k rows per image: (k_0, v_0, ...) each [B*k, H, 0, d/H]."""
        empty = memory[0].new_zeros(memory[0].size(0) * k, self.heads, 0, self.head_dim)
        return (empty,) * (2 * len(self.layers))

    def run_layers(self, x, state, memory):
        """x [N, T, d] after the state's t cached positions -> (hidden [N, T, d] after the final norm,
        new state, last layer's cross-attention weights averaged over heads [N, T, P])."""
        new_state = []
        for i, layer in enumerate(self.layers):
            x, k, v, weights = layer(x, state[2 * i], state[2 * i + 1], memory[2 * i], memory[2 * i + 1])
            new_state += [k, v]
        return self.norm(x), tuple(new_state), weights.mean(dim=1)

    def step(self, tokens, state, memory):
        """tokens [N] -> logp [N, V], the cache one position longer, alpha [N, P]."""
        x = self.embed(tokens.unsqueeze(1), state[0].size(2))                 # [N, 1, d]
        hidden, state, alpha = self.run_layers(x, state, memory)
        return F.log_softmax(self.fc(hidden[:, 0]), dim=1), state, alpha[:, 0]

    def forward(self, features, captions, lengths, image_index=None):
        """Teacher forcing: every position of every caption in one pass (the causal mask keeps each
        word from seeing the words after it); the grid's keys and values once per image."""
        captions, decode_lengths, rows, sort_ind, targets = interface.sort_captions(captions, lengths, image_index)
        T = decode_lengths[0]
        memory = tuple(m.index_select(0, rows) for m in self.prepare(features))   # [N, H, P, Dh]; see ShowAttendTell
        N = captions.size(0)
        empty = memory[0].new_zeros(N, self.heads, 0, self.head_dim)
        hidden, _, _ = self.run_layers(self.embed(captions[:, :T], 0), (empty,) * (2 * len(self.layers)), memory)
        scores = self.fc(pack_padded_sequence(hidden, decode_lengths, batch_first=True).data)   # [M, V]
        return interface.DecoderOutput(scores, targets, decode_lengths, None, sort_ind)



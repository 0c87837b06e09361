"""The LSTM caption decoders: Show, Attend and Tell with additive or dot-product attention, Show and
Tell, the repeat-BiLSTM baseline (behind the interface of captioning/decoders/interface.py)."""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning.decoders.interface import Decoder, DecoderOutput, sort_captions


def _flat(features):
    """[B, g, g, C] or [B, P, C] -> [B, P, C]."""
    return features.reshape(features.size(0), -1, features.size(-1))


# ----------------------------------------------------------------------------------------------
# Show, Attend and Tell (soft attention: additive as the paper, or scaled dot-product as seed 001)

class Attention(nn.Module):
    """Additive (Bahdanau) attention over the encoder grid, as in the paper and the tutorial."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def prepare(self, encoder_out):
        """[n, P, C] -> (values [n, P, C], keys [n, P, A]): the per-image part, computed once."""
        return encoder_out, self.encoder_att(encoder_out)

    def forward(self, encoder_out, decoder_hidden, att1=None, workspace=None):
        """encoder_out [n, P, C], decoder_hidden [n * k, D], att1 = encoder_att(encoder_out) [n, P, A]
        (pass it to avoid recomputing it every step) -> context [n * k, C], alpha [n * k, P].

        k > 1 rows per image (beam search: row i * k + j is beam j of image i) share that image's
        features, read once instead of once per row; training uses k = 1. `workspace`: a flat
        tensor of at least n * k * P * A elements that holds the [n, k, P, A] intermediate, so a
        search reuses one buffer instead of allocating tens of MB per step (only without autograd)."""
        if att1 is None:
            att1 = self.encoder_att(encoder_out)                              # [n, P, A]
        n, P, A = att1.shape
        k = decoder_hidden.size(0) // n
        att2 = self.decoder_att(decoder_hidden).view(n, k, 1, A)              # [n, k, 1, A]
        out = None
        if workspace is not None and not torch.is_grad_enabled() and workspace.dtype == att2.dtype == att1.dtype:
            out = workspace[:n * k * P * A].view(n, k, P, A)
        hidden = torch.add(att1.unsqueeze(1), att2, out=out).relu_()          # [n, k, P, A], ReLU in place
        att = self.full_att(hidden).view(n * k, P)                            # [n*k, P]
        alpha = self.softmax(att)                                             # [n*k, P]
        context = torch.bmm(alpha.view(n, k, P), encoder_out).view(n * k, -1)  # [n*k, C]
        return context, alpha


class DotAttention(nn.Module):
    """Scaled dot-product attention (seed 001): query from the hidden state, key and value from the
    features by linear layers, ReLU on the scaled scores before the softmax (as the seed; `relu`
    False leaves it out).

    The value layer is applied to the pooled feature, not to every cell: the weights of a row sum to
    1, so value(sum_p alpha_p x_p) == sum_p alpha_p value(x_p), and projecting one [C] vector per row
    and step costs far less than projecting all P cells of the image (P = 196 on a 14 x 14 grid)."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim, relu=True):
        super().__init__()
        self.query = nn.Linear(decoder_dim, attention_dim)
        self.key = nn.Linear(encoder_dim, attention_dim)
        self.value = nn.Linear(encoder_dim, encoder_dim)
        self.use_relu, self.scale = relu, 1.0 / math.sqrt(attention_dim)

    def prepare(self, encoder_out):
        """[n, P, C] -> (values [n, P, C]: the features themselves, keys [n, P, A]), once per image."""
        return encoder_out, self.key(encoder_out)

    def forward(self, values, decoder_hidden, keys=None, workspace=None):
        """values [n, P, C] (the raw features when keys is None), decoder_hidden [n * k, D],
        keys [n, P, A] -> context [n * k, C], alpha [n * k, P]."""
        if keys is None:
            values, keys = self.prepare(values)
        n, P, A = keys.shape
        k = decoder_hidden.size(0) // n
        query = self.query(decoder_hidden).view(n, k, A)                      # [n, k, A]
        att = torch.bmm(query, keys.transpose(1, 2)) * self.scale             # [n, k, P]
        if self.use_relu:
            att = att.relu()
        alpha = att.softmax(dim=-1)                                           # [n, k, P]
        context = self.value(torch.bmm(alpha, values).view(n * k, -1))        # [n*k, C]: value of the pooled feature
        return context, alpha.view(n * k, P)


@dataclasses.dataclass
class SATConfig:
    vocab_size: int
    encoder_dim: int
    emb_dim: int = 512            # word embedding
    attention_dim: int = 512
    decoder_dim: int = 512        # LSTMCell size
    dropout: float = 0.5          # before the output layer
    alpha_c: float = 1.0          # weight of the doubly stochastic attention penalty
    attention: str = 'additive'   # additive | dot


@dataclasses.dataclass
class DotAttentionConfig(SATConfig):
    """Seed 001's sizes."""
    emb_dim: int = 256
    decoder_dim: int = 768
    alpha_c: float = 0.2
    attention: str = 'dot'
    attention_relu: bool = True   # ReLU on the scaled scores before the softmax, as the seed


class ShowAttendTell(Decoder):
    """LSTMCell decoder fed [word embedding; gated attention context] at each step; h and c start
    from the mean feature. The tutorial's parameter names (a tutorial state_dict loads)."""
    Config = SATConfig
    has_attention = True

    def __init__(self, cfg):
        super().__init__(cfg)
        C, D, A, E = cfg.encoder_dim, cfg.decoder_dim, cfg.attention_dim, cfg.emb_dim
        if cfg.attention == 'additive':
            self.attention = Attention(C, D, A)
        elif cfg.attention == 'dot':
            self.attention = DotAttention(C, D, A, getattr(cfg, 'attention_relu', True))
        else:
            raise ValueError(f"attention must be 'additive' or 'dot', got {cfg.attention!r}")
        self.encoder_dim, self.attention_dim, self.embed_dim, self.decoder_dim = C, A, E, D
        self.embedding = nn.Embedding(cfg.vocab_size, E)
        self.dropout = nn.Dropout(p=cfg.dropout)
        self.decode_step = nn.LSTMCell(E + C, D, bias=True)
        self.init_h = nn.Linear(C, D)
        self.init_c = nn.Linear(C, D)
        self.f_beta = nn.Linear(D, C)            # sigmoid gate on the context
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(D, cfg.vocab_size)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out):
        """encoder_out [B, P, C] -> h, c [B, D] from the mean feature."""
        mean = encoder_out.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def prepare(self, features, k=None):
        """-> (values [B, P, C], keys [B, P, A], h0 [B, D], c0 [B, D]) and, for a search (k given,
        additive attention), a reusable workspace for the attention's [B, k, P, A] intermediate."""
        enc = _flat(features)
        values, keys = self.attention.prepare(enc)
        memory = (values, keys, *self.init_hidden_state(enc))
        if k is not None and isinstance(self.attention, Attention):
            memory += (keys.new_empty(keys.size(0) * k * keys.size(1) * keys.size(2)),)
        return memory

    def init_state(self, memory, k):
        return memory[2].repeat_interleave(k, dim=0), memory[3].repeat_interleave(k, dim=0)   # [B*k, D]

    def select_memory(self, memory, keep):
        return tuple(m[keep] for m in memory[:4]) + memory[4:]        # the workspace is reused as it is

    def lstm_step(self, emb, h, c, values, keys, workspace=None):
        """emb [b, E], h, c [b, D], values/keys of b / k images -> new h, c [b, D], alpha [b, P]."""
        context, alpha = self.attention(values, h, keys, workspace)
        gate = self.sigmoid(self.f_beta(h))                                   # [b, C]
        h, c = self.decode_step(torch.cat([emb, gate * context], dim=1), (h, c))
        return h, c, alpha

    def step(self, tokens, state, memory):
        h, c, alpha = self.lstm_step(self.embedding(tokens), *state, memory[0], memory[1],
                                     memory[4] if len(memory) > 4 else None)
        return F.log_softmax(self.fc(self.dropout(h)), dim=1), (h, c), alpha

    def forward(self, features, captions, lengths, image_index=None):
        """Teacher forcing. features [B, g, g, C] or [B, P, C]; captions [N, L] (<start> ... <end>
        <pad>...); lengths [N] or [N, 1] with <start>/<end>; image_index [N]: the row of features each
        caption belongs to (default: caption i -> row i). The per-image work (attention keys,
        initial state) runs once per image; the batch shrinks as captions end; the output layer
        runs once over all steps."""
        captions, decode_lengths, rows, sort_ind, targets = sort_captions(captions, lengths, image_index)
        values, keys, h, c = self.prepare(features)
        # index_select, not m[rows]: its backward (index_add) sums the captions of an image in a fixed
        # order, while indexing's backward (index_put with accumulate) made CPU runs differ in the last bit
        values, keys, h, c = (m.index_select(0, rows) for m in (values, keys, h, c))
        T = decode_lengths[0]
        emb = self.embedding(captions[:, :T])                                 # [N, T, E]
        batch_sizes = [sum(n > t for n in decode_lengths) for t in range(T)]  # shrinking batch
        hs, alphas = [], []
        for t, bt in enumerate(batch_sizes):
            h, c, alpha = self.lstm_step(emb[:bt, t], h[:bt], c[:bt], values[:bt], keys[:bt])
            hs.append(h)
            alphas.append(alpha)
        scores = self.fc(self.dropout(torch.cat(hs)))                         # [M, V], one matmul
        step_rows = torch.cat([torch.arange(bt, device=scores.device) for bt in batch_sizes])
        alphas = torch.cat(alphas)                                            # [M, P]
        alpha_sum = alphas.new_zeros(len(captions), alphas.size(1)).index_add(0, step_rows, alphas)  # [N, P]
        penalty = self.cfg.alpha_c * ((1.0 - alpha_sum) ** 2).mean(dim=1)     # [N], doubly stochastic
        return DecoderOutput(scores, targets, decode_lengths, penalty, sort_ind)


class DotAttentionDecoder(ShowAttendTell):
    """Show, Attend and Tell with seed 001's scaled dot-product attention and sizes."""
    Config = DotAttentionConfig


class DecoderWithAttention(ShowAttendTell):
    """The tutorial's class and constructor, for code written against it."""

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5,
                 alpha_c=1.0):
        super().__init__(SATConfig(vocab_size, encoder_dim, embed_dim, attention_dim, decoder_dim, dropout, alpha_c))


# ----------------------------------------------------------------------------------------------
# Show and Tell (seed 002): the image is the LSTM's first input; no attention

@dataclasses.dataclass
class ShowTellConfig:
    vocab_size: int
    encoder_dim: int
    emb_dim: int = 256            # word embedding and image projection
    decoder_dim: int = 256        # LSTM size
    num_layers: int = 1
    dropout: float = 0.5          # before the output layer (and between LSTM layers)


class ShowTell(Decoder):
    """Mean-pooled image -> Linear -> the first input of an nn.LSTM (the fused kernel, over packed
    sequences in training), then the words from <start>."""
    Config = ShowTellConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.image_proj = nn.Linear(cfg.encoder_dim, cfg.emb_dim)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.lstm = nn.LSTM(cfg.emb_dim, cfg.decoder_dim, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.decoder_dim, cfg.vocab_size)

    def _image_state(self, features):
        """features -> the LSTM state after reading the image: h, c [layers, B, D]."""
        _, (h, c) = self.lstm(self.image_proj(_flat(features).mean(dim=1)).unsqueeze(1))
        return h, c

    def prepare(self, features, k=None):
        h, c = self._image_state(features)
        return h.transpose(0, 1), c.transpose(0, 1)                           # [B, layers, D]: image-major

    def init_state(self, memory, k):
        return tuple(m.repeat_interleave(k, dim=0) for m in memory)           # [B*k, layers, D]

    def step(self, tokens, state, memory):
        h, c = (s.transpose(0, 1).contiguous() for s in state)                # [layers, N, D]
        out, (h, c) = self.lstm(self.embedding(tokens).unsqueeze(1), (h, c))  # out [N, 1, D]
        logp = F.log_softmax(self.fc(self.dropout(out[:, 0])), dim=1)
        return logp, (h.transpose(0, 1), c.transpose(0, 1)), None

    def forward(self, features, captions, lengths, image_index=None):
        captions, decode_lengths, rows, sort_ind, targets = sort_captions(captions, lengths, image_index)
        h, c = self._image_state(features)                                    # once per image
        T = decode_lengths[0]
        packed = pack_padded_sequence(self.embedding(captions[:, :T]), decode_lengths, batch_first=True)
        out, _ = self.lstm(packed, (h.index_select(1, rows), c.index_select(1, rows)))   # see ShowAttendTell
        scores = self.fc(self.dropout(out.data))                              # [M, V], packed like targets
        return DecoderOutput(scores, targets, decode_lengths, None, sort_ind)


# ----------------------------------------------------------------------------------------------
# Repeated image + bidirectional LSTM (seed 004's improved model): not autoregressive

@dataclasses.dataclass
class RepeatBiLSTMConfig:
    vocab_size: int
    encoder_dim: int
    emb_dim: int = 256            # the image layer repeated at every position
    decoder_dim: int = 256        # LSTM size per direction
    num_layers: int = 1
    dropout: float = 0.5
    max_len: int = 51             # positions (words + <end>); set from the data when training


class RepeatBiLSTM(Decoder):
    """Pooled image -> ReLU layer -> the same vector at each of max_len positions -> bidirectional
    LSTM -> a softmax per position. Position t predicts word t + 1 whatever words came before, so
    its step() reads precomputed scores and beam search cannot improve on taking each position's
    best word (it only chooses where to stop)."""
    Config = RepeatBiLSTMConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.image_fc = nn.Linear(cfg.encoder_dim, cfg.emb_dim)
        self.lstm = nn.LSTM(cfg.emb_dim, cfg.decoder_dim, cfg.num_layers, batch_first=True, bidirectional=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(2 * cfg.decoder_dim, cfg.vocab_size)

    def step_limit(self):
        return self.cfg.max_len

    def position_scores(self, features):
        """features -> scores [B, max_len, V] for every position (always all max_len of them: the
        backward direction makes a position depend on how many follow)."""
        img = F.relu(self.image_fc(_flat(features).mean(dim=1)))              # [B, E]
        out, _ = self.lstm(img.unsqueeze(1).expand(-1, self.cfg.max_len, -1).contiguous())   # [B, T, 2D]
        return self.fc(self.dropout(out))                                     # [B, T, V]

    def prepare(self, features, k=None):
        return (F.log_softmax(self.position_scores(features), dim=-1),)       # [B, T, V]

    def init_state(self, memory, k):
        return (torch.zeros(memory[0].size(0) * k, dtype=torch.long, device=memory[0].device),)  # position

    def step(self, tokens, state, memory):
        logp = memory[0]                                                      # [n, T, V]
        k = tokens.numel() // logp.size(0)
        t = min(int(state[0][0]), logp.size(1) - 1)   # rows move in lockstep; past max_len the last position
        return logp[:, t].repeat_interleave(k, dim=0), (state[0] + 1,), None

    def forward(self, features, captions, lengths, image_index=None):
        captions, decode_lengths, rows, sort_ind, targets = sort_captions(captions, lengths, image_index)
        T = decode_lengths[0]
        if T > self.cfg.max_len:
            raise ValueError(f'a caption needs {T} positions; this repeat_bilstm has max_len {self.cfg.max_len}')
        scores = self.position_scores(features).index_select(0, rows)[:, :T]  # [N, T, V]; see ShowAttendTell
        scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data   # [M, V]
        return DecoderOutput(scores, targets, decode_lengths, None, sort_ind)

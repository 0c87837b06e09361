"""The tutorial's formulation, kept only as a yardstick: the benchmarks time it as the "before", and
a test checks that models.py computes the same loss.

It runs on our DecoderWithAttention's weights (same parameter names) but does the work the way
sgrvinod's tutorial does: the encoder-side attention projection recomputed from the full feature
map at every time step, the output layer applied step by step into a padded [B, T, V] tensor, packing
afterwards, and a beam search over one image at a time.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence


def tutorial_forward(decoder, encoder_out, encoded_captions, caption_lengths):
    """-> (predictions [B, T, V], sorted captions, decode_lengths, alphas [B, T, P], sort_ind)."""
    B = encoder_out.size(0)
    encoder_out = encoder_out.reshape(B, -1, encoder_out.size(-1))          # [B, P, C]
    caption_lengths, sort_ind = caption_lengths.view(-1).sort(descending=True)
    encoder_out, encoded_captions = encoder_out[sort_ind], encoded_captions[sort_ind]
    embeddings = decoder.embedding(encoded_captions)
    h, c = decoder.init_hidden_state(encoder_out)
    decode_lengths = (caption_lengths - 1).tolist()
    T = max(decode_lengths)
    predictions = encoder_out.new_zeros(B, T, decoder.vocab_size)
    alphas = encoder_out.new_zeros(B, T, encoder_out.size(1))
    for t in range(T):
        bt = sum(n > t for n in decode_lengths)
        context, alpha = decoder.attention(encoder_out[:bt], h[:bt])       # projection recomputed
        gate = torch.sigmoid(decoder.f_beta(h[:bt]))
        h, c = decoder.decode_step(torch.cat([embeddings[:bt, t], gate * context], dim=1), (h[:bt], c[:bt]))
        predictions[:bt, t] = decoder.fc(decoder.dropout(h))
        alphas[:bt, t] = alpha
    return predictions, encoded_captions, decode_lengths, alphas, sort_ind


def tutorial_loss(decoder, encoder_out, encoded_captions, caption_lengths, alpha_c=1.0):
    """Cross-entropy over pack_padded_sequence(...)[0] plus the doubly stochastic penalty."""
    scores, caps, decode_lengths, alphas, _ = tutorial_forward(decoder, encoder_out, encoded_captions,
                                                               caption_lengths)
    targets = caps[:, 1:]
    scores = pack_padded_sequence(scores, decode_lengths, batch_first=True)[0]
    targets = pack_padded_sequence(targets, decode_lengths, batch_first=True)[0]
    return F.cross_entropy(scores, targets) + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()


@torch.no_grad()
def tutorial_beam_search(decoder, encoder_out, word_map, beam_size=3, max_len=50):
    """One image (encoder_out [1, g, g, C]): k hypotheses in a batch, the attention projection
    recomputed each step, completed ones removed from the beam. Returns (word ids, steps taken)."""
    k = beam_size
    enc = encoder_out.reshape(1, -1, encoder_out.size(-1)).expand(k, -1, -1)   # [k, P, C]
    prev = torch.full((k, 1), word_map['<start>'], dtype=torch.long, device=enc.device)
    seqs, scores = prev, torch.zeros(k, 1, device=enc.device)
    complete, complete_scores = [], []
    h, c = decoder.init_hidden_state(enc)
    step = 0
    for step in range(1, max_len + 1):
        emb = decoder.embedding(prev).squeeze(1)
        context, _ = decoder.attention(enc, h)
        gate = torch.sigmoid(decoder.f_beta(h))
        h, c = decoder.decode_step(torch.cat([emb, gate * context], dim=1), (h, c))
        logp = F.log_softmax(decoder.fc(h), dim=1)
        logp = scores.expand_as(logp) + logp
        top, idx = (logp[0] if step == 1 else logp.view(-1)).topk(k)
        prev_inds, next_words = idx // decoder.vocab_size, idx % decoder.vocab_size
        seqs = torch.cat([seqs[prev_inds], next_words.unsqueeze(1)], dim=1)
        done = next_words == word_map['<end>']
        complete += seqs[done].tolist()
        complete_scores += top[done].tolist()
        k -= int(done.sum())
        if k == 0:
            break
        keep = ~done
        seqs, h, c, enc = seqs[keep], h[prev_inds[keep]], c[prev_inds[keep]], enc[prev_inds[keep]]
        scores, prev = top[keep].unsqueeze(1), next_words[keep].unsqueeze(1)
    if not complete:                       # the tutorial crashes here; keep going for the benchmark
        complete, complete_scores = seqs.tolist(), scores.view(-1).tolist()
    best = complete[max(range(len(complete)), key=complete_scores.__getitem__)]
    return best, step

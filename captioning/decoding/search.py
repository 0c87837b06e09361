"""The one beam search (used by validation, evaluation, inference and the server) and the sampler
(self-critical training), for any decoder behind the Decoder interface (captioning/decoders/interface.py)."""

import torch
import torch.nn.functional as F

DEFAULT_LENGTH_NORM = 0.5   # rank beams by score / length ** 0.5 (chosen on Flickr8k VAL; 0 = plain log-probability)
DEFAULT_NO_REPEAT_NGRAM = 3  # no word trigram twice in a caption (chosen on Flickr8k VAL, docs/inference.md; 0 = off):
                             # the default of 02, 03, 04 and training's validation; beam_search's own is 0


@torch.inference_mode()
def beam_search(decoder, encoder_out, word_map, beam_size=3, max_len=50, length_norm=0.0,
                no_repeat_ngram_size=0, min_len=1, allow_unk=False, no_end_after=None):
    """Beam search for a batch of images at once (images x beams in one batch), for any decoder of
    captioning/decoders/registry.py (it only calls prepare / init_state / step / select / select_memory).

    encoder_out: [B, g, g, C] or [B, P, C]. beam_size 1 is greedy decoding. A hypothesis that emits
    <end> is set aside; an image is done once it has `beam_size` finished hypotheses. The best one
    by score / (length ** length_norm) is returned (length counts the words and <end>); when none
    finished within `max_len` words, the best unfinished one is. `min_len` forbids <end> before that
    many tokens (default 1: a caption of no words is never an answer, whatever the decoder);
    `no_repeat_ngram_size` n forbids repeating any n-gram; `no_end_after` (token ids) forbids <end>
    right after any of those tokens (words that rarely end a sentence: "a", "in", "red";
    no_end_ids, from checkpoint.endings). <start> and <pad> are never emitted, nor
    <unk> unless `allow_unk`. The tokens are the decoder's (decoder.special_tokens): word ids, or
    for ClipCap with a pretrained GPT-2 its BPE tokens (lengths then count those); decoder.words
    turns them into words.

    Returns one dict per image: 'tokens' (token ids, without <start>/<end>), 'score' (summed log
    probability), 'norm_score', 'finished' (bool), 'alphas' ([len(tokens) (+1 with <end>), P] float
    tensor: the attention behind each emitted token; None for decoders without attention), 'steps'
    (decoding steps the image took) and 'beams' (the finished hypotheses, best first, at most
    beam_size: dicts with 'tokens', 'score', 'norm_score').
    """
    B = encoder_out.size(0)
    enc = encoder_out.reshape(B, -1, encoder_out.size(-1))                    # [B, P, C]
    V, k = decoder.vocab_size, beam_size
    start, end, never = decoder.special_tokens(word_map, allow_unk)          # the word map's, or the LM's
    device = enc.device
    attention = decoder.has_attention
    banned = torch.zeros(V, device=device)                                    # added to every step's scores
    banned[never] = float('-inf')
    end_after = None                                                          # [V]: added to <end>'s score
    if no_end_after is not None and len(no_end_after):
        end_after = torch.zeros(V, device=device)
        end_after[torch.as_tensor(list(no_end_after), dtype=torch.long, device=device)] = float('-inf')

    memory = decoder.prepare(enc, k)                                          # per image, once
    state = decoder.init_state(memory, k)                                     # [B*k, ...]: row = image*k + beam
    ids = list(range(B))                                                      # images still searching
    scores = torch.full((B, k), float('-inf'), device=device)
    scores[:, 0] = 0.0                                                        # only one beam alive at first
    prev = torch.full((B * k,), start, dtype=torch.long, device=device)
    seqs = torch.empty(B * k, 0, dtype=torch.long, device=device)             # [N, t]
    alpha_hist = None                                                         # [N, t, P] from the first step
    finished = [[] for _ in range(B)]                                         # (norm, score, tokens, alphas)
    steps = [max_len] * B

    for t in range(max_len):
        n_img = len(ids)
        logp, state, alpha = decoder.step(prev, state, memory)               # [N, V], state, [N, P] | None
        if attention and alpha_hist is None:
            alpha_hist = alpha.new_empty(B * k, 0, alpha.size(1))
        logp = logp + banned
        if t < min_len:
            logp[:, end] = float('-inf')
        elif end_after is not None:
            logp[:, end] = logp[:, end] + end_after[prev]
        if no_repeat_ngram_size:
            logp = logp + _ngram_penalty(seqs, no_repeat_ngram_size, V)
        cand = (scores.view(-1, 1) + logp).view(n_img, k * V)                 # [n, k*V]
        top_scores, top_idx = cand.topk(2 * k, dim=1)                         # [n, 2k]
        top_beam = torch.div(top_idx, V, rounding_mode='floor')               # integer beam index
        top_tok = top_idx % V
        is_end = top_tok == end

        # Hypotheses that end among the k best candidates are set aside.
        ended = (is_end[:, :k] & (top_scores[:, :k] > float('-inf'))).nonzero().tolist()
        if ended:
            top_scores_l, top_beam_l = top_scores.tolist(), top_beam.tolist()
            for i, r in ended:
                row = i * k + top_beam_l[i][r]
                score = top_scores_l[i][r]
                alphas = torch.cat([alpha_hist[row], alpha[row:row + 1]]).cpu() if attention else None  # [t+1, P]
                finished[ids[i]].append((score / (t + 1) ** length_norm, score, seqs[row].tolist(), alphas))

        # The k best candidates that do not end continue.
        cont_scores, pos = top_scores.masked_fill(is_end, float('-inf')).topk(k, dim=1)   # [n, k]
        beams = top_beam.gather(1, pos)
        rows = (torch.arange(n_img, device=device).unsqueeze(1) * k + beams).view(-1)       # [n*k]
        prev = top_tok.gather(1, pos).view(-1)
        seqs = torch.cat([seqs[rows], prev.unsqueeze(1)], dim=1)
        if attention:
            alpha_hist = torch.cat([alpha_hist[rows], alpha[rows].unsqueeze(1)], dim=1)
        state, scores = decoder.select(state, rows), cont_scores

        # Images with k finished hypotheses (or, without length normalisation, whose best finished
        # hypothesis can no longer be beaten: scores only fall) are done: drop their rows.
        best_alive = scores[:, 0].tolist()
        done = [len(finished[b]) >= k or (length_norm == 0 and bool(finished[b]) and
                                          max(f[1] for f in finished[b]) >= best_alive[i])
                for i, b in enumerate(ids)]
        for b, d in zip(ids, done):
            if d:
                steps[b] = t + 1
        if all(done):
            ids = []
            break
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            ids = [b for b, d in zip(ids, done) if not d]
            scores, memory = scores[keep], decoder.select_memory(memory, keep)
            state = decoder.select(state, keep_rows)
            prev, seqs = prev[keep_rows], seqs[keep_rows]
            if attention:
                alpha_hist = alpha_hist[keep_rows]

    results = []
    for b in range(B):
        ranked = sorted(finished[b], key=lambda f: f[0], reverse=True)
        beams = [{'tokens': tokens, 'score': score, 'norm_score': norm} for norm, score, tokens, _ in ranked[:k]]
        if ranked:
            norm, score, tokens, alphas = ranked[0]
            results.append({'tokens': tokens, 'score': score, 'norm_score': norm, 'finished': True, 'alphas': alphas,
                            'steps': steps[b], 'beams': beams})
        else:  # nothing ended within max_len: the best unfinished hypothesis
            i = ids.index(b)
            score = float(scores[i, 0])
            tokens = seqs[i * k].tolist()
            results.append({'tokens': tokens, 'score': score, 'norm_score': score / max_len ** length_norm,
                            'finished': False, 'alphas': alpha_hist[i * k].cpu() if attention else None,
                            'steps': max_len,
                            'beams': [{'tokens': tokens, 'score': score, 'norm_score': score / max_len ** length_norm}]})
    return results


def sample_captions(decoder, encoder_out, word_map, n=1, max_len=20, greedy=False, generator=None,
                    uniforms=None, allow_unk=False, grad=False, min_len=1):
    """Draw `n` captions per image from the decoder's own distribution (multinomial sampling), or
    the greedy caption (`greedy`: the most likely word at each step), for any decoder of captioning/decoders/registry.py
    (prepare / init_state / step / select / select_memory).

    encoder_out [B, g, g, C] or [B, P, C]. Row i * n + j is sample j of image i. <start>, <pad> and
    (unless allow_unk) <unk> are never emitted, nor <end> before `min_len` tokens (default 1: no
    caption of no words): the step's distribution is renormalised without them. A row stops at <end>
    or after max_len tokens. Sampling is by inverse CDF on uniform numbers,
    [B * n, max_len] float64 in [0, 1): `uniforms` when given (so a caller can make draws that do
    not depend on how images are split into batches or processes), else drawn from `generator`
    (a CPU torch.Generator; None: the global one). Row r's token at step t uses uniforms[r, t].

    Returns (tokens [B * n, T] long: the words and <end> when it came, <pad> after; T = the longest
    row, at most max_len; lengths [B * n] long: tokens emitted, <end> included; logprobs [B * n]
    float: the summed log-probability of each row under the distribution it was drawn from, with
    autograd through the decoder when `grad`, so that a decoder in training mode is differentiated
    under the very dropout masks that drew the words)."""
    with torch.set_grad_enabled(grad):
        return _sample(decoder, encoder_out, word_map, n, max_len, greedy, generator, uniforms, allow_unk, min_len)


def _sample(decoder, encoder_out, word_map, n, max_len, greedy, generator, uniforms, allow_unk, min_len):
    """sample_captions' loop, under the caller's grad mode."""
    B = encoder_out.size(0)
    enc = encoder_out.reshape(B, -1, encoder_out.size(-1))                    # [B, P, C]
    device, V, N = enc.device, decoder.vocab_size, B * n
    start, end, never = decoder.special_tokens(word_map, allow_unk)         # the word map's, or the LM's
    pad = word_map['<pad>']                                                   # filler after <end>
    banned = torch.zeros(V, device=device)
    banned[never] = float('-inf')
    early = banned.clone()                                                    # ... and before min_len tokens
    early[end] = float('-inf')
    if not greedy and uniforms is None:
        uniforms = torch.rand(N, max_len, generator=generator, dtype=torch.float64)
    if uniforms is not None:
        if tuple(uniforms.shape) != (N, max_len):
            raise ValueError(f'uniforms must be [{N}, {max_len}], got {list(uniforms.shape)}')
        uniforms = uniforms.to(device, torch.float64)

    # One memory row per caption, so a finished caption's row can leave the batch on its own.
    memory = decoder.prepare(enc, n)
    memory = decoder.select_memory(memory, torch.arange(B, device=device).repeat_interleave(n))   # [N, ...]
    state = decoder.init_state(memory, 1)
    rows = torch.arange(N, device=device)                                     # rows still decoding
    prev = torch.full((N,), start, dtype=torch.long, device=device)
    tokens = torch.full((N, max_len), pad, dtype=torch.long, device=device)
    lengths = torch.full((N,), max_len, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, device=device)
    for t in range(max_len):
        logp, state, _ = decoder.step(prev, state, memory)                   # [r, V]
        logp = F.log_softmax(logp.float() + (early if t < min_len else banned), dim=1)   # renormalised without them
        if greedy:
            tok = logp.argmax(dim=1)                                          # [r]
        else:
            cdf = logp.detach().double().exp().cumsum(dim=1)                  # [r, V]
            x = (uniforms[rows, t] * cdf[:, -1]).unsqueeze(1)                 # [r, 1]
            tok = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=V - 1)
            impossible = logp.gather(1, tok.unsqueeze(1)).squeeze(1) == float('-inf')   # only by rounding
            tok = torch.where(impossible, logp.argmax(dim=1), tok)
        tokens[rows, t] = tok
        logprobs[rows] += logp.gather(1, tok.unsqueeze(1)).squeeze(1)
        ended = tok == end
        if ended.any():
            lengths[rows[ended]] = t + 1
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, tok = rows[keep], tok[keep]
            state, memory = decoder.select(state, keep), decoder.select_memory(memory, keep)
        prev = tok
    return tokens[:, :int(lengths.max())], lengths, logprobs


def _ngram_penalty(seqs, n, vocab_size):
    """[N, t] generated tokens -> [N, V] penalty, -inf for tokens that would repeat an n-gram."""
    N, t = seqs.shape
    penalty = seqs.new_zeros(N, vocab_size + 1, dtype=torch.float)
    if t >= n - 1 and t >= 1:
        if n == 1:
            banned = seqs
        elif t >= n:
            windows = seqs.unfold(1, n, 1)                                      # [N, W, n]
            match = (windows[:, :, :-1] == seqs[:, t - n + 1:].unsqueeze(1)).all(dim=2)   # [N, W]
            banned = torch.where(match, windows[:, :, -1], vocab_size)
        else:
            return penalty[:, :vocab_size]
        penalty.scatter_(1, banned, float('-inf'))
    return penalty[:, :vocab_size]


def search_images(decoder, encoder_out, word_map, **beam_kw):
    """beam_search over a batch; one image at a time for a decoder marked `per_image_search`
    (captioning/decoding/quantize.py's int8 decoders, which scale their activations per call), so that a caption never
    depends on which other images shared its batch: the web server's batches are other people's
    requests. caption_paths (02, 03) searches its batches whole: batched int8 is about 3x faster than
    one image at a time, and a folder's captions depend only on the batch size (docs/speed.md)."""
    if not getattr(decoder, 'per_image_search', False):
        return beam_search(decoder, encoder_out, word_map, **beam_kw)
    return [beam_search(decoder, encoder_out[i:i + 1], word_map, **beam_kw)[0] for i in range(encoder_out.size(0))]

"""The one beam search (used by validation, evaluation, inference and the server) and the sampler
(self-critical training), for any decoder behind the Decoder interface (captioning/decoders/interface.py)."""

import hashlib

import torch
import torch.nn.functional as F

DEFAULT_LENGTH_NORM = 0.5   # rank beams by score / length ** 0.5 (chosen on Flickr8k VAL; 0 = plain log-probability)
DEFAULT_NO_REPEAT_NGRAM = 3  # no word trigram twice in a caption (chosen on Flickr8k VAL, docs/inference.md; 0 = off):
                             # the default of 02, 03, 04 and training's validation; beam_search's own is 0


MAX_CONSTRAINTS = 3   # per image: 2 ** 3 = 8 beam sets, one per set of satisfied constraints


@torch.inference_mode()
def beam_search(decoder, encoder_out, word_map, beam_size=3, max_len=50, length_norm=0.0,
                no_repeat_ngram_size=0, min_len=1, allow_unk=False, no_end_after=None, prefix=(),
                diversity_groups=1, diversity_strength=0.5, constraints=None, constraint_margin=float('inf')):
    """Beam search for a batch of images at once (images x beams in one batch), for any decoder
    behind the Decoder interface (it only calls prepare / init_state / step / select / select_memory).

    encoder_out: [B, g, g, C] or [B, P, C]. beam_size 1 is greedy decoding. A hypothesis that emits
    <end> is set aside; an image is done once it has `beam_size` finished hypotheses. The best one
    by score / (length ** length_norm) is returned (length counts the words and <end>); when none
    finished within `max_len` words, the best unfinished one is. `min_len` forbids <end> before that
    many tokens after the prefix (default 1: a caption of no words is never an answer, whatever the
    decoder); `no_repeat_ngram_size` n forbids repeating any n-gram; `no_end_after` (token ids)
    forbids <end> right after any of those tokens (words that rarely end a sentence: "a", "in", "red";
    loading.no_end_ids). <start> and <pad> are never emitted, nor <unk> unless `allow_unk`. The tokens
    are the decoder's (decoder.special_tokens): word ids, or for ClipCap with a pretrained GPT-2 its
    BPE tokens (lengths then count those); decoder.words turns them into words.

    `prefix` (token ids): every caption starts with them; the model continues (their log-probabilities
    count in the score, and attention maps are kept for them too).

    Beams in groups (one set of `beam_size` rows per image, split into groups that select their own
    candidates each step; with one group, the plain search above):
    - `diversity_groups` G > 1: diverse beam search (Vijayakumar et al., AAAI 2018): G groups of
      beam_size / G beams; at each step group g's candidates are ranked by their log-probability
      minus `diversity_strength` times the number of beams of groups before g that chose the same
      token at this step (scores stay plain log-probabilities). G = 1 is the plain search exactly.
    - `constraints`: per image, a list of at most MAX_CONSTRAINTS constraints, each a list of token
      ids of which one must appear (a disjunction: cat | cats). Constrained beam search (Anderson et
      al., EMNLP 2017): one set of beam_size beams per subset of satisfied constraints (2 ** c sets);
      a token that satisfies constraint j moves a hypothesis to the set with j. The answer is the best
      finished caption that satisfies the most constraints, unless its normalised score is more than
      `constraint_margin` below the best finished caption of any set (then fewer, down to none).
      No constraints (None, or [] for an image) is the plain search exactly.

    Returns one dict per image: 'tokens' (token ids, without <start>/<end>), 'score' (summed log
    probability), 'norm_score', 'finished' (bool), 'alphas' ([len(tokens) (+1 with <end>), P] float
    tensor: the attention behind each emitted token; None for decoders without attention), 'steps'
    (decoding steps the image took), 'beams' (the finished hypotheses, the answer first, then by
    normalised score, at most beam_size: dicts with 'tokens', 'score', 'norm_score') and, when
    `constraints` is given, 'constraints_met' (how many of the image's constraints the answer satisfies).
    """
    B = encoder_out.size(0)
    enc = encoder_out.reshape(B, -1, encoder_out.size(-1))                    # [B, P, C]
    V, k = decoder.vocab_size, beam_size
    start, end, never = decoder.special_tokens(word_map, allow_unk)          # the word map's, or the LM's
    device = enc.device
    attention = decoder.has_attention
    groups = _Groups(k, diversity_groups, diversity_strength, constraints, B, V, device)
    M, kg = groups.count, groups.size                                         # groups, beams per group
    R = M * kg                                                                # rows per image
    prefix = _check_prefix(prefix, V, never, end, max_len)
    P = len(prefix)
    banned = torch.zeros(V, device=device)                                    # added to every step's scores
    banned[never] = float('-inf')
    end_after = None                                                          # [V]: added to <end>'s score
    if no_end_after is not None and len(no_end_after):
        end_after = torch.zeros(V, device=device)
        end_after[torch.as_tensor(list(no_end_after), dtype=torch.long, device=device)] = float('-inf')

    memory = decoder.prepare(enc, R)                                          # per image, once
    state = decoder.init_state(memory, R)                                     # [B*R, ...]: row = image*R + beam
    ids = list(range(B))                                                      # images still searching
    scores = torch.full((B, R), float('-inf'), device=device)
    scores[:, groups.first_rows] = 0.0                                        # one beam alive per starting group
    prev = torch.full((B * R,), start, dtype=torch.long, device=device)
    seqs = torch.empty(B * R, 0, dtype=torch.long, device=device)             # [N, t]
    alpha_hist = None                                                         # [N, t, P] from the first step
    finished = [[] for _ in range(B)]                                         # (norm, score, tokens, alphas, group)
    steps = [max_len] * B

    for t in range(max_len):
        n_img = len(ids)
        logp, state, alpha = decoder.step(prev, state, memory)               # [N, V], state, [N, P] | None
        if attention and alpha_hist is None:
            alpha_hist = alpha.new_empty(B * R, 0, alpha.size(1))
        logp = logp + banned
        if t < P + min_len:
            logp[:, end] = float('-inf')
        elif end_after is not None:
            logp[:, end] = logp[:, end] + end_after[prev]
        if t < P:                                                             # the prefix: its token only
            logp = logp + _forced(prefix[t], V, device)
        if no_repeat_ngram_size:
            logp = logp + _ngram_penalty(seqs, no_repeat_ngram_size, V)
        logp = logp.view(n_img, R, V)

        rows, toks, new_scores, chosen = [], [], [], None
        for m in range(M):
            cand, sel, offset = groups.candidates(m, scores, logp, ids, chosen)   # [n, rows*V] each
            top_sel, top_idx = sel.topk(2 * kg, dim=1)                        # [n, 2kg]
            top_scores = top_sel if cand is sel else cand.gather(1, top_idx)  # the plain log-probabilities
            top_row = torch.div(top_idx, V, rounding_mode='floor') + offset   # integer row within the image
            top_tok = top_idx % V
            is_end = top_tok == end

            # Hypotheses that end among the kg best candidates are set aside.
            ended = (is_end[:, :kg] & (top_sel[:, :kg] > float('-inf'))).nonzero().tolist()
            if ended:
                top_scores_l, top_row_l = top_scores.tolist(), top_row.tolist()
                for i, r in ended:
                    row = i * R + top_row_l[i][r]
                    score = top_scores_l[i][r]
                    alphas = torch.cat([alpha_hist[row], alpha[row:row + 1]]).cpu() if attention else None  # [t+1, P]
                    finished[ids[i]].append((score / (t + 1) ** length_norm, score, seqs[row].tolist(), alphas, m))

            # The kg best candidates that do not end continue.
            cont_sel, pos = top_sel.masked_fill(is_end, float('-inf')).topk(kg, dim=1)   # [n, kg]
            cont_scores = cont_sel if cand is sel else \
                top_scores.gather(1, pos).masked_fill(cont_sel == float('-inf'), float('-inf'))
            rows.append(top_row.gather(1, pos))
            toks.append(top_tok.gather(1, pos))
            new_scores.append(cont_scores)
            chosen = groups.count_chosen(chosen, toks[-1], cont_sel)
        rows = (torch.arange(n_img, device=device).unsqueeze(1) * R + torch.cat(rows, dim=1)).view(-1)   # [n*R]
        prev = torch.cat(toks, dim=1).view(-1)
        seqs = torch.cat([seqs[rows], prev.unsqueeze(1)], dim=1)
        if attention:
            alpha_hist = torch.cat([alpha_hist[rows], alpha[rows].unsqueeze(1)], dim=1)
        state, scores = decoder.select(state, rows), torch.cat(new_scores, dim=1)

        # Images whose every group has kg finished hypotheses (or, without length normalisation, a best
        # finished hypothesis that can no longer be beaten: scores only fall) are done: drop their rows.
        best_alive = scores.view(n_img, M, kg).max(dim=2).values.tolist()  # [n][M], one transfer per step
        done = [groups.image_done(finished[b], best_alive[i], length_norm, t) for i, b in enumerate(ids)]
        for b, d in zip(ids, done):
            if d:
                steps[b] = t + 1
        if all(done):
            ids = []
            break
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
            keep_rows = (keep.unsqueeze(1) * R + torch.arange(R, device=device)).view(-1)
            ids = [b for b, d in zip(ids, done) if not d]
            scores, memory = scores[keep], decoder.select_memory(memory, keep)
            state = decoder.select(state, keep_rows)
            prev, seqs = prev[keep_rows], seqs[keep_rows]
            if attention:
                alpha_hist = alpha_hist[keep_rows]

    results = []
    for b in range(B):
        ranked = groups.ranked(finished[b], b, constraint_margin)
        beams = [{'tokens': tokens, 'score': score, 'norm_score': norm} for norm, score, tokens, _, _ in ranked[:k]]
        if ranked:
            norm, score, tokens, alphas, group = ranked[0]
            result = {'tokens': tokens, 'score': score, 'norm_score': norm, 'finished': True, 'alphas': alphas,
                      'steps': steps[b], 'beams': beams}
        else:  # nothing ended within max_len: the best unfinished hypothesis
            i = ids.index(b)
            r = int(scores[i].argmax())
            score, group = float(scores[i, r]), r // kg
            tokens = seqs[i * R + r].tolist()
            result = {'tokens': tokens, 'score': score, 'norm_score': score / max_len ** length_norm,
                      'finished': False, 'alphas': alpha_hist[i * R + r].cpu() if attention else None,
                      'steps': max_len,
                      'beams': [{'tokens': tokens, 'score': score, 'norm_score': score / max_len ** length_norm}]}
        if constraints is not None:
            result['constraints_met'] = groups.met(group)
        results.append(result)
    return results


def _check_prefix(prefix, V, never, end, max_len):
    """The prefix as a list of token ids, or ValueError naming what no caption can start with."""
    prefix = [int(x) for x in (prefix or ())]
    bad = [x for x in prefix if not 0 <= x < V or x in set(int(n) for n in never) or x == end]
    if bad:
        raise ValueError(f'prefix token(s) {bad}: not words the decoder may emit')
    if len(prefix) >= max_len:
        raise ValueError(f'a prefix of {len(prefix)} tokens leaves no room within max_len {max_len}')
    return prefix


def _forced(token, V, device):
    """[V]: 0 for `token`, -inf for every other."""
    forced = torch.full((V,), float('-inf'), device=device)
    forced[token] = 0.0
    return forced


class _Groups:
    """How beam_search's rows are grouped (see its docstring): one group (the plain search), diverse
    groups, or one group per set of satisfied constraints."""

    def __init__(self, k, diversity_groups, diversity_strength, constraints, B, V, device):
        constraints = [list(c or ()) for c in constraints] if constraints is not None else None
        self.constrained = bool(constraints) and any(constraints)
        if diversity_groups < 1 or k % diversity_groups:
            raise ValueError(f'beam size {k} does not split into {diversity_groups} diversity groups: give a '
                             'beam size that is a multiple of the groups')
        if self.constrained and diversity_groups > 1:
            raise ValueError('constraints and diversity groups do not combine: use one or the other')
        self.strength = float(diversity_strength)
        self.V = V
        if self.constrained:
            if len(constraints) != B:
                raise ValueError(f'{len(constraints)} constraint lists for {B} images')
            c = max(len(cs) for cs in constraints)
            if c > MAX_CONSTRAINTS:
                raise ValueError(f'{c} constraints for one image: at most {MAX_CONSTRAINTS}')
            bits = torch.zeros(B, V, dtype=torch.long)                        # [B, V]: constraints a token meets
            for b, cs in enumerate(constraints):
                for j, options in enumerate(cs):
                    if not options:
                        raise ValueError(f'image {b}: constraint {j} lists no token')
                    bits[b, torch.as_tensor([int(x) for x in options])] |= 1 << j
            self.bits = bits.to(device)
            self.real = [len(cs) for cs in constraints]                       # constraints of each image
            self.count, self.size = 2 ** c, k
            self.state_of_row = torch.arange(self.count * k, device=device) // k   # [R]
            self.first_rows = [0]                                             # only "nothing met" starts
        else:
            self.count, self.size = diversity_groups, k // diversity_groups
            self.first_rows = [m * self.size for m in range(self.count)]      # every group starts

    def candidates(self, m, scores, logp, ids, chosen):
        """Group m's candidates: (plain scores [n, rows*V], selection scores (the same tensor unless
        penalised), offset of the candidate rows within an image)."""
        n = scores.size(0)
        if self.constrained:                                                  # from every set, into set m
            cand = scores.unsqueeze(2) + logp                                 # [n, R, V]
            target = self.state_of_row.view(1, -1, 1) | self.bits[ids].unsqueeze(1)   # [n, R, V]
            cand = cand.masked_fill(target != m, float('-inf')).view(n, -1)
            return cand, cand, 0
        g0 = m * self.size
        cand = (scores[:, g0:g0 + self.size].unsqueeze(2) + logp[:, g0:g0 + self.size]).view(n, -1)
        if chosen is None:
            return cand, cand, g0
        return cand, cand - self.strength * chosen.repeat(1, self.size), g0

    def count_chosen(self, chosen, tokens, live):
        """Diverse search: [n, V] counts of the tokens that groups so far chose at this step."""
        if self.count == 1 or self.constrained:
            return None
        if chosen is None:
            chosen = torch.zeros(tokens.size(0), self.V, device=tokens.device)
        return chosen.scatter_add(1, tokens, (live > float('-inf')).float())

    def image_done(self, finished, best_alive, length_norm, t):
        """Whether an image's search is over (best_alive: its groups' best live scores): every group has
        its beams' worth of finished hypotheses (or, without length normalisation, can no longer beat its
        best finished one); with several groups, a group with no live beam once every group could be
        reached is over too."""
        for m in range(self.count):
            own = [f[1] for f in finished if f[4] == m]
            over = len(own) >= self.size or (length_norm == 0 and bool(own) and max(own) >= best_alive[m])
            if not over and self.count > 1 and t >= self.count.bit_length() - 1 and best_alive[m] == float('-inf'):
                over = True
            if not over:
                return False
        return True

    def ranked(self, finished, b, margin):
        """An image's finished hypotheses, the answer first, then by normalised score; each group
        keeps its best `size`."""
        ranked = sorted(finished, key=lambda f: f[0], reverse=True)
        if self.count > 1:
            kept, per_group = [], {}
            for f in ranked:
                if per_group.get(f[4], 0) < self.size:
                    per_group[f[4]] = per_group.get(f[4], 0) + 1
                    kept.append(f)
            ranked = kept
        if not self.constrained or not ranked:
            return ranked
        allowed = [f for f in ranked if f[4] < 2 ** self.real[b]]            # sets of the image's own constraints
        best = ranked[0][0]
        for count in range(self.real[b], -1, -1):
            meeting = [f for f in allowed if self.met(f[4]) == count]
            if meeting and (count == 0 or meeting[0][0] >= best - margin):
                answer = meeting[0]
                return [answer] + [f for f in ranked if f is not answer]
        return ranked

    def met(self, group):
        """How many constraints a group's hypotheses satisfy (0 without constraints)."""
        return bin(group).count('1') if self.constrained else 0


def sample_captions(decoder, encoder_out, word_map, n=1, max_len=20, greedy=False, generator=None,
                    uniforms=None, allow_unk=False, grad=False, min_len=1, temperature=1.0, top_k=0, top_p=1.0,
                    no_end_after=None, no_repeat_ngram_size=0, prefix=(), record=None):
    """Draw `n` captions per image from the decoder's own distribution (multinomial sampling), or
    the greedy caption (`greedy`: the most likely word at each step), for any decoder behind the
    Decoder interface (prepare / init_state / step / select / select_memory).

    encoder_out [B, g, g, C] or [B, P, C]. Row i * n + j is sample j of image i. <start>, <pad> and
    (unless allow_unk) <unk> are never emitted, nor <end> before `min_len` tokens after the prefix
    (default 1: no caption of no words), nor <end> right after a token of `no_end_after`, nor a token
    that repeats an n-gram of `no_repeat_ngram_size`: the step's distribution is renormalised without
    them (when they forbid every token, the caption ends there). `temperature` divides the log-probabilities, `top_k` (0: all) keeps the k likeliest tokens
    and `top_p` (1: all) the smallest set whose probability reaches p (nucleus sampling), each
    renormalised. `prefix` (token ids): every row starts with them. A row stops at <end> or after
    max_len tokens. Sampling is by inverse CDF on uniform numbers, [B * n, max_len] float64 in
    [0, 1): `uniforms` when given (so a caller can make draws that do not depend on how images are
    split into batches or processes), else drawn from `generator` (a CPU torch.Generator; None: the
    global one). Row r's token at step t uses uniforms[r, t].

    Returns (tokens [B * n, T] long: the words and <end> when it came, <pad> after; T = the longest
    row, at most max_len; lengths [B * n] long: tokens emitted, <end> included; logprobs [B * n]
    float: the summed log-probability of each row under the distribution it was drawn from, with
    autograd through the decoder when `grad`, so that a decoder in training mode is differentiated
    under the very dropout masks that drew the words). A dict `record` receives 'model_logprobs'
    [B * n] (the summed log-probabilities of the decoder itself, as beam_search scores them) and, for
    decoders with attention, 'alphas' [B * n, T, P]."""
    with torch.set_grad_enabled(grad):
        return _sample(decoder, encoder_out, word_map, n, max_len, greedy, generator, uniforms, allow_unk, min_len,
                       temperature, top_k, top_p, no_end_after, no_repeat_ngram_size, prefix, record)


def _sample(decoder, encoder_out, word_map, n, max_len, greedy, generator, uniforms, allow_unk, min_len,
            temperature=1.0, top_k=0, top_p=1.0, no_end_after=None, no_repeat_ngram_size=0, prefix=(), record=None):
    """sample_captions' loop, under the caller's grad mode."""
    B = encoder_out.size(0)
    enc = encoder_out.reshape(B, -1, encoder_out.size(-1))                    # [B, P, C]
    device, V, N = enc.device, decoder.vocab_size, B * n
    start, end, never = decoder.special_tokens(word_map, allow_unk)         # the word map's, or the LM's
    prefix = _check_prefix(prefix, V, never, end, max_len)
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f'sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0 (got {temperature}, '
                         f'{top_p}, {top_k})')
    pad = word_map['<pad>']                                                   # filler after <end>
    banned = torch.zeros(V, device=device)
    banned[never] = float('-inf')
    early = banned.clone()                                                    # ... and before min_len tokens
    early[end] = float('-inf')
    end_after = None                                                          # [V]: added to <end>'s score
    if no_end_after is not None and len(no_end_after):
        end_after = torch.zeros(V, device=device)
        end_after[torch.as_tensor(list(no_end_after), dtype=torch.long, device=device)] = float('-inf')
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
    if record is not None:
        record['model_logprobs'] = torch.zeros(N, device=device)
        alphas = None
    for t in range(max_len):
        logits, state, alpha = decoder.step(prev, state, memory)             # [r, V]
        mask = early if t < len(prefix) + min_len else banned
        if end_after is not None and t >= len(prefix) + min_len:
            mask = mask + F.pad(end_after[prev].unsqueeze(1), (end, V - end - 1))   # -inf at <end> after them
        if t < len(prefix):                                                   # the prefix: its token only
            mask = mask + _forced(prefix[t], V, device)
        if no_repeat_ngram_size and t:
            mask = mask + _ngram_penalty(tokens[rows, :t], no_repeat_ngram_size, V)
        if mask.dim() == 2 and t >= len(prefix):                              # every word forbidden (no-repeat,
            stuck = (logits.float() + mask).isinf().all(dim=1)                # bad endings): the caption ends
            if stuck.any():
                mask = mask.clone()
                mask[stuck, end] = 0.0
        logp = F.log_softmax(logits.float() + mask, dim=1)                    # renormalised without them
        if temperature != 1.0:
            logp = F.log_softmax(logp / temperature, dim=1)
        if top_k and top_k < V:
            kth = logp.topk(top_k, dim=1).values[:, -1:]                      # [r, 1]
            logp = F.log_softmax(logp.masked_fill(logp < kth, float('-inf')), dim=1)
        if top_p < 1.0:
            logp = F.log_softmax(_nucleus(logp, top_p), dim=1)
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
        if record is not None:
            record['model_logprobs'][rows] += logits.detach().float().gather(1, tok.unsqueeze(1)).squeeze(1)
            if alpha is not None:
                if alphas is None:
                    alphas = torch.zeros(N, max_len, alpha.size(1), device=device)
                alphas[rows, t] = alpha.detach().float()
        ended = tok == end
        if ended.any():
            lengths[rows[ended]] = t + 1
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, tok = rows[keep], tok[keep]
            state, memory = decoder.select(state, keep), decoder.select_memory(memory, keep)
        prev = tok
    T = int(lengths.max())
    if record is not None and alphas is not None:
        record['alphas'] = alphas[:, :T]
    return tokens[:, :T], lengths, logprobs


def _nucleus(logp, p):
    """[r, V] log-probabilities -> the same with -inf outside the smallest set of likeliest tokens
    whose probability reaches p (the likeliest token always stays)."""
    sorted_logp, order = logp.sort(dim=1, descending=True)
    before = sorted_logp.exp().cumsum(dim=1) - sorted_logp.exp()            # probability of the tokens above
    drop = (before >= p).scatter(1, order, before >= p)                       # back in vocabulary order
    return logp.masked_fill(drop, float('-inf'))


def sample_seeds(seed, keys):
    """One generator seed per image from a run's seed and the image's key (its path, or any string),
    so that an image's samples do not depend on its batch, its process or a resume."""
    return [int.from_bytes(hashlib.sha256(f'{seed}\0{key}'.encode()).digest()[:8], 'little') >> 1 for key in keys]


@torch.inference_mode()
def decode(decoder, encoder_out, word_map, beam_size=3, num_captions=1, sample=False, temperature=1.0, top_k=0,
           top_p=1.0, seed=0, keys=None, guides=None, guide_margin=float('inf'), per_image=False, **search_kw):
    """The captions 02, 03 and 04 ask for, one dict per image as beam_search gives them, with the
    alternatives in 'beams' (the answer first): the beam search, or with `sample` `num_captions`
    distinct sampled captions per image (ranked by normalised score; the draws come from `seed` and
    each image's key in `keys`, default its index, so they are reproducible and independent of the
    batch). search_kw: beam_search's other settings (max_len, length_norm, no_repeat_ngram_size,
    min_len, allow_unk, no_end_after, prefix, and for the search diversity_groups / strength).

    `guides` (beam search only): per image, constraints its caption should satisfy (tags.Guide). The
    plain search runs first; an image whose caption misses some of them is searched again with those
    as constraints (margin `guide_margin`), and the guided caption replaces the plain one when it
    meets at least one ('guided': the constraints it was searched with). Without guides, or where
    the caption already meets them, the captions are the plain search's exactly. `per_image`: an int8
    decoder searches one image at a time (search_images: the server's batches are other requests)."""
    search = search_images if per_image else beam_search
    if not sample:
        results = search(decoder, encoder_out, word_map, beam_size=beam_size, **search_kw)
        missing = [[c for c in g if not set(c) & set(r['tokens'])] for g, r in zip(guides or [], results)]
        redo = [i for i, m in enumerate(missing) if m]
        if redo:
            again = search(decoder, encoder_out[redo], word_map, beam_size=beam_size,
                           constraints=[missing[i] for i in redo], constraint_margin=guide_margin, **search_kw)
            for i, hyp in zip(redo, again):
                if hyp['constraints_met']:
                    results[i] = {**hyp, 'guided': missing[i]}
        return results
    groups, constraints = search_kw.pop('diversity_groups', 1), search_kw.pop('constraints', None)
    search_kw.pop('diversity_strength', None), search_kw.pop('constraint_margin', None)
    if groups != 1 or (constraints and any(constraints)):
        raise ValueError('diversity groups and constraints are settings of the beam search, not of sampling')
    length_norm = search_kw.pop('length_norm', 0.0)
    max_len = search_kw.pop('max_len', 50)
    B, draws = encoder_out.size(0), 3 * num_captions          # more draws than captions: duplicates are dropped
    keys = [str(i) for i in range(B)] if keys is None else [str(k) for k in keys]
    uniforms = torch.cat([torch.rand(draws, max_len, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                          for s in sample_seeds(seed, keys)])
    record = {}
    tokens, lengths, _ = sample_captions(decoder, encoder_out, word_map, n=draws, max_len=max_len, uniforms=uniforms,
                                         temperature=temperature, top_k=top_k, top_p=top_p, record=record,
                                         **search_kw)
    end = decoder.special_tokens(word_map, search_kw.get('allow_unk', False))[1]
    tokens, lengths, scores = tokens.tolist(), lengths.tolist(), record['model_logprobs'].tolist()
    alphas = record.get('alphas')
    results = []
    for b in range(B):
        seen, hyps = set(), []
        for r in range(b * draws, (b + 1) * draws):
            finished = lengths[r] <= max_len and tokens[r][lengths[r] - 1] == end
            words = tuple(tokens[r][:lengths[r] - 1] if finished else tokens[r][:lengths[r]])
            if words in seen:
                continue
            seen.add(words)
            norm = scores[r] / lengths[r] ** length_norm
            hyps.append({'tokens': list(words), 'score': scores[r], 'norm_score': norm, 'finished': finished,
                         'alphas': alphas[r, :lengths[r]].cpu() if alphas is not None else None})
            if len(hyps) == num_captions:
                break
        hyps.sort(key=lambda h: h['norm_score'], reverse=True)
        beams = [{k: h[k] for k in ('tokens', 'score', 'norm_score')} for h in hyps]
        results.append({**hyps[0], 'steps': max(lengths[b * draws:(b + 1) * draws]), 'beams': beams})
    return results


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
    constraints = beam_kw.pop('constraints', None)
    return [beam_search(decoder, encoder_out[i:i + 1], word_map, **beam_kw,
                        constraints=None if constraints is None else constraints[i:i + 1])[0]
            for i in range(encoder_out.size(0))]

"""Captioning with a trained model: the one beam search (used by validation, evaluation and
inference), model loading from a checkpoint, and attention figures.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import checkpoint
import text
from decoders import words_of  # noqa: F401 - the word-map case of decoder.words, for callers of caption.words_of
from utils import atomic_path

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
PROVIDED_CHECKPOINT = os.path.join(REPO_DIR, 'checkpoints', 'flickr8k_efficientnet_lite0_fp16.pt')  # shipped
PROVIDED_LITE2 = os.path.join(REPO_DIR, 'checkpoints', 'flickr8k_efficientnet_lite2_fp16.pt')       # shipped
# The default of 02, 03, 04: both, as an ensemble (ensemble.py; chosen on Flickr8k VAL, checkpoints/README.md)
DEFAULT_CHECKPOINTS = [PROVIDED_CHECKPOINT, PROVIDED_LITE2]
# The Chinese default: the Flickr8k-CN Lite0 and Lite2 models as an ensemble (docs/data.md)
PROVIDED_CN = [os.path.join(REPO_DIR, 'checkpoints', f'flickr8k_cn_efficientnet_{e}_fp16.pt') for e in ('lite0', 'lite2')]
# Names that --checkpoint takes for the provided ensembles (a file of that name comes first)
PROVIDED_MODELS = {'flickr8k': DEFAULT_CHECKPOINTS, 'flickr8k-cn': PROVIDED_CN}
CHECKPOINT_HELP = ('a checkpoint, or several to decode as an ensemble (their mean word distribution; they must share '
                   f"the word map), or a provided ensemble by name: {' | '.join(PROVIDED_MODELS)} (Chinese) "
                   '(default: %(default)s)')
# What the provided models know: 02 prints it and the page shows it when they are in use
_NOTE = ('the provided checkpoints learned from {data}, which shows people, dogs and outdoor scenes only '
         '(the bundled cat photo becomes {cat}); for everyday photos use a COCO '
         "model: the tutorial's checkpoint (docs/tutorial-checkpoints.md), ClipCap with pretrained CLIP + "
         'GPT-2, or 01_train.py on COCO with a GPU')
PROVIDED_NOTE = _NOTE.format(data='Flickr8k', cat='"a man is playing with a toy"')
PROVIDED_NOTE_CN = _NOTE.format(data='Flickr8k-CN (Chinese captions of the Flickr8k photos)',
                                cat='"一只狗在玩耍", a dog is playing')
DEFAULT_LENGTH_NORM = 0.5   # rank beams by score / length ** 0.5 (chosen on Flickr8k VAL; 0 = plain log-probability)
DEFAULT_NO_REPEAT_NGRAM = 3  # no word trigram twice in a caption (chosen on Flickr8k VAL, see README; 0 = off):
                             # the default of 02, 03, 04 and training's validation; beam_search's own is 0


@torch.inference_mode()
def beam_search(decoder, encoder_out, word_map, beam_size=3, max_len=50, length_norm=0.0,
                no_repeat_ngram_size=0, min_len=1, allow_unk=False, no_end_after=None):
    """Beam search for a batch of images at once (images x beams in one batch), for any decoder of
    decoders.py (it only calls prepare / init_state / step / select / select_memory).

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
    the greedy caption (`greedy`: the most likely word at each step), for any decoder of decoders.py
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


@torch.inference_mode()
def caption_paths(encoder, decoder, word_map, paths, beam_sizes=(3,), batch_size=16, workers=0,
                  device='cpu', progress=True, **beam_kw):
    """Caption image files in batches: the encoder runs once per image for every beam size.

    Returns (results, failures): results[i] is {beam_size: hypothesis dict (see beam_search) plus
    'words'} for paths[i], or None when it could not be decoded; failures is [(path, error)].
    """
    from tqdm import tqdm
    results, failures = [None] * len(paths), []
    batches = caption_batches(encoder, decoder, word_map, paths, beam_sizes, batch_size, workers, device, **beam_kw)
    for indices, hyps, bad in tqdm(batches, total=math.ceil(len(paths) / batch_size), desc='captioning', unit='batch',
                                   disable=None if progress else True, leave=False):
        failures += [(paths[i], err) for i, err in bad]
        for j, i in enumerate(indices):
            results[i] = {k: hyps[k][j] for k in beam_sizes}
    return results, failures


@torch.inference_mode()
def caption_batches(encoder, decoder, word_map, paths, beam_sizes=(3,), batch_size=16, workers=0, device='cpu',
                    **beam_kw):
    """Caption image files batch by batch, keeping nothing between batches (for collections of any size).

    Yields (indices into paths, {beam_size: [hypothesis dict (see beam_search) plus 'words'] in the
    order of indices}, [(index, error), ...] of the files of the batch that could not be decoded).
    """
    from torch.utils.data import DataLoader

    from datasets import ImageFiles, collate_image_files, image_transform
    device = torch.device(device)
    rev = {v: k for k, v in word_map.items()}
    loader = DataLoader(ImageFiles(paths, image_transform(encoder)), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_image_files, pin_memory=device.type == 'cuda')
    for images, indices, bad in loader:
        hyps = {}
        if images is not None:
            enc = encoder(images.to(device, non_blocking=True))                   # [b, g, g, C]
            for k in beam_sizes:
                hyps[k] = beam_search(decoder, enc, word_map, beam_size=k, **beam_kw)
                for hyp in hyps[k]:
                    hyp['words'] = decoder.words(hyp['tokens'], rev)
        yield indices, hyps, bad


def empty_reason(hyp):
    """Why a captioned hypothesis (with 'words', see caption_paths) has no words; None when it has some."""
    if hyp['words']:
        return None
    if not hyp['tokens']:
        return 'the model ended it at once, and --min-len 0 allowed that'
    return (f"its {len(hyp['tokens'])} token(s) decode to no words (e.g. a GPT-2 emitting only whitespace or "
            'special pieces)')


def search_images(decoder, encoder_out, word_map, **beam_kw):
    """beam_search over a batch; one image at a time for a decoder marked `per_image_search`
    (quantize.py's int8 decoders, which scale their activations per call), so that a caption never
    depends on which other images shared its batch: the web server's batches are other people's
    requests. caption_paths (02, 03) searches its batches whole: batched int8 is about 3x faster than
    one image at a time, and a folder's captions depend only on the batch size (docs/speed.md)."""
    if not getattr(decoder, 'per_image_search', False):
        return beam_search(decoder, encoder_out, word_map, **beam_kw)
    return [beam_search(decoder, encoder_out[i:i + 1], word_map, **beam_kw)[0] for i in range(encoder_out.size(0))]


def checkpoint_paths(checkpoint_path):
    """A path, or several (an ensemble), each of which may be the name of a provided ensemble
    (PROVIDED_MODELS, unless a file has that name) -> a list of paths."""
    paths = [checkpoint_path] if isinstance(checkpoint_path, (str, os.PathLike)) else list(checkpoint_path)
    def expand(p):
        return PROVIDED_MODELS[p] if isinstance(p, str) and p in PROVIDED_MODELS and not os.path.exists(p) else [p]
    return [q for p in paths for q in expand(p)]


def checkpoint_label(checkpoint_path, basename=False):
    """One path, or several joined by ' + ' (an ensemble), for messages."""
    paths = checkpoint_paths(checkpoint_path)
    return ' + '.join(os.path.basename(p) if basename else os.fspath(p) for p in paths)


def provided_note(checkpoint_path):
    """PROVIDED_NOTE when every checkpoint is one of the provided Flickr8k ones (checkpoints/flickr8k_*),
    PROVIDED_NOTE_CN when they are the Chinese ones (checkpoints/flickr8k_cn_*), else None."""
    paths = checkpoint_paths(checkpoint_path)
    provided = all(os.path.basename(p).startswith('flickr8k_') and
                   os.path.dirname(os.path.abspath(p)) == os.path.join(REPO_DIR, 'checkpoints') for p in paths)
    if not provided:
        return None
    return PROVIDED_NOTE_CN if all(os.path.basename(p).startswith('flickr8k_cn_') for p in paths) else PROVIDED_NOTE


BAD_ENDINGS = ('avoid', 'allow')


def add_bad_endings_argument(parser, default='avoid'):
    """The --bad-endings flag of 02, 03 and 04."""
    parser.add_argument('--bad-endings', choices=BAD_ENDINGS, default=default,
                        help="avoid: never end a caption on a word that rarely ends a TRAIN reference ('a', 'in', "
                             "'red': under 2%% of its occurrences), from the checkpoint's ending statistics; allow: "
                             'the model decides (default: %(default)s)')


def add_mirror_argument(parser, default=False):
    """The --mirror flag of 02, 03 and 04."""
    parser.add_argument('--mirror', action=argparse.BooleanOptionalAction, default=default,
                        help='also decode every photo flipped left to right, as one more ensemble member per model '
                             '(test-time augmentation, ensemble.py): about twice the model time (default: %(default)s)')


def bad_endings_setting(choice, decoder, word_map, config):
    """--bad-endings -> (the token ids to pass as beam_search's no_end_after, or None; a note to print
    when 'avoid' cannot apply, else None)."""
    if choice != 'avoid':
        return None, None
    ids = no_end_ids(decoder, word_map, config.get('endings'))
    if ids is None:
        why = ('its tokens are not its word map' if config.get('endings') else
               'the checkpoint has no ending statistics (checkpoints of 01_train.py carry them; for others: '
               'tools/write_endings.py DATA_FOLDER CHECKPOINT_FOLDER/NAME.endings.json)')
        return None, f'--bad-endings avoid does not apply: {why}'
    return ids, None


def no_end_ids(decoder, word_map, endings):
    """The token ids after which <end> is forbidden (--bad-endings avoid): the word map's words that
    rarely end a TRAIN reference (metrics.bad_ending_words). None when they are unknown (`endings`
    None) or the decoder's tokens are not the word map's (a pretrained GPT-2's BPE pieces)."""
    import metrics
    if not endings or decoder.vocab_size != len(word_map):
        return None
    bad = metrics.bad_ending_words(endings)
    return sorted(i for w, i in word_map.items() if w in bad)


def load_captioner(checkpoint_path, device, word_map=None, mirror=False):
    """-> (encoder, decoder, word_map, config) ready for captioning on `device`, from one checkpoint
    file, or from several as an ensemble (ensemble.py: one list of two or more paths). `word_map`:
    the WORDMAP_*.json of a checkpoint of the tutorial, converted as it loads (tutorial_import.py).
    `mirror`: every model also decodes the photo flipped left to right, as one more ensemble member
    (ensemble.py). config['endings'] is the checkpoint's (the first member's) TRAIN ending
    statistics or None (checkpoint.endings)."""
    import tutorial_import
    paths = checkpoint_paths(checkpoint_path)
    if len(paths) > 1 or mirror:
        if word_map:
            raise ValueError(f"--word-map converts one tutorial checkpoint: convert it with tools/convert_tutorial.py "
                             f"to decode it {'mirrored' if mirror else 'in an ensemble'}")
        import ensemble
        return ensemble.load_ensemble(paths, device, mirror)
    ckpt = tutorial_import.load_checkpoint(paths[0], word_map)   # this suite's checkpoint, or the tutorial's
    encoder, decoder = checkpoint.models_from_checkpoint(ckpt, device)
    return encoder, decoder, ckpt['word_map'], {**ckpt['config'], 'endings': checkpoint.endings(ckpt, paths[0])}


# ----------------------------------------------------------------------------------------------
# Attention figures

def _jet(x):
    """[H, W] floats in [0, 1] -> [H, W, 3] uint8 colours of the 'jet' colour map."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def attention_figure(image, words, alphas, panel=192, columns=5):
    """The image, then one panel per word with its attention map upsampled and overlaid.

    image: PIL RGB; words: the emitted words (add '<end>' to show its map too); alphas: [T, P] with
    T >= len(words) and P a square grid. Returns a PIL image.
    """
    grid = int(round(math.sqrt(alphas.shape[1])))
    img = image.convert('RGB').resize((panel, panel), Image.BILINEAR)
    base = np.asarray(img, dtype=np.float32)
    font = text.label_font(words, max(12, panel // 12))        # a CJK font when a label needs one
    label_h = panel // 6
    n = len(words) + 1
    rows = math.ceil(n / columns)
    fig = Image.new('RGB', (columns * panel, rows * (panel + label_h)), 'white')
    draw = ImageDraw.Draw(fig)
    for k in range(n):
        x, y = (k % columns) * panel, (k // columns) * (panel + label_h)
        if k == 0:
            fig.paste(img, (x, y))
            label = '(image)'
        else:
            a = torch.as_tensor(alphas[k - 1], dtype=torch.float32).view(1, 1, grid, grid)
            a = F.interpolate(a, size=(panel, panel), mode='bilinear', align_corners=False)[0, 0].numpy()
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
            over = 0.45 * base + 0.55 * _jet(a).astype(np.float32) * (0.35 + 0.65 * a[..., None])
            fig.paste(Image.fromarray(np.clip(over, 0, 255).astype(np.uint8)), (x, y))
            label = words[k - 1]
        draw.text((x + panel // 2, y + panel + label_h // 2), label, fill='black', font=font, anchor='mm')
    return fig


def save_attention_figure(image, words, alphas, path, **kw):
    with atomic_path(path) as tmp:
        attention_figure(image, words, alphas, **kw).save(tmp, format='PNG')
    return path


def figure_name(image_path, used):
    """A unique PNG name for an image's attention figure."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, i = f'{stem}_attention.png', 1
    while name in used:
        i += 1
        name = f'{stem}_{i}_attention.png'
    used.add(name)
    return name

"""Image files -> captions in batches: reading, the encoder once per image (with its tags), the search (02, 03)."""
import collections
import math

import torch

from captioning.decoding.search import decode


@torch.inference_mode()
def caption_paths(encoder, decoder, word_map, paths, beam_sizes=(3,), batch_size=16, workers=0,
                  device='cpu', progress=True, **decode_kw):
    """Caption image files in batches: the encoder runs once per image for every beam size.

    Returns (results, failures): results[i] is {beam_size: hypothesis dict (see caption_batches)}
    for paths[i], or None when it could not be decoded; failures is [(path, error)].
    """
    from tqdm import tqdm
    results, failures = [None] * len(paths), []
    batches = caption_batches(encoder, decoder, word_map, paths, beam_sizes, batch_size, workers, device, **decode_kw)
    for indices, hyps, bad in tqdm(batches, total=math.ceil(len(paths) / batch_size), desc='captioning', unit='batch',
                                   disable=None if progress else True, leave=False):
        failures += [(paths[i], err) for i, err in bad]
        for j, i in enumerate(indices):
            results[i] = {k: hyps[k][j] for k in beam_sizes}
    return results, failures


@torch.inference_mode()
def caption_batches(encoder, decoder, word_map, paths, beam_sizes=(3,), batch_size=16, workers=0, device='cpu',
                    tag=False, guide=None, guide_margin=float('inf'), loader='processes', **decode_kw):
    """Caption image files batch by batch, keeping nothing between batches (for collections of any size).

    decode_kw: search.decode's settings (the beam search's, or sampling with the images' paths as the
    keys of their draws). `tag`: also the encoder's ImageNet tags, from the same pass (tags.py);
    `guide` (a tags.Guide): the confident tags guide the beam search (search.decode's guides).

    Yields (indices into paths, {beam_size: [hypothesis dict (see search.decode) plus 'words', and
    with `tag` or `guide` 'tags' (tags.top_tags, None for an encoder without a head) and
    'dropped_tags' (confident classes that name no word of the model)] in the order of indices},
    [(index, error), ...] of the files of the batch that could not be decoded).

    Reading: `workers` 0 reads each batch in this thread before it is captioned; otherwise `loader`
    'threads' reads the next batch with that many threads while this one is captioned (thread_batches),
    'processes' with that many DataLoader worker processes.
    """
    from torch.utils.data import DataLoader

    from captioning.decoding import tags
    from datasets import ImageFiles, collate_image_files, image_transform
    if loader not in LOADERS:
        raise ValueError(f"loader {loader!r}: choose from {', '.join(LOADERS)}")
    device = torch.device(device)
    rev = {v: k for k, v in word_map.items()}
    dataset = ImageFiles(paths, image_transform(encoder))
    if workers and loader == 'threads':
        batches = thread_batches(dataset, batch_size, workers, collate_image_files)
    else:
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_image_files,
                             pin_memory=device.type == 'cuda')
    for images, indices, bad in batches:
        hyps = {}
        if images is not None:
            enc, probs = tags.encode(encoder, images.to(device, non_blocking=True), classify=tag or guide is not None)
            found = guide.constraints(probs) if guide is not None and probs is not None else None
            for k in beam_sizes:
                hyps[k] = decode(decoder, enc, word_map, beam_size=k, keys=[paths[i] for i in indices],
                                 guides=[c for c, _ in found] if found else None, guide_margin=guide_margin,
                                 **decode_kw)
                for j, hyp in enumerate(hyps[k]):
                    hyp['words'] = decoder.words(hyp['tokens'], rev)
                    if tag or guide is not None:
                        hyp['tags'] = tags.top_tags(probs[j:j + 1])[0] if probs is not None else None
                        hyp['dropped_tags'] = found[j][1] if found else []
        yield indices, hyps, bad


LOADERS = ('threads', 'processes')


def thread_batches(dataset, batch_size, threads, collate):
    """Batches of dataset[0], dataset[1], ... in order, read by a pool of `threads` threads: the next
    batch is read while the caller works on this one (JPEG decoding and resizing release the GIL), so
    at most two batches are in memory. -> collate(items) per batch."""
    from concurrent.futures import ThreadPoolExecutor
    n = len(dataset)
    starts = iter(range(0, n, batch_size))
    pool = ThreadPoolExecutor(threads, thread_name_prefix='read')
    try:
        def submit(start):
            return [pool.submit(dataset.__getitem__, i) for i in range(start, min(start + batch_size, n))]
        pending = collections.deque(submit(s) for s in [next(starts, None), next(starts, None)] if s is not None)
        while pending:
            batch = [f.result() for f in pending.popleft()]
            start = next(starts, None)
            if start is not None:
                pending.append(submit(start))
            yield collate(batch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def alternatives(hyp, decoder, rev_word_map, n):
    """The first n distinct captions of a hypothesis (its answer first, then its other beams or
    samples): [{'words', 'score', 'norm_score'}]."""
    out, seen = [], set()
    for beam in [hyp] + hyp.get('beams', []):
        words = decoder.words(beam['tokens'], rev_word_map)
        if tuple(words) in seen:
            continue
        seen.add(tuple(words))
        out.append({'words': words, 'score': beam['score'], 'norm_score': beam['norm_score']})
        if len(out) == n:
            break
    return out


def empty_reason(hyp):
    """Why a captioned hypothesis (with 'words', see caption_paths) has no words; None when it has some."""
    if hyp['words']:
        return None
    if not hyp['tokens']:
        return 'the model ended it at once, and --min-len 0 allowed that'
    return (f"its {len(hyp['tokens'])} token(s) decode to no words (e.g. a GPT-2 emitting only whitespace or "
            'special pieces)')

"""Image files -> captions in batches: reading, the encoder once per image, the beam search (02, 03)."""
import math

import torch

from captioning.decoding.search import beam_search


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

"""Our code against the original tutorial's own code (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning),
side by side in one run: the same weights, the same inputs, interleaved rounds, medians.

    git clone https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning /tmp/tutorial
    python benchmarks/bench_tutorial.py --tutorial-repo /tmp/tutorial                 # table
    python benchmarks/bench_tutorial.py --tutorial-repo /tmp/tutorial --rounds 9 --threads 2 --json
    python benchmarks/bench_tutorial.py --tutorial-repo /tmp/tutorial --images DIR --num-images 0

(--tutorial-repo defaults to the TUTORIAL_REPO environment variable.) The tutorial's files are
never copied into this repository: its models.py, caption.py and utils.py are read from the
checkout, patched in memory (below) and executed as modules `tutorial_models`, `tutorial_caption`
and `tutorial_utils`.

Three figures; in each round every side runs once, the side that goes first alternating from round
to round (A B, B A, A B, ...), so that a drift in the machine's load falls on both sides alike and a
linear drift cancels within each pair of rounds. Every side runs once untimed first (warm-up).
The medians over rounds are reported, with every round's figure.

1. train: decoder training from features. Random 14x14x2048 features (a frozen ResNet101's
   shape), --train-batch captions (one image each) of Flickr8k-like lengths, a 2,631-word
   vocabulary, dims 512/512/512, dropout 0.5, Adam 4e-4, gradients clipped at 5
   (bench_train.synthetic_feature_batches: the same batches, in the same order, for both sides).
   Tutorial: its models.DecoderWithAttention, and the step of its train.py's train() transcribed
   (train.py itself imports nltk and runs a whole epoch with printing): forward, cross-entropy
   (nn.CrossEntropyLoss) over pack_padded_sequence(...).data of scores and targets plus
   alpha_c * ((1 - alphas.sum(dim=1)) ** 2).mean(), zero_grad, backward, its
   utils.clip_gradient, step of torch.optim.Adam built as train.py builds it. train.py wrote
   `scores, _ = pack_padded_sequence(...)`, which fails since PyTorch 1.1 (a PackedSequence has
   four fields): `.data` is what it meant. Ours: lstm.DecoderWithAttention started from the
   tutorial decoder's state_dict (same parameter names), interface.caption_loss, the fused Adam and
   clip_grad_value_ of 01_train.py. The metric bookkeeping of both training loops (top-5
   accuracy, loss.item()) is left out of both. Figure: captions/s.
2. decode: beam-3 search with the shipped checkpoint (--checkpoint), on --num-images photos whose
   encoder features are computed once (our encoder and transform) and shared by every side.
   Tutorial: its caption.caption_image_beam_search, run one image at a time on a models.
   DecoderWithAttention holding the checkpoint decoder's state_dict, with only its decoding part
   kept: the lines from `# Read image and process` to `encoder_out = encoder(image)` are replaced
   by taking the features in image_path's place (patch below); everything after them runs as
   written, including the attention maps it keeps for its figure. Ours: search.beam_search on
   batches of --batch-size images, and on one image at a time. Both with the tutorial's rules:
   plain summed log-probability, no length normalisation, <unk> allowed (length_norm=0,
   allow_unk=True), at most 51 decoding steps (the tutorial stops after `step > 50`). The
   tutorial is called under torch.no_grad() (its caption.py calls it with autograd recording,
   which is slower: this only helps it). Figure: ms per image; and how many images get the same
   caption (token ids) from the tutorial's search as from ours: the searches differ in details
   (the tutorial's beam shrinks as hypotheses end; ours keeps k alive and never emits <start>),
   so a few may differ.
3. e2e: image file -> caption at beam 3, per image, encoder included. Tutorial: its
   caption_image_beam_search on the file (its scipy-style reading, resizing and normalisation,
   then the checkpoint's encoder, then its search), one image at a time. Its 256x256 size and
   ImageNet mean/std are set to the checkpoint encoder's own input (patch below), so that both
   sides feed the same encoder the same number of pixels, normalised as it was trained. Ours:
   files.caption_paths (reading, transform, encoder and beam search in batches of --batch-size
   images) and the same with batches of 1. The encoder module (our models.Encoder from the
   checkpoint) is the same for both sides. Figure: ms per image, and identical captions.

Patches applied to the tutorial's source (each replaces an exact substring found exactly once,
else the run stops with an error naming it; the JSON lists the ones applied):
  - caption.py: `import matplotlib.pyplot as plt`, `import matplotlib.cm as cm`,
    `import skimage.transform` removed: only visualize_att uses them, which is not run.
  - caption.py, utils.py: `from scipy.misc import imread, imresize` -> this file's
    scipy_misc_imread / scipy_misc_imresize, the same PIL calls SciPy 1.1 made (scipy.misc lost
    them in SciPy 1.2/1.3).
  - caption.py: `top_k_words / vocab_size` -> `top_k_words // vocab_size`: `/` of integer
    tensors no longer floors since PyTorch 1.5 (it now gives floats, which cannot index); floor
    division is what it computed on the PyTorch it was written for.
  - caption.py, decode figure only: the image reading and encoding lines cut (see 2).
  - caption.py, e2e figure only: `(256, 256)`, `mean=[0.485, 0.456, 0.406]` and
    `std=[0.229, 0.224, 0.225]` set to the checkpoint encoder's size, mean and std (see 3).
models.py runs unpatched. train.py is not executed; its step is transcribed with `.data` (see 1),
listed in the JSON's patches too.
The JSON also lists, in words, the first images whose captions differ between the tutorial and us.
"""
import argparse
import collections
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_train import synthetic_feature_batches  # noqa: E402
from common import environment, peak_rss_mb, report, setup  # noqa: E402

import datasets  # noqa: E402
from captioning.decoders import interface, lstm  # noqa: E402
from captioning.decoding import files, loading, quantize, runtime, search  # noqa: E402

# Defaults of the flags
ROUNDS = 5                      # interleaved rounds; the median over them is reported
IMAGES = os.path.join(os.path.dirname(HERE), 'assets', 'samples')
NUM_IMAGES = 60                 # the folder's images cycled to this many (0: each once)
BATCH_SIZE = 60                 # images per batch for our batched decoding / captioning
TRAIN_BATCH = 32                # captions per training step (the tutorial's batch_size)
TRAIN_STEPS = 3                 # training steps per side per round
THREADS = 0                     # torch threads (0: torch's default)
CHECKPOINT = loading.PROVIDED_CHECKPOINT
FIGURES = ('train', 'decode', 'e2e')

# Fixed settings: the tutorial's train.py (Flickr8k-sized vocabulary) and caption.py
VOCAB_SIZE = 2631               # Flickr8k's word map at min_word_freq 5, as bench_train.py
DIM = 512                       # emb_dim = attention_dim = decoder_dim
DROPOUT, LR, GRAD_CLIP, ALPHA_C = 0.5, 4e-4, 5.0, 1.0
BEAM_SIZE = 3
TUTORIAL_MAX_STEPS = 51         # its loop: step 1, 2, ... and `if step > 50: break` after decoding

Patch = collections.namedtuple('Patch', 'file old new why until', defaults=(None,))
Patch.__doc__ = """Replace `old` (or, with `until`, the text from `old` through the end of `until`)
by `new` in `file`; each of `old` / `until` must occur exactly once."""


class PatchError(RuntimeError):
    pass


def apply_patch(source, patch):
    """-> source with `patch` applied; PatchError when its text is missing or occurs more than once."""
    def find_once(text, start=0):
        n = source.count(text, start)
        if n != 1:
            what = 'not found' if n == 0 else f'found {n} times'
            raise PatchError(f'{patch.file}: {what}: {text!r} (this patch: {patch.why}); is --tutorial-repo '
                             f'a checkout of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning?')
        return source.index(text, start)
    i = find_once(patch.old)
    j = i + len(patch.old)
    if patch.until is not None:
        j = find_once(patch.until, i) + len(patch.until)
    return source[:i] + patch.new + source[j:]


def scipy_misc_imread(name):
    """scipy.misc.imread as SciPy 1.1 had it (default arguments): PIL's decoding as an array, with
    palette images converted to RGB(A) and 1-bit ones to L, as its fromimage did."""
    im = Image.open(name)
    if im.mode == 'P':
        im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
    elif im.mode == '1':
        im = im.convert('L')
    return np.array(im)


def scipy_misc_imresize(arr, size):
    """scipy.misc.imresize(arr, (h, w)) as SciPy 1.1 had it for uint8 images: PIL's bilinear resize
    to (w, h) (other dtypes were byte-scaled first, which the tutorial never needed)."""
    if arr.dtype != np.uint8 or isinstance(size, (int, float)):
        raise ValueError('this stand-in of scipy.misc.imresize takes uint8 images and an (h, w) size')
    return np.array(Image.fromarray(arr).resize((size[1], size[0]), resample=Image.BILINEAR))


SCIPY_MISC = Patch('', 'from scipy.misc import imread, imresize\n',
                   'imread, imresize = _bench_scipy_misc_imread, _bench_scipy_misc_imresize\n',
                   'scipy.misc.imread/imresize were removed in SciPy 1.2/1.3: the same PIL calls (bench_tutorial.py)')
CAPTION_PATCHES = [
    Patch('caption.py', 'import matplotlib.pyplot as plt\nimport matplotlib.cm as cm\nimport skimage.transform\n', '',
          'matplotlib and scikit-image are only used by visualize_att, which is not run'),
    SCIPY_MISC._replace(file='caption.py'),
    Patch('caption.py', 'top_k_words / vocab_size', 'top_k_words // vocab_size',
          'integer / integer no longer floors since PyTorch 1.5 (today it gives floats, which cannot index): '
          'floor division, what it computed on the PyTorch it was written for'),
]
# Not a patch to executed code: train.py is not run (it imports nltk and runs whole epochs with
# printing); train_figure transcribes its step, and this is the one line written differently.
TRAIN_TRANSCRIPTION = Patch('train.py', 'scores, _ = pack_padded_sequence(scores, decode_lengths, batch_first=True)',
                            'scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data',
                            'train figure: train()\'s step transcribed, not executed; unpacking a PackedSequence '
                            'into two fails since PyTorch 1.1 (it has four fields): .data is what it meant '
                            '(the same for targets)')
UTILS_PATCHES = [SCIPY_MISC._replace(file='utils.py')]
DECODE_ONLY = Patch('caption.py', '    # Read image and process\n',
                    '    encoder_out = image_path  # bench_tutorial.py: precomputed features [1, g, g, C]\n',
                    'decode figure only: the image reading and encoding lines cut; the features come in image_path',
                    until='    encoder_out = encoder(image)  # (1, enc_image_size, enc_image_size, encoder_dim)\n')


def input_patches(transform):
    """The e2e figure's: the tutorial's input size and normalisation set to the encoder's own."""
    why = 'e2e figure only: {} set to the checkpoint encoder\'s, as ours feeds it'
    size, mean, std = transform['size'], list(transform['mean']), list(transform['std'])
    return [Patch('caption.py', 'imresize(img, (256, 256))', f'imresize(img, ({size}, {size}))', why.format('input size')),
            Patch('caption.py', 'mean=[0.485, 0.456, 0.406]', f'mean={mean}', why.format('normalisation mean')),
            Patch('caption.py', 'std=[0.229, 0.224, 0.225]', f'std={std}', why.format('normalisation std'))]


def load_tutorial_module(repo, filename, name, patches):
    """Execute the tutorial's `filename` from `repo`, patched, as a new module `name`."""
    path = os.path.join(repo, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: not found; --tutorial-repo must be a checkout of '
                                'sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning')
    with open(path, encoding='utf-8') as f:
        source = f.read()
    for patch in patches:
        source = apply_patch(source, patch)
    module = types.ModuleType(name)
    module.__file__ = path
    module.__dict__.update(_bench_scipy_misc_imread=scipy_misc_imread, _bench_scipy_misc_imresize=scipy_misc_imresize)
    exec(compile(source, path, 'exec'), module.__dict__)
    return module


def patch_record(patches):
    return [{'file': p.file, 'replaced': p.old + (f' ... {p.until}' if p.until else ''), 'with': p.new, 'why': p.why}
            for p in patches]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tutorial-repo', default=os.environ.get('TUTORIAL_REPO', ''),
                   help='checkout of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning (default: $TUTORIAL_REPO)')
    p.add_argument('--rounds', type=int, default=ROUNDS, help='interleaved rounds (default: %(default)s)')
    p.add_argument('--images', default=IMAGES, help='image folder or file (default: the sample photos)')
    p.add_argument('--num-images', type=int, default=NUM_IMAGES,
                   help='images cycled to this many; 0: each once (default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=BATCH_SIZE,
                   help='images per batch for our decoding and captioning (default: %(default)s)')
    p.add_argument('--train-batch', type=int, default=TRAIN_BATCH, help='captions per training step (default: %(default)s)')
    p.add_argument('--train-steps', type=int, default=TRAIN_STEPS,
                   help='training steps per side per round (default: %(default)s)')
    p.add_argument('--threads', type=int, default=THREADS, help='torch threads (0: default)')
    p.add_argument('--checkpoint', default=CHECKPOINT, help='a Show, Attend and Tell checkpoint (default: the shipped one)')
    p.add_argument('--figures', nargs='+', choices=FIGURES, default=list(FIGURES), help='which figures (default: all)')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    quantize.add_argument(p)   # ours only: the tutorial's decoder stays fp32, as its code has it
    p.add_argument('--runtimes', nargs='+', choices=('torch', 'onnx'), default=['torch', 'onnx'],
                   help="ours only: the encoder's engines of the e2e figure, each a side (onnx: onnxruntime on the "
                        "CPU, captioning/decoding/runtime.py; left out without onnxruntime or on a GPU) "
                        '(default: %(default)s)')
    p.add_argument('--onnx-cache', default=None, help='the ONNX encoder cache (default: runtime.cache_dir())')
    return p.parse_args(argv)


def interleaved(sides, rounds, sync):
    """sides: {name: fn}. One untimed call each, then `rounds` rounds, each timing every side once,
    the first side alternating. -> ({name: [seconds per round]}, {name: last output})."""
    outputs = {name: fn() for name, fn in sides.items()}
    sync()
    times = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            outputs[name] = sides[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times, outputs


def train_figure(tut, args, device, sync):
    tut_models, tut_utils = tut['models'], tut['utils']
    torch.manual_seed(0)
    # The tutorial's decoder and optimizer as its train.py builds them (encoder_dim 2048: ResNet101)
    tdec = tut_models.DecoderWithAttention(attention_dim=DIM, embed_dim=DIM, decoder_dim=DIM, vocab_size=VOCAB_SIZE,
                                           dropout=DROPOUT).to(device).train()
    topt = torch.optim.Adam(params=filter(lambda p: p.requires_grad, tdec.parameters()), lr=LR)
    criterion = nn.CrossEntropyLoss().to(device)
    ours = lstm.DecoderWithAttention(DIM, DIM, DIM, VOCAB_SIZE, 2048, DROPOUT, ALPHA_C)
    ours.load_state_dict(tdec.state_dict())                 # the same starting weights
    ours = ours.to(device).train()
    oopt = torch.optim.Adam(ours.parameters(), lr=LR, fused=device.type in ('cpu', 'cuda'))   # as 01_train.py
    batches = synthetic_feature_batches(VOCAB_SIZE, args.train_batch, device)
    tut_batches = [(f, c, n.unsqueeze(1)) for f, c, n in batches]      # its caplens are [B, 1]
    pos = {'tutorial': 0, 'ours': 0}

    def tutorial():
        for _ in range(args.train_steps):
            imgs, caps, caplens = tut_batches[pos['tutorial'] % len(batches)]
            pos['tutorial'] += 1
            # train.py's train(), the decoder's part of one batch (see the docstring: .data)
            scores, caps_sorted, decode_lengths, alphas, sort_ind = tdec(imgs, caps, caplens)
            targets = caps_sorted[:, 1:]
            scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
            targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
            loss = criterion(scores, targets)
            loss += ALPHA_C * ((1. - alphas.sum(dim=1)) ** 2).mean()
            topt.zero_grad()
            loss.backward()
            tut_utils.clip_gradient(topt, GRAD_CLIP)
            topt.step()

    def our_steps():
        for _ in range(args.train_steps):
            feats, caps, lengths = batches[pos['ours'] % len(batches)]
            pos['ours'] += 1
            loss = interface.caption_loss(ours(feats, caps, lengths))
            oopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(ours.parameters(), GRAD_CLIP)
            oopt.step()

    times, _ = interleaved({'tutorial': tutorial, 'ours': our_steps}, args.rounds, sync)
    n = args.train_steps * args.train_batch
    rates = {k: [n / s for s in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {'tutorial_captions_per_s': round(med['tutorial'], 2), 'ours_captions_per_s': round(med['ours'], 2),
            'ours_over_tutorial': round(med['ours'] / med['tutorial'], 2),
            'rounds_captions_per_s': {k: [round(r, 2) for r in v] for k, v in rates.items()},
            'captions_per_round': n, 'vocab_size': VOCAB_SIZE, 'features': '14x14x2048', 'dims': DIM}


def tutorial_caption_tokens(seq, word_map):
    """The tutorial's sequence (<start> ... <end>) -> word ids as ours gives them (without both)."""
    if seq and seq[0] == word_map['<start>']:
        seq = seq[1:]
    if seq and seq[-1] == word_map['<end>']:
        seq = seq[:-1]
    return seq


def run_tutorial_search(fn, encoder, decoder, image, word_map, what):
    try:
        seq, _ = fn(encoder, decoder, image, word_map, BEAM_SIZE)
    except ValueError as e:             # max() of no finished caption: its caption.py fails the same way
        raise RuntimeError(f'the tutorial\'s search finished no caption within {TUTORIAL_MAX_STEPS} steps for {what}'
                           f' ({e})') from e
    return tutorial_caption_tokens(seq, word_map)


def same_count(a, b):
    return sum(x == y for x, y in zip(a, b))


def differences(paths, tutorial, ours, word_map, limit=10):
    """The first `limit` images whose captions differ, in words (so a reader can judge how)."""
    rev = {v: k for k, v in word_map.items()}
    seen, out = set(), []
    for p, t, o in zip(paths, tutorial, ours):
        if t != o and p not in seen and len(out) < limit:
            seen.add(p)
            out.append({'image': os.path.basename(p), 'tutorial': ' '.join(rev[i] for i in t),
                        'ours': ' '.join(rev[i] for i in o)})
    return out


def ms_per_image(times, n):
    return {k: [s / n * 1000 for s in v] for k, v in times.items()}


def summarise_ms(ms, n, sides):
    med = {k: statistics.median(v) for k, v in ms.items()}
    out = {f'{k}_ms_per_image': round(med[k], 2) for k in sides}
    out.update({f'tutorial_over_{k}': round(med['tutorial'] / med[k], 2) for k in sides if k != 'tutorial'})
    out['rounds_ms_per_image'] = {k: [round(x, 2) for x in v] for k, v in ms.items()}
    out['images'] = n
    return out


def decode_figure(tut, model, paths, args, device, sync):
    encoder, decoder, word_map = model[:3]
    transform = datasets.ImageTransform(**encoder.transform_config())
    with torch.no_grad():                                   # computed once, shared by every side
        images = torch.stack([transform(datasets.load_image(p, transform.size)) for p in paths])
        feats = torch.cat([encoder(images[i:i + args.batch_size].to(device))
                           for i in range(0, len(paths), args.batch_size)]).contiguous()
    tutorial_search = tut['caption_decode'].caption_image_beam_search
    tdec = tut['decoder']
    beam_kw = dict(beam_size=BEAM_SIZE, max_len=TUTORIAL_MAX_STEPS, length_norm=0.0, allow_unk=True)

    def tutorial():
        with torch.no_grad():
            return [run_tutorial_search(tutorial_search, None, tdec, feats[i:i + 1], word_map, paths[i]) for i in range(len(paths))]

    def ours_batched():
        return [h['tokens'] for i in range(0, len(paths), args.batch_size)
                for h in search.beam_search(decoder, feats[i:i + args.batch_size], word_map, **beam_kw)]

    def ours_batch1():
        return [search.beam_search(decoder, feats[i:i + 1], word_map, **beam_kw)[0]['tokens']
                for i in range(len(paths))]

    sides = {'tutorial': tutorial, 'ours_batched': ours_batched, 'ours_batch1': ours_batch1}
    times, outs = interleaved(sides, args.rounds, sync)
    out = summarise_ms(ms_per_image(times, len(paths)), len(paths), sides)
    out.update({'identical_tutorial_vs_ours': same_count(outs['tutorial'], outs['ours_batched']),
                'identical_ours_batch1_vs_batched': same_count(outs['ours_batch1'], outs['ours_batched']),
                'different_captions': differences(paths, outs['tutorial'], outs['ours_batched'], word_map),
                'beam_size': BEAM_SIZE, 'batch_size': args.batch_size, 'max_steps': TUTORIAL_MAX_STEPS})
    return out


def e2e_figure(tut, model, paths, args, device, sync):
    encoder, decoder, word_map, onnx_encoder = model
    search = tut['caption_e2e'].caption_image_beam_search
    tdec = tut['decoder']
    kw = dict(beam_sizes=(BEAM_SIZE,), workers=0, device=device, progress=False, max_len=TUTORIAL_MAX_STEPS,
              length_norm=0.0, allow_unk=True)

    def tutorial():
        with torch.no_grad():
            return [run_tutorial_search(search, encoder, tdec, p, word_map, p) for p in paths]

    def ours(batch_size, enc=encoder):
        def run():
            results, failures = files.caption_paths(enc, decoder, word_map, paths, batch_size=batch_size, **kw)
            if failures:
                raise RuntimeError(f'could not read: {failures}')
            return [r[BEAM_SIZE]['tokens'] for r in results]
        return run

    sides = {'tutorial': tutorial, 'ours_batched': ours(args.batch_size), 'ours_batch1': ours(1)}
    if onnx_encoder is not None:    # the encoder in onnxruntime (--runtimes onnx): two more sides, same decoder
        sides.update({'ours_onnx_batched': ours(args.batch_size, onnx_encoder), 'ours_onnx_batch1': ours(1, onnx_encoder)})
    times, outs = interleaved(sides, args.rounds, sync)
    out = summarise_ms(ms_per_image(times, len(paths)), len(paths), sides)
    if onnx_encoder is not None:
        out['identical_onnx_vs_torch'] = same_count(outs['ours_onnx_batched'], outs['ours_batched'])
    out.update({'identical_tutorial_vs_ours': same_count(outs['tutorial'], outs['ours_batched']),
                'different_captions': differences(paths, outs['tutorial'], outs['ours_batched'], word_map),
                'beam_size': BEAM_SIZE, 'batch_size': args.batch_size, 'image_size': encoder.image_size})
    return out


def load_tutorial(repo, transform, need_captioning):
    """-> ({'models', 'utils', 'caption_decode', 'caption_e2e'}, patches applied)."""
    tut, applied = {}, []
    tut['models'] = load_tutorial_module(repo, 'models.py', 'tutorial_models', [])
    tut['utils'] = load_tutorial_module(repo, 'utils.py', 'tutorial_utils', UTILS_PATCHES)
    applied += UTILS_PATCHES
    if need_captioning:
        tut['caption_decode'] = load_tutorial_module(repo, 'caption.py', 'tutorial_caption_decode',
                                                     CAPTION_PATCHES + [DECODE_ONLY])
        e2e = input_patches(transform)
        tut['caption_e2e'] = load_tutorial_module(repo, 'caption.py', 'tutorial_caption', CAPTION_PATCHES + e2e)
        applied += CAPTION_PATCHES + [DECODE_ONLY] + e2e
    return tut, applied


def table(result):
    rows = []
    f = result['figures']
    if 'train' in f:
        t = f['train']
        rows.append(('train, captions/s (higher is better)', t['tutorial_captions_per_s'], t['ours_captions_per_s'], '',
                     f"{t['ours_over_tutorial']}x"))
    for key, label in (('decode', f'beam-{BEAM_SIZE} decode, ms/image'), ('e2e', f'file -> caption beam {BEAM_SIZE}, ms/image')):
        if key in f:
            d = f[key]
            rows.append((label, d['tutorial_ms_per_image'], d['ours_batched_ms_per_image'], d['ours_batch1_ms_per_image'],
                         f"{d['tutorial_over_ours_batched']}x ({d['tutorial_over_ours_batch1']}x batch 1); "
                         f"same caption {d['identical_tutorial_vs_ours']}/{d['images']}"))
            if 'ours_onnx_batched_ms_per_image' in d:
                rows.append((label + ', encoder in onnxruntime', d['tutorial_ms_per_image'],
                             d['ours_onnx_batched_ms_per_image'], d['ours_onnx_batch1_ms_per_image'],
                             f"{d['tutorial_over_ours_onnx_batched']}x ({d['tutorial_over_ours_onnx_batch1']}x batch 1); "
                             f"same caption as torch {d['identical_onnx_vs_torch']}/{d['images']}"))
    head = ('figure (median of rounds)', 'tutorial', f"ours (batch {result['batch_size']})", 'ours (batch 1)', 'ours vs tutorial')
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not args.tutorial_repo:
        print('error: give --tutorial-repo PATH (or set TUTORIAL_REPO): a checkout of '
              'https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning', file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    device = setup('auto', args.threads)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    need_captioning = bool({'decode', 'e2e'} & set(args.figures))
    model, transform = None, None
    if need_captioning:
        encoder, decoder, word_map, _ = loading.load_captioner(args.checkpoint, device)
        if not (isinstance(decoder, lstm.ShowAttendTell) and isinstance(decoder.attention, lstm.Attention)):
            print('error: the tutorial runs Show, Attend and Tell with additive attention: --checkpoint must hold '
                  'a sat decoder', file=sys.stderr)
            return 2
        transform = encoder.transform_config()
        if transform.get('crop'):
            print('error: the tutorial resizes without cropping; this encoder crops', file=sys.stderr)
            return 2
        if len(word_map) != decoder.vocab_size:     # the tutorial's search takes len(word_map) as vocabulary
            print('error: the word map and the decoder disagree on the vocabulary size', file=sys.stderr)
            return 2
        model = (encoder, decoder, word_map)
    try:
        tut, applied = load_tutorial(args.tutorial_repo, transform, need_captioning)
        applied += [TRAIN_TRANSCRIPTION] if 'train' in args.figures else []
    except (PatchError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if tut['models'].device.type != device.type:    # its modules move tensors to their own device
        print(f"error: the tutorial runs on {tut['models'].device}, ours on {device}", file=sys.stderr)
        return 2
    if need_captioning:
        cfg = decoder.cfg
        tdec = tut['models'].DecoderWithAttention(attention_dim=cfg.attention_dim, embed_dim=cfg.emb_dim,
                                                  decoder_dim=cfg.decoder_dim, vocab_size=cfg.vocab_size,
                                                  encoder_dim=cfg.encoder_dim, dropout=cfg.dropout)
        tdec.load_state_dict(decoder.state_dict())           # the checkpoint's weights in the tutorial's class
        tut['decoder'] = tdec.to(device).eval()
        decoder, precision = quantize.apply_precision_or_exit(decoder, args.precision, device)   # after the copy above
        onnx_encoder = None
        if 'onnx' in args.runtimes and 'e2e' in args.figures and runtime.resolve('auto', device) == 'onnx':
            onnx_encoder = runtime.onnx_encoder(encoder, args.checkpoint, args.onnx_cache)
        model = (encoder, decoder, word_map, onnx_encoder)
        found = datasets.list_images(args.images)
        if not found:
            print(f'error: no images in {args.images}', file=sys.stderr)
            return 2
        paths = [found[i % len(found)] for i in range(args.num_images)] if args.num_images else found

    figures, seconds = {}, {}
    for name in args.figures:
        start = time.perf_counter()
        if name == 'train':
            figures[name] = train_figure(tut, args, device, sync)
        else:
            figures[name] = (decode_figure if name == 'decode' else e2e_figure)(tut, model, paths, args, device, sync)
        seconds[name] = round(time.perf_counter() - start, 1)

    result = {'benchmark': 'tutorial', 'tutorial_repo': os.path.abspath(args.tutorial_repo),
              'checkpoint': os.path.basename(args.checkpoint) if need_captioning else None,
              'precision': precision if need_captioning else None,
              'images': os.path.abspath(args.images) if need_captioning else None,
              'rounds': args.rounds, 'batch_size': args.batch_size, 'train_batch': args.train_batch,
              'train_steps_per_round': args.train_steps, 'figures': figures, 'seconds_per_figure': seconds,
              'patches': patch_record(applied), 'load_average_start': [round(x, 2) for x in load_start],
              'load_average_end': [round(x, 2) for x in os.getloadavg()], 'peak_rss_mb': peak_rss_mb(),
              **environment(device)}
    if args.json:
        report(result, True)
    else:
        print(table(result))
        print()
        report({k: v for k, v in result.items() if k not in ('figures', 'patches')}, False)
        for key in ('decode', 'e2e'):
            for d in result['figures'].get(key, {}).get('different_captions', []):
                print(f"{key + ' differs':>24}: {d['image']}: tutorial '{d['tutorial']}' / ours '{d['ours']}'")
        print(f"{'patches':>24}: " + '; '.join(f"{p['file']}: {p['why']}" for p in result['patches']))
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Decoding precision: int8 dynamic quantization of a loaded decoder on CPU (`--precision` of 02, 03,
04 and the benchmarks).

At batch 1 the decoder reads all of its weights at every step for 3 rows of arithmetic, so its time
is the time to read ~25 MB of fp32 weights; int8 weights are a quarter of that. PyTorch's dynamic
quantization (torch.ao.quantization.quantize_dynamic) stores the weights of the decoder's Linear,
LSTMCell and LSTM layers as int8 (one scale per weight tensor) and quantizes their inputs on the fly;
everything else (embeddings, attention softmax, beam search) stays fp32, so outputs (tokens, scores,
attention maps) have the same structure. The encoder is untouched.

    --precision fp32   the weights as loaded (exactly today's captions)
    --precision int8   quantize the decoder once at load (each member of an ensemble); CPU only
    --precision auto   int8 on CPU for the decoders in INT8_AUTO (measured), fp32 otherwise and on GPUs
"""
import hashlib
import warnings

import torch
from torch import nn

PRECISIONS = ('auto', 'fp32', 'int8')

# The trained decoders that `auto` quantizes on CPU, by fingerprint (below): those whose int8 captions
# scored no more than 0.003 below fp32 in BLEU-4 and in CIDEr on Flickr8k VAL (1,000 images, beam 3,
# the shipped decoding, COCO toolkit, batch 32; 03_evaluate.py --split VAL --beam-sizes 3 --precision
# fp32 / int8, 2026-12-03; the table is in checkpoints/README.md, "int8 decoding on the CPU"). Gains
# count as within: the Lite2 model's and the pair's CIDEr rose by 0.0032. An ensemble is int8 under
# `auto` when every member is here (the default pair was measured as a pair too: BLEU-4 0.2401 ->
# 0.2406, CIDEr 0.6086 -> 0.6118). Not here, so fp32 under `auto`: flickr8k_efficientnet_lite0_xe_fp16.pt
# (CIDEr 0.5359 -> 0.5319, 0.0040 lower), and every decoder not measured (your own checkpoints: measure
# them the same way and pass --precision int8, or add their fingerprint here).
INT8_AUTO = {
    'cb34998c59ebb7ed': 'flickr8k_efficientnet_lite0_fp16.pt: BLEU-4 0.2267 -> 0.2257, CIDEr 0.5651 -> 0.5642',
    '8173e196cc237f45': 'flickr8k_efficientnet_lite2_fp16.pt: BLEU-4 0.2267 -> 0.2266, CIDEr 0.5773 -> 0.5805',
    # Flickr8k-CN VAL the same way (jieba words; 2026-12-04, one thread); their pair, the Chinese
    # default: BLEU-4 0.2928 -> 0.2927, CIDEr 0.9290 -> 0.9263.
    'e30e7dd96b238129': 'flickr8k_cn_efficientnet_lite0_fp16.pt: BLEU-4 0.2680 -> 0.2674, CIDEr 0.8794 -> 0.8789',
    'ba40c697c5813b9d': 'flickr8k_cn_efficientnet_lite2_fp16.pt: BLEU-4 0.2839 -> 0.2843, CIDEr 0.8839 -> 0.8837',
}

QUANTIZED_LAYERS = {nn.Linear, nn.LSTMCell, nn.LSTM}


def add_argument(parser, default='auto'):
    """The --precision flag, as every script and benchmark spells it."""
    parser.add_argument('--precision', choices=PRECISIONS, default=default,
                        help='decoder weights: fp32, int8 (dynamic quantization, CPU only) or auto (int8 on CPU '
                             'for the provided decoders measured to keep their VAL scores, fp32 otherwise) '
                             '(default: %(default)s)')


def members(decoder):
    """The decoders inside: an ensemble's members, or the decoder itself."""
    inner = getattr(decoder, 'members', None)
    return list(inner) if isinstance(inner, nn.ModuleList) else [decoder]


def fingerprint(decoder):
    """A short digest that tells trained decoders apart: their class, and the shape and first 16 values
    of every entry of their fp32 state_dict (cheap: no pass over all the weights)."""
    digest = hashlib.sha256(type(decoder).__name__.encode())
    for key, value in decoder.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            digest.update(f'{key}{tuple(value.shape)}'.encode())
            digest.update(value.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve(precision, decoder, device):
    """-> 'fp32' or 'int8': what `precision` means for this decoder on this device.
    ValueError (one line) for int8 on a GPU or an unknown precision."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == 'int8' and device.type != 'cpu':
        raise ValueError(f'--precision int8: dynamic int8 quantization runs on the CPU only, and the model is on '
                         f'{device}; use --precision fp32 (or auto), or --device cpu')
    if precision == 'auto':
        ok = device.type == 'cpu' and all(fingerprint(d) in INT8_AUTO for d in members(decoder))
        return 'int8' if ok else 'fp32'
    return precision


def quantize_decoder(decoder):
    """The decoder with its Linear / LSTMCell / LSTM layers replaced by dynamically quantized int8
    ones, in place (an ensemble's members are all inside it, so each is quantized). Returns it."""
    quantize_dynamic = getattr(getattr(torch.ao, 'quantization', None), 'quantize_dynamic', None)
    if quantize_dynamic is None or torch.backends.quantized.engine == 'none':
        raise RuntimeError(f'--precision int8: this PyTorch ({torch.__version__}) has no dynamic quantization '
                           '(torch.ao.quantization with a quantized engine); use --precision fp32')
    decoder.eval()
    with warnings.catch_warnings():   # torch.ao.quantization announces its move to torchao; it works as is here
        warnings.filterwarnings('ignore', message='.*quantiz.*deprecated', category=UserWarning)
        warnings.filterwarnings('ignore', message='.*torch.ao.quantization is deprecated', category=DeprecationWarning)
        decoder = quantize_dynamic(decoder, QUANTIZED_LAYERS, dtype=torch.qint8, inplace=True)
    # Activations are quantized with one scale per call, over every row: searched together, images
    # can shift each other's captions. The server searches one image at a time (caption.search_images).
    decoder.per_image_search = True
    return decoder


def apply_precision(decoder, precision, device):
    """-> (decoder, 'fp32' or 'int8'): `decoder` quantized when `precision` resolves to int8 (once,
    at load), else as it is."""
    used = resolve(precision, decoder, device)
    if used == 'int8':
        decoder = quantize_decoder(decoder)
    return decoder, used


def is_quantized(decoder):
    """Whether any layer of the decoder holds int8 weights."""
    return any(type(m).__module__.startswith('torch.ao.nn.quantized') for m in decoder.modules())


def apply_precision_or_exit(decoder, precision, device):
    """apply_precision for the benchmarks: a precision that cannot apply ends the run with one line."""
    try:
        return apply_precision(decoder, precision, device)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f'error: {e}') from None

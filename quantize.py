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
    --precision auto   int8 on CPU for the decoder kinds in INT8_AUTO (measured), fp32 otherwise and on GPUs
"""
import warnings

import torch
from torch import nn

PRECISIONS = ('auto', 'fp32', 'int8')

# Decoder kinds (decoders.DECODERS names) that `auto` quantizes on CPU: those whose int8 captions
# scored within 0.003 BLEU-4 and CIDEr of fp32 on Flickr8k VAL (beam 3, default decoding, COCO
# toolkit; 03_evaluate.py --split VAL --beam-sizes 3 --precision fp32 / int8; checkpoints/README.md,
# "int8 decoding"). A kind that is not here has not been measured, and stays fp32 under `auto`.
INT8_AUTO = {
    # sat (Show, Attend and Tell, additive attention): FILL measured figures
    'sat',
}

QUANTIZED_LAYERS = {nn.Linear, nn.LSTMCell, nn.LSTM}


def add_argument(parser, default='auto'):
    """The --precision flag, as every script and benchmark spells it."""
    parser.add_argument('--precision', choices=PRECISIONS, default=default,
                        help='decoder weights: fp32, int8 (dynamic quantization, CPU only) or auto (int8 on CPU '
                             'for the decoder kinds measured to keep their VAL scores, fp32 otherwise) '
                             '(default: %(default)s)')


def decoder_kinds(decoder):
    """The registry names of a decoder's kind, one per member for an ensemble (None for a class that
    is not in decoders.DECODERS)."""
    import decoders
    members = getattr(decoder, 'members', None)
    parts = list(members) if isinstance(members, nn.ModuleList) else [decoder]
    names = {cls: name for name, cls in decoders.DECODERS.items()}
    return [names.get(type(d)) for d in parts]


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
        ok = device.type == 'cpu' and all(kind in INT8_AUTO for kind in decoder_kinds(decoder))
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

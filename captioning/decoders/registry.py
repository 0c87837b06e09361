"""The registry of every decoder, DECODERS: the one place that imports every decoder module."""
import dataclasses

from captioning.decoders import clipcap, transformer_decoder
from captioning.decoders.lstm import DotAttentionDecoder, RepeatBiLSTM, ShowAttendTell, ShowTell

# ----------------------------------------------------------------------------------------------
# Registry

DECODERS = {
    'sat': ShowAttendTell,                 # Show, Attend and Tell, additive attention (the default)
    'dot_attention': DotAttentionDecoder,  # seed 001: scaled dot-product attention
    'show_tell': ShowTell,                 # seed 002: no attention, image as the first LSTM input
    'repeat_bilstm': RepeatBiLSTM,         # seed 004: non-autoregressive baseline
    'transformer': transformer_decoder.TransformerDecoder,  # pre-norm Transformer over the grid (2019-)
    'clipcap': clipcap.ClipCap,            # seed 003: an image prefix for GPT-2 (clipcap.py; transformers
}                                          # is imported only when one is built)


def decoder_fields(name):
    return [f.name for f in dataclasses.fields(decoder_class(name).Config)]


def decoder_class(name):
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[name]


def build_decoder(name, vocab_size, encoder_dim, **overrides):
    """A new decoder: its Config's defaults, with the overrides that are not None (flags left unset
    are None). An override the decoder does not have is an error, not silently ignored."""
    cls = decoder_class(name)
    fields = decoder_fields(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"decoder {name} has no setting {', '.join(unknown)} (its settings: "
                         f"{', '.join(f for f in fields if f not in ('vocab_size', 'encoder_dim'))})")
    return cls(cls.Config(vocab_size=vocab_size, encoder_dim=encoder_dim, **given))


def decoder_from_args(name, args):
    """The decoder a checkpoint describes (config['decoder'], config['decoder_args'])."""
    cls = decoder_class(name)
    return cls(cls.Config(**args))

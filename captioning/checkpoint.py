"""The checkpoint format and its files: what a checkpoint holds, saving and loading (with a one-line
reason for a file that is not one), the migration of older files, export to a small inference
file, and rebuilding the models from one.

A checkpoint is a plain dict of tensors and primitives (torch.load(weights_only=True) reads it;
save_checkpoint / load_checkpoint below do the file I/O). Format 2:

    format        2
    config        the run's settings, including
                    decoder       a name in decoders.DECODERS
                    decoder_args  that decoder's Config as a dict (sizes, vocab_size, encoder_dim)
                    encoder, encoder_weights, image_size, encoded_image_size
    word_map      word -> id
    decoder       decoder state_dict (decoder_ema: its moving average, when training kept one); a
                  ClipCap with a frozen pretrained GPT-2 leaves the LM out and keeps the SHA-256
                  of its weights ('lm_digest'), checked when the LM is rebuilt from its name
    encoder       encoder state_dict, or None with encoder_delta (the entries that differ from the
                  encoder's named pretrained weights: ImageNet, or a CLIP folder or hub name) and
                  encoder_digest (exported files)
    ...           training state: optimizer, scheduler, rng, epoch, step, best_score, val_metrics

Format 1 (the first release, one decoder) had no decoder/decoder_args: `migrate` adds them, so
its files (checkpoints/flickr8k_efficientnet_lite0_xe_fp16.pt among them) load unchanged. The
original ClipCap's state_dicts are converted by clipcap.convert_clipcap_state (tools/convert_clipcap.py
writes a checkpoint from one).
"""
import hashlib
import json
import os
import re
import warnings

import torch

import utils
from models import ENCODERS, build_models, named_weights
from utils import atomic_path, format_size

FORMAT = 2


def migrate(ckpt, path='checkpoint'):
    """A checkpoint dict of any known format -> format 2 (a new dict; the input is not changed)."""
    fmt = ckpt.get('format', 1)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ValueError(f'{path}: checkpoint format {fmt!r} is newer than this code understands ({FORMAT}): '
                         'update the suite')
    if fmt >= 2:
        return ckpt
    config = dict(ckpt['config'])
    try:
        config['decoder'] = 'sat'
        config['decoder_args'] = {
            'vocab_size': len(ckpt['word_map']), 'encoder_dim': ENCODERS[config['encoder']].dim,
            'emb_dim': config['emb_dim'], 'attention_dim': config['attention_dim'],
            'decoder_dim': config['decoder_dim'], 'dropout': config['dropout'],
            'alpha_c': config.get('alpha_c', 1.0), 'attention': 'additive'}
    except KeyError as e:
        raise ValueError(f'{path}: a format-1 checkpoint without config field {e}') from None
    return {**ckpt, 'config': config, 'format': FORMAT}


def load(path, map_location='cpu'):
    """Read a checkpoint file (no code runs: weights_only) and bring it to the current format."""
    return migrate(load_checkpoint(path, map_location), path)


def restore_encoder(encoder, ckpt):
    """Load a checkpoint's encoder weights into `encoder` (built from the checkpoint's config).

    Training checkpoints hold the whole encoder (build it with weights 'none'). Exported ones
    (tools/export_checkpoint.py) may hold only 'encoder_delta', the entries that differ from the
    encoder's named pretrained weights (build it with those): the delta is applied and the result
    checked against the stored 'encoder_digest'."""
    full = ckpt.get('encoder') is not None
    state = ckpt['encoder'] if full else ckpt.get('encoder_delta', {})
    unknown = set(state) - set(encoder.state_dict())
    if unknown:
        raise ValueError(f'checkpoint encoder entries unknown to {encoder.name}: {sorted(unknown)[:3]}')
    encoder.load_state_dict(utils.float_state_dict(state), strict=full)
    if not full and ckpt.get('encoder_digest'):
        if utils.state_dict_digest(encoder) != ckpt['encoder_digest']:
            raise ValueError(f'the {encoder.name} weights installed here differ from those this checkpoint was '
                             'trained with (encoder digest mismatch): install the pinned requirements-extras.txt')
    return encoder


def encoder_weights_for(ckpt):
    """The weights to build a checkpoint's encoder with before restore_encoder."""
    return 'none' if ckpt.get('encoder') is not None else ckpt['config']['encoder_weights']


def selected_decoder_state(ckpt):
    """The decoder weights a checkpoint was selected with: the moving average when training kept one."""
    return ckpt.get('decoder_ema') or ckpt['decoder']


def models_from_checkpoint(ckpt, device='cpu'):
    """(encoder, decoder) in eval mode, fp32, on `device`, from a checkpoint dict (any format); the
    decoder's moving average when training kept one."""
    ckpt = migrate(ckpt)
    encoder, decoder = build_models(ckpt['config'], len(ckpt['word_map']), encoder_weights_for(ckpt))
    restore_encoder(encoder, ckpt)
    decoder.load_state_dict(utils.float_state_dict(selected_decoder_state(ckpt)))
    return encoder.to(device).eval(), decoder.to(device).eval()


RUN_PATHS = ('data_folder', 'out_dir', 'resume', 'init_from')   # config fields naming the run's own files


def export(ckpt, fp16=True):
    """A small inference checkpoint from a training checkpoint dict: no optimizer or RNG state,
    floating weights in fp16, and only the encoder entries that differ from its named pretrained
    weights (with a digest to check them on load). The encoder is kept whole when its weights were
    random or a local state_dict file."""
    ckpt = migrate(ckpt)
    # where the run's files were on its machine: only the names travel (no absolute paths ship)
    config = {k: os.path.basename(v) if k in RUN_PATHS and isinstance(v, str) and os.path.isabs(v) else v
              for k, v in ckpt['config'].items()}
    cast = utils.half_state_dict if fp16 else dict
    out = {'format': FORMAT, 'config': config, 'word_map': ckpt['word_map'],
           'decoder': cast(selected_decoder_state(ckpt)), 'epoch': ckpt.get('epoch'),
           'best_score': ckpt.get('best_score'),
           # numbers only: sample captions quote the dataset's references, which must not ship
           'val_metrics': {k: v for k, v in (ckpt.get('val_metrics') or {}).items() if k != 'samples'}}
    if ckpt.get('endings'):   # word counts only (how often each word ends a TRAIN reference): no captions
        out['endings'] = ckpt['endings']
    if not named_weights(config['encoder'], config['encoder_weights']):
        out['encoder'] = cast(ckpt['encoder'])
        return out
    encoder = build_models(config, len(ckpt['word_map']))[0]        # the named pretrained weights
    reference = encoder.state_dict()
    delta = cast({k: v for k, v in ckpt['encoder'].items() if not torch.equal(v.float(), reference[k].float())})
    encoder.load_state_dict(utils.float_state_dict(delta), strict=False)
    out.update(encoder=None, encoder_delta=delta, encoder_digest=utils.state_dict_digest(encoder))
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and primitives, loadable with torch.load(weights_only=True).

def save_checkpoint(path, state):
    with atomic_path(path) as tmp:
        try:
            with open(tmp, 'wb') as f:   # a Python file: torch's writer then keeps the OSError of a failed write
                torch.save(state, f)
        except RuntimeError as e:        # torch reports a full disk as 'unexpected pos': give the real cause
            cause = e.__context__
            if isinstance(cause, OSError) and cause.errno:
                raise OSError(cause.errno, cause.strerror, path) from None
            raise


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint written by `save_checkpoint` (no pickled code: weights_only=True).

    Anything else (empty, truncated, text, pickled objects) raises ValueError with one line that
    names the file and says what it is."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        with warnings.catch_warnings():   # torch warns about pickle protocols of hostile files
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f'{path}: {_checkpoint_problem(path, e)}') from None
    if not isinstance(ckpt, dict) or 'decoder' not in ckpt or 'config' not in ckpt:
        raise ValueError(f'{path}: not a checkpoint of this suite (expected keys "config" and "decoder")')
    return ckpt


def _checkpoint_problem(path, error):
    """Why torch.load failed on `path`, in words (one line, no terminal control codes)."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(4)
    message = utils.without_control(error)
    if size == 0:
        return 'empty file (0 bytes): not a checkpoint; was its writing interrupted?'
    refused = re.search(r'GLOBAL ([\w.]+)', message)
    if refused:   # a pickle that names classes/functions: code would run to rebuild them
        name = refused.group(1)
        hint = (" This looks like a tutorial .pth.tar (those pickle whole modules): convert it without running "
                "its code with tools/convert_tutorial.py CKPT WORDMAP.json OUT.pt (or give 02/03/04 --word-map "
                "WORDMAP.json)." if re.search(r'DecoderWithAttention|Encoder|models\.', name) else '')
        return f'refused: it pickles {name}, and only tensors and plain data are loaded (no code runs).{hint}'
    if head.startswith(b'PK'):
        return (f'truncated or damaged checkpoint ({format_size(size)}; its zip archive is incomplete): '
                'was its writing interrupted? Use another checkpoint')
    if head[:1] == b'\x80':
        return f'truncated, damaged or not a tensor checkpoint ({format_size(size)} pickle that torch cannot read)'
    return f'not a checkpoint file ({format_size(size)} of text or another format)'


# ----------------------------------------------------------------------------------------------
# Ending statistics: which words a checkpoint's captions should not end on (--bad-endings)

ENDINGS_SUFFIX = '.endings.json'   # a checkpoint folder's ending statistics (tools/write_endings.py)


def word_map_digest(word_map):
    """sha1 of a word map (its words and ids, sorted): which ending statistics fit which checkpoints."""
    return hashlib.sha1(json.dumps(sorted(word_map.items())).encode()).hexdigest()


def endings(ckpt, path):
    """-> {word: [references it ends, occurrences]} over the TRAIN references the checkpoint learned
    from, or None: its own `endings` entry (01_train.py writes it), else a `*.endings.json` file in
    its folder made for the same word map (tools/write_endings.py; the provided checkpoints' is
    checkpoints/flickr8k.endings.json). Files that do not parse or fit are passed over."""
    if ckpt.get('endings'):
        return ckpt['endings']
    return word_map_file(os.path.dirname(os.path.abspath(path)), ENDINGS_SUFFIX, ckpt['word_map'], 'counts')


def word_map_file(folder, suffix, word_map, field):
    """The dict `field` of the first `*suffix` JSON file in `folder` (name order) made for `word_map`
    (its 'word_map_sha1'), or None. Files that do not parse or fit are passed over: what sits beside
    checkpoints for their word map (ending statistics, tag words)."""
    digest = word_map_digest(word_map)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if not name.endswith(suffix):
            continue
        try:
            with open(os.path.join(folder, name), encoding='utf-8') as f:
                found = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and found.get('word_map_sha1') == digest and isinstance(found.get(field), dict):
            return found[field]
    return None

"""The checkpoint format: what a checkpoint holds, the migration of older files, export to a small
inference file, and rebuilding the models from one.

A checkpoint is a plain dict of tensors and primitives (torch.load(weights_only=True) reads it;
utils.save_checkpoint / utils.load_checkpoint do the file I/O). Format 2:

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
original ClipCap's state_dicts are converted by `convert_clipcap_state` (tools/convert_clipcap.py
writes a checkpoint from one).
"""
import os

import torch

import utils
from models import ENCODERS, build_models, named_weights

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
    return migrate(utils.load_checkpoint(path, map_location), path)


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
# The original ClipCap's checkpoints (github rmokady/CLIP_prefix_caption): plain state_dicts of its
# ClipCaptionModel / ClipCaptionPrefix, with 'gpt.*' (GPT2LMHeadModel, as clipcap.ClipCap's) and
# 'clip_project.*' (its MLP, or its TransformerMapper).

# its transformer mapper's layer names -> nn.TransformerEncoderLayer's (queries/keys/values apart)
_MAPPER_LAYER_NAMES = {'norm1': 'norm1', 'norm2': 'norm2', 'attn.project': 'self_attn.out_proj',
                       'mlp.fc1': 'linear1', 'mlp.fc2': 'linear2'}


def is_old_gpt2_buffer(key):
    """The causal-mask buffers older transformers saved in GPT-2 state_dicts ('...attn.bias' and
    '...attn.masked_bias'; not the parameters 'attn.c_attn.bias' / 'attn.c_proj.bias'), which newer
    GPT2LMHeadModels lack and reject."""
    return key.endswith(('.attn.bias', '.attn.masked_bias'))


def convert_clipcap_state(state):
    """An original ClipCap state_dict -> (clipcap.ClipCap state_dict without 'lm_digest', the settings
    it implies: mapping, prefix_length and, for the transformer, clip_length and mapping_layers).

    The GPT-2 mask buffers are dropped; 'clip_project.*' becomes 'mapping.*': the MLP keeps its
    names, the transformer mapper's layers take nn.TransformerEncoderLayer's, its separate query and
    key/value projections joined into one (biases zero where it had none). ValueError names a key
    it does not know."""
    out, layers = {}, {}
    for key, value in state.items():
        if key.startswith('gpt.'):
            if not is_old_gpt2_buffer(key):
                out[key] = value
        elif key.startswith('clip_project.model.') or key in ('clip_project.linear.weight', 'clip_project.linear.bias',
                                                               'clip_project.prefix_const'):
            out['mapping.' + key[len('clip_project.'):]] = value
        elif key.startswith('clip_project.transformer.layers.'):
            n, rest = key[len('clip_project.transformer.layers.'):].split('.', 1)
            layers.setdefault(int(n), {})[rest] = value
        else:
            raise ValueError(f'not a ClipCap state_dict this converter knows: unexpected key {key!r}')
    if 'gpt.transformer.wte.weight' not in out:
        raise ValueError("not a ClipCap state_dict: no 'gpt.transformer.wte.weight'")
    E = out['gpt.transformer.wte.weight'].size(1)
    for n, parts in sorted(layers.items()):
        prefix = f'mapping.transformer.layers.{n}.'
        q, kv = parts.pop('attn.to_queries.weight'), parts.pop('attn.to_keys_values.weight')   # [E, E], [2E, E]
        q_bias, kv_bias = parts.pop('attn.to_queries.bias', None), parts.pop('attn.to_keys_values.bias', None)
        out[prefix + 'self_attn.in_proj_weight'] = torch.cat([q, kv])                           # [3E, E]: q, k, v
        out[prefix + 'self_attn.in_proj_bias'] = torch.cat([
            q_bias if q_bias is not None else q.new_zeros(E), kv_bias if kv_bias is not None else kv.new_zeros(2 * E)])
        for rest, value in parts.items():
            name, _, kind = rest.rpartition('.')
            if name not in _MAPPER_LAYER_NAMES:
                raise ValueError(f'not a ClipCap state_dict this converter knows: unexpected key '
                                 f'clip_project.transformer.layers.{n}.{rest}')
            out[prefix + _MAPPER_LAYER_NAMES[name] + '.' + kind] = value
    if 'mapping.model.2.weight' in out:
        settings = {'mapping': 'mlp', 'prefix_length': out['mapping.model.2.weight'].size(0) // E}
    elif 'mapping.prefix_const' in out:
        settings = {'mapping': 'transformer', 'prefix_length': out['mapping.prefix_const'].size(0),
                    'clip_length': out['mapping.linear.weight'].size(0) // E, 'mapping_layers': len(layers)}
    else:
        raise ValueError('not a ClipCap state_dict this converter knows: no MLP or transformer mapper '
                         '(clip_project.model.* / clip_project.prefix_const)')
    return out, settings

"""Import the checkpoints of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning (its
BEST_checkpoint_*.pth.tar and WORDMAP_*.json) as checkpoints of this suite, without running their code.

The tutorial's train.py saved whole modules with torch.save: {'epoch', 'epochs_since_improvement',
'bleu-4', 'encoder': models.Encoder, 'decoder': models.DecoderWithAttention, 'encoder_optimizer',
'decoder_optimizer'}. Such a file is read by pickled_modules.read without running its code (both
torch file formats; the tutorial's classes, torch.nn modules and optimizers become inert holders of
their weights; any other class or function is refused with one line naming it).

The holders' weights become a format-2 checkpoint (captioning/checkpoint.py): the encoder as this suite's
torchvision ResNet (resnet101 for the tutorial's own; the depth is read from the blocks) at the
tutorial's 256 x 256 input with ImageNet normalisation and its 14 x 14 pooled grid; the decoder as
`sat`, whose parameter names are the tutorial's; the word map inside; epoch and the tutorial's
VAL BLEU-4 recorded (its validate() scores teacher-forced word ids, not generated captions).
"""
import os

import torch

import utils
from captioning import checkpoint
from captioning.tutorial import pickled_modules
from captioning.tutorial.pickled_modules import Holder

TUTORIAL = 'a-PyTorch-Tutorial-to-Image-Captioning'
SPECIAL_TOKENS = ('<pad>', '<start>', '<end>', '<unk>')
IMAGE_SIZE = 256                             # the tutorial's input side; ImageNet mean/std (the resnet spec's)
RESNETS = {(False, (2, 2, 2, 2)): 'resnet18', (False, (3, 4, 6, 3)): 'resnet34',
           (True, (3, 4, 6, 3)): 'resnet50', (True, (3, 4, 23, 3)): 'resnet101', (True, (3, 8, 36, 3)): 'resnet152'}
RESNET_CHILDREN = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}
# what train.py uses and the file does not hold
TUTORIAL_SETTINGS = {'alpha_c': 1.0, 'grad_clip': 5.0, 'batch_size': 32, 'decoder_lr': 4e-4, 'encoder_lr': 1e-4,
                     'select_by': 'BLEU-4'}


def read_tutorial_file(path):
    """A tutorial checkpoint file -> its top-level dict, modules and optimizers as Holders
    (pickled_modules.read: no code runs), or ValueError with one line naming the file."""
    obj = pickled_modules.read(path)
    is_tutorial = (isinstance(obj, dict) and getattr(obj.get('encoder'), 'pickled_as', '') == 'models.Encoder'
                   and getattr(obj.get('decoder'), 'pickled_as', '') == 'models.DecoderWithAttention')
    if not is_tutorial:
        raise ValueError(f"{path}: not a checkpoint of the tutorial (expected 'encoder' and 'decoder' holding its "
                         'models.Encoder and models.DecoderWithAttention)')
    return obj


def looks_like_tutorial(path):
    """True when a file's pickle names the tutorial's DecoderWithAttention (found without unpickling)."""
    try:
        return 'models.DecoderWithAttention' in pickled_modules.checkpoint_globals(path)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# Holders -> state_dicts

def holder_state(holder, where, prefix='', seen=None):
    """A module Holder -> {name: tensor} as nn.Module.state_dict() names them (parameters, persistent
    buffers, submodules), or ValueError naming what is not a module's content."""
    seen = set() if seen is None else seen
    if not isinstance(holder, Holder):
        raise ValueError(f'{where}: {prefix or "the module"} is not a module of the tutorial or torch.nn')
    if id(holder) in seen:
        raise ValueError(f'{where}: module {prefix} appears twice in the tree (shared or cyclic)')
    seen.add(id(holder))
    attrs = vars(holder)
    skip = attrs.get('_non_persistent_buffers_set') or set()
    state = {}
    for kind in ('_parameters', '_buffers'):
        entries = attrs.get(kind) or {}
        if not isinstance(entries, dict):
            raise ValueError(f'{where}: {prefix}{kind} is not a dict')
        for name, value in entries.items():
            if value is None or name in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f'{where}: {prefix}{name} is not a tensor')
            state[prefix + str(name)] = value.detach()        # a plain tensor (a Parameter's data, shared)
    modules = attrs.get('_modules') or {}
    if not isinstance(modules, dict):
        raise ValueError(f'{where}: {prefix}_modules is not a dict')
    for name, child in modules.items():
        if child is not None:
            state.update(holder_state(child, where, f'{prefix}{name}.', seen))
    return state


def _module_attr(holder, name, default=None):
    """An attribute of a Holder, or of its submodule `name` (held in _modules)."""
    attrs = vars(holder)
    return attrs.get(name, (attrs.get('_modules') or {}).get(name, default))


def _shape_check(state, expected, where, what):
    """ValueError naming the first entry missing, extra or of another shape than `expected`'s."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: not the tutorial's {what}: " +
                         (f'{len(missing)} entries missing (e.g. {missing[0]})' if missing else
                          f'{len(extra)} unexpected entries (e.g. {extra[0]})'))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: {what} entry {k} has shape {list(state[k].shape)}, expected {list(v.shape)}")


def convert_decoder(holder, where):
    """The tutorial's DecoderWithAttention Holder -> (sat decoder_args, state_dict): the names are the same."""
    from captioning.decoders.registry import build_decoder
    state = holder_state(holder, where)
    for key in ('embedding.weight', 'attention.encoder_att.weight', 'decode_step.weight_hh'):
        if key not in state or state[key].dim() != 2:
            raise ValueError(f"{where}: the decoder has no 2-d {key}: not the tutorial's DecoderWithAttention")
    (V, E), (A, C), D = state['embedding.weight'].shape, state['attention.encoder_att.weight'].shape, \
        state['decode_step.weight_hh'].size(1)
    dropout = getattr(_module_attr(holder, 'dropout'), 'p', 0.5)
    dropout = float(dropout) if isinstance(dropout, (int, float)) and 0 <= dropout < 1 else 0.5
    with torch.device('meta'):
        decoder = build_decoder('sat', V, C, emb_dim=E, attention_dim=A, decoder_dim=D, dropout=dropout,
                                alpha_c=TUTORIAL_SETTINGS['alpha_c'])
    _shape_check(state, decoder.state_dict(), where, 'DecoderWithAttention')
    return decoder.args(), {k: v.float() for k, v in state.items()}


def convert_encoder(holder, where):
    """The tutorial's Encoder Holder (resnet = a torchvision ResNet's children without avgpool/fc, then
    adaptive pooling) -> (encoder name, grid side, this suite's Encoder state_dict)."""
    from models import Encoder
    state = {}
    for key, value in holder_state(holder, where).items():
        parts = key.split('.', 2)
        if len(parts) < 3 or parts[0] != 'resnet' or parts[1] not in RESNET_CHILDREN:
            raise ValueError(f"{where}: encoder entry {key} is not in a ResNet's layers: not the tutorial's Encoder")
        state[f'backbone.{RESNET_CHILDREN[parts[1]]}.{parts[2]}'] = value
    bottleneck = any('.conv3.' in k for k in state)
    blocks = tuple(len({k.split('.')[2] for k in state if k.startswith(f'backbone.layer{i}.')}) for i in range(1, 5))
    name = RESNETS.get((bottleneck, blocks))
    if name is None:
        raise ValueError(f'{where}: an encoder of {"bottleneck" if bottleneck else "basic"} blocks {list(blocks)}, '
                         'which is no torchvision ResNet (18, 34, 50, 101, 152)')
    grid = vars(holder).get('enc_image_size')
    if not isinstance(grid, int):
        size = getattr(_module_attr(holder, 'adaptive_pool'), 'output_size', 14)
        grid = size[0] if isinstance(size, (tuple, list)) and size else size
    if not isinstance(grid, int) or not 1 <= grid <= 64:
        raise ValueError(f'{where}: the encoder pools to {grid!r} cells, not a grid side')
    with torch.device('meta'):
        expected = Encoder(name, 'none', grid, IMAGE_SIZE, channels_last=False).state_dict()
    for k, v in expected.items():   # torch 0.4.0's BatchNorm had no batch counter (unused in eval mode)
        if k.endswith('num_batches_tracked') and k not in state:
            state[k] = torch.zeros((), dtype=v.dtype)
    _shape_check(state, expected, where, f'Encoder ({name})')
    return name, grid, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_word_map(path):
    """The tutorial's WORDMAP_*.json -> {word: id} with ids 0..n-1 and the special tokens, or ValueError."""
    word_map = utils.read_json(path, 'word map')
    ok = (isinstance(word_map, dict) and all(isinstance(k, str) and type(v) is int for k, v in word_map.items())
          and sorted(word_map.values()) == list(range(len(word_map))) and set(SPECIAL_TOKENS) <= set(word_map))
    if not ok:
        raise ValueError(f'{path}: not a word map (expected an object word -> ids 0..n-1 with '
                         f"{', '.join(SPECIAL_TOKENS)})")
    return word_map


def _number(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def convert(obj, word_map, where='checkpoint', word_map_path=''):
    """A tutorial checkpoint dict (read_tutorial_file) and its word map -> a format-2 checkpoint dict."""
    from models import DECODER_SETTINGS
    decoder_args, decoder_state = convert_decoder(obj['decoder'], where)
    encoder, grid, encoder_state = convert_encoder(obj['encoder'], where)
    if decoder_args['encoder_dim'] != _feature_dim(encoder):
        raise ValueError(f"{where}: the decoder attends to {decoder_args['encoder_dim']}-d features; {encoder} gives "
                         f'{_feature_dim(encoder)}')
    if len(word_map) != decoder_args['vocab_size']:
        raise ValueError(f"{word_map_path or 'word map'}: {len(word_map)} words, but the checkpoint's decoder has "
                         f"{decoder_args['vocab_size']}: pass the WORDMAP_*.json it was trained with")
    base = os.path.basename(word_map_path)
    data_name = base[len('WORDMAP_'):-len('.json')] if base.startswith('WORDMAP_') and base.endswith('.json') else ''
    epoch, bleu4 = _number(obj.get('epoch')), _number(obj.get('bleu-4'))
    fine_tuned = obj.get('encoder_optimizer') is not None
    config = {**TUTORIAL_SETTINGS, 'encoder': encoder, 'encoder_weights': 'imagenet', 'image_size': IMAGE_SIZE,
              'encoded_image_size': grid, 'channels_last': True, 'decoder': 'sat', 'decoder_args': decoder_args,
              'tokenizer': 'words', 'data_folder': '', 'data_name': data_name, 'fine_tune_encoder': fine_tuned,
              'fine_tune_from': 'layer2' if fine_tuned else '', 'objective': 'xe', 'converted_from': TUTORIAL,
              **{k: decoder_args.get(k) for k in DECODER_SETTINGS}}
    return {'format': checkpoint.FORMAT, 'config': config, 'word_map': word_map, 'decoder': decoder_state,
            'encoder': encoder_state, 'epoch': epoch, 'best_score': bleu4,
            # the tutorial's validate(): BLEU-4 of teacher-forced word ids, not of generated captions
            'val_metrics': {'bleu4_teacher_forced': bleu4} if bleu4 is not None else {},
            'tutorial': {'epochs_since_improvement': _number(obj.get('epochs_since_improvement'))}}


def _feature_dim(encoder):
    from models import ENCODERS
    return ENCODERS[encoder].dim


def convert_file(path, word_map_path):
    """tools/convert_tutorial.py's and --word-map's work: tutorial checkpoint + word map -> checkpoint dict."""
    word_map = read_word_map(word_map_path)
    return convert(read_tutorial_file(path), word_map, path, word_map_path)


def load_checkpoint(path, word_map_path=None):
    """A checkpoint for captioning: the tutorial's file converted in memory when `word_map_path` is
    given, else this suite's (checkpoint.load), with a line saying what to do when it is the tutorial's."""
    if word_map_path:
        return convert_file(path, word_map_path)
    try:
        return checkpoint.load(path)
    except ValueError:
        if not looks_like_tutorial(path):
            raise
    folder = os.path.dirname(path) or '.'
    try:
        found = sorted(f for f in os.listdir(folder) if f.startswith('WORDMAP_') and f.endswith('.json'))
    except OSError:
        found = []
    word_map = os.path.join(folder, found[0]) if len(found) == 1 else 'WORDMAP_....json'
    raise ValueError(f"{path}: a checkpoint of the tutorial ({TUTORIAL}): add --word-map {word_map} (the word "
                     f'map it was trained with) to convert it as it loads, or convert it once: python '
                     f'tools/convert_tutorial.py {path} {word_map} OUT.pt')

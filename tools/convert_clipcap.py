"""Turn a checkpoint of the original ClipCap (github rmokady/CLIP_prefix_caption: its coco_weights.pt,
transformer_weights.pt, or what its train.py saved) into a checkpoint of this suite.

    python tools/convert_clipcap.py coco_weights.pt checkpoints/clipcap_mlp.pt
    python tools/convert_clipcap.py transformer_weights.pt checkpoints/clipcap_transformer.pt --freeze-lm
    python tools/convert_clipcap.py coco_weights.pt out.pt --lm models/gpt2 --encoder-weights models/clip-vit-base-patch32 \\
        --data-folder data/coco      # local copies; the word map of prepared data, to fine-tune with --init-from

The file is read with torch.load(weights_only=True) (no code runs). The GPT-2 attention-mask
buffers older transformers saved ('gpt.transformer.h.N.attn.bias', '.attn.masked_bias') are
dropped; 'clip_project.*' becomes the mapping network (clipcap.convert_clipcap_state), whose
kind, prefix length, CLIP positions and layers are read from the weights. The LM (--lm) and CLIP
ViT-B/32 (--encoder-weights) are loaded to build the models: local folders, or Hugging Face names
(their cache when offline). With --freeze-lm (the paper's transformer variant) the GPT-2 weights
in the file must equal --lm's: the checkpoint then names the LM and keeps its digest.

Not the same decoding: the original feeds no token between the prefix and the caption and was
trained without an end token (its demo stops at '.'); here <start> and <end> are GPT-2's
end-of-text token. Converted weights load and caption, but fine-tune them on prepared data
(--data-folder here, then 01_train.py --init-from OUT) before trusting their captions.
"""
import argparse
import importlib
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import datasets  # noqa: E402
import utils  # noqa: E402
from captioning import checkpoint, text  # noqa: E402
from captioning.decoders import clipcap, registry  # noqa: E402
from models import DECODER_SETTINGS, Encoder  # noqa: E402

LM = 'gpt2'                                        # the LM the original was built on
ENCODER = 'clip_vit_b32'
ENCODER_WEIGHTS = 'imagenet'                       # = the encoder's default: openai/clip-vit-base-patch32
NO_DATA_WORD_MAP = {'<pad>': 0, '<unk>': 1, '<start>': 2, '<end>': 3}   # a pretrained LM needs no words


def read_original(path):
    """The original's state_dict (tensors only), or ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such file: {path}')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f'{path}: not a tensor state_dict that loads without running code '
                         f'({utils.describe_error(e)})') from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{path}: not a state_dict (a dict of tensors)')
    return state


def convert(state, lm=LM, encoder_weights=ENCODER_WEIGHTS, freeze_lm=False, data_folder='', data_name=''):
    """An original ClipCap state_dict -> a format-2 checkpoint dict of this suite."""
    converted, settings = clipcap.convert_clipcap_state(state)
    word_map, tokenizer = dict(NO_DATA_WORD_MAP), text.DEFAULT_TOKENIZER
    if data_folder:
        data_name = data_name or utils.find_data_name(data_folder)
        word_map = datasets.read_word_map(os.path.join(data_folder, f'WORDMAP_{data_name}.json'))
        tokenizer = text.read_tokenizer(data_folder, data_name)
    encoder = Encoder(ENCODER, encoder_weights, channels_last=False)
    first = converted.get('mapping.model.0.weight', converted.get('mapping.linear.weight'))
    if first.size(1) != encoder.encoder_dim:
        raise ValueError(f'this ClipCap was trained on {first.size(1)}-d image embeddings (another CLIP); '
                         f'{ENCODER} gives {encoder.encoder_dim}')
    decoder = registry.build_decoder('clipcap', len(word_map), encoder.encoder_dim, lm=lm, freeze_lm=freeze_lm,
                                     dropout=0.1, **settings)
    decoder.use_word_map(word_map, tokenizer)
    if decoder.scratch:
        raise ValueError('--lm must name the GPT-2 the original was built on (e.g. gpt2), not scratch')
    converted['lm_digest'] = decoder.lm_digest
    try:
        decoder.load_state_dict(converted)
    except RuntimeError as e:   # shapes: another GPT-2 size than --lm
        raise ValueError(f'the weights do not fit --lm {lm}: {utils.describe_error(e).splitlines()[0][:300]}') from None
    if freeze_lm and not torch.equal(clipcap.weights_digest(decoder.gpt), decoder.lm_digest):
        raise ValueError(f'--freeze-lm: the GPT-2 in this file differs from --lm {lm} (it was fine-tuned): convert '
                         'without --freeze-lm to keep its weights in the checkpoint')
    train = importlib.import_module('01_train')
    config = vars(train.make_parser().parse_args([]))
    config.update(encoder=ENCODER, encoder_weights=encoder_weights, image_size=encoder.image_size,
                  encoded_image_size=encoder.encoded_image_size, decoder='clipcap', decoder_args=decoder.args(),
                  tokenizer=tokenizer, data_folder=data_folder, data_name=data_name, converted_from='CLIP_prefix_caption')
    config.update({k: config['decoder_args'].get(k) for k in DECODER_SETTINGS})
    return {'format': checkpoint.FORMAT, 'config': config, 'word_map': word_map, 'decoder': decoder.state_dict(),
            'encoder': None, 'encoder_delta': {}, 'encoder_digest': utils.state_dict_digest(encoder),
            'epoch': None, 'best_score': None, 'val_metrics': {}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('original', help="the original ClipCap's .pt state_dict")
    p.add_argument('out', help='where to write the checkpoint')
    p.add_argument('--lm', default=LM, help='its GPT-2: a Hugging Face name or save_pretrained folder (default: %(default)s)')
    p.add_argument('--encoder-weights', default=ENCODER_WEIGHTS,
                   help='CLIP ViT-B/32: a folder or Hugging Face name (default: imagenet = openai/clip-vit-base-patch32)')
    p.add_argument('--freeze-lm', action='store_true', help='the GPT-2 was frozen (the transformer variant)')
    p.add_argument('--data-folder', default='', help='prepared data whose word map the checkpoint takes '
                   '(for fine-tuning with 01_train.py --init-from)')
    p.add_argument('--data-name', default='', help='base name of the prepared files (default: the only one)')
    args = p.parse_args(argv)
    try:
        out = convert(read_original(args.original), args.lm, args.encoder_weights, args.freeze_lm, args.data_folder,
                      args.data_name)
        checkpoint.save_checkpoint(args.out, out)
    except (OSError, ValueError, ImportError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    cfg = out['config']['decoder_args']
    print(f"wrote {args.out} ({utils.format_size(os.path.getsize(args.out))}): {cfg['mapping']} mapping, prefix "
          f"{cfg['prefix_length']}, LM {cfg['lm']} ({'named and digested' if cfg['freeze_lm'] else 'weights included'})")
    return 0


if __name__ == '__main__':
    sys.exit(main())

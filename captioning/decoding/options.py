"""The command-line flags that 02, 03 and 04 share: the model to load and how to decode it."""
import argparse

from captioning.decoding import quantize, runtime as runtimes
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
                           min_len=None, allow_unk=None, runtime='auto'):
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
    runtimes.add_arguments(parser, runtime)     # --runtime, --onnx-cache (captioning/decoding/runtime.py)


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


def add_generation_arguments(parser, num_captions=True):
    """What to generate (02, 03; 04 takes the same per request): several captions, sampling, diverse
    beams, a prefix, and the tag guidance of the constrained beam search (docs/inference.md)."""
    if num_captions:
        parser.add_argument('--num-captions', type=int, default=1,
                            help='captions per photo: the N best distinct beams (N <= --beam-size), or N samples '
                                 'with --sample; the first is the caption (default: %(default)s)')
    parser.add_argument('--sample', action=argparse.BooleanOptionalAction, default=False,
                        help="sample captions from the model's distribution instead of the beam search "
                             '(default: %(default)s)')
    parser.add_argument('--temperature', type=float, default=1.0,
                        help='--sample: divide the log-probabilities by this; above 1 more varied (default: %(default)s)')
    parser.add_argument('--top-k', type=int, default=0, help='--sample: only the k likeliest words, 0 = all '
                                                             '(default: %(default)s)')
    parser.add_argument('--top-p', type=float, default=1.0,
                        help='--sample: only the likeliest words whose probability reaches p (nucleus), 1 = all '
                             '(default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help="--sample: the draws come from this and each photo's path: the same captions again "
                             '(default: %(default)s)')
    parser.add_argument('--diversity-groups', type=int, default=1,
                        help='diverse beam search: the beam in G groups that avoid the words earlier groups chose '
                             '(--beam-size a multiple of G; 1 = the plain search) (default: %(default)s)')
    parser.add_argument('--diversity-strength', type=float, default=0.5,
                        help='how much a group avoids the words of the groups before it (default: %(default)s)')
    parser.add_argument('--prefix', default='',
                        help='every caption starts with these words (the model continues), e.g. "a cat"; each '
                             "word must be in the checkpoint's word map (default: none)")
    parser.add_argument('--guide', choices=GUIDES, default=DEFAULT_GUIDE,
                        help='on: a tag the encoder is confident of (its ImageNet classifier) that the caption '
                             'does not mention becomes a constraint of the beam search; auto: on for English word '
                             'maps (measured on Flickr8k VAL), off for Chinese ones; off: the caption alone '
                             '(default: %(default)s)')


GUIDES = ('auto', 'on', 'off')
DEFAULT_GUIDE = 'auto'


def check_generation(args, beam_size):
    """ValueError naming the flag whose value cannot work (before any model is loaded)."""
    n = getattr(args, 'num_captions', 1)
    if n < 1:
        raise ValueError(f'--num-captions {n}: must be at least 1')
    if not args.sample and n > beam_size:
        raise ValueError(f'--num-captions {n} is above --beam-size {beam_size}: the beam holds the captions '
                         '(raise --beam-size, or --sample)')
    if args.temperature <= 0:
        raise ValueError(f'--temperature {args.temperature}: must be above 0')
    if not 0 < args.top_p <= 1:
        raise ValueError(f'--top-p {args.top_p}: must be above 0 and at most 1')
    if args.top_k < 0:
        raise ValueError(f'--top-k {args.top_k}: must be 0 (all) or more')
    if args.diversity_groups < 1 or beam_size % args.diversity_groups:
        raise ValueError(f'--diversity-groups {args.diversity_groups}: must divide --beam-size {beam_size}')
    if args.sample and args.diversity_groups > 1:
        raise ValueError('--diversity-groups is for the beam search, not with --sample')
    if args.prefix and not args.prefix.strip():
        raise ValueError('--prefix is empty: give the words every caption starts with')


def prefix_tokens(prefix, decoder, word_map, tokenizer):
    """The words every caption starts with -> the decoder's token ids, split by the checkpoint's own
    tokenizer (jieba for Chinese); ValueError naming a word outside the word map, or an empty prefix."""
    from captioning import text
    if prefix is None or not str(prefix).strip():
        return []
    words = text.tokenize(str(prefix), tokenizer)
    if not words:
        raise ValueError(f'--prefix {prefix!r} has no words')
    if decoder.vocab_size != len(word_map) and getattr(decoder, 'tokenizer', None) is not None:
        return decoder.tokenizer(' ' + ' '.join(words), add_special_tokens=False)['input_ids']   # a GPT-2's pieces
    unknown = [w for w in words if w not in word_map]
    if unknown:
        raise ValueError(f"--prefix: {', '.join(repr(w) for w in unknown)} {'is' if len(unknown) == 1 else 'are'} "
                         "not in the checkpoint's word map: a caption can only hold words the model knows")
    return [word_map[w] for w in words]


def decode_settings(args, decoder, word_map, tokenizer):
    """The flags of add_generation_arguments -> keyword arguments of search.decode (not the guides,
    which come per image from the encoder's tags)."""
    settings = {'num_captions': getattr(args, 'num_captions', 1), 'sample': args.sample}
    if args.sample:
        settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    elif args.diversity_groups > 1:
        settings.update(diversity_groups=args.diversity_groups, diversity_strength=args.diversity_strength)
    prefix = prefix_tokens(args.prefix, decoder, word_map, tokenizer)
    if prefix:
        settings['prefix'] = prefix
    return settings


def add_reading_arguments(parser, workers, loader):
    """--workers and --loader of 02 and 03: who reads the next batch of images while the model runs."""
    from captioning.decoding.files import LOADERS
    parser.add_argument('--workers', type=int, default=workers,
                        help='readers decoding the next batch of images while the model captions this one, 0 = '
                             'read each batch first (default: %(default)s)')
    parser.add_argument('--loader', choices=LOADERS, default=loader,
                        help='the --workers readers: threads of this process, or DataLoader worker processes '
                             '(default: %(default)s)')

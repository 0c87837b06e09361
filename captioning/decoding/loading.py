"""Loading a captioner: the provided checkpoints by name, one function for one model (this suite's
checkpoint or the tutorial's), ensembles of them, and the decoding settings a checkpoint carries (--bad-endings)."""
import os

from captioning import checkpoint
from captioning.decoding import ensemble, tags
from captioning.tutorial import importer

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout's root
PROVIDED_CHECKPOINT = os.path.join(REPO_DIR, 'checkpoints', 'flickr8k_efficientnet_lite0_fp16.pt')  # shipped
PROVIDED_LITE2 = os.path.join(REPO_DIR, 'checkpoints', 'flickr8k_efficientnet_lite2_fp16.pt')       # shipped
# The default of 02, 03, 04: both, as an ensemble (ensemble.py; chosen on Flickr8k VAL, checkpoints/README.md)
DEFAULT_CHECKPOINTS = [PROVIDED_CHECKPOINT, PROVIDED_LITE2]
# The Chinese default: the Flickr8k-CN Lite0 and Lite2 models as an ensemble (docs/data.md)
PROVIDED_CN = [os.path.join(REPO_DIR, 'checkpoints', f'flickr8k_cn_efficientnet_{e}_fp16.pt') for e in ('lite0', 'lite2')]
# Names that --checkpoint takes for the provided ensembles (a file of that name comes first)
PROVIDED_MODELS = {'flickr8k': DEFAULT_CHECKPOINTS, 'flickr8k-cn': PROVIDED_CN}
# What the provided models know: 02 prints it and the page shows it when they are in use
_NOTE = ('the provided checkpoints learned from {data}, which shows people, dogs and outdoor scenes only '
         '(the bundled cat photo becomes {cat}); for everyday photos use a COCO '
         "model: the tutorial's checkpoint (docs/tutorial-checkpoints.md), ClipCap with pretrained CLIP + "
         'GPT-2, or 01_train.py on COCO with a GPU')
PROVIDED_NOTE = _NOTE.format(data='Flickr8k', cat='"a man is playing with a toy" unless the encoder\'s ImageNet tag '
                                                  'guides it to "a cat is playing with a toy"')
PROVIDED_NOTE_CN = _NOTE.format(data='Flickr8k-CN (Chinese captions of the Flickr8k photos)',
                                cat='"一只狗在玩耍", a dog is playing')


def checkpoint_paths(checkpoint_path):
    """A path, or several (an ensemble), each of which may be the name of a provided ensemble
    (PROVIDED_MODELS, unless a file has that name) -> a list of paths."""
    paths = [checkpoint_path] if isinstance(checkpoint_path, (str, os.PathLike)) else list(checkpoint_path)
    def expand(p):
        return PROVIDED_MODELS[p] if isinstance(p, str) and p in PROVIDED_MODELS and not os.path.exists(p) else [p]
    return [q for p in paths for q in expand(p)]


def checkpoint_label(checkpoint_path, basename=False):
    """One path, or several joined by ' + ' (an ensemble), for messages."""
    paths = checkpoint_paths(checkpoint_path)
    return ' + '.join(os.path.basename(p) if basename else os.fspath(p) for p in paths)


def provided_note(checkpoint_path):
    """PROVIDED_NOTE when every checkpoint is one of the provided Flickr8k ones (checkpoints/flickr8k_*),
    PROVIDED_NOTE_CN when they are the Chinese ones (checkpoints/flickr8k_cn_*), else None."""
    paths = checkpoint_paths(checkpoint_path)
    provided = all(os.path.basename(p).startswith('flickr8k_') and
                   os.path.dirname(os.path.abspath(p)) == os.path.join(REPO_DIR, 'checkpoints') for p in paths)
    if not provided:
        return None
    return PROVIDED_NOTE_CN if all(os.path.basename(p).startswith('flickr8k_cn_') for p in paths) else PROVIDED_NOTE


def bad_endings_setting(choice, decoder, word_map, config):
    """--bad-endings -> (the token ids to pass as beam_search's no_end_after, or None; a note to print
    when 'avoid' cannot apply, else None)."""
    if choice != 'avoid':
        return None, None
    ids = no_end_ids(decoder, word_map, config.get('endings'))
    if ids is None:
        why = ('its tokens are not its word map' if config.get('endings') else
               'the checkpoint has no ending statistics (checkpoints of 01_train.py carry them; for others: '
               'tools/write_endings.py DATA_FOLDER CHECKPOINT_FOLDER/NAME.endings.json)')
        return None, f'--bad-endings avoid does not apply: {why}'
    return ids, None


def no_end_ids(decoder, word_map, endings):
    """The token ids after which <end> is forbidden (--bad-endings avoid): the word map's words that
    rarely end a TRAIN reference (metrics.bad_ending_words). None when they are unknown (`endings`
    None) or the decoder's tokens are not the word map's (a pretrained GPT-2's BPE pieces)."""
    from captioning.scoring import metrics
    if not endings or decoder.vocab_size != len(word_map):
        return None
    bad = metrics.bad_ending_words(endings)
    return sorted(i for w, i in word_map.items() if w in bad)


def load_model(path, device, word_map=None, check=None, runtime='torch', onnx_cache=None):
    """One checkpoint file -> (encoder, decoder, word_map, config) in eval mode on `device`: this
    suite's checkpoint, or the tutorial's converted as it loads when `word_map` names the
    WORDMAP_*.json it was trained with (captioning/tutorial/importer.py). config['endings'] is the
    checkpoint's TRAIN ending statistics or None (checkpoint.endings); config['tags_note'] None when the
    encoder gives ImageNet tags (tags.attach_head), else why not. `check(path, word_map,
    config)` runs before the models are built (an ensemble's member that does not fit fails fast).
    `runtime` 'onnx' (runtime.resolve's answer): the encoder runs in onnxruntime, exported once into
    the cache `onnx_cache` (runtime.py); config['runtime'] says which ran."""
    ckpt = importer.load_checkpoint(path, word_map)
    if check is not None:
        check(path, ckpt['word_map'], ckpt['config'])
    encoder, decoder = checkpoint.models_from_checkpoint(ckpt, device)
    tags_note = tags.attach_head(encoder, ckpt)                  # ImageNet tags where the encoder is stock
    if runtime == 'onnx':
        from captioning.decoding import runtime as runtimes
        encoder = runtimes.onnx_encoder(encoder, path, onnx_cache)
    elif runtime != 'torch':
        raise ValueError(f"runtime {runtime!r}: 'torch' or 'onnx' (runtime.resolve)")
    return encoder, decoder, ckpt['word_map'], {**ckpt['config'], 'endings': checkpoint.endings(ckpt, path),
                                                'tags_note': tags_note, 'runtime': runtime}


def load_captioner(checkpoint_path, device, word_map=None, mirror=False, runtime='torch', onnx_cache=None):
    """-> (encoder, decoder, word_map, config) ready for captioning on `device`, from one checkpoint
    file (load_model), or from several as an ensemble of them (captioning/decoding/ensemble.py: a list of two or more
    paths, or the name of a provided ensemble). `mirror`: every model also decodes the photo flipped
    left to right, as one more ensemble member (captioning/decoding/ensemble.py). An ensemble's config is its first
    member's. `runtime`, `onnx_cache`: load_model's (each member's encoder in onnxruntime)."""
    paths = checkpoint_paths(checkpoint_path)
    run = {'runtime': runtime, 'onnx_cache': onnx_cache}
    if len(paths) == 1 and not mirror:
        return load_model(paths[0], device, word_map, **run)
    if word_map:
        raise ValueError(f"--word-map converts one tutorial checkpoint: convert it with tools/convert_tutorial.py "
                         f"to decode it {'mirrored' if mirror else 'in an ensemble'}")
    members = [(paths[0], *load_model(paths[0], device, **run))]
    check = ensemble.member_check(paths[0], members[0][3], members[0][4])
    members += [(path, *load_model(path, device, check=check, **run)) for path in paths[1:]]
    return ensemble.assemble(members, device, mirror)

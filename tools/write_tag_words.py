"""Write the ImageNet class -> caption words mapping of a word map (what --guide auto turns the
encoder's tags into), to ship beside checkpoints or to edit by hand.

    python tools/write_tag_words.py checkpoints/flickr8k_efficientnet_lite0_fp16.pt checkpoints/flickr8k.tags.json
    python tools/write_tag_words.py data/flickr8k/WORDMAP_flickr8k_5_cap_per_img_5_min_word_freq.json my.tags.json

The source is a checkpoint (its word map) or a WORDMAP_*.json. The mapping is captioning/decoding/
tags.py's class_words: the curated table, else the class name's head noun, singular and plural, kept
where the word is in the word map (Chinese word maps through the curated English -> Chinese table).
02, 03 and 04 find a `*.tags.json` made for a checkpoint's word map in the checkpoint's folder (and
compute the same mapping when there is none); edit the file to add or remove words of a class.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from captioning import checkpoint  # noqa: E402
from captioning.decoding import tags  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='a checkpoint (.pt) or a WORDMAP_*.json')
    p.add_argument('out', help=f'the file to write; its name must end with {tags.TAGS_SUFFIX}')
    args = p.parse_args(argv)
    if not args.out.endswith(tags.TAGS_SUFFIX):
        p.error(f'{args.out}: the name must end with {tags.TAGS_SUFFIX} (how checkpoints find it)')
    try:
        if args.source.endswith('.json'):
            word_map = utils.read_json(args.source, 'word map')
        else:
            word_map = checkpoint.load_checkpoint(args.source)['word_map']
        names = tags.imagenet_classes()
        classes = tags.class_words(word_map, names)
        utils.write_json(args.out, {'word_map_sha1': checkpoint.word_map_digest(word_map),
                                    'names': {str(i): names[i] for i in classes},
                                    'classes': {str(i): words for i, words in classes.items()}}, indent=1)
    except (OSError, ValueError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    words = sorted({w for ws in classes.values() for w in ws})
    print(f'wrote {args.out}: {len(classes)} of the 1000 ImageNet classes name {len(words)} words of the word map')
    return 0


if __name__ == '__main__':
    sys.exit(main())

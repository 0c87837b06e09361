"""Write a prepared dataset's ending statistics next to checkpoints that lack them, so that 02, 03 and
04 can keep their captions from ending on words that rarely end a sentence (--bad-endings avoid).

    python tools/write_endings.py data/flickr8k checkpoints/flickr8k.endings.json

Checkpoints written by 01_train.py carry these statistics themselves; older ones (and the tutorial's)
find them in a `*.endings.json` file in their own folder made for the same word map. The file holds
word counts only: for each word of the word map, how many TRAIN references it ends and how often it
occurs (metrics.ending_counts), plus the word map's digest; no caption.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from captioning import checkpoint  # noqa: E402
from captioning.scoring import metrics  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data_folder', help="00_create_input_files.py's output folder (its TRAIN_REFS and WORDMAP)")
    p.add_argument('out', help=f'the file to write; its name must end with {checkpoint.ENDINGS_SUFFIX}')
    p.add_argument('--data-name', default=None, help='the prepared set, when the folder holds several')
    args = p.parse_args(argv)
    if not args.out.endswith(checkpoint.ENDINGS_SUFFIX):
        p.error(f'{args.out}: the name must end with {checkpoint.ENDINGS_SUFFIX} (how checkpoints find it)')
    try:
        name = args.data_name or utils.find_data_name(args.data_folder)
        word_map = utils.read_json(os.path.join(args.data_folder, f'WORDMAP_{name}.json'), 'word map')
        refs = utils.read_json(os.path.join(args.data_folder, f'TRAIN_REFS_{name}.json'), 'TRAIN references')
        tokenizer_file = os.path.join(args.data_folder, f'TOKENIZER_{name}.json')
        tokenizer = utils.read_json(tokenizer_file, 'tokenizer file').get('tokenizer', 'words') \
            if os.path.exists(tokenizer_file) else 'words'
        counts = metrics.ending_counts(refs, tokenizer)
        utils.write_json(args.out, {'data': name, 'tokenizer': tokenizer, 'threshold': metrics.BAD_ENDING_SHARE,
                                    'word_map_sha1': checkpoint.word_map_digest(word_map),
                                    'counts': {w: list(c) for w, c in sorted(counts.items()) if w in word_map}})
    except (OSError, ValueError, ImportError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    bad = metrics.bad_ending_words({w: c for w, c in counts.items() if w in word_map})
    print(f'wrote {args.out}: the {len(word_map)} entries of the word map, {len(bad)} of its words rarely end a reference '
          f'(under {metrics.BAD_ENDING_SHARE:.0%} of their occurrences)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

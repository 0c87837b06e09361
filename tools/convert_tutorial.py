"""Turn a checkpoint of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning (BEST_checkpoint_*.pth.tar,
which pickles whole modules) and its word map into a checkpoint of this suite, without running its code.

    python tools/convert_tutorial.py BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \\
        WORDMAP_coco_5_cap_per_img_5_min_word_freq.json checkpoints/tutorial_coco.pt
    python 02_inference.py --img photo.jpg --checkpoint checkpoints/tutorial_coco.pt

02_inference.py, 03_evaluate.py and 04_serve.py also take the tutorial's file directly
(--checkpoint X.pth.tar --word-map WORDMAP.json) and convert it in memory on every start.
How the file is read (both torch file formats; the tutorial's classes, torch.nn modules and
optimizers become inert holders of their weights; anything else is refused) and what the result
holds: captioning/tutorial/pickled_modules.py, captioning/tutorial/importer.py and docs/tutorial-checkpoints.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from captioning import checkpoint  # noqa: E402
from captioning.tutorial import importer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('tutorial_checkpoint', help="the tutorial's BEST_checkpoint_*.pth.tar (or checkpoint_*.pth.tar)")
    p.add_argument('word_map', help='the WORDMAP_*.json it was trained with')
    p.add_argument('out', help='where to write the checkpoint (.pt)')
    args = p.parse_args(argv)
    try:
        ckpt = importer.convert_file(args.tutorial_checkpoint, args.word_map)
        checkpoint.save_checkpoint(args.out, ckpt)
    except (OSError, ValueError, ImportError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    cfg, bleu = ckpt['config'], ckpt['best_score']
    print(f"wrote {args.out} ({utils.format_size(os.path.getsize(args.out))}): {cfg['encoder']} at "
          f"{cfg['image_size']} px pooled to {cfg['encoded_image_size']}x{cfg['encoded_image_size']}"
          f"{' (fine-tuned)' if cfg['fine_tune_encoder'] else ''}, sat decoder, {len(ckpt['word_map'])} words; "
          f"epoch {ckpt['epoch']}, the tutorial's VAL BLEU-4 "
          f"{'unknown' if bleu is None else f'{bleu:.4f}'} (teacher-forced; 03_evaluate.py scores generated captions)")
    return 0


if __name__ == '__main__':
    sys.exit(main())

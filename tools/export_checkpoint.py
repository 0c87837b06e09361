"""Turn a training checkpoint into a small inference checkpoint (what checkpoints/ ships).

    python tools/export_checkpoint.py runs/<name>/BEST_checkpoint_<name>.pt checkpoints/my_model.pt

Drops the optimizer, scheduler and RNG state, stores floating weights in fp16 (--fp32 to keep
them), and keeps only the encoder weights that differ from its named pretrained ones (none for a
frozen encoder), with a digest checked when the checkpoint is loaded. The config and word map stay.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from captioning import checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='training checkpoint (BEST_checkpoint_*.pt)')
    p.add_argument('out', help='where to write the exported checkpoint')
    p.add_argument('--fp32', action='store_true', help='keep fp32 weights')
    args = p.parse_args(argv)
    out = checkpoint.export(checkpoint.load(args.checkpoint), fp16=not args.fp32)
    checkpoint.save_checkpoint(args.out, out)
    n_delta = len(out.get('encoder_delta') or {})
    print(f"wrote {args.out} ({utils.format_size(os.path.getsize(args.out))}; encoder: "
          f"{'whole' if out.get('encoder') else f'{n_delta} entries differing from its pretrained weights'})")
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Overlay the training curves of several 01_train.py runs in one figure (the zoo in one picture).

    python tools/plot_runs.py runs/sat runs/show_tell runs/dot_attention --out zoo_curves.png
    python tools/plot_runs.py runs/flickr8k_efficientnet_lite0 --labels lite0   # one run, one colour

One colour per run: train loss solid and VAL teacher-forced loss dashed, VAL BLEU-4, VAL CIDEr-D
and (self-critical runs) the train reward per epoch, all read from each run folder's metrics.jsonl.
Every run also draws its own curves.png (with its logged steps) after each epoch: captioning/training/curves.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captioning.training import curves  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', metavar='RUN', help='run folders of 01_train.py (with metrics.jsonl)')
    p.add_argument('--out', default='curves_overlay.png', help='the PNG to write (default: %(default)s)')
    p.add_argument('--labels', nargs='+', help="legend names, one per run (default: the folders' names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        print(f'error: {len(args.labels)} --labels for {len(args.runs)} runs', file=sys.stderr)
        return 1
    try:
        for run in args.runs:
            epochs, _ = curves.read_run(run)
            if not epochs:
                raise ValueError(f'{run}: no epoch has ended yet (metrics.jsonl is empty or missing)')
        panels = curves.write_overlay(args.runs, args.out, args.labels)
    except (OSError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    points = sum(len(line.xs) for line in panels.get('bleu4', []))
    print(f'wrote {args.out}: {len(args.runs)} runs, {points} epochs in all')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The model zoo's table rows (docs/results.md, docs/zoo.md) from run folders, so no figure is copied by hand.

    python tools/zoo_table.py runs/zoo_sat runs/zoo_transformer runs/zoo_transformer_scst

One Markdown row per run folder of 01_train.py, read from what the run and its scoring wrote there:
- `val_metrics.json` (03_evaluate.py --split VAL --beam-sizes 3 --bad-endings allow --out ...; the
  zoo recipes of the Makefile write it): BLEU-1..4, METEOR, ROUGE-L, CIDEr, bad endings, distinct words
  of the beam-3 row (METEOR "not scored" for Chinese, whose scoring leaves it out);
- `metrics.jsonl`: epochs run, the selected one (counted from 0, as the logs count), and the training time (training plus validation
  seconds of every epoch logged, as measured, whatever else shared the machine);
- `BEST_checkpoint_*.pt`: the decoder, the objective and the decoder's parameters (shared weights once);
- `bench_infer.json`, when present: decode ms per image at beam 3 on batches of 32, encoder excluded
  (`python benchmarks/bench_infer.py --checkpoint RUN/BEST_checkpoint_*.pt --batch-sizes 32 --beam-sizes 3
  --max-len 50 --json > RUN/bench_infer.json`, on an idle machine); else "not measured".
The command that reproduces a row is the Makefile's zoo recipe when the folder follows its naming
(runs/zoo_<decoder>, runs/zoo_<decoder>_scst; runs/zoo_cn_<decoder>[_scst] for Flickr8k-CN).
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from captioning import checkpoint  # noqa: E402
from captioning.training import curves  # noqa: E402

BEAM_SIZE = 3
BENCH_BATCH = 32
SCORES = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')
OPTIONAL_SCORES = ('METEOR',)   # English-only: left out of Chinese (jieba) scoring
HEADER = ('| decoder | objective | parameters | epochs (best) | training | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | '
          'METEOR | ROUGE-L | CIDEr | bad endings | distinct words | decode ms/image | command |')


def beam_row(val_metrics, path):
    """The beam-3 result of a 03_evaluate.py metrics.json (ValueError naming the file otherwise)."""
    results = val_metrics.get('results') if isinstance(val_metrics, dict) else None
    rows = [r for r in results or [] if isinstance(r, dict) and r.get('beam_size') == BEAM_SIZE]
    if not rows:
        raise ValueError(f'{path}: no beam-size {BEAM_SIZE} result (score with 03_evaluate.py --beam-sizes {BEAM_SIZE})')
    scores = rows[0].get('metrics')
    missing = [k for k in SCORES if k not in OPTIONAL_SCORES
               and (not isinstance(scores, dict) or not isinstance(scores.get(k), (int, float)))]
    if missing:
        raise ValueError(f'{path}: results[beam_size={BEAM_SIZE}].metrics lacks {", ".join(missing)} '
                         '(scored without the COCO toolkit?)')
    return rows[0]


def decode_ms(folder):
    """Decode ms per image (beam 3, batch 32) from the folder's bench_infer.json, or None."""
    path = os.path.join(folder, 'bench_infer.json')
    if not os.path.exists(path):
        return None
    bench = utils.read_json(path, 'bench_infer.py --json output')
    for r in bench.get('results') or [] if isinstance(bench, dict) else []:
        if (isinstance(r, dict) and r.get('batch_size') == BENCH_BATCH and r.get('beam_size') == BEAM_SIZE
                and 'tutorial_formulation' not in r and isinstance(r.get('beam_s'), (int, float))):
            return r['beam_s'] / BENCH_BATCH * 1000
    raise ValueError(f'{path}: no batch-{BENCH_BATCH}, beam-{BEAM_SIZE} result')


def decoder_parameters(ckpt):
    """The decoder's parameters (a weight shared by two layers, as tied embeddings are, counted once)."""
    _, decoder = checkpoint.models_from_checkpoint(ckpt)
    return sum(p.numel() for p in decoder.parameters())


def reproduce(folder, config):
    """The command that reproduces the run: the Makefile's zoo recipe when the folder is named its way
    (runs/zoo_<decoder>[_scst] on Flickr8k, runs/zoo_cn_<decoder>[_scst] on Flickr8k-CN)."""
    name, decoder = os.path.basename(os.path.normpath(folder)), config['decoder']
    stage = {'xe': '', 'scst': '_scst'}[config['objective']]
    for prefix, target in (('zoo_', 'flickr8k-zoo'), ('zoo_cn_', 'flickr8k-cn-zoo')):
        if name == f'{prefix}{decoder}{stage}':
            return f"`make {target}{stage.replace('_', '-')} DECODER={decoder}`"
    return f'the config in `{folder}`'


def fmt_minutes(seconds):
    return f'{seconds / 60:.0f} min' if seconds < 5400 else f'{seconds / 3600:.1f} h'


def zoo_row(folder):
    """One Markdown row for a run folder (ValueError, one line naming the file, when a part is missing)."""
    epochs, _ = curves.read_run(folder)
    bests = sorted(glob.glob(os.path.join(folder, 'BEST_checkpoint_*.pt')))
    if not bests:
        raise ValueError(f'{folder}: no BEST_checkpoint_*.pt')
    ckpt = checkpoint.load(bests[0])
    config = {'objective': 'xe', **ckpt['config']}
    val_path = os.path.join(folder, 'val_metrics.json')
    if not os.path.exists(val_path):
        raise ValueError(f'{val_path}: missing (03_evaluate.py --checkpoint {bests[0]} --split VAL '
                         f'--beam-sizes {BEAM_SIZE} --bad-endings allow --out {val_path})')
    row = beam_row(utils.read_json(val_path, '03_evaluate.py metrics'), val_path)
    best = curves.best_epoch(epochs)
    seconds = sum(r.get('train_seconds', 0) + r.get('val_seconds', 0) for r in epochs)
    ms = decode_ms(folder)
    bad = row.get('bad_endings')
    cells = [f"`{config['decoder']}`", {'xe': 'cross-entropy', 'scst': 'self-critical'}[config['objective']],
             f'{decoder_parameters(ckpt) / 1e6:.1f} M', f"{len(epochs)} ({best[0] - 1 if best else '-'})",
             fmt_minutes(seconds)]
    cells += [f"{row['metrics'][k]:.4f}" if k in row['metrics'] else 'not scored' for k in SCORES]
    cells += [f'{bad:.1%}' if isinstance(bad, (int, float)) else 'not measured',
              str(row.get('diversity', {}).get('distinct_words', 'not measured')),
              f'{ms:.1f}' if ms is not None else 'not measured', reproduce(folder, config)]
    return '| ' + ' | '.join(cells) + ' |'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', metavar='RUN', help='run folders of 01_train.py, scored on VAL')
    p.add_argument('--no-header', action='store_true', help='rows only (to add to an existing table)')
    args = p.parse_args(argv)
    rows = []
    try:
        for run in args.runs:
            rows.append(zoo_row(run))
    except (OSError, ValueError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    if not args.no_header:
        print(HEADER)
        print('|' + '---|' * 2 + '---:|' * (HEADER.count('|') - 4) + '---|')
    print('\n'.join(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())

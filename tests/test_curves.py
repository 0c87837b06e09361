"""Training curves (captioning/training/curves.py): curves.png after every epoch of 01_train.py, tools/plot_runs.py,
--tensorboard."""
import json
import os
import sys

import pytest
from conftest import REPO, TINY_MODEL, script
from PIL import Image

from captioning.training import curves

sys.path.insert(0, os.path.join(REPO, 'tools'))
import plot_runs  # noqa: E402

train = script('01_train')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_png(path):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()                                   # checksums of every chunk
    with Image.open(path) as img:
        assert img.format == 'PNG' and img.width >= 1000 and img.height >= 400
        assert len(img.convert('L').getcolors(1 << 16)) > 10     # something is drawn on the white canvas


@pytest.fixture(scope='module')
def xe_run(synth_data, tmp_path_factory):
    """A 2-epoch cross-entropy run folder of the tiny synthetic set (12 steps per epoch, each logged)."""
    folder, _ = synth_data
    out = tmp_path_factory.mktemp('curves_xe')
    assert train.main(['--data-folder', folder, '--out-dir', str(out), '--epochs', '2', '--batch-size', '20',
                       *TINY_MODEL]) == 0
    return str(out)


def test_each_epoch_of_a_run_draws_its_curves(xe_run):
    path = os.path.join(xe_run, 'curves.png')
    assert_png(path)
    epochs, steps = records(os.path.join(xe_run, 'metrics.jsonl')), records(os.path.join(xe_run, 'steps.jsonl'))
    assert len(epochs) == 2 and len(steps) == 24
    panels = curves.run_series(xe_run)
    assert list(panels) == ['loss', 'bleu4', 'cider']  # no reward panel for a cross-entropy run
    lines = {line.label: line for lines in panels.values() for line in lines}
    for label, key in (('train loss (epoch mean)', 'train_loss'), ('VAL loss (teacher-forced)', 'val_tf_loss'),
                       ('VAL BLEU-4', 'bleu4'), ('VAL CIDEr-D', 'cider')):
        assert lines[label].xs == [1, 2]               # one point per epoch, at epochs trained
        assert lines[label].ys == [r[key] for r in epochs]
    step_line = lines['train loss (logged steps)']
    assert step_line.ys == [r['loss'] for r in steps]
    assert step_line.xs[0] == pytest.approx(1 / 12) and step_line.xs[11] == 1 and step_line.xs[-1] == 2
    # the figure after epoch 0 had one point per series: the hook drew it then (its file was replaced since)
    partial = os.path.join(xe_run, 'partial')
    os.makedirs(partial)
    with open(os.path.join(partial, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps(epochs[0]) + '\n' + '{"epoch": 1, "step": 2')   # plus a torn line, as a kill leaves
    _, partial_panels = curves.write_run_curves(partial)
    assert [len(line.xs) for line in partial_panels['bleu4']] == [1]
    assert_png(os.path.join(partial, 'curves.png'))


def test_self_critical_run_draws_its_reward(synth_data, tiny_checkpoint, tmp_path):
    folder, _ = synth_data
    out = tmp_path / 'scst'
    assert train.main(['--data-folder', folder, '--init-from', tiny_checkpoint, '--objective', 'scst', '--out-dir',
                       str(out), '--batch-size', '20', '--workers', '0', '--log-every', '3', '--epochs', '1',
                       '--scst-baseline', 'greedy']) == 0
    assert_png(out / 'curves.png')
    panels = curves.run_series(str(out))
    assert list(panels) == ['loss', 'bleu4', 'cider', 'reward']
    labels = {panel: [line.label for line in lines] for panel, lines in panels.items()}
    # its policy-gradient loss is left out; the greedy baseline differs from the reward, so it is drawn
    assert labels['loss'] == ['VAL loss (teacher-forced)']
    assert labels['reward'] == ['reward (logged steps)', 'train reward (epoch mean)', 'baseline (epoch mean)']
    record = records(out / 'metrics.jsonl')[0]
    assert panels['reward'][1].ys == [record['train_reward']] and panels['reward'][2].ys == [record['train_baseline']]
    assert len(panels['reward'][0].xs) == 12 // 3
    assert curves.best_epoch(records(out / 'metrics.jsonl'))[1] == 'cider'     # selected by CIDEr


def test_step_positions_of_a_resumed_and_an_unfinished_epoch():
    epochs = [{'epoch': 0, 'step': 10}, {'epoch': 1, 'step': 30}]
    steps = [{'epoch': 0, 'step': 5}, {'epoch': 1, 'step': 20}, {'epoch': 2, 'step': 40}, {'epoch': 3, 'step': 99}]
    xs = [x for x, _ in curves.step_positions(epochs, steps)]
    assert xs == [0.5, 1.5, 2.5]             # epoch 2 has not ended: placed by epoch 1's length; 3 left out


def test_plot_runs_overlays_runs_and_refuses_bad_folders(xe_run, tmp_path, capsys):
    out = tmp_path / 'zoo.png'
    assert plot_runs.main([xe_run, xe_run, '--labels', 'a', 'b', '--out', str(out)]) == 0
    assert_png(out)
    panels = curves.overlay_series([xe_run, xe_run], ['a', 'b'])
    assert [line.label for line in panels['loss']] == ['a train', 'a VAL', 'b train', 'b VAL']
    assert [len(line.xs) for line in panels['cider']] == [2, 2]
    assert panels['loss'][0].color != panels['loss'][2].color
    capsys.readouterr()
    for argv, message in (([str(tmp_path / 'missing')], 'no such run folder'),
                          ([str(tmp_path)], 'no metrics.jsonl or steps.jsonl'),
                          ([xe_run, '--labels', 'a', 'b'], '2 --labels for 1 runs')):
        assert plot_runs.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and err.count('\n') == 1


def test_a_figure_that_cannot_be_written_is_a_warning(xe_run, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    for name in ('metrics.jsonl', 'steps.jsonl'):
        (run / name).write_text(open(os.path.join(xe_run, name)).read())
    (run / 'curves.png').mkdir()                       # in the way
    said = []
    assert curves.after_epoch(str(run), log=said.append) is None
    assert len(said) == 1 and said[0].startswith('warning: could not draw the training curves')


def test_tensorboard_missing_is_one_line(synth_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)      # as if not installed
    folder, _ = synth_data
    assert train.main(['--data-folder', folder, '--out-dir', str(tmp_path / 'tb'), '--epochs', '1',
                       '--tensorboard', *TINY_MODEL]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'pip install tensorboard==' in err
    assert not (tmp_path / 'tb').exists()           # refused before any work


def test_tensorboard_event_files(xe_run, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / 'run'
    run.mkdir()
    epochs = records(os.path.join(xe_run, 'metrics.jsonl'))
    (run / 'steps.jsonl').write_text(open(os.path.join(xe_run, 'steps.jsonl')).read())
    for i in range(len(epochs)):                       # as 01_train.py: the epoch's line, then the hook
        with open(run / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(epochs[i]) + '\n')
        curves.after_epoch(str(run), tensorboard=True)
    acc = EventAccumulator(str(run / 'tensorboard'))
    acc.Reload()
    assert [e.step for e in acc.Scalars('val/bleu4')] == [r['step'] for r in epochs]
    assert [e.value for e in acc.Scalars('val/cider')] == pytest.approx([r['cider'] for r in epochs])
    assert [e.step for e in acc.Scalars('train/step_loss')] == list(range(1, 25))   # each logged step once


def test_tensorboard_turned_on_later_writes_what_was_logged(xe_run, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / 'run'
    run.mkdir()
    for name in ('metrics.jsonl', 'steps.jsonl'):       # two epochs logged without --tensorboard
        (run / name).write_text(open(os.path.join(xe_run, name)).read())
    curves.after_epoch(str(run), tensorboard=True)
    acc = EventAccumulator(str(run / 'tensorboard'))
    acc.Reload()
    assert len(acc.Scalars('val/cider')) == 2 and len(acc.Scalars('train/step_loss')) == 24

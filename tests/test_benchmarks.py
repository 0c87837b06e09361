"""The benchmark scripts run and report their keys (tiny settings; timings are not asserted)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def bench(name, *args, cwd=None):
    done = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', name), '--json', *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_train_synthetic_features_ours_and_tutorial():
    for extra in ([], ['--tutorial']):
        r = bench('bench_train.py', '--synthetic-features', '--dim', '32', '--vocab-size', '50', '--batch-size', '4',
                  '--warmup', '1', '--steps', '1', '--windows', '2', *extra)
        assert r['captions_per_s'] > 0 and r['peak_rss_mb'] > 0 and r['tutorial_formulation'] == bool(extra)
        assert {'torch', 'threads', 'device'} <= set(r)


def test_bench_train_on_a_prepared_dataset(synth_data):
    folder, _ = synth_data
    for extra in (['--source', 'cache'], ['--source', 'images'], ['--source', 'images', '--tutorial']):
        r = bench('bench_train.py', '--data-folder', folder, '--encoder', 'resnet18', '--image-size', '64',
                  '--dim', '16', '--batch-size', '10', '--warmup', '1', '--steps', '1', '--windows', '1', *extra)
        assert r['captions_per_s'] > 0 and r['encoder'] == 'resnet18'


def test_bench_cider_times_the_reward_and_the_scst_step(synth_data):
    folder, _ = synth_data
    r = bench('bench_cider.py', '--data-folder', folder, '--image-size', '64', '--dim', '16', '--batch-size', '10',
              '--warmup', '1', '--repeats', '2')
    assert r['images_per_step'] == 2 and r['samples_per_image'] == 5 and r['train_images'] == 48
    assert 0 < r['reward_ms'] and 0 < r['step_ms'] and 0 < r['reward_share_of_step'] < 1 and r['ngrams'] > 0


def test_bench_infer_reports_decode_cost(tmp_path):
    r = bench('bench_infer.py', '--encoder', 'resnet18', '--vocab-size', '30', '--batch-sizes', '1', '2',
              '--beam-sizes', '1', '2', '--max-len', '4', '--repeats', '1', '--tutorial')
    rows = r['results']
    assert len(rows) == 2 * 2 + 2
    for row in rows:
        assert row['decode_ms_per_image_step'] > 0 and row['decode_steps'] >= 1
    assert all(row['images_per_s'] > 0 for row in rows if not row.get('tutorial_formulation'))


def test_bench_prep_runs(tmp_path):
    r = bench('bench_prep.py', '--synthetic-images', '40', '--runs', '1', '--hdf5', '--image-size', '32')
    assert r['images'] == 40 and r['captions'] == 200 and r['seconds'] > 0 and r['wall_seconds'] > 0


def test_benchmarks_take_every_decoder():
    from captioning.decoders import registry
    for name in registry.DECODERS:
        r = bench('bench_train.py', '--synthetic-features', '--decoder', name, '--dim', '16', '--vocab-size', '40',
                  '--batch-size', '4', '--warmup', '1', '--steps', '1', '--windows', '1')
        assert r['decoder'] == name and r['captions_per_s'] > 0
        r = bench('bench_infer.py', '--encoder', 'resnet18', '--decoder', name, '--vocab-size', '30',
                  '--batch-sizes', '2', '--beam-sizes', '2', '--max-len', '3', '--repeats', '1')
        assert name in r['model'] and r['results'][0]['decode_steps'] >= 1


def test_bench_cli_times_the_whole_inference_command(tiny_checkpoint):
    r = bench('bench_cli.py', '--checkpoint', tiny_checkpoint, '--runs', '1')
    assert r['command_median_s'] > r['import_torch_median_s'] > 0 and r['runs'] == 1


def _bench_tutorial():
    import importlib.util
    spec = importlib.util.spec_from_file_location('bench_tutorial', os.path.join(REPO, 'benchmarks', 'bench_tutorial.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_tutorial_patch_helper_replaces_exactly_once_or_says_why():
    bt = _bench_tutorial()
    src = 'a = 1\nprev = top / vocab\n# Read\nx = 1\ny = 2\nz = enc(x)\nend = 3\n'
    assert bt.apply_patch(src, bt.Patch('f.py', 'top / vocab', 'top // vocab', 'why')) == src.replace('/', '//')
    cut = bt.apply_patch(src, bt.Patch('f.py', '# Read\n', 'z = x\n', 'why', until='z = enc(x)\n'))
    assert cut == 'a = 1\nprev = top / vocab\nz = x\nend = 3\n'
    for bad in (bt.Patch('f.py', 'missing', '', 'the reason'), bt.Patch('f.py', '= ', '', 'the reason'),
                bt.Patch('f.py', '# Read\n', '', 'the reason', until='not there')):
        with pytest.raises(bt.PatchError, match=r'f\.py: (not found|found \d+ times).*the reason'):
            bt.apply_patch(src, bad)


def test_bench_tutorial_one_round_against_the_tutorials_code():
    """Needs a checkout of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning in $TUTORIAL_REPO (no network here)."""
    repo = os.environ.get('TUTORIAL_REPO')
    if not repo:
        pytest.skip('the side-by-side run against the tutorial\'s own code needs a checkout of it (never committed '
                    'here): git clone https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning DIR, then '
                    'TUTORIAL_REPO=DIR make test (or TUTORIAL_REPO=DIR .venv/bin/python -m pytest '
                    'tests/test_benchmarks.py)')
    r = bench('bench_tutorial.py', '--tutorial-repo', repo, '--rounds', '1', '--num-images', '2', '--batch-size', '2',
              '--train-batch', '2', '--train-steps', '1')
    f = r['figures']
    assert f['train']['tutorial_captions_per_s'] > 0 and f['train']['ours_captions_per_s'] > 0
    for key in ('decode', 'e2e'):
        assert f[key]['images'] == 2 and f[key]['tutorial_ms_per_image'] > 0 and f[key]['ours_batch1_ms_per_image'] > 0
        assert 0 <= f[key]['identical_tutorial_vs_ours'] <= 2
    assert f['decode']['identical_ours_batch1_vs_batched'] == 2
    assert any('//' in p['with'] for p in r['patches']) and {'torch', 'threads', 'device'} <= set(r)


def test_gpu_check_refuses_cleanly_without_cuda():
    """Without a CUDA GPU (as here; CUDA_VISIBLE_DEVICES='' hides any) it says so in one line, exit 2."""
    done = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_check.py')], capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith('gpu-check: no CUDA GPU visible') and 'Traceback' not in done.stderr


def test_bench_scale_small(tmp_path):
    """Tiny sizes: 00 on a COCO-shaped JSON, 02 at two sizes, the resume check after a kill -9."""
    r = bench('bench_scale.py', '--distinct', '2', '--prep-sizes', '300', '--infer-sizes', '20', '40',
              '--resume-images', '120', '--batch-size', '4')
    assert r['prep'][0]['images'] == 300 and r['prep'][0]['seconds'] > 0 and r['prep'][0]['peak_rss_mb'] > 0
    assert [row['captions'] for row in r['infer']] == [20, 40] and r['infer_rss_growth_mb_per_1000_images'] is not None
    assert r['resume']['every_image_once'] and r['resume']['captions_after'] == 120

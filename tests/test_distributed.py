"""torchrun + DistributedDataParallel on CPU (gloo): 2 processes behave like 1 on the global batch."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_MODEL, script
from test_train import step_losses

train = script('01_train')
ARGS = [*TINY_MODEL, '--dropout', '0', '--epochs', '1', '--no-cache-features']


def torchrun(tmp_path, out, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'tests', 'ddp_worker.py'), str(out), *map(str, args)]
    done = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope='module')
def two_process_run(synth_data, tmp_path_factory):
    folder, name = synth_data
    tmp = tmp_path_factory.mktemp('ddp')
    out = tmp / 'run'
    out.mkdir()
    stdout = torchrun(tmp, out, '--data-folder', folder, '--out-dir', out, '--batch-size', '10', *ARGS)
    return out, name, stdout


def test_ranks_hold_identical_parameters_equal_to_one_process(two_process_run, synth_data, tmp_path):
    out, name, stdout = two_process_run
    r0, r1 = torch.load(out / 'rank0.pt', weights_only=True), torch.load(out / 'rank1.pt', weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert stdout.count('epoch 0:') == 1                      # only rank 0 logs
    folder, _ = synth_data
    single = tmp_path / 'single'
    assert train.main(['--data-folder', folder, '--out-dir', str(single), '--batch-size', '20', *ARGS]) == 0
    # Same global batches, gradients averaged over processes: the losses of one process, step by step ...
    assert len(step_losses(out)) == len(step_losses(single)) == 12
    for (s1, a), (s2, b) in zip(step_losses(out), step_losses(single)):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    # ... and its parameters, up to float summation order (which Adam can turn into +-lr on a few
    # near-zero gradients, hence the tolerance of a few learning rates).
    one = torch.load(single / f'checkpoint_{name}.pt', weights_only=True)['decoder']
    for k in one:
        assert torch.allclose(one[k], r0[k], atol=3e-3), k
    assert sum((one[k] - r0[k]).abs().sum() for k in one) / sum(v.numel() for v in one.values()) < 1e-5


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    out, name, _ = two_process_run
    ckpt = out / f'checkpoint_{name}.pt'
    state = torch.load(ckpt, weights_only=True)
    assert state['epoch'] == 1 and state['step'] == 12        # 48 images, 2 x 2 per step
    assert train.main(['--resume', str(ckpt), '--epochs', '2', '--out-dir', str(tmp_path / 'cont')]) == 0
    cont = torch.load(tmp_path / 'cont' / f'checkpoint_{name}.pt', weights_only=True)
    assert cont['epoch'] == 2 and cont['step'] == 24

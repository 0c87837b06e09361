"""benchmarks/gpu_check.py (make gpu-check), ready for a short GPU loan: its plan fits its own budget with
what matters most first, the budget skips and stops rows while the table file keeps every row done,
and its dry run: --quick on the CPU under the simulated CUDA device (tests/cuda_sim.py), the server's
own process included (--launcher), so every row's CUDA branch runs once here."""
import os
import sys
import time

import pytest
from conftest import REPO
from cuda_sim import simulated_cuda

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import gpu_check  # noqa: E402

from captioning.decoders import registry  # noqa: E402


@pytest.fixture
def options():
    """gpu_check.OPT as a test sets it, restored after."""
    saved = gpu_check.Options(**vars(gpu_check.OPT))
    yield gpu_check.OPT
    for key, value in vars(saved).items():
        setattr(gpu_check.OPT, key, value)


def test_the_plan_fits_its_budget_on_one_gpu_with_what_matters_most_first(options, tmp_path):
    options.quick = False
    rows = gpu_check.plan(str(tmp_path), str(tmp_path / 'data'), gpu_count=1)
    names = [r.name for r in rows]
    assert names[:5] == ['environment', 'prepare the tiny set', 'train sat bf16', 'inference batch 64', 'server']
    assert names[-1] == 'train images --compile'
    assert all(f'train {d} {t}' in names for d in registry.DECODERS for t in ('bf16', 'fp16'))
    assert not any(r.skip for r in rows)
    assert sum(r.estimate for r in rows) <= gpu_check.BUDGET == 480        # 8 minutes by its own estimate
    two = gpu_check.plan(str(tmp_path), str(tmp_path / 'data'), gpu_count=2)
    assert sum(r.estimate for r in two) > sum(r.estimate for r in rows)      # the torchrun rows then count


def test_the_budget_skips_and_stops_rows_and_the_table_keeps_every_row_done(tmp_path):
    out = tmp_path / 'table.md'
    checker = gpu_check.Checker(str(out), budget=2.0, title='test')
    seen = {}

    def slow():
        seen['while running'] = out.read_text()
        time.sleep(30)

    def broken():
        raise ValueError('a clear reason\nsecond line')
    statuses = [checker.run(gpu_check.Row('fast', 0.1, lambda: 'fine')),
                checker.run(gpu_check.Row('broken', 0.1, broken)),
                checker.run(gpu_check.Row('left out', 0.1, None, skip='not here')),
                checker.run(gpu_check.Row('too long', 100, lambda: 'never')),
                checker.run(gpu_check.Row('slow', 0.5, slow))]
    assert statuses == ['ok', 'FAIL', 'skip', 'skip', 'TIMEOUT']
    assert '(running: slow' in seen['while running'] and '| broken | FAIL |' in seen['while running']
    table = out.read_text()
    for line in ('| fast | ok |', '| broken | FAIL |', 'ValueError: second line', '| left out | skip |',
                 '| too long | skip |', 'does not fit', '| slow | TIMEOUT |', 'budget ran out'):
        assert line in table
    assert '(running' not in table and checker.failed() == ['broken', 'slow']
    assert time.monotonic() - checker.began < 10                              # the slow row was stopped


def test_quick_dry_run_on_simulated_cuda_runs_every_rows_cuda_branch(tmp_path, options):
    out = tmp_path / 'gpu_check.md'
    launcher = f"{sys.executable} {os.path.join(REPO, 'tests', 'cuda_sim.py')}"
    with simulated_cuda() as sim:
        rc = gpu_check.main(['--quick', '--budget', '0', '--out', str(out), '--launcher', launcher,
                             '--keep', str(tmp_path / 'work')])
    table = out.read_text()
    assert rc == 0, table
    assert not sim.errors and not sim.gaps
    rows = {line.split(' | ')[0][2:]: line.split(' | ')[1] for line in table.splitlines() if line.startswith('| ')
            and not line.startswith('| check') and not line.startswith('|---')}
    ran = ['environment', 'prepare the tiny set', 'train sat bf16', 'inference batch 64', 'server', 'train sat fp16',
           'feature caching batch 64', 'evaluation', 'train scst', 'train --fine-tune-encoder']
    assert all(rows[name] == 'ok' for name in ran), table
    assert all(status == 'skip' for name, status in rows.items() if name not in ran), table
    assert 'Simulated CUDA device' in table.splitlines()[0] and 'passed or skipped' in table.splitlines()[-1]

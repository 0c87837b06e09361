"""The whole `python 02_inference.py --img PHOTO` command, as a user runs it: wall time from process
start to exit (interpreter start, imports, checkpoint load, captioning, writing, exit), median of runs.

    python benchmarks/bench_cli.py                       # 02's default (the provided pair), one sample photo, 5 runs
    python benchmarks/bench_cli.py --runs 9 --json

Also times `python -c "import torch"` (the floor any command of the suite pays), and reports the
CPU time (user + system) of the command and the load average: on a busy machine wall time moves
more than any change in the code, CPU time much less.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from common import report  # noqa: E402

RUNS = 5
IMG = os.path.join(REPO, 'assets', 'samples', 'coffee.jpg')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--img', default=IMG, help='(default: %(default)s)')
    p.add_argument('--checkpoint', nargs='+', default=[],
                   help="one checkpoint, or several (an ensemble) (default: 02_inference.py's, the provided pair)")
    p.add_argument('--runs', type=int, default=RUNS, help='(default: %(default)s)')
    p.add_argument('--precision', choices=('auto', 'fp32', 'int8'), default='auto',
                   help="02_inference.py's --precision (default: %(default)s)")
    p.add_argument('--json', action='store_true')
    return p.parse_args(argv)


def wall(cmd):
    """-> (wall seconds, CPU seconds of the child: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None):
    args = parse_args(argv)
    if args.runs < 1:
        raise SystemExit('--runs must be at least 1')
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(REPO, '02_inference.py'), '--img', args.img, '--out', out,
               '--device', 'cpu', '--overwrite',   # each run captions anew (the same --out would resume: nothing to do)
               '--precision', args.precision, *(['--checkpoint', *args.checkpoint] if args.checkpoint else [])]
        wall(cmd)   # warm the page cache (files and libraries), as a second use of the command would find it
        load_before = os.getloadavg()[0]
        command, cpu = zip(*[wall(cmd) for _ in range(args.runs)])
        import_torch, import_cpu = zip(*[wall([sys.executable, '-c', 'import torch']) for _ in range(args.runs)])
    report({'command_median_s': round(statistics.median(command), 3), 'command_min_s': round(min(command), 3),
            'command_max_s': round(max(command), 3), 'command_cpu_median_s': round(statistics.median(cpu), 3),
            'import_torch_median_s': round(statistics.median(import_torch), 3),
            'import_torch_cpu_median_s': round(statistics.median(import_cpu), 3),
            'runs': args.runs, 'precision': args.precision, 'load_avg_1min_before': round(load_before, 2),
            'load_avg_1min_after': round(os.getloadavg()[0], 2), 'cpus': os.cpu_count()}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

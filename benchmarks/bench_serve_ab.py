"""Side by side: one client's latency against several 04_serve.py servers in one run (e.g. this tree at
int8 and fp32 against an older commit checked out in a git worktree), the servers loaded at once and
measured in interleaved rounds, so that the machine's drift falls on all of them alike.

    git worktree add /tmp/before 50dfb1c       # the code before issue 31 (shares this .venv if linked)
    python benchmarks/bench_serve_ab.py --server before=/tmp/before --server int8=.:--precision,int8 \\
        --server fp32=.:--precision,fp32 --rounds 5 --requests 20 --json

A server is LABEL=FOLDER[:ARG,ARG,...]: FOLDER's 04_serve.py is run by this Python with the same
--checkpoint (default: this tree's provided pair, by absolute path) and its own extra arguments.
For each round, each server in turn gets --requests POSTs of the sample photos (cycled) from one
client on one keep-alive connection, after a warm-up. Reported per server: p50 and p99 latency over
all rounds, and the ratio of its p50 to the first server's. 127.0.0.1 only.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_serve import HOST, REPO, free_port, multipart, percentile, run_load, wait_ready  # noqa: E402

PAIR = [os.path.join(REPO, 'checkpoints', f'flickr8k_efficientnet_{e}_fp16.pt') for e in ('lite0', 'lite2')]


def parse_server(spec):
    """'LABEL=FOLDER[:ARG,ARG]' -> (label, folder, [args])."""
    label, sep, rest = spec.partition('=')
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f'--server {spec!r}: expected LABEL=FOLDER[:ARG,ARG,...]')
    folder, _, args = rest.partition(':')
    folder = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(folder, '04_serve.py')):
        raise argparse.ArgumentTypeError(f'--server {spec!r}: no 04_serve.py in {folder}')
    return label, folder, [a for a in args.split(',') if a]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--server', type=parse_server, action='append', required=True, metavar='LABEL=FOLDER[:ARGS]')
    p.add_argument('--checkpoint', nargs='+', default=PAIR, help='passed to every server (default: the provided pair)')
    p.add_argument('--images', default=os.path.join(REPO, 'assets', 'samples'), help='photos to send (cycled)')
    p.add_argument('--beam-size', type=int, default=3)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--requests', type=int, default=20, help='requests per server per round')
    p.add_argument('--warmup', type=int, default=5, help='requests per server before anything is measured')
    p.add_argument('--time-limit', type=float, default=1200, help='give up after this many seconds in all')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    args = p.parse_args(argv)
    if len({label for label, _, _ in args.server}) != len(args.server):
        p.error('--server labels must differ')
    if not (1 <= args.rounds <= 100 and 1 <= args.requests <= 500):
        p.error('--rounds must be 1..100 and --requests 1..500')
    return args


def main(argv=None):
    args = parse_args(argv)
    from common import report

    from datasets import list_images
    bodies = []
    for path in list_images(args.images):
        with open(path, 'rb') as f:
            bodies.append(multipart(f.read(), os.path.basename(path), args.beam_size))
    if not bodies:
        print(f'error: no images in {args.images}', file=sys.stderr)
        return 1
    deadline = time.time() + args.time_limit
    servers = []
    try:
        for label, folder, extra in args.server:
            port, log = free_port(), tempfile.NamedTemporaryFile(prefix='bench_serve_ab_', suffix='.log', delete=False)
            proc = subprocess.Popen([sys.executable, os.path.join(folder, '04_serve.py'), '--checkpoint',
                                     *[os.path.abspath(c) for c in args.checkpoint], '--host', HOST, '--port', str(port),
                                     '--beam-size', str(args.beam_size), *extra],
                                    cwd=folder, stdout=log, stderr=subprocess.STDOUT)
            servers.append({'label': label, 'folder': folder, 'args': extra, 'port': port, 'proc': proc,
                            'log': log.name, 'latencies': []})
        for s in servers:
            wait_ready(s['port'], s['proc'], deadline, s['log'])
        for s in servers:
            run_load(s['port'], bodies, args.warmup, 1, deadline)
        for _ in range(args.rounds):
            for s in servers:
                s['latencies'] += run_load(s['port'], bodies, args.requests, 1, deadline)[1]
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s['proc'].terminate()
        for s in servers:
            try:
                s['proc'].wait(timeout=30)
            except subprocess.TimeoutExpired:
                s['proc'].kill()
            os.unlink(s['log'])
    first = statistics.median(servers[0]['latencies'])
    result = {'checkpoint': ' + '.join(os.path.basename(c) for c in args.checkpoint), 'beam_size': args.beam_size,
              'rounds': args.rounds, 'requests_per_round': args.requests, 'cpus': os.cpu_count(),
              'servers': [{'label': s['label'], 'folder': s['folder'], 'args': s['args'],
                           'requests': len(s['latencies']), 'p50_ms': round(statistics.median(s['latencies']), 1),
                           'p99_ms': round(percentile(s['latencies'], 99), 1),
                           'p50_ratio_to_first': round(statistics.median(s['latencies']) / first, 3)}
                          for s in servers],
              'load_average_1m_at_end': round(os.getloadavg()[0], 2)}
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Load benchmark of 04_serve.py: requests/s and latency at several numbers of concurrent clients,
and the server's memory before and after many requests. 127.0.0.1 only; request counts are bounded.

    python benchmarks/bench_serve.py                          # the provided checkpoint, 1, 8 and 32 clients
    python benchmarks/bench_serve.py --concurrency 1 8 32 --requests 96 --memory-requests 1000 --json
    python benchmarks/bench_serve.py --checkpoint A.pt B.pt --precision fp32     # an ensemble, fp32 decoder
    python benchmarks/bench_serve.py --concurrency 8 --requests 96 --memory-requests 0 --soak 10000

Starts the server as a subprocess on a free port of 127.0.0.1 (its per-request log goes to a
temporary file), warms it up, then for each concurrency c runs --requests POSTs of the sample photos
(cycled) from c client threads, each with its own keep-alive connection: requests/s over the wall
time, p50/p99 latency, and the mean number of requests the server gathered into one batch. Finally
--memory-requests more requests at --memory-concurrency clients, with the server's resident memory
(VmRSS) read before and after. --soak N then sends N more (at --memory-concurrency clients) and
reads the server's resident memory every --soak-every (500) requests. The clients share the machine with the server: on a 2-core machine
their own CPU time is part of what is measured.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

HOST = '127.0.0.1'     # never anything else: this benchmark only loads a server on this machine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', nargs='+',
                   default=[os.path.join(REPO, 'checkpoints', 'flickr8k_efficientnet_lite0_fp16.pt')],
                   help='one checkpoint, or several (an ensemble) (default: the Lite0 model)')
    p.add_argument('--precision', choices=('auto', 'fp32', 'int8'), default='auto',
                   help="the server's --precision (default: %(default)s)")
    p.add_argument('--soak', type=int, default=0,
                   help='after the rest, this many requests with RSS read every --soak-every (at most 50,000)')
    p.add_argument('--soak-every', type=int, default=500, help='(default: %(default)s)')
    p.add_argument('--server-env', nargs='*', default=[], metavar='NAME=VALUE',
                   help='environment variables for the server process (e.g. MALLOC_ARENA_MAX=2)')
    p.add_argument('--images', default=os.path.join(REPO, 'assets', 'samples'), help='photos to send (cycled)')
    p.add_argument('--concurrency', type=int, nargs='+', default=[1, 8, 32], help='clients at a time, per level')
    p.add_argument('--requests', type=int, default=96, help='requests per concurrency level (at most 2,000)')
    p.add_argument('--warmup', type=int, default=8, help='requests before anything is measured')
    p.add_argument('--memory-requests', type=int, default=1000, help='requests between the memory readings (at most 5,000)')
    p.add_argument('--memory-concurrency', type=int, default=8)
    p.add_argument('--beam-size', type=int, default=3)
    p.add_argument('--max-batch', type=int, default=8, help="server's --max-batch")
    p.add_argument('--batch-wait-ms', type=float, default=None, help="server's --batch-wait-ms (default: the server's)")
    p.add_argument('--time-limit', type=float, default=1200, help='give up after this many seconds in all')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 2000 and 0 <= args.memory_requests <= 5000 and
            0 <= args.soak <= 50000 and 1 <= args.soak_every <= 10000 and
            all(1 <= c <= 256 for c in args.concurrency + [args.memory_concurrency])):
        p.error('request counts and concurrency are bounded: --requests 1..2000, --memory-requests 0..5000, '
                '--soak 0..50000, --soak-every 1..10000, concurrency 1..256')
    if any('=' not in kv for kv in args.server_env):
        p.error('--server-env takes NAME=VALUE pairs')
    return args


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(port, server, deadline, log):
    """Wait until the server (a Popen) answers /healthz, i.e. its model is loaded; RuntimeError when it
    exits first (see `log`) or `deadline` passes."""
    while True:
        if server.poll() is not None:
            raise RuntimeError(f'the server exited with code {server.returncode}; see {log}')
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request('GET', '/healthz')
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
        if time.time() > deadline:
            raise RuntimeError('the server did not start in time')


def rss_mb(pid):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f'no VmRSS for process {pid}')


def multipart(data, filename, beam_size):
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="beam_size"\r\n\r\n{beam_size}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
    return body, f'multipart/form-data; boundary={boundary}'


def run_load(port, bodies, n_requests, concurrency, deadline):
    """n_requests POSTs from `concurrency` threads -> (wall seconds, latencies in ms, batch sizes)."""
    lock, counter = threading.Lock(), [0]
    latencies, batches, errors = [], [], []

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            while time.time() < deadline:
                with lock:
                    i = counter[0]
                    if i >= n_requests:
                        return
                    counter[0] += 1
                body, ctype = bodies[i % len(bodies)]
                t = time.perf_counter()
                conn.request('POST', '/api/caption', body=body, headers={'Content-Type': ctype})
                resp = conn.getresponse()
                payload = resp.read()
                ms = (time.perf_counter() - t) * 1000
                if resp.status != 200:
                    errors.append(f'HTTP {resp.status}: {payload[:200]!r}')
                    return
                with lock:
                    latencies.append(ms)
                    batches.append(json.loads(payload)['batch_size'])
        except OSError as e:
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f'{len(errors)} request(s) failed, first: {errors[0]}')
    if len(latencies) < n_requests:
        raise RuntimeError(f'--time-limit reached after {len(latencies)} of {n_requests} requests')
    return wall, latencies, batches


def soak(port, bodies, n_requests, every, concurrency, pid, deadline):
    """n_requests POSTs in chunks of `every`, the server's RSS read after each chunk ->
    {'rss_mb': [[requests so far, MB], ...], 'requests_per_s', and, past 1,000 requests, the growth from
    the reading at 1,000 to the last}."""
    readings, done, seconds = [[0, rss_mb(pid)]], 0, 0.0
    while done < n_requests:
        n = min(every, n_requests - done)
        wall, lat, _ = run_load(port, bodies, n, concurrency, deadline)
        done, seconds = done + len(lat), seconds + wall
        readings.append([done, rss_mb(pid)])
        print(f'soak: {done} requests, server RSS {readings[-1][1]} MB', file=sys.stderr, flush=True)
    out = {'requests': done, 'clients': concurrency, 'requests_per_s': round(done / seconds, 2), 'rss_mb': readings}
    at_1000 = [mb for n, mb in readings if n >= 1000]
    if len(at_1000) > 1:
        out['rss_growth_from_1000_mb'] = round(at_1000[-1] - at_1000[0], 1)
    return out


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def main(argv=None):
    args = parse_args(argv)
    from common import report

    from datasets import list_images
    paths = list_images(args.images)
    if not paths:
        print(f'error: no images in {args.images}', file=sys.stderr)
        return 1
    bodies = []
    for path in paths:
        with open(path, 'rb') as f:
            bodies.append(multipart(f.read(), os.path.basename(path), args.beam_size))
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix='bench_serve_', suffix='.log', delete=False)
    env = dict(os.environ, **dict(kv.split('=', 1) for kv in args.server_env))
    server = subprocess.Popen([sys.executable, os.path.join(REPO, '04_serve.py'), '--checkpoint', *args.checkpoint,
                               '--host', HOST, '--port', str(port), '--beam-size', str(args.beam_size),
                               '--max-batch', str(args.max_batch),
                               *(['--batch-wait-ms', str(args.batch_wait_ms)] if args.batch_wait_ms is not None else []),
                               '--precision', args.precision],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + args.time_limit
    try:
        wait_ready(port, server, deadline, log.name)
        run_load(port, bodies, args.warmup, 1, deadline)
        levels = []
        for c in args.concurrency:
            wall, lat, batches = run_load(port, bodies, args.requests, c, deadline)
            levels.append({'clients': c, 'requests': len(lat), 'requests_per_s': round(len(lat) / wall, 2),
                           'p50_ms': round(percentile(lat, 50), 1), 'p99_ms': round(percentile(lat, 99), 1),
                           'mean_batch': round(statistics.mean(batches), 2)})
        memory = {}
        if args.memory_requests:
            before = rss_mb(server.pid)
            wall, lat, _ = run_load(port, bodies, args.memory_requests, args.memory_concurrency, deadline)
            after = rss_mb(server.pid)
            memory = {'memory_requests': len(lat), 'memory_clients': args.memory_concurrency,
                      'rss_before_mb': before, 'rss_after_mb': after, 'rss_growth_mb': round(after - before, 1),
                      'memory_run_requests_per_s': round(len(lat) / wall, 2)}
        if args.soak:
            memory['soak'] = soak(port, bodies, args.soak, args.soak_every, args.memory_concurrency, server.pid, deadline)
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    with open(log.name, encoding='utf-8', errors='replace') as f:
        logged = sum(1 for line in f if ' POST /api/caption ' in line)
    os.unlink(log.name)
    result = {'checkpoint': ' + '.join(os.path.basename(c) for c in args.checkpoint), 'precision': args.precision,
              'server_env': args.server_env, 'beam_size': args.beam_size,
              'max_batch': args.max_batch, 'batch_wait_ms': args.batch_wait_ms, 'images': len(paths),
              'levels': levels, **memory, 'logged_requests': logged, 'cpus': os.cpu_count(),
              'load_average_1m_at_end': round(os.getloadavg()[0], 2)}
    report(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

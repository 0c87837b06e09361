"""04_serve.py under a real uvicorn on 127.0.0.1, as clients meet it: a 25 MB upload gets the 413 JSON
through urllib and httpx (clients that send the whole body before reading the answer), and the soak
benchmark (bench_serve.py --soak) runs a short bounded soak with resident-memory readings; the
allocator settings the server applies (captioning/serving/allocator.py)."""
import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from conftest import REPO, script, served

from captioning.serving import allocator

pytest.importorskip('fastapi', reason='the web server extras are not installed (pip install -r requirements-extras.txt)')
pytest.importorskip('uvicorn', reason='the web server extras are not installed (pip install -r requirements-extras.txt)')
pytest.importorskip('python_multipart', reason='python-multipart is not installed (pip install -r requirements-extras.txt)')
HTTPX = next((m for m in ('httpx', 'httpx2') if importlib.util.find_spec(m)), None)

BIG = 25 * 10**6                         # bytes: over the default 20 MiB limit


@pytest.fixture(scope='module')
def server(tiny_checkpoint):
    """The app with its default upload limit, served on 127.0.0.1 -> (base URL, app)."""
    app = script('04_serve').create_app(tiny_checkpoint)
    with served(app) as url:
        yield url, app


def multipart(data, name='big.jpg'):
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            'Content-Type: image/jpeg\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
    return body, f'multipart/form-data; boundary={boundary}'


def test_a_25_mb_upload_through_urllib_gets_the_413_json(server):
    url, _ = server
    body, ctype = multipart(b'\xff' * BIG)
    request = urllib.request.Request(f'{url}/api/caption', data=body, headers={'Content-Type': ctype})
    with pytest.raises(urllib.error.HTTPError) as refused:      # not ConnectionResetError / BrokenPipeError
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == 413
    assert 'limit' in json.loads(refused.value.read())['detail']
    with urllib.request.urlopen(f'{url}/healthz', timeout=30) as r:  # and the server goes on serving
        assert json.loads(r.read())['status'] == 'ok'


def test_a_25_mb_upload_through_httpx_gets_the_413_json(server):
    if HTTPX is None:
        pytest.skip('httpx is not installed (pip install -r requirements-dev.txt)')
    httpx = __import__(HTTPX)
    url, _ = server
    r = httpx.post(f'{url}/api/caption', files={'image': ('big.jpg', b'\xff' * BIG)}, timeout=120)
    assert r.status_code == 413 and 'limit' in r.json()['detail']
    with open(f'{REPO}/assets/samples/coffee.jpg', 'rb') as f:
        ok = httpx.post(f'{url}/api/caption', files={'image': ('coffee.jpg', f.read())}, timeout=120)
    assert ok.status_code == 200 and ok.json()['caption']


def test_the_server_trims_freed_memory_after_batches(server):
    url, app = server
    trimmer = app.state.trimmer
    trimmer.last = 0.0                                           # as if the last trim was long ago
    with open(f'{REPO}/assets/samples/rocket.jpg', 'rb') as f:
        body, ctype = multipart(f.read(), 'rocket.jpg')
    before = trimmer.trims
    with urllib.request.urlopen(urllib.request.Request(f'{url}/api/caption', data=body,
                                                       headers={'Content-Type': ctype}), timeout=120) as r:
        assert r.status == 200
    deadline = time.time() + 10
    while trimmer.trims == before and time.time() < deadline:   # after_batch runs once the answer is out
        time.sleep(0.05)
    assert trimmer.trims == before + (1 if allocator._glibc() is not None else 0)
    assert not trimmer.maybe_trim()                              # at most once per interval


def test_allocator_calls_work_here_or_say_they_cannot(monkeypatch):
    glibc = allocator._glibc() is not None
    assert allocator.trim() == glibc
    monkeypatch.setenv('MALLOC_ARENA_MAX', '4')
    assert allocator.limit_arenas() is False                    # the user's own setting wins


def test_bench_serve_soak_reports_rss_every_chunk(tiny_checkpoint):
    done = subprocess.run([sys.executable, f'{REPO}/benchmarks/bench_serve.py', '--checkpoint', tiny_checkpoint,
                           '--concurrency', '2', '--requests', '4', '--warmup', '1', '--memory-requests', '0',
                           '--soak', '12', '--soak-every', '5', '--json'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    soak = r['soak']
    assert soak['requests'] == 12 and [n for n, _ in soak['rss_mb']] == [0, 5, 10, 12]
    assert all(mb > 0 for _, mb in soak['rss_mb']) and soak['requests_per_s'] > 0
    assert 'rss_growth_from_1000_mb' not in soak                 # fewer than 1,000 requests: not claimed
    assert r['logged_requests'] == 1 + 4 + 12
    assert done.stderr.count('soak: ') == 3


def test_bench_serve_refuses_an_unbounded_soak(tiny_checkpoint):
    done = subprocess.run([sys.executable, f'{REPO}/benchmarks/bench_serve.py', '--checkpoint', tiny_checkpoint,
                           '--soak', '1000000'], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and 'bounded' in done.stderr and 'Traceback' not in done.stderr


def _run_restart(env):
    code = ('import os; from captioning.serving import allocator; r = allocator.restart_with_jemalloc(); '
            'print(r, allocator.jemalloc_loaded(), os.environ.get("MALLOC_CONF", "-"))')
    done = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_restart_with_jemalloc_when_installed_and_only_once():
    import os
    env = {k: v for k, v in os.environ.items() if k not in (allocator.RESTARTED, 'LD_PRELOAD', 'MALLOC_CONF')}
    env['PYTHONPATH'] = REPO
    if allocator.find_jemalloc() is None:
        assert _run_restart(env) == ['glibc', 'False', '-']           # nothing to restart with: glibc, no loop
        pytest.skip('libjemalloc2 is not installed (apt install libjemalloc2): the restart itself is not tested')
    # the same command, now on jemalloc, with the server's settings (large allocations kept for reuse)
    assert _run_restart(env) == ['jemalloc', 'True', allocator.JEMALLOC_CONF]
    assert _run_restart({**env, 'MALLOC_CONF': 'narenas:2'}) == ['jemalloc', 'True', 'narenas:2']   # the user's wins
    assert _run_restart({**env, allocator.RESTARTED: '1'}) == ['glibc', 'False', '-']   # a failed restart is not retried

"""04_serve.py's HTTP API through FastAPI's test client, on the tiny random checkpoint: captions,
every refusal, batching equivalence, the page, the log line per request and the missing-extras message."""
import asyncio
import importlib.util
import io
import json
import logging
import struct
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO, script
from PIL import Image

pytest.importorskip('fastapi', reason='the web server extras are not installed (pip install -r requirements-extras.txt)')
pytest.importorskip('python_multipart', reason='python-multipart is not installed (pip install -r requirements-extras.txt)')
if not (importlib.util.find_spec('httpx2') or importlib.util.find_spec('httpx')):
    pytest.skip("FastAPI's test client needs httpx2 (pip install -r requirements-dev.txt)", allow_module_level=True)
from fastapi.testclient import TestClient  # noqa: E402

import datasets  # noqa: E402
from captioning.decoders import interface  # noqa: E402
from captioning.decoding import loading, quantize, search  # noqa: E402
from captioning.serving import uploads  # noqa: E402

serve = script('04_serve')
SAMPLES = f'{REPO}/assets/samples'
NAMES = ['astronaut.jpg', 'camera_man_gray.jpg', 'chelsea_cat.jpg', 'coffee.jpg', 'rocket.jpg']


def photo(name):
    with open(f'{SAMPLES}/{name}', 'rb') as f:
        return f.read()


def png_bytes(size=(40, 30), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='PNG')
    return buf.getvalue()


def png_header_only(width, height):
    """A PNG whose header claims width x height (valid CRC) with almost no pixel data: what a
    decompression bomb looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)            # 1-bit grayscale
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')


@pytest.fixture(scope='module')
def app(tiny_checkpoint):
    return serve.create_app(tiny_checkpoint, max_upload_mb=1, max_beam_size=5)


@pytest.fixture(scope='module')
def client(app):
    with TestClient(app) as c:
        yield c


def post(client, data, name='photo.jpg', **form):
    return client.post('/api/caption', files={'image': (name, data)}, data={k: str(v) for k, v in form.items()})


def test_caption_matches_the_pipeline_and_has_every_field(client, app, tiny_checkpoint):
    r = post(client, photo('chelsea_cat.jpg'), beam_size=2)
    assert r.status_code == 200, r.text
    body = r.json()
    # The same image through the beam search directly: the server adds nothing and loses nothing.
    encoder, decoder, word_map, config = loading.load_captioner(tiny_checkpoint, 'cpu')
    decoder, _ = quantize.apply_precision(decoder, app.state.captioner.precision, 'cpu')   # as the server's
    no_end_after, _ = loading.bad_endings_setting('avoid', decoder, word_map, config)   # as the server's default
    img = datasets.load_image(f'{SAMPLES}/chelsea_cat.jpg', size=encoder.transform_config()['size'])
    with torch.inference_mode():
        enc = encoder(datasets.ImageTransform(**encoder.transform_config())(img).unsqueeze(0))
    hyp = search.beam_search(decoder, enc, word_map, beam_size=2, length_norm=search.DEFAULT_LENGTH_NORM,
                              no_repeat_ngram_size=search.DEFAULT_NO_REPEAT_NGRAM, no_end_after=no_end_after)[0]
    words = interface.words_of(hyp['tokens'], {v: k for k, v in word_map.items()})
    assert no_end_after and app.state.captioner.no_end_after == no_end_after
    assert body['words'] == words and body['caption'] == ' '.join(words)
    assert body['beams'][0]['caption'] == body['caption']
    assert body['beams'][0]['score'] == pytest.approx(hyp['score'], abs=1e-3)
    att = body['attention']
    grid = int(round(hyp['alphas'].shape[1] ** 0.5))
    assert att['grid'] == grid and len(att['maps']) == len(words)
    for m, ref in zip(att['maps'], hyp['alphas']):
        assert len(m) == grid * grid and sum(m) == pytest.approx(1, abs=1e-3)
        assert m == pytest.approx(ref.tolist(), abs=1e-4)
    assert body['image'] == dict(zip(('width', 'height'), Image.open(f'{SAMPLES}/chelsea_cat.jpg').size))
    assert body['beam_size'] == 2 and body['ms'] > 0 and body['model_ms'] > 0 and body['batch_size'] == 1
    assert app.state.captioner.no_repeat_ngram == search.DEFAULT_NO_REPEAT_NGRAM      # the scripts' default


def test_beams_come_from_the_search_when_it_lists_them(client, monkeypatch):
    real = search.beam_search

    def with_beams(*a, **kw):
        hyps = real(*a, **kw)
        for h in hyps:
            h['beams'] = [{'tokens': h['tokens'], 'score': h['score'], 'norm_score': h['norm_score']},
                          {'tokens': h['tokens'][:1], 'score': h['score'] - 1, 'norm_score': h['norm_score'] - 1}]
        return hyps
    monkeypatch.setattr(search, 'beam_search', with_beams)
    beams = post(client, photo('coffee.jpg')).json()['beams']
    assert len(beams) == 2 and beams[1]['score'] == pytest.approx(beams[0]['score'] - 1, abs=1e-3)


def test_decoder_without_attention_returns_no_maps(client, app, monkeypatch):
    monkeypatch.setattr(app.state.captioner, 'has_attention', False)
    body = post(client, photo('coffee.jpg')).json()
    assert body['attention'] is None and body['caption']


@pytest.mark.parametrize('data, name', [(b'this is not an image', 'notes.txt'), (b'', 'empty.jpg'),
                                        (None, 'truncated.jpg')])
def test_not_an_image_is_415_with_a_json_message(client, data, name):
    if data is None:
        data = photo('coffee.jpg')[:300]                 # a JPEG cut short: header fine, pixels missing
    r = post(client, data, name=name)
    assert r.status_code == 415 and r.headers['content-type'] == 'application/json'
    assert 'image' in r.json()['detail']


def test_upload_over_the_limit_is_413(client):
    r = post(client, b'\xff' * (1024 * 1024 + 1))
    assert r.status_code == 413 and 'limit' in r.json()['detail']


def _asgi_post(app, chunks, content_length=None):
    """Drive the ASGI app directly with a body arriving in chunks -> (status, json body, chunks read)."""
    headers = [(b'content-type', b'multipart/form-data; boundary=xyz')]
    if content_length is not None:
        headers.append((b'content-length', str(content_length).encode()))
    scope = {'type': 'http', 'asgi': {'version': '3.0'}, 'http_version': '1.1', 'method': 'POST', 'scheme': 'http',
             'path': '/api/caption', 'raw_path': b'/api/caption', 'query_string': b'', 'root_path': '',
             'headers': headers, 'client': ('127.0.0.1', 1), 'server': ('127.0.0.1', 80)}
    reads, sent = [0], []

    async def receive():
        if reads[0] < len(chunks):
            reads[0] += 1
            return {'type': 'http.request', 'body': chunks[reads[0] - 1], 'more_body': reads[0] < len(chunks)}
        return {'type': 'http.disconnect'}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m['type'] == 'http.response.start')
    body = b''.join(m.get('body', b'') for m in sent if m['type'] == 'http.response.body')
    return start['status'], json.loads(body), reads[0]


def test_oversized_body_is_refused_unparsed_and_drained_up_to_a_bound(app):
    head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    chunks = [head] + [b'a' * (64 * 1024)] * 64                               # a 4 MiB file part, limit 1 MiB
    # Read to its end (and thrown away) before the 413, so a client that sends everything first hears it
    status, body, read = _asgi_post(app, chunks, content_length=sum(map(len, chunks)))
    assert status == 413 and 'limit' in body['detail'] and read == len(chunks)   # declared too large
    status, body, read = _asgi_post(app, chunks)                                  # chunked, no length: counted
    assert status == 413 and 'limit' in body['detail'] and read == len(chunks)
    # Past the drain bound the rest is not read: declared, not a byte; chunked, it stops past the bound
    bounded = uploads.UploadGuard(app, max_bytes=2**20, drain_bytes=2 * 2**20)
    status, body, read = _asgi_post(bounded, chunks, content_length=sum(map(len, chunks)))
    assert status == 413 and 'limit' in body['detail'] and read == 0
    status, body, read = _asgi_post(bounded, chunks)
    assert status == 413 and 'limit' in body['detail'] and 33 <= read <= 35


def test_more_pixels_than_allowed_is_413(tiny_checkpoint):
    small_limit = serve.create_app(tiny_checkpoint, max_megapixels=0.001)     # 1,000 pixels
    with TestClient(small_limit) as c:
        r = post(c, png_bytes((40, 30)), name='a.png')                       # 1,200 pixels
        assert r.status_code == 413 and 'megapixels' in r.json()['detail']
        assert post(c, png_bytes((30, 30)), name='b.png').status_code == 200


@pytest.mark.parametrize('side', [10_000, 30_000])    # PIL warns above 89.5 MP and raises above 179 MP
def test_decompression_bombs_are_refused(tiny_checkpoint, side):
    no_own_limit = serve.create_app(tiny_checkpoint, max_megapixels=10_000)   # only PIL's bomb check is left
    with TestClient(no_own_limit) as c:
        r = post(c, png_header_only(side, side), name='bomb.png')
        assert r.status_code == 413 and 'decompression bomb' in r.json()['detail']


def test_a_bomb_is_refused_by_the_default_pixel_limit_too(client):
    r = post(client, png_header_only(8000, 8000), name='bomb.png')          # 64 MP: under PIL's limit
    assert r.status_code == 413 and 'megapixels' in r.json()['detail']


@pytest.mark.parametrize('beam', [0, 6, -1, 'three'])
def test_beam_size_out_of_range_is_422(client, beam):
    r = post(client, photo('coffee.jpg'), beam_size=beam)
    assert r.status_code == 422 and r.json()['detail'][0]['loc'][-1] == 'beam_size'


def test_missing_image_field_is_422(client):
    r = client.post('/api/caption', data={'beam_size': '2'})
    assert r.status_code == 422 and r.json()['detail'][0]['loc'][-1] == 'image'


# fp32: exactly. int8 (each image searched alone) differs from alone only through the encoder's last-bit
# differences between batch sizes, which int8 rounding can amplify in the babble of this one-epoch model:
# its first 8 words are compared, and its scores and attention maps to 1e-2 (int8 rounding turned the
# encoder's last-bit differences into 1.5e-3 of a -29.16 log-probability and 1.4e-3 of one attention weight).
@pytest.mark.parametrize('precision, max_len', [('fp32', serve.MAX_LEN), ('int8', 8)])
def test_batched_requests_get_the_same_answers_as_alone(tiny_checkpoint, synth_data, precision, max_len):
    import glob
    folder, _ = synth_data
    images = [photo(n) for n in NAMES]
    # A few synthetic images too: the tiny model was trained on them, so its captions differ between them.
    for path in sorted(glob.glob(f'{folder}/**/*.png', recursive=True) + glob.glob(f'{folder}/**/*.jpg', recursive=True))[:3]:
        with open(path, 'rb') as f:
            images.append(f.read())
    beams = [1 + i % 3 for i in range(len(images))]                          # mixed beam sizes in one batch
    with TestClient(serve.create_app(tiny_checkpoint, max_batch=1, precision=precision, max_len=max_len)) as c:
        alone = [post(c, img, beam_size=k).json() for img, k in zip(images, beams)]
    batching = serve.create_app(tiny_checkpoint, max_batch=len(images), batch_wait_ms=1000, precision=precision,
                                max_len=max_len)
    assert batching.state.captioner.precision == precision
    with TestClient(batching) as c:
        start = threading.Barrier(len(images))

        def send(i):
            start.wait()
            return post(c, images[i], beam_size=beams[i]).json()
        with ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(send, range(len(images))))
    assert max(r['batch_size'] for r in together) > 1                         # they really were batched
    assert all(r['batch_size'] == 1 for r in alone)
    tol = 1e-3 if precision == 'fp32' else 1e-2
    for a, b in zip(alone, together):
        assert a['caption'] == b['caption'] and a['beam_size'] == b['beam_size']
        assert b['beams'][0]['score'] == pytest.approx(a['beams'][0]['score'], abs=tol)
        flat = lambda r: [v for m in r['attention']['maps'] for v in m]  # noqa: E731
        assert flat(b) == pytest.approx(flat(a), abs=tol)


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger='serve'):
        assert post(client, photo('coffee.jpg')).status_code == 200
        assert post(client, b'nope').status_code == 415
        assert post(client, photo('coffee.jpg'), beam_size=0).status_code == 422
        assert client.get('/healthz').status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == 'serve']
    assert len(lines) == 4
    assert [line.split()[3] for line in lines] == ['200', '415', '422', '200']
    assert 'POST /api/caption' in lines[0] and 'ms' in lines[0]


def test_healthz_and_openapi_describe_the_api(client):
    h = client.get('/healthz').json()
    assert h['status'] == 'ok' and h['has_attention'] is True and h['max_beam_size'] == 5
    schema = client.get('/openapi.json').json()
    op = schema['paths']['/api/caption']['post']
    ref = op['requestBody']['content']['multipart/form-data']['schema']['$ref'].split('/')[-1]
    form = schema['components']['schemas'][ref]
    assert form['required'] == ['image'] and form['properties']['beam_size']['maximum'] == 5
    assert {'200', '413', '415', '422'} <= set(op['responses'])
    result = schema['components']['schemas']['CaptionResult']['properties']
    assert {'caption', 'words', 'beams', 'attention', 'image', 'ms'} <= set(result)


def test_page_is_self_contained_and_samples_are_served(client):
    r = client.get('/')
    assert r.status_code == 200 and 'text/html' in r.headers['content-type']
    page = r.text
    assert 'id="file"' in page and '/api/caption' in page
    for external in ('src="http', "src='http", 'href="http', '@import', 'url(http'):
        assert external not in page                                          # works offline, no CDN
    names = client.get('/api/samples').json()
    assert names == NAMES
    assert client.get(f'/samples/{names[0]}').content == photo(names[0])
    assert client.get('/samples/..%2F..%2FREADME.md').status_code == 404
    assert client.get('/samples/LICENSE.md').status_code == 404


def test_beam_size_flag_outside_the_range_is_an_error(tiny_checkpoint, capsys):
    assert serve.main(['--checkpoint', tiny_checkpoint, '--beam-size', '11']) == 1
    assert 'between 1 and' in capsys.readouterr().err


def test_missing_extras_are_named(monkeypatch, capsys, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, 'fastapi', None)                        # import fastapi -> ImportError
    assert serve.main(['--checkpoint', tiny_checkpoint]) == 1
    err = capsys.readouterr().err
    assert 'fastapi' in err and 'requirements-extras.txt' in err
    with pytest.raises(ImportError, match='requirements-extras.txt'):
        serve.create_app(tiny_checkpoint)


def test_bench_serve_reports_every_level_and_the_memory(tiny_checkpoint):
    import subprocess
    done = subprocess.run([sys.executable, f'{REPO}/benchmarks/bench_serve.py', '--checkpoint', tiny_checkpoint,
                           '--concurrency', '1', '3', '--requests', '6', '--warmup', '1', '--memory-requests', '5',
                           '--json'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert [lv['clients'] for lv in r['levels']] == [1, 3]
    for lv in r['levels']:
        assert lv['requests'] == 6 and lv['requests_per_s'] > 0 and 0 < lv['p50_ms'] <= lv['p99_ms']
    assert r['levels'][0]['mean_batch'] == 1
    assert r['memory_requests'] == 5 and r['rss_before_mb'] > 0 and r['rss_after_mb'] > 0
    assert r['logged_requests'] == 1 + 6 + 6 + 5                 # the server logged every request once


def test_a_full_queue_is_503_and_the_others_still_get_answers(tiny_checkpoint):
    app = serve.create_app(tiny_checkpoint, max_batch=1, max_queue=1)
    batcher, gate, running = app.state.batcher, threading.Event(), threading.Event()
    real = batcher.run_batch

    def held(items):                      # the model is busy until the test lets it go
        running.set()
        gate.wait(60)
        return real(items)
    batcher.run_batch = held
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, c, photo('coffee.jpg'))
        assert running.wait(60)                                               # taken by the model thread
        second = pool.submit(post, c, photo('rocket.jpg'))
        for _ in range(600):                                                 # waits in the queue (size 1)
            if batcher.pending() == 1:
                break
            threading.Event().wait(0.05)
        r = post(c, photo('astronaut.jpg'))
        assert r.status_code == 503 and 'busy' in r.json()['detail']
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


THREADS_PROBE = r'''
import importlib, os, sys, threading
sys.path.insert(0, sys.argv[1])
serve = importlib.import_module('04_serve')
from fastapi.testclient import TestClient
def native_only():      # OS threads that are not Python threads: OpenMP and BLAS workers
    return len(os.listdir('/proc/self/task')) - threading.active_count()
app = serve.create_app(batch_wait_ms=0)      # the provided pair: images big enough for OpenMP
loaded = native_only()
with TestClient(app) as client:
    for name in ('coffee.jpg', 'rocket.jpg', 'astronaut.jpg'):
        with open(os.path.join(sys.argv[1], 'assets', 'samples', name), 'rb') as f:
            assert client.post('/api/caption', files={'image': (name, f.read())}).status_code == 200
    print(loaded, native_only())
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='counts threads in /proc')
def test_all_torch_work_stays_on_the_model_thread(tmp_path):
    """A second thread running torch ops starts a second OpenMP team, and libgomp then stops
    spinning: every op of the model slows 2-2.5x on 2 cores (Batcher). Decoding uploads must run no
    torch op that starts one, so serving requests adds no native (OpenMP) thread to those of loading."""
    import subprocess
    probe = tmp_path / 'probe.py'
    probe.write_text(THREADS_PROBE)
    done = subprocess.run([sys.executable, str(probe), REPO], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in __import__('os').environ.items() if k != 'OMP_NUM_THREADS'})
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, served = map(int, done.stdout.split()[-2:])
    assert served == loaded


def test_the_transform_gives_contiguous_tensors():
    img = Image.new('RGB', (300, 200), (10, 120, 240))
    for t in (datasets.ImageTransform(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
              datasets.PackedTransform([datasets.ImageTransform(32, (0.5,) * 3, (0.5,) * 3),
                                        datasets.ImageTransform(48, (0.4,) * 3, (0.3,) * 3)])):
        assert t(img).is_contiguous()


def test_a_model_that_fails_to_load_raises_in_create_app_and_leaves_no_thread(tmp_path):
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(FileNotFoundError):
        serve.create_app([str(tmp_path / 'missing.pt')])
    assert {t.name for t in threading.enumerate()} == before


def test_bench_serve_ab_measures_every_server_in_rounds(tiny_checkpoint):
    import subprocess
    done = subprocess.run([sys.executable, f'{REPO}/benchmarks/bench_serve_ab.py', '--checkpoint', tiny_checkpoint,
                           '--server', f'a={REPO}', '--server', f'b={REPO}:--precision,fp32', '--rounds', '2',
                           '--requests', '3', '--warmup', '1', '--json'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert [s['label'] for s in r['servers']] == ['a', 'b'] and r['servers'][1]['args'] == ['--precision', 'fp32']
    assert all(s['requests'] == 6 and 0 < s['p50_ms'] <= s['p99_ms'] for s in r['servers'])
    assert r['servers'][0]['p50_ratio_to_first'] == 1.0
    bad = subprocess.run([sys.executable, f'{REPO}/benchmarks/bench_serve_ab.py', '--server', 'x=/nonexistent'],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and 'no 04_serve.py in' in bad.stderr and 'Traceback' not in bad.stderr

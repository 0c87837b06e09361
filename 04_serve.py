"""Step 4: a web page and an HTTP API for captioning (the model is loaded once, requests are batched).

    python 04_serve.py                                  # http://127.0.0.1:8000 with the provided pair (an ensemble)
    python 04_serve.py --checkpoint runs/.../BEST_checkpoint_....pt --port 8080 --beam-size 5

    curl -F image=@assets/samples/chelsea_cat.jpg -F beam_size=3 http://127.0.0.1:8000/api/caption

GET / is a self-contained page (no CDN): choose, drop or click a sample photo, read the caption, the
top beams with their scores and the time taken, and hover or tap a word to see its attention map.
POST /api/caption takes the multipart field `image` (and optionally `beam_size`) and answers JSON;
GET /healthz says whether the model is loaded; GET /docs and /openapi.json describe the API.

Concurrent requests are gathered (those queued while the model was busy, up to --max-batch, and what
arrives within --batch-wait-ms of the first, 0 by default) into one batched beam search in a single worker thread; the beam search is batch-invariant, so a
caption is the same whether its request was batched or alone (an int8 decoder, --precision, searches
one image at a time for that: its activations are quantized per call). Bad input is a 4xx with a JSON
`detail`: not an image 415, over --max-upload-mb 413 (refused as the body streams in, never stored;
the rest is read and discarded, up to DRAIN_MB more, so that every client sees the answer), more than --max-megapixels or a decompression bomb 413, beam size out of range 422.

Needs the optional extras (FastAPI, uvicorn, python-multipart): pip install -r requirements-extras.txt
"""
import argparse
import asyncio
import concurrent.futures
import io
import logging
import math
import os
import queue
import sys
import threading
import time
import warnings

import allocator
import caption
import quantize

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
CHECKPOINT = caption.DEFAULT_CHECKPOINTS   # the provided Flickr8k pair (an ensemble), or [your BEST_checkpoint_*.pt]
WORD_MAP = None                            # the tutorial's WORDMAP_*.json when CHECKPOINT is its .pth.tar
HOST = '127.0.0.1'                         # 0.0.0.0 to accept other machines (there is no authentication)
PORT = 8000
MAX_UPLOAD_MB = 20                         # request bodies above this many MiB are refused with 413
DRAIN_MB = 64                              # ... after reading and discarding up to this many MiB more (see _Guard)
MAX_MEGAPIXELS = 50                        # images with more pixels are refused (decompression bombs too)
BEAM_SIZE = 3                              # default beam size of a request (1 = greedy)
MAX_BEAM_SIZE = 10                         # a request may ask for 1..MAX_BEAM_SIZE
LENGTH_NORM = caption.DEFAULT_LENGTH_NORM  # rank beams by score / length ** LENGTH_NORM
NO_REPEAT_NGRAM = caption.DEFAULT_NO_REPEAT_NGRAM   # forbid repeating n-grams of this size (0 = off)
MAX_LEN = 50                               # at most this many words
MAX_BATCH = 8                              # requests gathered into one batched beam search
BATCH_WAIT_MS = 0.0                        # how long the first request of a batch waits for company (0: a batch is
                                           # what queued while the model was busy; one client 8-13 ms faster, the
                                           # same requests/s at 8 clients: docs/speed.md)
MAX_QUEUE = 256                            # requests waiting for the model beyond this get 503
DECODE_WORKERS = 2                         # images decoded at once (a 50 MP PNG takes 150 MB while decoding)
DEVICE = 'cpu'                             # cpu | cuda | auto
PRECISION = 'auto'                         # decoder weights: auto | fp32 | int8 (quantize.py)
MIRROR = False                             # also decode each photo's mirror image (test-time augmentation)
BAD_ENDINGS = 'avoid'                      # avoid: never end on a word that rarely ends a sentence ('a', 'red') | allow
ALLOCATOR = 'auto'                         # auto: jemalloc when installed (a flat resident size under load) | glibc
SAMPLES = os.path.join(caption.REPO_DIR, 'assets', 'samples')   # photos the page offers as examples
PAGE = os.path.join(caption.REPO_DIR, 'web', 'index.html')       # the page served at /
EXTRAS = ('fastapi', 'uvicorn', 'python_multipart')                   # import names of the optional extras
SAMPLE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')

log = logging.getLogger('serve')


def missing_extras():
    """Import names of the optional server packages that are not installed."""
    missing = []
    for name in EXTRAS:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def extras_message(missing):
    pip_names = {'python_multipart': 'python-multipart'}
    return (f"the web server needs the optional extras, missing: {', '.join(pip_names.get(m, m) for m in missing)}. "
            f"Install them with: pip install -r requirements-extras.txt")


class ImageRefused(Exception):
    """An upload that is not a usable image; `status` is the HTTP status to answer with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def decode_upload(data, transform, max_pixels):
    """Upload bytes -> (normalised [3, S, S] tensor, (width, height)), or ImageRefused.

    The pixel count is checked from the header before anything is decoded, and PIL's own
    decompression-bomb warning is an error here, so a small file cannot expand into gigabytes."""
    from PIL import Image, UnidentifiedImageError

    import datasets
    if not data:
        raise ImageRefused(415, 'the uploaded file is empty, not an image; send a JPEG, PNG, WebP, BMP or GIF photo')
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:     # reads the header only
                width, height = probe.size
            if width * height > max_pixels:
                raise ImageRefused(413, f'the image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); '
                                        f'the limit is {max_pixels / 1e6:g} megapixels')
            img = datasets.load_image(io.BytesIO(data), size=transform.size)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRefused(413, f'refused as a possible decompression bomb: {e}') from None
        except UnidentifiedImageError:
            raise ImageRefused(415, 'the uploaded file is not an image this server can read '
                                    '(send a JPEG, PNG, WebP, BMP or GIF photo)') from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:   # truncated or corrupt image data
            raise ImageRefused(415, f'the image could not be decoded ({e.__class__.__name__}: {e})') from None
    return transform(img), (width, height)


class Batcher:
    """The model thread: it loads the model (`start`), then runs it on requests queued within `wait_s`
    of each other (up to `max_batch`), which share one encoder pass and one beam search per beam size.

    Every torch operation of the server runs on this one thread, the loading included (image decoding
    in the request threads is PIL and numpy: datasets.ImageTransform). PyTorch's CPU ops run on an
    OpenMP team per calling thread, and once a second thread has started a team the process holds
    more OpenMP threads than cores, so libgomp stops its workers spinning between operations: every
    later op waits on a wake-up. Measured on 2 cores, the default pair at int8: 43-47 ms per one-photo
    request with one thread doing all torch work, 100-127 ms once two threads had (docs/speed.md)."""

    _STOP = object()

    def __init__(self, load, max_batch, wait_s, max_queue, after_batch=None):
        self.load, self.run_batch, self.max_batch, self.wait_s = load, None, max_batch, wait_s
        self.after_batch = after_batch   # called in the worker thread once a batch's answers are out
        self._queue = queue.Queue(maxsize=max_queue)
        self._thread, self._lock = None, threading.Lock()
        self.batches = 0          # batches run so far (for /healthz)

    def start(self):
        """Start the model thread, run `load()` on it and keep what it returns as `run_batch`
        (items -> answers); -> that. An exception of `load` is raised here, and the thread ends."""
        loaded = concurrent.futures.Future()
        with self._lock:
            if self._thread is not None:
                raise RuntimeError('the model thread is already running')
            self._thread = threading.Thread(target=self._loop, args=(loaded,), name='captioner', daemon=True)
            self._thread.start()
        try:
            self.run_batch = loaded.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        return self.run_batch

    def submit(self, item):
        """-> concurrent.futures.Future of run_batch's answer for `item`; queue.Full when overloaded."""
        with self._lock:
            if self.run_batch is None:
                raise RuntimeError('Batcher.start() first: the model is not loaded')
            if self._thread is None:   # stopped, and the app is served again: a new thread, the same model
                self._thread = threading.Thread(target=self._loop, name='captioner', daemon=True)
                self._thread.start()
        future = concurrent.futures.Future()
        self._queue.put_nowait((item, future))
        return future

    def pending(self):
        return self._queue.qsize()

    def stop(self):
        with self._lock:
            if self._thread is not None:
                self._queue.put(self._STOP)
                self._thread.join()
                self._thread = None

    def _loop(self, loaded=None):
        if loaded is not None:
            try:
                loaded.set_result(self.load())
            except BaseException as e:  # noqa: BLE001 - start() raises it in the caller's thread
                loaded.set_exception(e)
                return
        while True:
            first = self._queue.get()
            if first is self._STOP:
                return
            batch, deadline = [first], time.monotonic() + self.wait_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is self._STOP:
                    stop = True
                    break
                batch.append(nxt)
            live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if live:
                try:
                    answers = self.run_batch([item for item, _ in live])
                    for (_, f), answer in zip(live, answers):
                        f.set_result(answer)
                except Exception as e:  # noqa: BLE001 - every waiting request hears about it
                    for _, f in live:
                        f.set_exception(e)
                self.batches += 1
                if self.after_batch is not None:
                    self.after_batch()
            if stop:
                return


class Captioner:
    """The loaded model and what turns a batch of image tensors into JSON-ready answers."""

    def __init__(self, checkpoint, device, max_len, length_norm, no_repeat_ngram=NO_REPEAT_NGRAM, word_map=WORD_MAP,
                 precision='auto', bad_endings='avoid', mirror=False):
        import torch

        import datasets
        import utils
        self.torch = torch
        self.device = utils.get_device(device)
        self.encoder, self.decoder, self.word_map, self.config = caption.load_captioner(checkpoint, self.device,
                                                                                        word_map, mirror)
        self.decoder, self.precision = quantize.apply_precision(self.decoder, precision, self.device)   # once
        self.no_end_after, self.endings_note = caption.bad_endings_setting(bad_endings, self.decoder, self.word_map,
                                                                           self.config)
        self.rev_word_map = {v: k for k, v in self.word_map.items()}
        self.transform = datasets.image_transform(self.encoder)
        self.has_attention = getattr(self.decoder, 'has_attention', True)
        self.max_len, self.length_norm, self.no_repeat_ngram = max_len, length_norm, no_repeat_ngram
        self.checkpoint = checkpoint

    def __call__(self, items):
        """items: [(tensor [3, S, S], beam_size)] -> one answer dict per item (same order)."""
        torch = self.torch
        start = time.perf_counter()
        with torch.inference_mode():
            enc = self.encoder(torch.stack([t for t, _ in items]).to(self.device))   # [B, g, g, C], once
            hyps = [None] * len(items)
            for k in sorted({k for _, k in items}):          # beam_search takes one beam size per call
                idx = [i for i, (_, kk) in enumerate(items) if kk == k]
                # one image at a time for an int8 decoder: a request's caption never depends on who
                # else was asking (caption.search_images)
                found = caption.search_images(self.decoder, enc[idx], self.word_map, beam_size=k,
                                              max_len=self.max_len, length_norm=self.length_norm,
                                              no_repeat_ngram_size=self.no_repeat_ngram, no_end_after=self.no_end_after)
                for i, hyp in zip(idx, found):
                    hyps[i] = hyp
        model_ms = (time.perf_counter() - start) * 1000
        return [dict(self.answer(hyp), batch_size=len(items), model_ms=model_ms) for hyp in hyps]

    def answer(self, hyp):
        words = self.decoder.words(hyp['tokens'], self.rev_word_map)
        beams = hyp.get('beams') or [hyp]                     # older beam_search: the best one alone
        out = {'caption': ' '.join(words), 'words': words, 'finished': bool(hyp['finished']),
               'beams': [{'caption': ' '.join(self.decoder.words(b['tokens'], self.rev_word_map)),
                          'score': round(float(b['score']), 4), 'norm_score': round(float(b['norm_score']), 4)}
                         for b in beams],
               'attention': None}
        if not words:   # the search emits a token at least; a GPT-2's can decode to no words: say why
            out['note'] = f"empty caption: {caption.empty_reason({**hyp, 'words': words})}"
        alphas = hyp.get('alphas')
        if self.has_attention and alphas is not None:
            alphas = alphas[:len(hyp['tokens'])].float()          # one map per word (the <end> map is left out)
            grid = int(round(math.sqrt(alphas.shape[1])))
            out['attention'] = {'grid': grid,
                                'maps': [[round(v, 5) for v in row] for row in alphas.tolist()]}
        return out


class _Guard:
    """ASGI middleware: refuses request bodies over `max_bytes` with 413 as they stream in (from
    Content-Length up front, else by counting), and logs one line per request.

    The rest of a refused body is read and thrown away (never stored) up to `drain_bytes` in all
    before the 413 is sent: a client that sends its whole body before reading the answer (Python's
    urllib, requests, httpx, browsers) would otherwise find the connection closed under it
    (connection reset, broken pipe) and never see the message. A body larger than that is cut off
    without reading on."""

    def __init__(self, app, max_bytes, drain_bytes=None):
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = max_bytes + DRAIN_MB * 2**20 if drain_bytes is None else drain_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        import json
        start, state = time.perf_counter(), {'status': 0, 'received': 0, 'too_large': False, 'started': False,
                                             'more': True}
        limit_msg = json.dumps({'detail': f'the upload is larger than the {self.max_bytes / 2**20:g} MiB limit'}).encode()

        async def drain(more):
            """Read and discard the body's remaining messages (more: whether any are left)."""
            while more and state['received'] <= self.drain_bytes:
                message = await receive()
                if message['type'] != 'http.request':
                    return
                state['received'] += len(message.get('body', b''))
                more = message.get('more_body', False)

        async def refuse(more=True):
            await drain(more)
            state['status'], state['started'] = 413, True
            await send({'type': 'http.response.start', 'status': 413,
                        'headers': [(b'content-type', b'application/json'), (b'connection', b'close'),
                                    (b'content-length', str(len(limit_msg)).encode())]})
            await send({'type': 'http.response.body', 'body': limit_msg})

        async def limited_receive():
            if state['too_large']:
                return {'type': 'http.disconnect'}
            message = await receive()
            if message['type'] == 'http.request':
                state['received'] += len(message.get('body', b''))
                if state['received'] > self.max_bytes:
                    state['too_large'] = True         # stop parsing; the parser sees a disconnect
                    state['more'] = message.get('more_body', False)
                    return {'type': 'http.disconnect'}
            return message

        async def guarded_send(message):
            if state['too_large']:                   # whatever the app answers, the client gets 413
                if not state['started']:
                    await refuse(state['more'])
                return
            if message['type'] == 'http.response.start':
                state['status'], state['started'] = message['status'], True
            await send(message)

        headers = dict(scope.get('headers') or [])
        try:
            declared = int(headers.get(b'content-length', b'0'))
        except ValueError:
            declared = 0
        try:
            if declared > self.max_bytes:             # the body is drained, not parsed nor kept
                await refuse(more=declared <= self.drain_bytes)
            else:
                try:
                    await self.app(scope, limited_receive, guarded_send)
                except Exception:
                    if not state['too_large']:
                        raise
                if state['too_large'] and not state['started']:
                    await refuse(state['more'])
        finally:
            client = scope.get('client') or ('-', 0)
            log.info('%s %s %s %d %.1f ms %d bytes', client[0], scope['method'], scope['path'], state['status'],
                     (time.perf_counter() - start) * 1000, max(state['received'], declared))


def create_app(checkpoint=CHECKPOINT, device=DEVICE, beam_size=BEAM_SIZE, max_beam_size=MAX_BEAM_SIZE,
               max_upload_mb=MAX_UPLOAD_MB, max_megapixels=MAX_MEGAPIXELS, max_batch=MAX_BATCH,
               batch_wait_ms=BATCH_WAIT_MS, max_queue=MAX_QUEUE, max_len=MAX_LEN, length_norm=LENGTH_NORM,
               samples=SAMPLES, page=PAGE, decode_workers=DECODE_WORKERS, no_repeat_ngram=NO_REPEAT_NGRAM,
               word_map=WORD_MAP, precision=PRECISION, bad_endings=BAD_ENDINGS, mirror=MIRROR):
    """Load the model and build the FastAPI app (ImportError naming the extras when they are missing)."""
    missing = missing_extras()
    if missing:
        raise ImportError(extras_message(missing))
    import contextlib
    from typing import Annotated, Optional

    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field

    if not 1 <= beam_size <= max_beam_size:
        raise ValueError(f'--beam-size must be between 1 and --max-beam-size ({max_beam_size}), got {beam_size}')
    if no_repeat_ngram < 0:
        raise ValueError(f'--no-repeat-ngram {no_repeat_ngram}: must be 0 (off) or more')
    trimmer = allocator.Trimmer()         # less resident memory under load (allocator.py)
    batcher = Batcher(lambda: Captioner(checkpoint, device, max_len, length_norm, no_repeat_ngram, word_map, precision,
                                        bad_endings, mirror),
                      max_batch, batch_wait_ms / 1000, max_queue, after_batch=trimmer.maybe_trim)
    captioner = batcher.start()           # loaded on the model thread, where all torch work runs (Batcher)
    with open(page, encoding='utf-8') as f:
        page_html = f.read()
    sample_names = sorted(n for n in os.listdir(samples) if n.lower().endswith(SAMPLE_EXTENSIONS)) \
        if samples and os.path.isdir(samples) else []
    max_pixels = int(max_megapixels * 1e6)
    decode_slots = threading.BoundedSemaphore(decode_workers)   # bounds decoding memory, however many clients

    def decode(data):
        with decode_slots:
            return decode_upload(data, captioner.transform, max_pixels)

    class Beam(BaseModel):
        caption: str
        score: float = Field(description='summed log-probability of the words and <end>')
        norm_score: float = Field(description='score / length ** length_norm, what beams are ranked by')

    class Attention(BaseModel):
        grid: int = Field(description='the maps are grid x grid cells over the whole image, row-major')
        maps: list[list[float]] = Field(description='one map per word of `words`, each grid*grid weights summing to 1')

    class ImageSize(BaseModel):
        width: int
        height: int

    class CaptionResult(BaseModel):
        caption: str
        words: list[str]
        finished: bool = Field(description='false when no hypothesis emitted <end> within max_len words')
        beams: list[Beam] = Field(description='finished hypotheses, best first')
        attention: Optional[Attention] = Field(description='null for decoders without attention')
        image: ImageSize = Field(description='size of the uploaded image (after EXIF rotation)')
        beam_size: int
        batch_size: int = Field(description='requests captioned together in this one batch')
        ms: float = Field(description='milliseconds from the upload received to the answer')
        model_ms: float = Field(description='milliseconds the batched encoder and beam search took')

    class Problem(BaseModel):
        detail: str

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title='Show, Attend and Tell captioning', lifespan=lifespan,
                  description='Caption a photo with a trained Show, Attend and Tell model.')
    app.add_middleware(_Guard, max_bytes=int(max_upload_mb * 2**20))
    app.state.captioner, app.state.batcher, app.state.trimmer = captioner, batcher, trimmer

    @app.exception_handler(ImageRefused)
    async def refused(request, exc):
        return JSONResponse({'detail': str(exc)}, status_code=exc.status)

    @app.get('/', response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page_html

    @app.get('/healthz', summary='Liveness: the model is loaded and the worker is reachable')
    async def healthz():
        return {'status': 'ok', 'checkpoint': caption.checkpoint_label(checkpoint, basename=True),
                'device': str(captioner.device), 'precision': captioner.precision,
                'bad_endings': 'avoided' if captioner.no_end_after is not None else 'allowed', 'mirror': mirror,
                'has_attention': captioner.has_attention, 'beam_size': beam_size, 'max_beam_size': max_beam_size,
                'max_upload_mb': max_upload_mb, 'queued': batcher.pending(), 'batches': batcher.batches,
                'note': caption.provided_note(checkpoint)}   # what the provided models know, or None

    @app.get('/api/samples', summary='Names of the bundled sample photos (served under /samples/)')
    async def list_samples():
        return sample_names

    @app.get('/samples/{name}', include_in_schema=False)
    async def sample(name: str):
        if name not in sample_names:                     # only the listed files: no path traversal
            raise HTTPException(404, 'no such sample')
        return FileResponse(os.path.join(samples, name))

    @app.post('/api/caption', response_model=CaptionResult, summary='Caption one photo',
              responses={413: {'model': Problem, 'description': 'upload or image too large'},
                         415: {'model': Problem, 'description': 'not an image'},
                         503: {'model': Problem, 'description': 'too many requests waiting'}})
    async def caption_photo(
            image: Annotated[UploadFile, File(description='the photo: JPEG, PNG, WebP, BMP or GIF')],
            beam_size: Annotated[int, Form(ge=1, le=max_beam_size, description='1 = greedy')] = beam_size):
        start = time.perf_counter()
        data = await image.read()       # spooled to disk by the parser past 1 MiB; capped by _Guard
        tensor, (width, height) = await run_in_threadpool(decode, data)
        try:
            future = batcher.submit((tensor, beam_size))
        except queue.Full:
            return JSONResponse({'detail': 'the server is busy; try again shortly'}, status_code=503)
        answer = await asyncio.wrap_future(future)
        return dict(answer, image={'width': width, 'height': height}, beam_size=beam_size,
                    ms=round((time.perf_counter() - start) * 1000, 1), model_ms=round(answer['model_ms'], 1))

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', nargs='+', default=CHECKPOINT,
                   help=caption.CHECKPOINT_HELP)
    p.add_argument('--word-map', default=WORD_MAP,
                   help="with a checkpoint of the tutorial (its .pth.tar): the WORDMAP_*.json it was trained with; "
                        'the file is converted as it loads (docs/tutorial-checkpoints.md)')
    p.add_argument('--host', default=HOST, help='(default: %(default)s)')
    p.add_argument('--port', type=int, default=PORT, help='(default: %(default)s)')
    p.add_argument('--max-upload-mb', type=float, default=MAX_UPLOAD_MB, help='(default: %(default)s)')
    p.add_argument('--max-megapixels', type=float, default=MAX_MEGAPIXELS, help='(default: %(default)s)')
    p.add_argument('--beam-size', type=int, default=BEAM_SIZE, help='default beam size of a request (default: %(default)s)')
    p.add_argument('--max-beam-size', type=int, default=MAX_BEAM_SIZE, help='(default: %(default)s)')
    p.add_argument('--length-norm', type=float, default=LENGTH_NORM, help='(default: %(default)s)')
    p.add_argument('--no-repeat-ngram', type=int, default=NO_REPEAT_NGRAM,
                   help='forbid repeating any n-gram of this size, 0 = off (default: %(default)s)')
    p.add_argument('--max-len', type=int, default=MAX_LEN, help='(default: %(default)s)')
    p.add_argument('--max-batch', type=int, default=MAX_BATCH, help='requests per batch (default: %(default)s)')
    p.add_argument('--batch-wait-ms', type=float, default=BATCH_WAIT_MS, help='(default: %(default)s)')
    p.add_argument('--max-queue', type=int, default=MAX_QUEUE, help='(default: %(default)s)')
    p.add_argument('--decode-workers', type=int, default=DECODE_WORKERS, help='(default: %(default)s)')
    p.add_argument('--device', default=DEVICE, help='cpu, cuda or auto (default: %(default)s)')
    p.add_argument('--samples', default=SAMPLES, help='folder of sample photos the page offers (default: %(default)s)')
    quantize.add_argument(p, PRECISION)
    caption.add_bad_endings_argument(p, BAD_ENDINGS)
    caption.add_mirror_argument(p, MIRROR)
    p.add_argument('--allocator', choices=['auto', 'glibc'], default=ALLOCATOR,
                   help='auto: restart once with jemalloc preloaded when libjemalloc2 is installed (flat memory '
                        'under load, docs/speed.md); glibc: the C library\'s malloc, arenas capped and trimmed '
                        '(default: %(default)s)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    memory = 'glibc'
    if argv is None and args.allocator == 'auto':   # run as a command: its own process to restart
        memory = allocator.restart_with_jemalloc()  # returns only when it did not restart (allocator.py)
    if memory == 'glibc':
        allocator.limit_arenas()          # before any thread allocates (allocator.py: less resident memory)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
    missing = missing_extras()
    if missing:
        print(f'error: {extras_message(missing)}', file=sys.stderr)
        return 1
    import uvicorn
    try:
        app = create_app(args.checkpoint, args.device, args.beam_size, args.max_beam_size, args.max_upload_mb,
                         args.max_megapixels, args.max_batch, args.batch_wait_ms, args.max_queue, args.max_len,
                         args.length_norm, args.samples, decode_workers=args.decode_workers,
                         no_repeat_ngram=args.no_repeat_ngram, word_map=args.word_map, precision=args.precision,
                         bad_endings=args.bad_endings, mirror=args.mirror)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if app.state.captioner.endings_note:
        print(f'note: {app.state.captioner.endings_note}', file=sys.stderr)
    print(f'serving {caption.checkpoint_label(args.checkpoint, basename=True)} on http://{args.host}:{args.port} '
          f'(memory allocator: {memory}; Ctrl+C stops)', flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level='warning')  # serve logs each request
    return 0


if __name__ == '__main__':
    sys.exit(main())

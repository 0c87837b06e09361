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
import dataclasses
import logging
import os
import queue
import random
import sys
import threading
import time

from captioning.decoding import loading, options, search
from captioning.serving import allocator
from captioning.serving.batcher import Batcher
from captioning.serving.captioner import Captioner, Request
from captioning.serving.uploads import ImageRefused, UploadGuard, decode_upload

# ---- configuration: edit these, or override any of them with a flag (see --help) ----
CHECKPOINT = loading.DEFAULT_CHECKPOINTS   # the provided Flickr8k pair (an ensemble), or [your BEST_checkpoint_*.pt]
WORD_MAP = None                            # the tutorial's WORDMAP_*.json when CHECKPOINT is its .pth.tar
HOST = '127.0.0.1'                         # 0.0.0.0 to accept other machines (there is no authentication)
PORT = 8000
MAX_UPLOAD_MB = 20                         # request bodies above this many MiB are refused with 413
DRAIN_MB = 64                              # ... after reading and discarding up to this many MiB more (UploadGuard)
MAX_MEGAPIXELS = 50                        # images with more pixels are refused (decompression bombs too)
BEAM_SIZE = 3                              # default beam size of a request (1 = greedy)
MAX_BEAM_SIZE = 10                         # a request may ask for 1..MAX_BEAM_SIZE
LENGTH_NORM = search.DEFAULT_LENGTH_NORM  # rank beams by score / length ** LENGTH_NORM
NO_REPEAT_NGRAM = search.DEFAULT_NO_REPEAT_NGRAM   # forbid repeating n-grams of this size (0 = off)
MAX_LEN = 50                               # at most this many words
MAX_BATCH = 8                              # requests gathered into one batched beam search
BATCH_WAIT_MS = 0.0                        # how long the first request of a batch waits for company (0: a batch is
                                           # what queued while the model was busy; one client 8-13 ms faster, the
                                           # same requests/s at 8 clients: docs/speed.md)
MAX_QUEUE = 256                            # requests waiting for the model beyond this get 503
DECODE_WORKERS = 2                         # images decoded at once (a 50 MP PNG takes 150 MB while decoding)
DEVICE = 'cpu'                             # cpu | cuda | auto
PRECISION = 'auto'                         # decoder weights: auto | fp32 | int8 (captioning/decoding/quantize.py)
RUNTIME = 'auto'                           # the encoder's engine: auto | torch | onnx (captioning/decoding/runtime.py)
MIRROR = False                             # also decode each photo's mirror image (test-time augmentation)
GUIDE = options.DEFAULT_GUIDE              # a request's default: auto (English: tags guide the search) | on | off
BAD_ENDINGS = 'avoid'                      # avoid: never end on a word that rarely ends a sentence ('a', 'red') | allow
ALLOCATOR = 'auto'                         # auto: jemalloc when installed (a flat resident size under load) | glibc
SAMPLES = os.path.join(loading.REPO_DIR, 'assets', 'samples')   # photos the page offers as examples
PAGE = os.path.join(loading.REPO_DIR, 'web', 'index.html')       # the page served at /
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


@dataclasses.dataclass
class Settings:
    """Everything the server is built from (create_app): the constants above, or the flags."""
    checkpoint: list = dataclasses.field(default_factory=lambda: list(CHECKPOINT))
    word_map: str = WORD_MAP
    device: str = DEVICE
    precision: str = PRECISION
    runtime: str = RUNTIME
    onnx_cache: str = None
    mirror: bool = MIRROR
    bad_endings: str = BAD_ENDINGS
    beam_size: int = BEAM_SIZE
    max_beam_size: int = MAX_BEAM_SIZE
    max_len: int = MAX_LEN
    length_norm: float = LENGTH_NORM
    no_repeat_ngram: int = NO_REPEAT_NGRAM
    max_upload_mb: float = MAX_UPLOAD_MB
    drain_mb: float = DRAIN_MB
    max_megapixels: float = MAX_MEGAPIXELS
    max_batch: int = MAX_BATCH
    batch_wait_ms: float = BATCH_WAIT_MS
    max_queue: int = MAX_QUEUE
    decode_workers: int = DECODE_WORKERS
    samples: str = SAMPLES
    page: str = PAGE
    guide: str = GUIDE

    @classmethod
    def from_args(cls, args):
        """The settings that parsed flags (parse_args) give; the others keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def create_app(checkpoint=None, settings=None, **changes):
    """Load the model and build the FastAPI app from `settings` (default: Settings()) with `changes`
    (field=value) and `checkpoint`, when given, replacing theirs. ImportError names the extras when
    they are missing."""
    settings = dataclasses.replace(settings or Settings(), **changes,
                            **({'checkpoint': checkpoint} if checkpoint is not None else {}))
    missing = missing_extras()
    if missing:
        raise ImportError(extras_message(missing))
    import contextlib
    from typing import Annotated, Literal, Optional

    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field

    if not 1 <= settings.beam_size <= settings.max_beam_size:
        raise ValueError(f'--beam-size must be between 1 and --max-beam-size ({settings.max_beam_size}), '
                         f'got {settings.beam_size}')
    if settings.no_repeat_ngram < 0:
        raise ValueError(f'--no-repeat-ngram {settings.no_repeat_ngram}: must be 0 (off) or more')
    trimmer = allocator.Trimmer()         # less resident memory under load (captioning/serving/allocator.py)
    batcher = Batcher(lambda: Captioner(settings), settings.max_batch, settings.batch_wait_ms / 1000,
                      settings.max_queue, after_batch=trimmer.maybe_trim)
    captioner = batcher.start()           # loaded on the model thread, where all torch work runs (Batcher)
    with open(settings.page, encoding='utf-8') as f:
        page_html = f.read()
    samples = settings.samples
    sample_names = sorted(n for n in os.listdir(samples) if n.lower().endswith(SAMPLE_EXTENSIONS)) \
        if samples and os.path.isdir(samples) else []
    max_pixels = int(settings.max_megapixels * 1e6)
    decode_slots = threading.BoundedSemaphore(settings.decode_workers)   # bounds decoding memory, however many clients

    def decode(data):
        with decode_slots:
            return decode_upload(data, captioner.transform, max_pixels)

    def make_request(beam_size, num_captions, sample, temperature, top_k, top_p, seed, diversity_groups, prefix,
                     guide):
        """The form's fields -> a Request, or a 422 naming the field whose value cannot work."""
        def refuse(field, message):
            return HTTPException(422, [{'loc': ['body', field], 'msg': message, 'type': 'value_error'}])
        if not sample and num_captions > beam_size:
            raise refuse('num_captions', f'{num_captions} captions need beam_size {num_captions} or more (or sample)')
        if beam_size % diversity_groups:
            raise refuse('diversity_groups', f'{diversity_groups} groups do not divide beam_size {beam_size}')
        if sample and diversity_groups > 1:
            raise refuse('diversity_groups', 'diversity groups are for the beam search, not with sample')
        if prefix is not None and not prefix.strip():
            raise refuse('prefix', 'the prefix is empty: give the words every caption starts with, or leave it out')
        try:
            tokens = captioner.prefix_tokens(prefix) if prefix else ()
        except ValueError as e:
            raise refuse('prefix', str(e).removeprefix('--prefix: ')) from None
        if tokens and len(tokens) >= settings.max_len:
            raise refuse('prefix', f'longer than the {settings.max_len} words a caption may have')
        if sample and seed is None:
            seed = random.randrange(2**31)
        return Request(beam_size, num_captions, sample, temperature, top_k, top_p, seed or 0, diversity_groups,
                       tokens, guide)

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

    class Tag(BaseModel):
        label: str = Field(description='an ImageNet class the encoder recognises')
        p: float = Field(description="the encoder's ImageNet classifier's probability")

    class CaptionResult(BaseModel):
        caption: str
        words: list[str]
        finished: bool = Field(description='false when no hypothesis emitted <end> within max_len words')
        beams: list[Beam] = Field(description='finished hypotheses, best first')
        captions: list[Beam] = Field(description='num_captions distinct captions, the caption first: the best '
                                                 'beams, or samples ranked by normalised score')
        tags: Optional[list[Tag]] = Field(description="the encoder's top ImageNet tags; null for an encoder "
                                                      'without an ImageNet classifier (or a fine-tuned one)')
        guided_by: Optional[list[list[str]]] = Field(
            description='the tag words the caption was made to mention (guide auto), one list of '
                        'alternatives per constraint; null when the plain search was kept')
        seed: Optional[int] = Field(None, description='sample: the seed the samples were drawn from')
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
    max_bytes = int(settings.max_upload_mb * 2**20)
    app.add_middleware(UploadGuard, max_bytes=max_bytes, drain_bytes=max_bytes + int(settings.drain_mb * 2**20))
    app.state.captioner, app.state.batcher, app.state.trimmer = captioner, batcher, trimmer

    @app.exception_handler(ImageRefused)
    async def refused(request, exc):
        return JSONResponse({'detail': str(exc)}, status_code=exc.status)

    @app.get('/', response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page_html

    @app.get('/healthz', summary='Liveness: the model is loaded and the worker is reachable')
    async def healthz():
        return {'status': 'ok', 'checkpoint': loading.checkpoint_label(settings.checkpoint, basename=True),
                'device': str(captioner.device), 'precision': captioner.precision,
                'runtime': captioner.runtime,
                'bad_endings': 'avoided' if captioner.no_end_after is not None else 'allowed',
                'mirror': settings.mirror, 'has_attention': captioner.has_attention, 'beam_size': settings.beam_size,
                'max_beam_size': settings.max_beam_size, 'max_upload_mb': settings.max_upload_mb,
                'queued': batcher.pending(), 'batches': batcher.batches,
                'tags': captioner.tags_note is None, 'tags_note': captioner.tags_note, 'guide': settings.guide,
                'note': loading.provided_note(settings.checkpoint)}   # what the provided models know, or None

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
            beam_size: Annotated[int, Form(ge=1, le=settings.max_beam_size,
                                           description='1 = greedy')] = settings.beam_size,
            num_captions: Annotated[int, Form(ge=1, le=settings.max_beam_size, description=(
                'distinct captions to return: the best beams (at most beam_size), or samples'))] = 1,
            sample: Annotated[bool, Form(description="sample from the model's distribution instead of "
                                                     'the beam search')] = False,
            temperature: Annotated[float, Form(gt=0, description='sample: divides the log-probabilities')] = 1.0,
            top_k: Annotated[int, Form(ge=0, description='sample: the k likeliest words only, 0 = all')] = 0,
            top_p: Annotated[float, Form(gt=0, le=1, description='sample: nucleus probability, 1 = all')] = 1.0,
            seed: Annotated[Optional[int], Form(ge=0, description='sample: the same seed gives the same '
                                                                  'captions (default: a new one)')] = None,
            diversity_groups: Annotated[int, Form(ge=1, description='diverse beam search: groups, dividing '
                                                                    'beam_size (1 = the plain search)')] = 1,
            prefix: Annotated[Optional[str], Form(description='words every caption starts with, each in the '
                                                              "model's word map")] = None,
            guide: Annotated[Literal['auto', 'on', 'off'], Form(description=(
                "on: a tag the encoder is confident of, missing from the caption, becomes a constraint "
                'of the beam search; auto: on for English word maps; off: the plain search'))] = settings.guide):
        start = time.perf_counter()
        request = await run_in_threadpool(make_request, beam_size, num_captions, sample, temperature, top_k,
                                          top_p, seed, diversity_groups, prefix, guide)
        data = await image.read()       # spooled to disk by the parser past 1 MiB; capped by UploadGuard
        tensor, (width, height) = await run_in_threadpool(decode, data)
        try:
            future = batcher.submit((tensor, request))
        except queue.Full:
            return JSONResponse({'detail': 'the server is busy; try again shortly'}, status_code=503)
        answer = await asyncio.wrap_future(future)
        return dict(answer, image={'width': width, 'height': height}, beam_size=beam_size,
                    ms=round((time.perf_counter() - start) * 1000, 1), model_ms=round(answer['model_ms'], 1))

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model_arguments(p, CHECKPOINT, WORD_MAP)
    p.add_argument('--host', default=HOST, help='(default: %(default)s)')
    p.add_argument('--port', type=int, default=PORT, help='(default: %(default)s)')
    p.add_argument('--max-upload-mb', type=float, default=MAX_UPLOAD_MB, help='(default: %(default)s)')
    p.add_argument('--max-megapixels', type=float, default=MAX_MEGAPIXELS, help='(default: %(default)s)')
    p.add_argument('--beam-size', type=int, default=BEAM_SIZE, help='default beam size of a request (default: %(default)s)')
    p.add_argument('--max-beam-size', type=int, default=MAX_BEAM_SIZE, help='(default: %(default)s)')
    options.add_decoding_arguments(p, length_norm=LENGTH_NORM, no_repeat_ngram=NO_REPEAT_NGRAM, max_len=MAX_LEN,
                                   bad_endings=BAD_ENDINGS, mirror=MIRROR, precision=PRECISION, runtime=RUNTIME)
    p.add_argument('--guide', choices=options.GUIDES, default=GUIDE,
                   help="a request's default --guide (02_inference.py --help) (default: %(default)s)")
    p.add_argument('--max-batch', type=int, default=MAX_BATCH, help='requests per batch (default: %(default)s)')
    p.add_argument('--batch-wait-ms', type=float, default=BATCH_WAIT_MS, help='(default: %(default)s)')
    p.add_argument('--max-queue', type=int, default=MAX_QUEUE, help='(default: %(default)s)')
    p.add_argument('--decode-workers', type=int, default=DECODE_WORKERS, help='(default: %(default)s)')
    p.add_argument('--device', default=DEVICE, help='cpu, cuda or auto (default: %(default)s)')
    p.add_argument('--samples', default=SAMPLES, help='folder of sample photos the page offers (default: %(default)s)')
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
        app = create_app(settings=Settings.from_args(args))
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if app.state.captioner.endings_note:
        print(f'note: {app.state.captioner.endings_note}', file=sys.stderr)
    print(f'serving {loading.checkpoint_label(args.checkpoint, basename=True)} on http://{args.host}:{args.port} '
          f'(memory allocator: {memory}; Ctrl+C stops)', flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level='warning')  # serve logs each request
    return 0


if __name__ == '__main__':
    sys.exit(main())

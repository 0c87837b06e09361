"""What the server takes from a client: uploads refused as their bodies stream in (UploadGuard), and
image bytes decoded with their size checked before any pixel is (decode_upload)."""
import io
import json
import logging
import time
import warnings

DRAIN_MB = 64   # a refused body is read and thrown away up to this many MiB more (UploadGuard)

log = logging.getLogger('serve')


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


class UploadGuard:
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

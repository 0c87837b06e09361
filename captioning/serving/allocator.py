"""Lowers a long-running process's resident memory (04_serve.py): jemalloc when it is installed, else
fewer glibc malloc arenas and freed memory handed back to the system regularly.

jemalloc (Debian/Ubuntu: `apt install libjemalloc2`) is what keeps the server flat: in a 4,000-request
soak of the default pair (8 clients, idle machine) its resident size stayed within 730-745 MB from
request 500 on, where glibc with the measures below went from 663 to 914 MB; over 10,000 requests with
JEMALLOC_CONF (below) it moved within 828-921 MB, 25 MB lower at the end than at request 1,000, at 21
requests/s (docs/speed.md). A
process can only get it at its start (LD_PRELOAD), so 04_serve.py restarts itself once with it
preloaded (restart_with_jemalloc) when run from the command line.

Why: the server allocates image buffers, tensors and activations from many threads (the request
threads decode uploads, the model thread runs the encoder and the search, PyTorch's own threads).
glibc gives threads their own malloc arenas (up to 8 per core) and keeps what is freed inside them for
reuse; memory freed in the middle of an arena's heap stays resident, so under steady load the
resident size climbs in steps as more arenas fill and fragment (the memory is free, just never
returned). Capping the arenas (mallopt M_ARENA_MAX, what the MALLOC_ARENA_MAX environment variable
does) and calling malloc_trim(0) about once a second, which releases the free pages of every arena,
lower it (by 70-150 MB in a 2,000-request soak of the default pair; it still grew: docs/speed.md).

On a C library without these calls (musl, macOS) every function here does nothing and says so by
returning False.
"""
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
import time

M_ARENA_MAX = -8          # glibc's mallopt parameter numbers (malloc.h)
SERVER_ARENAS = 2         # arenas for the server: its work is one model thread and a few decoding threads
TRIM_INTERVAL_S = 1.0     # at most one malloc_trim per this many seconds
JEMALLOC = 'libjemalloc.so.2'
JEMALLOC_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib',
                 '/usr/local/lib', '/opt/homebrew/lib')
RESTARTED = 'CAPTION_ALLOCATOR_RESTARTED'   # set in the restarted process: restart at most once
# jemalloc's settings for the server (unless MALLOC_CONF is set: the user's choice wins). By default
# jemalloc serves requests over 8 MiB from a dedicated arena that hands pages back at once, so the
# encoders' large activations were faulted in afresh on every batch: 9.5-11.8 requests/s at 8 clients
# against 18.5-19.4 with this setting or with glibc (default pair, idle machine, docs/speed.md).
JEMALLOC_CONF = 'oversize_threshold:0'


@functools.cache
def _glibc():
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    if not (hasattr(libc, 'mallopt') and hasattr(libc, 'malloc_trim')):
        return None
    return libc


def find_jemalloc():
    """The path of an installed libjemalloc.so.2, or None."""
    for folder in JEMALLOC_DIRS:
        path = os.path.join(folder, JEMALLOC)
        if os.path.exists(path):
            return path
    return None


def jemalloc_loaded():
    """Whether this process runs on jemalloc (Linux: its library is mapped)."""
    try:
        with open('/proc/self/maps', encoding='utf-8', errors='replace') as f:
            return 'libjemalloc' in f.read()
    except OSError:
        return False


def restart_with_jemalloc(argv=None):
    """Replace this process (same PID, same arguments) by one with jemalloc preloaded, when it is
    installed and not in use yet. Returns only when it does not restart: -> 'jemalloc' (already in
    use) or 'glibc' (not installed, or the restart did not take). argv: the command line to run again
    (default: this interpreter's)."""
    if jemalloc_loaded():
        return 'jemalloc'
    path = find_jemalloc()
    if path is None or os.environ.get(RESTARTED):
        return 'glibc'
    preload = ' '.join(p for p in (path, os.environ.get('LD_PRELOAD', '')) if p)
    argv = argv or [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, 'LD_PRELOAD': preload, RESTARTED: '1'}
    env.setdefault('MALLOC_CONF', JEMALLOC_CONF)
    os.execve(sys.executable, argv, env)


def limit_arenas(n=SERVER_ARENAS):
    """Cap glibc's malloc arenas at `n` (unless MALLOC_ARENA_MAX is set: the user's choice wins).
    Call it before threads start allocating: glibc fixes the cap when it first needs a second arena.
    -> whether the cap was set."""
    libc = _glibc()
    if libc is None or os.environ.get('MALLOC_ARENA_MAX'):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, int(n)))


def trim():
    """Hand the free pages of every malloc arena back to the system. -> whether it could."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class Trimmer:
    """trim() at most once per `interval` seconds, however often maybe_trim() is called (the server's
    model thread calls it after every batch, so a busy server pays for one trim a second: a few ms)."""

    def __init__(self, interval=TRIM_INTERVAL_S):
        self.interval, self.last, self.trims = interval, time.monotonic(), 0
        self._lock = threading.Lock()

    def maybe_trim(self):
        now = time.monotonic()
        with self._lock:
            if now - self.last < self.interval:
                return False
            self.last = now
        if trim():
            self.trims += 1
            return True
        return False

"""Lowers a long-running process's resident memory (04_serve.py): fewer glibc malloc arenas, and
freed memory handed back to the system regularly.

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
import os
import threading
import time

M_ARENA_MAX = -8          # glibc's mallopt parameter numbers (malloc.h)
SERVER_ARENAS = 2         # arenas for the server: its work is one model thread and a few decoding threads
TRIM_INTERVAL_S = 1.0     # at most one malloc_trim per this many seconds


def _glibc():
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    if not (hasattr(libc, 'mallopt') and hasattr(libc, 'malloc_trim')):
        return None
    return libc


_LIBC = _glibc()


def limit_arenas(n=SERVER_ARENAS):
    """Cap glibc's malloc arenas at `n` (unless MALLOC_ARENA_MAX is set: the user's choice wins).
    Call it before threads start allocating: glibc fixes the cap when it first needs a second arena.
    -> whether the cap was set."""
    if _LIBC is None or os.environ.get('MALLOC_ARENA_MAX'):
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, int(n)))


def trim():
    """Hand the free pages of every malloc arena back to the system. -> whether it could."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
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

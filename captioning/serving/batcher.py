"""The server's model thread: requests queued close together share one encoder pass and one beam search."""
import concurrent.futures
import queue
import threading
import time


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

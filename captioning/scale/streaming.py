"""Captions of large collections, streamed to disk: the captions.jsonl log (appended and flushed per
batch; a torn last line, as a kill leaves, is dropped and that image redone), resume (what is
already captioned is skipped), the run's settings (captions.settings.json: a run with other
settings refuses to append), per-rank part files under torchrun, their merge into one
captions.jsonl / captions.json / captions.csv in single-process order, and progress lines.

Memory stays flat in the number of images: what is kept per image is its path (the image list
itself), a set of the names already done and, in the merge, two integers.
Nothing here does work at import time.
"""
import contextlib
import csv
import glob
import json
import os
import re
import sys
import time

import numpy as np

import utils

JSONL = 'captions.jsonl'
SETTINGS = 'captions.settings.json'
PART = 'captions.part-{rank:05d}-of-{world:05d}.jsonl'
_PART_RE = re.compile(r'^captions\.part-\d{5}-of-\d{5}\.jsonl$')
FIELDS = ('image', 'caption', 'score', 'finished')   # captions.csv's columns, and 'tags' ('label 80%; ...') when recorded
PROGRESS_SECONDS = 15   # without a terminal (logs, nohup), a progress line at most this often


# ----------------------------------------------------------------------------------------------
# Reading and appending the log

def read_records(path, cut_torn=False):
    """Yield (byte offset, byte length, record) of each complete line of a captions log.

    A last line without its newline is torn (a kill during the write): it is skipped, and with
    `cut_torn` cut off the file, so that appending continues on a clean line. A damaged line
    anywhere else raises ValueError naming the file and line."""
    try:
        f = open(path, 'rb')
    except FileNotFoundError:
        return
    with f:
        offset, number = 0, 0
        for line in f:
            number += 1
            if not line.endswith(b'\n'):
                if cut_torn:
                    os.truncate(path, offset)
                return
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f'{path} line {number}: not a caption record ({e}); repair or delete the line, '
                                 'or pass --overwrite to start over') from None
            if not isinstance(record, dict) or not isinstance(record.get('image'), str):
                raise ValueError(f'{path} line {number}: not a caption record (expected an object with "image"); '
                                 'repair or delete the line, or pass --overwrite to start over')
            yield offset, len(line), record
            offset += len(line)


class CaptionLog:
    """Appends caption records to a JSON-lines file, one line per image, flushed to disk per batch."""

    def __init__(self, path):
        self.path = path
        self._file = None

    def append(self, records):
        if not records:
            return
        if self._file is None:
            self._file = open(self.path, 'a', encoding='utf-8')
        data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def sources(out):
    """The logs in `out` that hold captions: captions.jsonl, then the part files in name order."""
    parts = sorted(p for p in glob.glob(os.path.join(glob.escape(out), 'captions.part-*.jsonl'))
                   if _PART_RE.match(os.path.basename(p)))
    main = os.path.join(out, JSONL)
    return ([main] if os.path.exists(main) else []) + parts


def done_images(out):
    """The set of images that already have a caption in any log of `out`."""
    return {record['image'] for path in sources(out) for _, _, record in read_records(path)}


# ----------------------------------------------------------------------------------------------
# The run's settings

def file_digest(path):
    """sha1 of a file's bytes (names a checkpoint by content, wherever it lies)."""
    return utils.file_digest(path, 'sha1')


# Settings added after runs were first recorded: what such a run did (so it resumes with that value)
BEFORE_THE_SETTING = {'bad_endings': 'allow', 'num_captions': 1, 'sample': False, 'temperature': 1.0, 'top_k': 0,
                      'top_p': 1.0, 'seed': 0, 'diversity_groups': 1, 'diversity_strength': 0.5, 'prefix': '',
                      'guide': 'off', 'runtime': 'torch'}


def check_settings(out, settings):
    """ValueError with one line when `out` holds captions written with other settings (or with no
    record of them); fine when `out` holds no captions yet."""
    if not sources(out):
        return
    path = os.path.join(out, SETTINGS)
    if not os.path.exists(path):
        raise ValueError(f'{os.path.join(out, JSONL)} has no record of the settings it was written with ({SETTINGS} '
                         'is missing): pass --overwrite to start over, or choose another --out')
    old = utils.read_json(path, 'settings file')
    old = {**{k: v for k, v in BEFORE_THE_SETTING.items() if k in settings}, **old}
    for key in sorted(set(old) | set(settings)):
        if _compared(old.get(key)) != _compared(settings.get(key)):
            raise ValueError(f'{out} holds captions made with {key} {_show(old.get(key))}, this run has '
                             f'{_show(settings.get(key))}: pass --overwrite to start over with the new settings, '
                             'or choose another --out')


def _is_files(value):
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and 'sha1' in v for v in value)


def _compared(value):
    """Files (checkpoints: [{path, sha1}]) are the same files by content, wherever they lie now."""
    return [v['sha1'] for v in value] if _is_files(value) else value


def _show(value):
    if _is_files(value):
        return ' + '.join(f"{os.path.basename(c['path'])} (sha1 {c['sha1'][:10]})" for c in value)
    return json.dumps(value)


def file_settings(paths):
    """[{path, sha1}] of files (checkpoints) for the settings record: compared by content."""
    return [{'path': os.path.abspath(p), 'sha1': file_digest(p)} for p in paths]


def start_over(out):
    """Remove the captions, parts and settings record of an earlier run in `out` (--overwrite)."""
    for path in sources(out) + [os.path.join(out, n) for n in (SETTINGS, 'captions.json', 'captions.csv')]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ----------------------------------------------------------------------------------------------
# A resumable, sharded captioning run

class Run:
    """One rank's view of a captioning run into `out` (see the module docstring).

    Every rank calls open() then finish(); in between it captions `pending` and hands each batch's
    records to append(). Rank r of w appends to its own part file (w > 1) or to captions.jsonl."""

    def __init__(self, out, settings, rank=0, world=1, overwrite=False):
        self.out, self.settings, self.rank, self.world, self.overwrite = out, settings, rank, world, overwrite
        name = JSONL if world == 1 else PART.format(rank=rank, world=world)
        self.log = CaptionLog(os.path.join(out, name))
        self.skipped = 0

    def open(self, paths, batch_size):
        """Check the settings, read what is done, and return this rank's share of what is not: whole
        batches of the remaining images in list order (identical on every rank)."""
        from captioning.scale import sharding
        if not self.overwrite:
            check_settings(self.out, self.settings)          # every rank reads the same files: same verdict
        sharding.barrier()                                   # all have read before rank 0 changes anything
        if self.rank == 0:
            utils.remove_stale_temp(self.out)                # a merge a kill cut short
            if self.overwrite:
                start_over(self.out)
            utils.write_json(os.path.join(self.out, SETTINGS), self.settings, indent=1)
        sharding.barrier()
        for _ in read_records(self.log.path, cut_torn=True):   # this rank's own log: cut a torn last line
            pass
        done = done_images(self.out)
        sharding.barrier()                                   # all have read before anyone appends
        pending = [p for p in paths if p not in done]
        self.skipped = len(paths) - len(pending)
        start, stop = sharding.batch_share(len(pending), self.rank, self.world, batch_size)
        return pending[start:stop]

    def append(self, records):
        self.log.append(records)

    def finish(self, paths, failed=False):
        """Wait for every rank; then rank 0 merges the logs (what every rank wrote, also after a
        failure) and writes captions.json/.csv. -> (the number of captions on rank 0, None elsewhere;
        whether any rank failed). With no caption, no captions.json/.csv is written."""
        from captioning.scale import sharding
        self.log.close()
        failed = sharding.any_rank(failed)
        if self.rank != 0:
            return None, failed
        count = merge(self.out, paths)
        return (write_tables(self.out) if count else 0), failed


# ----------------------------------------------------------------------------------------------
# The merge

def merge(out, paths):
    """Make `out`/captions.jsonl hold one record per image, in the order of `paths` (a single-process
    run's order), from captions.jsonl and any part files; the first record of an image wins. Records
    of images not in `paths` (an earlier run over other files) are kept, after them. Returns the
    number of records (write_tables then writes captions.json and captions.csv from it).

    Memory: an index of `paths` and two integers per image; records are copied by byte offset."""
    files = sources(out)
    index = {p: i for i, p in enumerate(paths)}
    where = np.full(len(paths), -1, dtype=np.int64)        # file number * 2**40 + offset
    length = np.zeros(len(paths), dtype=np.int32)
    extra, seen_extra, in_order, previous = [], set(), True, -1
    for n, path in enumerate(files):
        for offset, size, record in read_records(path):
            i = index.get(record['image'])
            if i is None:
                if record['image'] not in seen_extra:
                    seen_extra.add(record['image'])
                    extra.append((n, offset, size))
                else:
                    in_order = False
                continue
            if where[i] >= 0 or i <= previous or extra:   # extras stay in place only after every listed image
                in_order = False
            if where[i] < 0:
                where[i], length[i] = (n << 40) | offset, size
            previous = i
    del index
    main = os.path.join(out, JSONL)
    if not (files == [main] and in_order):
        fds = [os.open(p, os.O_RDONLY) for p in files]
        try:
            with utils.atomic_path(main) as tmp:
                with open(tmp, 'wb') as f:
                    for i in np.flatnonzero(where >= 0):
                        f.write(os.pread(fds[where[i] >> 40], int(length[i]), int(where[i] & ((1 << 40) - 1))))
                    for n, offset, size in extra:
                        f.write(os.pread(fds[n], size, offset))
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            for fd in fds:
                os.close(fd)
        for path in files:
            if path != main:
                os.remove(path)
    return int((where >= 0).sum()) + len(extra)


def write_tables(out):
    """captions.json (a list of the records: image, caption, score, finished, and what else they hold;
    as json.dump(indent=1) writes it) and captions.csv (FIELDS) from captions.jsonl, streamed record by
    record. -> the number of records."""
    main, count = os.path.join(out, JSONL), 0
    with utils.atomic_path(os.path.join(out, 'captions.json')) as tmp_json, \
            utils.atomic_path(os.path.join(out, 'captions.csv')) as tmp_csv:
        with open(tmp_json, 'w', encoding='utf-8') as fj, open(tmp_csv, 'w', newline='', encoding='utf-8') as fc:
            writer = None
            fj.write('[')
            for _, _, record in read_records(main):
                fj.write((',\n ' if count else '\n ') + json.dumps(record, indent=1, ensure_ascii=False)
                         .replace('\n', '\n '))
                if writer is None:   # the columns: FIELDS, and tags when the run recorded them
                    writer = csv.DictWriter(fc, fieldnames=FIELDS + (('tags',) if 'tags' in record else ()),
                                            extrasaction='ignore')
                    writer.writeheader()
                tags = '; '.join(f"{t['label']} {t['p']:.0%}" for t in record.get('tags') or [])
                writer.writerow({**record, 'tags': tags})
                count += 1
            fj.write('\n]' if count else ']')
    return count


# ----------------------------------------------------------------------------------------------
# Progress

class Progress:
    """Images done of `total`, with images/s and the time left: a tqdm bar on a terminal, else a plain
    line at most every `every` seconds (and at the end), so logs of long runs show it too."""

    def __init__(self, total, desc='captioning', enabled=True, every=PROGRESS_SECONDS, stream=None):
        from tqdm import tqdm
        self.total, self.desc, self.every, self.stream = total, desc, every, stream or sys.stdout
        self.bar = tqdm(total=total, desc=desc, unit='img', disable=None if enabled else True, leave=False)
        self.plain = enabled and self.bar.disable
        self.done, self.start = 0, time.time()
        self.last = self.start

    def update(self, n):
        self.done += n
        self.bar.update(n)
        now = time.time()
        if self.plain and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now=None):
        elapsed = max((now or time.time()) - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float('inf')
        return (f'{self.desc}: {self.done}/{self.total} images ({100 * self.done // max(self.total, 1)}%), '
                f'{rate:.1f} images/s, {_clock(elapsed)} elapsed, ETA {_clock(left)}')

    def write(self, message):
        """A line of output that does not break the bar."""
        if self.bar.disable:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def close(self):
        self.bar.close()


def _clock(seconds):
    if seconds == float('inf'):
        return '--:--'
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else f'{rest // 60:02d}:{rest % 60:02d}'

"""Streaming inference (02_inference.py + captioning/scale/streaming.py): captions.jsonl per batch, resume after a
kill -9, a torn last line, settings that refuse to mix, the merge's order, flat memory, progress."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import REPO, script
from PIL import Image

from captioning.scale import sharding, streaming

infer = script('02_inference')

# Runs 02_inference.py and kills itself with SIGKILL when the log is about to get batch number KILL_AT
# (counting from 0): 'clean' before any byte of it, 'torn' after half of its bytes.
HARNESS = r'''
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from captioning.scale import streaming
kill_at, how, argv = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
real, batches = streaming.CaptionLog.append, [0]
def append(self, records):
    if batches[0] == kill_at:
        if how == 'torn':
            data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records).encode()
            with open(self.path, 'ab') as f:
                f.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, records)
    batches[0] += 1
streaming.CaptionLog.append = append
import importlib
sys.exit(importlib.import_module('02_inference').main(argv))
'''


def make_photos(folder, n, distinct=4):
    """n images: `distinct` random ones, the rest hard links to them (names sort in creation order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        path = folder / f'p{i:04d}.jpg'
        if i < distinct:
            Image.fromarray(rng.randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        else:
            os.link(folder / f'p{i % distinct:04d}.jpg', path)
    return folder


def lines(path):
    return [json.loads(line) for line in open(path, encoding='utf-8')]


def flags(checkpoint, photos, out, *extra):
    return ['--img', str(photos), '--checkpoint', checkpoint, '--out', str(out), '--batch-size', '3', *extra]


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp('photos') / 'p', 14)


@pytest.fixture(scope='module')
def reference(tiny_checkpoint, photos, tmp_path_factory):
    """captions.jsonl of one uninterrupted run."""
    out = tmp_path_factory.mktemp('ref')
    assert infer.main(flags(tiny_checkpoint, photos, out)) == 0
    return lines(out / 'captions.jsonl')


def test_uninterrupted_run_writes_the_log_and_the_same_tables(reference, photos):
    assert [r['image'] for r in reference] == sorted(str(p) for p in photos.iterdir())
    assert all(set(r) == {'image', 'caption', 'score', 'finished'} for r in reference)


@pytest.mark.parametrize('kill_at, how', [(0, 'clean'), (2, 'clean'), (3, 'torn')])
def test_resume_after_kill_9_captions_every_image_once(tiny_checkpoint, photos, reference, tmp_path, capsys,
                                                       kill_at, how):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-c', HARNESS, REPO, str(kill_at), how, *flags(tiny_checkpoint, photos, out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    log = out / 'captions.jsonl'
    written = log.read_bytes() if log.exists() else b''
    whole = written.count(b'\n')                                     # the batches before the kill, and with
    assert 3 * kill_at <= whole < 3 * kill_at + 3                    # 'torn' a line or two of the next one
    assert (written.endswith(b'\n') or not written) == (how == 'clean')
    assert infer.main(flags(tiny_checkpoint, photos, out)) == 0      # the same command again
    printed = capsys.readouterr().out
    if whole:
        assert f'resuming: {whole} of 14 image(s) already have a caption' in printed
    assert f'{14 - whole} image(s) captioned' in printed
    assert lines(log) == reference                                   # each image once, in order, same captions
    assert json.load(open(out / 'captions.json')) == reference
    assert not list(out.glob('captions.part-*')) and not list(out.glob('.*.tmp'))


def test_a_torn_last_line_is_dropped_and_that_image_redone(tiny_checkpoint, photos, reference, tmp_path, capsys):
    out = tmp_path / 'out'
    assert infer.main(flags(tiny_checkpoint, photos, out)) == 0
    log = out / 'captions.jsonl'
    data = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b''.join(data[:-2]) + data[-2][:-9])             # the last line gone, the one before torn
    assert infer.main(flags(tiny_checkpoint, photos, out)) == 0
    printed = capsys.readouterr().out
    assert 'resuming: 12 of 14' in printed and '2 image(s) captioned' in printed
    assert lines(log) == reference


def test_a_damaged_line_inside_the_log_is_one_clear_error(tiny_checkpoint, photos, tmp_path, capsys):
    out = tmp_path / 'out'
    assert infer.main(flags(tiny_checkpoint, photos, out)) == 0
    log = out / 'captions.jsonl'
    data = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b''.join(data[:3]) + b'{"image": broken\n' + b''.join(data[4:]))
    capsys.readouterr()
    assert infer.main(flags(tiny_checkpoint, photos, out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert 'captions.jsonl line 4: not a caption record' in err


def test_changed_settings_refuse_to_append_and_overwrite_starts_over(tiny_checkpoint, photos, tmp_path, capsys):
    out = tmp_path / 'out'
    assert infer.main(flags(tiny_checkpoint, photos, out, '--beam-size', '1')) == 0
    before = (out / 'captions.jsonl').read_bytes()
    capsys.readouterr()
    assert infer.main(flags(tiny_checkpoint, photos, out, '--beam-size', '2')) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and 'beam_size 1, this run has 2' in err and '--overwrite' in err
    assert infer.main(flags(tiny_checkpoint, photos, out, '--beam-size', '1', '--no-repeat-ngram', '0')) == 1
    assert 'no_repeat_ngram 3, this run has 0' in capsys.readouterr().err
    other = tmp_path / 'other.pt'                                    # other weights under the same name
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt['decoder'] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt['decoder'].items()}
    torch.save(ckpt, other)
    assert infer.main(flags(str(other), photos, out, '--beam-size', '1')) == 1
    assert 'made with checkpoint' in capsys.readouterr().err
    assert (out / 'captions.jsonl').read_bytes() == before           # nothing appended by the refused runs
    moved = tmp_path / 'moved.pt'                                    # the same file elsewhere: the same settings
    shutil.copy(tiny_checkpoint, moved)
    assert infer.main(flags(str(moved), photos, out, '--beam-size', '1')) == 0
    assert 'resuming: 14 of 14' in capsys.readouterr().out
    assert infer.main(flags(tiny_checkpoint, photos, out, '--beam-size', '2', '--overwrite')) == 0
    assert json.load(open(out / 'captions.settings.json'))['beam_size'] == 2
    assert '14 image(s) captioned' in capsys.readouterr().out and len(lines(out / 'captions.jsonl')) == 14


def test_merge_keeps_the_single_process_order(tmp_path):
    """Parts of any world size, in any order, with duplicates, a torn tail and images of an earlier list."""
    paths = [f'img{i:02d}.jpg' for i in range(10)]
    rec = {p: {'image': p, 'caption': f'c {p}', 'score': -1.5, 'finished': True} for p in paths + ['old.jpg']}
    out = tmp_path / 'out'
    out.mkdir()

    def write(name, images, torn=b''):
        (out / name).write_bytes(b''.join(json.dumps(rec[p]).encode() + b'\n' for p in images) + torn)
    write('captions.jsonl', ['img03.jpg', 'old.jpg', 'img01.jpg'])
    write(streaming.PART.format(rank=0, world=2), ['img00.jpg', 'img02.jpg', 'img09.jpg', 'img03.jpg'])
    write(streaming.PART.format(rank=1, world=2), ['img08.jpg', 'img05.jpg'], torn=b'{"image": "img06')
    write(streaming.PART.format(rank=2, world=3), ['img04.jpg', 'img07.jpg'])
    (out / 'captions.part-notes.jsonl').write_text('not ours')       # not a part name: left alone
    assert streaming.done_images(str(out)) == set(paths) - {'img06.jpg'} | {'old.jpg'}
    assert streaming.merge(str(out), paths) == 10
    merged = lines(out / 'captions.jsonl')
    assert [r['image'] for r in merged] == [p for p in paths if p != 'img06.jpg'] + ['old.jpg']
    assert merged[0] == rec['img00.jpg']
    assert sorted(os.listdir(out)) == ['captions.jsonl', 'captions.part-notes.jsonl']
    assert streaming.write_tables(str(out)) == 10
    assert (out / 'captions.json').read_text() == json.dumps(merged, indent=1)   # as json.dump wrote it before
    assert (out / 'captions.csv').read_text().splitlines()[:2] == ['image,caption,score,finished',
                                                                 'img00.jpg,c img00.jpg,-1.5,True']


def test_batch_shares_are_whole_batches_covering_the_list_once():
    for n, world, batch in ((0, 2, 4), (7, 2, 3), (10, 3, 3), (2, 4, 1), (100, 3, 16)):
        shares = [sharding.batch_share(n, r, world, batch) for r in range(world)]
        assert [i for a, b in shares for i in range(a, b)] == list(range(n))
        assert all(a % batch == 0 for a, b in shares if a < n)
        sizes = [-(-(b - a) // batch) for a, b in shares]
        assert max(sizes) - min(sizes) <= 1


def test_progress_without_a_terminal_prints_rate_and_eta(capsys):
    progress = streaming.Progress(10, 'captioning', every=0)
    progress.update(4)
    progress.update(6)
    progress.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith('captioning: 4/10 images (40%), ')
    assert 'images/s' in out[0] and 'ETA ' in out[0] and out[1].endswith('ETA 00:00')


def _traced_peak(tiny_checkpoint, photos, out):
    """Peak Python memory of one in-process run (tracemalloc) above what was allocated before it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert infer.main(flags(tiny_checkpoint, photos, out, '--batch-size', '10', '--beam-size', '3')) == 0
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images(tiny_checkpoint, tmp_path, capsys):
    """What is kept per image is its path and name (a few hundred bytes); the results of a batch are
    dropped once written. Measured here: 66 bytes per extra image; the old 02, which kept every result
    with its beams and attention until the end, 1,977 (its tensors not even counted)."""
    few, many = make_photos(tmp_path / 'few', 20), make_photos(tmp_path / 'many', 200)
    infer.main(flags(tiny_checkpoint, few, tmp_path / 'warm'))      # imports and first-call caches
    small = _traced_peak(tiny_checkpoint, few, tmp_path / 'o1')
    large = _traced_peak(tiny_checkpoint, many, tmp_path / 'o2')
    per_image = (large - small) / 180
    assert per_image < 600, f'{per_image:.0f} bytes of Python memory per extra image'

"""torchrun on CPU (gloo): 2 processes give what 1 gives, for 02_inference.py (captions.jsonl, byte for
byte), 03_evaluate.py (the scores) and the feature cache (the file, byte for byte; and as 01_train.py
builds it)."""
import json
import os
import shutil
import subprocess
import sys

import torch
from conftest import REPO, script
from test_streaming import lines, make_photos

import datasets
import models


def torchrun(cwd, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *map(str, args)]
    done = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_process_inference_writes_the_one_process_captions(tiny_checkpoint, tmp_path):
    photos = make_photos(tmp_path / 'photos', 17)
    (photos / 'corrupt.jpg').write_bytes(b'not a jpeg')             # skipped by whichever rank has it
    common = ['--img', photos, '--checkpoint', tiny_checkpoint, '--batch-size', '3', '--device', 'cpu']
    one, two = tmp_path / 'one', tmp_path / 'two'
    assert script('02_inference').main([*map(str, common), '--out', str(one)]) == 0
    stdout = torchrun(tmp_path, os.path.join(REPO, '02_inference.py'), *common, '--out', two)
    assert 'process 1 of 2' in stdout and '17 caption(s) in' in stdout
    assert (two / 'captions.jsonl').read_bytes() == (one / 'captions.jsonl').read_bytes()
    assert (two / 'captions.json').read_bytes() == (one / 'captions.json').read_bytes()
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))       # the part files are merged away
    # A 2-process run cut short (its parts left as a kill leaves them) is finished by one process.
    three = tmp_path / 'three'
    three.mkdir()
    rows = (one / 'captions.jsonl').read_bytes().splitlines(keepends=True)
    (three / 'captions.part-00000-of-00002.jsonl').write_bytes(b''.join(rows[:4]))
    (three / 'captions.part-00001-of-00002.jsonl').write_bytes(b''.join(rows[9:11]) + rows[11][:20])
    (three / 'captions.settings.json').write_bytes((one / 'captions.settings.json').read_bytes())
    assert script('02_inference').main([*map(str, common), '--out', str(three)]) == 0
    assert lines(three / 'captions.jsonl') == lines(one / 'captions.jsonl')


def test_two_process_evaluation_scores_like_one(tiny_checkpoint, synth_data, tmp_path):
    folder, _ = synth_data
    common = ['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'TRAIN', '--max-images', '11',
              '--beam-sizes', '1', '3', '--batch-size', '4', '--metrics', 'nltk', '--device', 'cpu']
    assert script('03_evaluate').main([*common, '--out', str(tmp_path / 'one.json')]) == 0
    torchrun(tmp_path, os.path.join(REPO, '03_evaluate.py'), *common, '--out', tmp_path / 'two.json')
    one, two = json.load(open(tmp_path / 'one.json')), json.load(open(tmp_path / 'two.json'))
    assert one['num_images'] == two['num_images'] == 11
    assert one['results'] == two['results'] and one['captions'] == two['captions']


def test_two_process_feature_cache_is_byte_identical(synth_data, tmp_path):
    folder, name = synth_data
    torch.manual_seed(0)
    encoder = models.Encoder('resnet18', 'none', image_size=64).eval()
    ds = datasets.CaptionDataset(folder, name, 'TRAIN', datasets.image_transform(encoder), per_image=True)
    one = tmp_path / 'one.npy'
    datasets.build_feature_cache(encoder, ds, str(one), torch.device('cpu'), batch_size=8, progress=False)
    two = tmp_path / 'two.npy'
    torchrun(tmp_path, os.path.join(REPO, 'tests', 'cache_worker.py'), folder, name, 'TRAIN', two, 8)
    assert ds.num_images == 48 and two.read_bytes() == one.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_two_process_training_caches_the_features_one_process_would(synth_data, tmp_path):
    """01_train.py under torchrun: both ranks encode into the caches; the files are those of one process."""
    folder, _ = synth_data
    flags = ['--encoder', 'resnet18', '--encoder-weights', 'none', '--image-size', '64', '--encoded-image-size', '2',
             '--emb-dim', '16', '--attention-dim', '16', '--decoder-dim', '32', '--workers', '0', '--epochs', '1',
             '--max-steps', '1', '--cache-features']
    caches = {}
    for runs in ('one', 'two'):
        data = tmp_path / f'data_{runs}'
        shutil.copytree(folder, data, ignore=shutil.ignore_patterns('features'))
        args = ['--data-folder', data, '--out-dir', tmp_path / f'run_{runs}', *flags]
        if runs == 'one':
            assert script('01_train').main(list(map(str, args))) == 0
        else:
            dump = tmp_path / 'dump'
            dump.mkdir()
            stdout = torchrun(tmp_path, os.path.join(REPO, 'tests', 'ddp_worker.py'), dump, *args)
            assert stdout.count('features of 48 images with the frozen resnet18 on 2 processes') == 1   # TRAIN
        caches[runs] = {p.name: p.read_bytes() for p in (data / 'features').iterdir()}
    assert sorted(caches['one']) == sorted(caches['two']) and len(caches['one']) == 2   # TRAIN and VAL
    assert caches['one'] == caches['two']

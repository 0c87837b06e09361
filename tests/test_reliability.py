"""Issue 13: faults and hostile input end in one clear line; nothing read runs code; nothing is lost."""
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL, script
from PIL import Image

import datasets
import utils
from captioning import checkpoint
from captioning.preparation import formats, prepare

train = script('01_train')
infer = script('02_inference')
evaluate = script('03_evaluate')


def one_error_line(err):
    """The single 'error:' line of a failed command (and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert 'Traceback' not in err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


class _RunsShell:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.fixture
def data_copy(synth_data, tmp_path):
    """A private copy of the prepared synthetic set (tests may damage it)."""
    folder, name = synth_data
    copy = tmp_path / 'data'
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns('synthetic_source', 'features'))
    return copy, name


@pytest.mark.parametrize('command', ['evaluate', 'train'])
def test_hostile_paths_pickle_never_runs_code(data_copy, tiny_checkpoint, tmp_path, capsys, command):
    folder, name = data_copy
    marker = tmp_path / 'pwned'
    split = 'TEST' if command == 'evaluate' else 'TRAIN'
    with open(folder / f'{split}_paths_{name}.pkl', 'wb') as f:
        pickle.dump([_RunsShell(marker)], f)
    if command == 'evaluate':
        rc = evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', str(folder), '--split', 'TEST'])
    else:
        rc = train.main(['--data-folder', str(folder), '--out-dir', str(tmp_path / 'run'), '--epochs', '1',
                         *TINY_MODEL])
    assert rc == 1
    assert not marker.exists()
    line = one_error_line(capsys.readouterr().err)
    assert f'{split}_paths_{name}.pkl' in line and 'refused' in line and 'posix.system' in line


@pytest.mark.parametrize('content, says', [
    (b'', 'truncated'), (b'\x80\x04\x95', 'truncated'), (b'hello, text', 'truncated'),
    (pickle.dumps({'a': 1}), 'got dict'), (pickle.dumps([1, 2]), 'non-strings'),
    (pickle.dumps(['a.jpg', 'b.jpg'])[:-3], 'truncated')])
def test_paths_pickle_other_than_a_list_of_str_is_one_line(tmp_path, content, says):
    path = tmp_path / 'TEST_paths_x.pkl'
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        datasets.read_paths_pickle(str(path))
    assert str(path) in str(e.value) and says in str(e.value) and '\n' not in str(e.value)


def test_paths_pickle_round_trips_a_list_of_str(tmp_path):
    path = tmp_path / 'p.pkl'
    path.write_bytes(pickle.dumps(['a.jpg', 'ü/b.jpg']))
    assert datasets.read_paths_pickle(str(path)) == ['a.jpg', 'ü/b.jpg']


@pytest.mark.parametrize('kind, content', [('CAPTIONS', '[["a", "b"]]'), ('CAPTIONS', '[[1, 2], [3]]'),
                                           ('CAPLENS', '{"a": 1}'), ('CAPLENS', '[[1]]')])
def test_prepared_json_of_the_wrong_shape_is_one_line(data_copy, kind, content):
    folder, name = data_copy
    (folder / f'VAL_{kind}_{name}.json').write_text(content)
    with pytest.raises(ValueError) as e:
        datasets.CaptionDataset(str(folder), name, 'VAL')
    assert f'VAL_{kind}_{name}.json' in str(e.value)


class DecoderWithAttention(torch.nn.Module):
    """Stands in for the tutorial's pickled decoder module."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'text', 'ansi', 'system', 'tutorial'])
def test_checkpoint_load_errors_are_one_plain_line(tmp_path, kind):
    path = tmp_path / 'bad.pt'
    good = tmp_path / 'good.pt'
    torch.save({'config': {}, 'decoder': {'w': torch.zeros(500)}}, good)
    content = {'empty': b'', 'truncated': good.read_bytes()[:700], 'text': b'just some text\n',
               'ansi': b'\x1b[31mred\x1b[0m\n', 'system': pickle.dumps(_RunsShell(tmp_path / 'pwned'), protocol=2)}
    if kind == 'tutorial':
        torch.save({'decoder': DecoderWithAttention()}, path)
    else:
        path.write_bytes(content[kind])
    with pytest.raises(ValueError) as e:
        checkpoint.load_checkpoint(str(path))
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and '\n' not in msg and '\x1b' not in msg
    assert not re.search(r'EOFError|IndexError|KeyError|pop from empty', msg)
    assert ('tutorial' in msg) == (kind == 'tutorial')
    assert {'empty': 'empty file', 'truncated': 'truncated', 'text': 'not a checkpoint', 'ansi': 'not a checkpoint',
            'system': 'refused: it pickles posix.system', 'tutorial': 'refused'}[kind] in msg
    assert not (tmp_path / 'pwned').exists()


# ----------------------------------------------------------------------------------------------
# 01_train.py: flags, run folders, leftovers, Ctrl-C, resume

def train_args(folder, out, *extra):
    return ['--data-folder', folder, '--out-dir', str(out), '--batch-size', '20', *TINY_MODEL, *map(str, extra)]


@pytest.mark.parametrize('flag, value', [('--val-beam-size', '0'), ('--batch-size', '0'), ('--epochs', '0'),
                                         ('--workers', '-1'), ('--dropout', '1.5'), ('--decoder-lr', '0')])
def test_train_flags_are_range_checked_before_any_work(synth_data, tmp_path, capsys, flag, value):
    folder, _ = synth_data
    out = tmp_path / 'run'
    assert train.main(train_args(folder, out, flag, value)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f'error: {flag} ') and ': must be' in line
    assert not out.exists() or not os.listdir(out)


def test_a_new_run_never_replaces_a_run_folder_with_a_checkpoint(synth_data, tmp_path, capsys):
    folder, name = synth_data
    out = tmp_path / 'run'
    out.mkdir()
    old = out / f'checkpoint_{name}.pt'
    old.write_bytes(b'the interrupted run')
    assert train.main(train_args(folder, out, '--max-steps', '1')) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'--resume {old}' in line and '--overwrite' in line
    assert old.read_bytes() == b'the interrupted run'
    (out / 'metrics.jsonl').write_text('{"epoch": 7}\n')
    assert train.main(train_args(folder, out, '--max-steps', '1', '--overwrite')) == 0
    assert checkpoint.load_checkpoint(str(old))['step'] == 1
    assert not (out / 'metrics.jsonl').exists()           # the old run's log went with it


def kill_inside_atomic_write(folder, name):
    """A subprocess that starts an atomic write of folder/name and is killed (SIGKILL) in the middle."""
    code = ('import os, signal, sys; sys.path.insert(0, %r); import utils\n'
            'with utils.atomic_path(%r) as tmp:\n'
            '    open(tmp, "wb").write(b"x" * 100000)\n'
            '    os.kill(os.getpid(), signal.SIGKILL)\n') % (REPO, str(folder / name))
    proc = subprocess.run([sys.executable, '-c', code])
    assert proc.returncode == -signal.SIGKILL


def test_the_next_run_removes_what_a_killed_checkpoint_write_left(synth_data, tmp_path, capsys):
    folder, name = synth_data
    out = tmp_path / 'run'
    out.mkdir()
    kill_inside_atomic_write(out, f'checkpoint_{name}.pt')
    left = list(out.glob('.checkpoint_*.tmp'))
    assert len(left) == 1 and left[0].stat().st_size == 100000
    with utils.atomic_path(str(out / 'other.pt')) as live:   # a write still under way (this process) stays
        open(live, 'wb').close()
        assert train.main(train_args(folder, out, '--max-steps', '1')) == 0
        assert os.path.exists(live)
    assert not left[0].exists()
    assert 'removed 97.7 KB of temporary files left by a killed run' in capsys.readouterr().out


def test_ctrl_c_message_comes_from_the_main_process_only(capfd):
    with train.Stopper() as stopper:
        pid = os.fork()
        if pid == 0:                           # as a forked DataLoader worker: inherits the handler
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(3 if stopper.requested else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert 'Ctrl-C' not in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)    # the main process: one message
        assert stopper.requested
    assert capfd.readouterr().err.count('Ctrl-C: saving') == 1


def test_resume_shows_the_epochs_position_and_whole_epoch_loss(synth_data, tmp_path, capsys):
    folder, name = synth_data
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert train.main(train_args(folder, full, '--epochs', '1')) == 0
    assert train.main(train_args(folder, part, '--epochs', '1', '--max-steps', '3')) == 0
    ckpt = part / f'checkpoint_{name}.pt'
    at_3 = tmp_path / 'at_step_3.pt'
    shutil.copy(ckpt, at_3)
    assert train.main(['--resume', str(ckpt), '--max-steps', '2']) == 0      # logs steps 4, 5 ...
    shutil.copy(at_3, ckpt)                                                  # ... then a kill -9 loses them
    capsys.readouterr()
    assert train.main(['--resume', str(ckpt), '--max-steps', '0']) == 0
    printed = capsys.readouterr().out
    assert 'epoch 0 step 4/12:' in printed and 'step 1/' not in printed
    steps = [json.loads(line)['step'] for line in open(part / 'steps.jsonl')]
    assert steps == list(range(1, 13))                                       # no step logged twice
    metrics = [json.loads(open(d / 'metrics.jsonl').readline()) for d in (full, part)]
    assert metrics[0]['train_loss'] == metrics[1]['train_loss']              # the whole epoch's loss


# ----------------------------------------------------------------------------------------------
# Images: the transform without torchvision, regular files only, several paths

def torchvision_transform(img, size, mean, std):
    """The torchvision v2 transform datasets.ImageTransform used before (the reference)."""
    from torchvision.transforms.v2 import functional as TF
    if isinstance(img, Image.Image):
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        img = TF.pil_to_tensor(img)
    elif img.shape[-2:] != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
    return TF.normalize(img.float().div_(255.0), mean, std)


@pytest.mark.parametrize('shape', [(3, 64, 64), (3, 300, 217), (3, 40, 90), (3, 7, 5), (3, 224, 224)])
def test_image_transform_matches_torchvision_exactly(shape):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    t = datasets.ImageTransform(64, mean, std)
    g = torch.Generator().manual_seed(shape[1] * shape[2])
    tensor = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    pil = Image.fromarray(tensor.permute(1, 2, 0).numpy())
    for img in (tensor, pil):
        assert torch.equal(t(img), torchvision_transform(img, 64, mean, std))


def test_captioning_does_not_import_torchvision():
    code = ('import sys; sys.path.insert(0, %r); from captioning.decoding import loading, search; import datasets, utils; import importlib\n'
            'importlib.import_module("02_inference")\n'
            'print("torchvision" in sys.modules)') % REPO
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'False'


def test_list_images_takes_several_paths_and_only_regular_files(tmp_path):
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.jpg')
    Image.new('RGB', (8, 8)).save(tmp_path / 'b.png')
    (tmp_path / 'sub').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'sub' / 'c.jpg')
    os.mkfifo(tmp_path / 'sub' / 'pipe.jpg')
    (tmp_path / 'sub' / 'loop').symlink_to(tmp_path / 'sub')
    got = datasets.list_images([str(tmp_path / 'b.png'), str(tmp_path / 'sub'), str(tmp_path / 'a.jpg'),
                                str(tmp_path / 'sub' / 'c.jpg')])
    assert got == [str(tmp_path / 'b.png'), str(tmp_path / 'sub' / 'c.jpg'), str(tmp_path / 'a.jpg')]
    with pytest.raises(ValueError, match='pipe.jpg: not a regular file'):
        datasets.list_images(str(tmp_path / 'sub' / 'pipe.jpg'))


# ----------------------------------------------------------------------------------------------
# 02_inference.py

def photos(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f'p{i}.jpg')
    return folder


def test_inference_takes_several_files_and_folders(tiny_checkpoint, tmp_path):
    a, b = photos(tmp_path / 'a'), photos(tmp_path / 'b', 3)
    out = tmp_path / 'out'
    assert infer.main(['--img', str(a / 'p0.jpg'), str(a / 'p1.jpg'), str(b), '--checkpoint', tiny_checkpoint,
                       '--out', str(out)]) == 0
    rows = json.load(open(out / 'captions.json'))
    assert [r['image'] for r in rows] == [str(a / 'p0.jpg'), str(a / 'p1.jpg')] + [str(b / f'p{i}.jpg') for i in range(3)]


@pytest.mark.parametrize('flag, value', [('--beam-size', '0'), ('--beam-size', '-1'), ('--batch-size', '0'),
                                         ('--max-len', '0'), ('--workers', '-1')])
def test_inference_flags_are_range_checked(tiny_checkpoint, tmp_path, capsys, flag, value):
    rc = infer.main(['--img', str(photos(tmp_path / 'a')), '--checkpoint', tiny_checkpoint,
                     '--out', str(tmp_path / 'out'), flag, value])
    assert rc == 1
    assert one_error_line(capsys.readouterr().err).startswith(f'error: {flag} {value}: must be')


def test_inference_checks_the_output_place_before_captioning(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / 'a_file').write_text('')
    monkeypatch.setattr(infer.files, 'caption_batches', lambda *a, **k: pytest.fail('captioned first'))
    rc = infer.main(['--img', str(photos(tmp_path / 'a')), '--checkpoint', tiny_checkpoint,
                     '--out', str(tmp_path / 'a_file' / 'out')])
    assert rc == 1
    assert 'cannot write there' in one_error_line(capsys.readouterr().err)


def test_a_fifo_named_jpg_does_not_hang_inference(tiny_checkpoint, tmp_path):
    folder = photos(tmp_path / 'a')
    os.mkfifo(folder / 'pipe.jpg')
    out = tmp_path / 'out'
    cmd = [sys.executable, os.path.join(REPO, '02_inference.py'), '--img', str(folder), '--checkpoint',
           tiny_checkpoint, '--out', str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.load(open(out / 'captions.json'))) == 2


def test_a_folder_of_only_bad_files_exits_nonzero(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / 'bad'
    folder.mkdir()
    (folder / 'x.jpg').write_bytes(b'not a jpeg')
    (folder / 'y.png').write_bytes(b'')
    assert infer.main(['--img', str(folder), '--checkpoint', tiny_checkpoint, '--out', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert 'error: none of the 2 image(s) could be decoded' in err and 'Traceback' not in err
    assert not (tmp_path / 'out' / 'captions.json').exists()


def limited_run(cmd, max_bytes):
    """Run cmd with RLIMIT_FSIZE (files cannot grow past max_bytes: a full disk, as a process sees it)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_a_full_disk_during_inference_is_one_line_after_the_summary(tiny_checkpoint, tmp_path):
    out = tmp_path / 'out'
    cmd = [sys.executable, os.path.join(REPO, '02_inference.py'), '--img', str(photos(tmp_path / 'a')),
           '--checkpoint', tiny_checkpoint, '--out', str(out), '--visualize']
    done = limited_run(cmd, 4096)                 # captions fit, attention figures do not
    assert done.returncode == 1
    assert '2 image(s) captioned' in done.stdout
    line = one_error_line(done.stderr)
    assert 'the file-size limit was reached' in line and '0 attention figure(s) written' in line
    assert len(json.load(open(out / 'captions.json'))) == 2
    assert sorted(os.listdir(out)) == ['captions.csv', 'captions.json', 'captions.jsonl',   # no partial figure
                                       'captions.settings.json']                           # or temp file


# ----------------------------------------------------------------------------------------------
# Full disks and file-size limits in 01_train.py: the feature cache and checkpoints

def test_feature_cache_larger_than_the_free_disk_fails_first_and_leaves_nothing(data_copy, tmp_path, capsys,
                                                                                 monkeypatch):
    folder, _ = data_copy
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: real(p)._replace(free=50000))
    assert train.main(train_args(str(folder), tmp_path / 'run', '--max-steps', '1')) == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r'the TRAIN feature cache needs .* \(\d+ bytes\) but only 48\.8 KB \(50000 bytes\) are free', line)
    assert os.listdir(folder / 'features') == []                       # no partial or hidden temporary file
    monkeypatch.undo()
    assert train.main(train_args(str(folder), tmp_path / 'run2', '--max-steps', '1')) == 0
    printed = capsys.readouterr().out   # not a terminal: plain progress lines instead of silence
    assert 'caching TRAIN features: 48/48 images (100%)' in printed


@pytest.mark.parametrize('where', ['feature cache', 'checkpoint'])
def test_a_file_size_limit_in_training_is_one_line_and_leaves_no_temp_file(data_copy, tmp_path, where):
    folder, name = data_copy
    out = tmp_path / 'run'
    cmd = [sys.executable, os.path.join(REPO, '01_train.py'), *train_args(str(folder), out, '--max-steps', '1')]
    if where == 'checkpoint':
        cmd.append('--no-cache-features')
    done = limited_run(cmd, 60000)   # the cache (196 KB) and the checkpoint (> 60 KB) cannot be written
    assert done.returncode == 1, done.stdout + done.stderr
    line = one_error_line(done.stderr)
    target = folder / 'features' / 'TRAIN_FEATURES_' if where == 'feature cache' else out / f'checkpoint_{name}.pt'
    assert f'error: cannot write {target}' in line and 'the file-size limit was reached' in line
    assert not [f for d in (out, folder / 'features') if d.exists() for f in os.listdir(d) if f.endswith('.tmp')]


# ----------------------------------------------------------------------------------------------
# 00_create_input_files.py: publishing, leftovers, empty splits, disk faults; 03's split message

PUBLISH_KILL = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
import datasets
from captioning.preparation import formats, prepare
moves, real = [0], os.replace
def replace(src, dst):   # kill -9 after {k} of the moves from the staging folder into the data folder
    if '.staging-' in src and '.staging-' not in dst:
        if moves[0] == {k}:
            os.kill(os.getpid(), signal.SIGKILL)
        moves[0] += 1
    real(src, dst)
os.replace = replace
records = formats.read_karpathy({json!r}, {images!r})
prepare.prepare_dataset(records, 'synthetic', {out!r}, min_word_freq=2, seed=1, workers=1)
'''


@pytest.mark.parametrize('k', [0, 1, 7, 12])
def test_a_kill_while_publishing_leaves_a_set_every_reader_calls_incomplete(synth_data, data_copy, tiny_checkpoint,
                                                                             capsys, k):
    source, name = synth_data
    folder, _ = data_copy
    code = PUBLISH_KILL.format(repo=REPO, k=k, json=os.path.join(source, 'synthetic_source', 'dataset_synthetic.json'),
                               images=os.path.join(source, 'synthetic_source', 'images'), out=str(folder))
    assert subprocess.run([sys.executable, '-c', code]).returncode == -signal.SIGKILL
    assert list(folder.glob('.staging-*'))                                  # what the kill left
    for split in utils.SPLITS:
        with pytest.raises(FileNotFoundError, match='incomplete set'):
            datasets.CaptionDataset(str(folder), name, split)
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', str(folder)]) == 1
    assert 'incomplete set' in one_error_line(capsys.readouterr().err)
    assert train.main(['--data-folder', str(folder), '--data-name', name, *TINY_MODEL]) == 1
    assert 'incomplete set' in one_error_line(capsys.readouterr().err)
    records = formats.read_karpathy(os.path.join(source, 'synthetic_source', 'dataset_synthetic.json'),
                                     os.path.join(source, 'synthetic_source', 'images'))
    prepare.prepare_dataset(records, 'synthetic', str(folder), min_word_freq=2, seed=1, workers=1)
    assert not list(folder.glob('.staging-*'))                              # the next run cleaned up
    assert len(datasets.CaptionDataset(str(folder), name, 'TEST')) == 30


def test_a_file_size_limit_in_prepare_is_one_line_and_keeps_the_old_set(synth_data, data_copy):
    source, name = synth_data
    folder, _ = data_copy
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    cmd = [sys.executable, os.path.join(REPO, '00_create_input_files.py'), '--output-folder', str(folder),
           '--karpathy-json', os.path.join(source, 'synthetic_source', 'dataset_synthetic.json'),
           '--image-folder', os.path.join(source, 'synthetic_source', 'images'), '--min-word-freq', '2',
           '--seed', '1', '--workers', '1']
    done = limited_run(cmd, 3000)   # the TRAIN captions file is larger
    assert done.returncode == 1
    assert 'the file-size limit was reached' in one_error_line(done.stderr)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before   # no staging, old set intact


def test_an_empty_split_is_warned_in_prepare_and_named_in_evaluate(synth_data, tiny_checkpoint, tmp_path, capsys):
    source, name = synth_data
    data = json.load(open(os.path.join(source, 'synthetic_source', 'dataset_synthetic.json')))
    data['images'] = [img for img in data['images'] if img['split'] != 'test']   # Flickr8k without its test split
    no_test = tmp_path / 'no_test.json'
    no_test.write_text(json.dumps(data))
    out = tmp_path / 'data'
    assert script('00_create_input_files').main([
        '--karpathy-json', str(no_test), '--image-folder', os.path.join(source, 'synthetic_source', 'images'),
        '--output-folder', str(out), '--min-word-freq', '2', '--workers', '1', '--dataset', 'synthetic']) == 0
    assert 'warning: split TEST is empty' in capsys.readouterr().err
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert 'split TEST' in line and 'TRAIN (48 images), VAL (6 images)' in line and '--split' in line


@pytest.mark.parametrize('flag, value', [('--beam-sizes', '0'), ('--batch-size', '0'), ('--max-len', '0'),
                                         ('--workers', '-1')])
def test_evaluate_flags_are_range_checked(synth_data, tiny_checkpoint, capsys, flag, value):
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', synth_data[0], flag, value]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f'error: {flag} {value}: must be')


# ----------------------------------------------------------------------------------------------
# Reproducibility, as docs/reliability.md states it

def test_two_fresh_runs_with_the_same_seed_are_bit_identical(data_copy, tmp_path):
    """Separate processes; the first builds the feature cache, the second reuses it (as two runs do).
    The dot-product decoder: with features[rows] in its teacher forcing, its runs differed in the last
    bit every time (the backward of indexing sums the captions of an image in a varying order)."""
    folder, _ = data_copy
    losses = []
    for run in ('a', 'b'):
        cmd = [sys.executable, os.path.join(REPO, '01_train.py'),
               *train_args(str(folder), tmp_path / run, '--epochs', '1', '--workers', '2',
                           '--decoder', 'dot_attention')]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        losses.append([json.loads(line)['loss'] for line in open(tmp_path / run / 'steps.jsonl')])
    assert len(losses[0]) == len(losses[1]) == 12
    assert losses[0] == losses[1]
    a, b = (torch.load(next((tmp_path / run).glob('checkpoint_*.pt')), weights_only=True)['decoder'] for run in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('content', ['["a", "b"]', '{"<pad>": 0, "a": "x"}', '{"a": 1}'])
def test_a_bad_word_map_is_one_line_in_training(data_copy, tmp_path, capsys, content):
    folder, name = data_copy
    (folder / f'WORDMAP_{name}.json').write_text(content)
    assert train.main(train_args(str(folder), tmp_path / 'run')) == 1
    assert f'WORDMAP_{name}.json: not a word map' in one_error_line(capsys.readouterr().err)


def test_bad_feature_caches_and_hdf5_files_are_one_line(data_copy, tmp_path):
    folder, name = data_copy
    npy = tmp_path / 'objects.npy'
    np.save(npy, np.array([{'a': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match='objects.npy: not a feature cache'):
        datasets.FeatureCache(str(npy))
    (folder / f'VAL_IMAGES_{name}.hdf5').write_bytes(b'not hdf5')
    with pytest.raises(ValueError, match=f'VAL_IMAGES_{name}.hdf5: not a readable HDF5 file'):
        datasets.CaptionDataset(str(folder), name, 'VAL')

"""Issue 13: faults and hostile input end in one clear line; nothing read runs code; nothing is lost."""
import os
import pickle
import re
import shutil

import pytest
import torch

from conftest import TINY_MODEL, script

import datasets
import utils

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
        utils.load_checkpoint(str(path))
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and '\n' not in msg and '\x1b' not in msg
    assert not re.search(r'EOFError|IndexError|KeyError|pop from empty', msg)
    assert ('tutorial' in msg) == (kind == 'tutorial')
    assert {'empty': 'empty file', 'truncated': 'truncated', 'text': 'not a checkpoint', 'ansi': 'not a checkpoint',
            'system': 'refused: it pickles posix.system', 'tutorial': 'refused'}[kind] in msg
    assert not (tmp_path / 'pwned').exists()

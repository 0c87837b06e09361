"""Captions that do not end mid-phrase: the ending statistics checkpoints carry or find, and
--bad-endings avoid (beam_search's no_end_after) in 02, 03 and 04."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, script

from captioning import checkpoint  # noqa: E402
from captioning.decoding import loading, search  # noqa: E402
from captioning.scoring import metrics  # noqa: E402


def ckpt_endings(path):
    return checkpoint.load(path)['endings']


def test_bad_ending_words_follow_the_measure():
    endings = {'a': (0, 100), 'ball': (43, 100), 'red': (1, 100), 'on': (3, 100)}
    assert metrics.bad_ending_words(endings) == {'a', 'red'}
    assert all(metrics.bad_ending([w], endings) == (w in {'a', 'red'}) for w in endings)


def test_no_end_after_never_ends_a_caption_on_those_tokens():
    import datasets
    encoder, decoder, word_map, _ = loading.load_captioner(loading.PROVIDED_CHECKPOINT, 'cpu')
    transform = datasets.image_transform(encoder)
    samples = os.path.join(REPO, 'assets', 'samples')
    images = torch.stack([transform(datasets.load_image(os.path.join(samples, n)))
                          for n in sorted(os.listdir(samples)) if n.endswith('.jpg')])
    with torch.inference_mode():
        enc = encoder(images)
    free = search.beam_search(decoder, enc, word_map, beam_size=3, max_len=20)
    last = sorted({b['tokens'][-1] for h in free for b in h['beams']})
    guarded = search.beam_search(decoder, enc, word_map, beam_size=3, max_len=20, no_end_after=last)
    assert all(h['finished'] for h in guarded)
    for h in guarded:
        assert all(b['tokens'][-1] not in last for b in h['beams'])
    same = search.beam_search(decoder, enc, word_map, beam_size=3, max_len=20, no_end_after=[])
    assert [h['tokens'] for h in same] == [h['tokens'] for h in free]


def test_training_stores_the_endings_and_export_keeps_them(tiny_checkpoint, synth_data, tmp_path):
    ckpt = checkpoint.load(tiny_checkpoint)
    folder, name = synth_data
    with open(os.path.join(folder, f'TRAIN_REFS_{name}.json')) as f:
        expected = metrics.ending_counts(json.load(f))
    assert ckpt['endings'] == {w: list(c) for w, c in expected.items() if w in ckpt['word_map']}
    exported = checkpoint.export(ckpt)
    assert exported['endings'] == ckpt['endings']
    assert loading.load_captioner(tiny_checkpoint, 'cpu')[3]['endings'] == ckpt['endings']


def test_a_checkpoint_without_endings_finds_a_fitting_file_in_its_folder(tiny_checkpoint, synth_data, tmp_path):
    folder, _ = synth_data
    ckpt = checkpoint.load(tiny_checkpoint)
    ckpt.pop('endings')
    path = tmp_path / 'old.pt'
    checkpoint.save_checkpoint(str(path), ckpt)
    assert checkpoint.endings(ckpt, str(path)) is None
    (tmp_path / 'broken.endings.json').write_text('{not json')
    (tmp_path / 'other.endings.json').write_text(json.dumps({'word_map_sha1': 'f' * 40, 'counts': {'a': [1, 1]}}))
    assert checkpoint.endings(ckpt, str(path)) is None                     # neither parses nor fits: passed over
    tool = [sys.executable, os.path.join(REPO, 'tools', 'write_endings.py'), folder]
    done = subprocess.run(tool + [str(tmp_path / 'synth.endings.json')], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = checkpoint.endings(ckpt, str(path))
    assert found == ckpt_endings(tiny_checkpoint)                         # the same statistics training stored
    bad = subprocess.run(tool + [str(tmp_path / 'wrong_name.json')], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and '.endings.json' in bad.stderr and 'Traceback' not in bad.stderr


def test_the_provided_checkpoints_find_their_endings():
    for path in (loading.PROVIDED_CHECKPOINT, loading.PROVIDED_LITE2):
        assert checkpoint.endings(checkpoint.load(path), path), path
    assert loading.load_captioner(loading.DEFAULT_CHECKPOINTS, 'cpu')[3]['endings']


def test_02_avoids_the_bad_ending_it_would_otherwise_write(tmp_path):
    """The provided pair ends the astronaut photo's caption on 'red' ("two boys are playing with a
    red"); by default 02 no longer does, and --bad-endings allow gives the model's own caption back."""
    inference = script('02_inference')
    photo = os.path.join(REPO, 'assets', 'samples', 'astronaut.jpg')
    got = {}
    for choice in ('avoid', 'allow'):
        out = tmp_path / choice
        assert inference.main(['--img', photo, '--out', str(out), '--bad-endings', choice]) == 0
        with open(out / 'captions.json') as f:
            got[choice] = json.load(f)[0]['caption']
    endings = checkpoint.endings(checkpoint.load(loading.PROVIDED_CHECKPOINT), loading.PROVIDED_CHECKPOINT)
    assert metrics.bad_ending(got['allow'].split(), endings)
    assert not metrics.bad_ending(got['avoid'].split(), endings)


def test_a_run_recorded_before_the_setting_resumes_with_its_old_endings(tmp_path):
    from captioning.scale import streaming
    out = tmp_path / 'run'
    out.mkdir()
    (out / streaming.JSONL).write_text(json.dumps({'image': 'a.jpg', 'caption': 'a dog'}) + '\n')
    (out / streaming.SETTINGS).write_text(json.dumps({'beam_size': 3}))        # written before --bad-endings
    streaming.check_settings(str(out), {'beam_size': 3, 'bad_endings': 'allow'})
    with pytest.raises(ValueError, match='made with bad_endings "allow", this run has "avoid".*--overwrite'):
        streaming.check_settings(str(out), {'beam_size': 3, 'bad_endings': 'avoid'})

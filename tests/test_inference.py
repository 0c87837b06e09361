"""02_inference.py and 03_evaluate.py with a tiny trained checkpoint."""
import json
import os

import numpy as np
import pytest
from conftest import script
from PIL import Image

import datasets
from captioning.decoding import loading, search
from captioning.scoring import metrics

infer = script('02_inference')
evaluate = script('03_evaluate')


@pytest.fixture
def photo_folder(tmp_path):
    """A folder of awkward images: corrupt, RGBA PNG, grayscale, EXIF-rotated JPEG, nested, upper-case."""
    folder = tmp_path / 'photos'
    (folder / 'nested').mkdir(parents=True)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (50, 70, 4), dtype=np.uint8), 'RGBA').save(folder / 'alpha.png')
    Image.fromarray(rng.randint(0, 255, (40, 40), dtype=np.uint8), 'L').save(folder / 'nested' / 'gray.JPG')
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.randint(0, 255, (30, 60, 3), dtype=np.uint8)).save(folder / 'rotated.jpeg', exif=exif.tobytes())
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF broken')
    (folder / 'readme.txt').write_text('not an image')
    return folder


def test_folder_inference_skips_corrupt_files_and_draws_attention(tiny_checkpoint, photo_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    assert infer.main(['--img', str(photo_folder), '--checkpoint', tiny_checkpoint, '--out', str(out),
                       '--visualize', '--beam-size', '2', '--batch-size', '2']) == 0
    printed = capsys.readouterr()
    rows = json.load(open(out / 'captions.json'))
    names = sorted(os.path.basename(r['image']) for r in rows)
    assert names == ['alpha.png', 'gray.JPG', 'rotated.jpeg']
    assert all(isinstance(r['caption'], str) and isinstance(r['score'], float) for r in rows)
    assert 'corrupt.jpg' in printed.err and 'skipped' in printed.err
    assert (out / 'captions.csv').read_text().splitlines()[0] == 'image,caption,score,finished'
    figures = sorted(p.name for p in out.glob('*_attention.png'))
    assert figures == ['alpha_attention.png', 'gray_attention.png', 'rotated_attention.png']
    assert Image.open(out / 'alpha_attention.png').size[0] > 192


def test_single_file_and_batch_independence(tiny_checkpoint, photo_folder, tmp_path):
    one = tmp_path / 'one'
    assert infer.main(['--img', str(photo_folder / 'alpha.png'), '--checkpoint', tiny_checkpoint,
                       '--out', str(one)]) == 0
    many = tmp_path / 'many'
    assert infer.main(['--img', str(photo_folder), '--checkpoint', tiny_checkpoint, '--out', str(many),
                       '--batch-size', '8']) == 0
    alone = json.load(open(one / 'captions.json'))[0]
    together = {os.path.basename(r['image']): r for r in json.load(open(many / 'captions.json'))}
    assert together['alpha.png']['caption'] == alone['caption']


def test_missing_checkpoint_and_empty_folder_are_clear_errors(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    assert infer.main(['--img', str(tmp_path / 'empty'), '--checkpoint', 'x.pt']) == 1
    assert 'no jpg/jpeg/png/bmp/webp images' in capsys.readouterr().err
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    assert infer.main(['--img', str(tmp_path / 'a.png'), '--checkpoint', str(tmp_path / 'nope.pt')]) == 1
    assert 'checkpoint not found' in capsys.readouterr().err


def test_provided_ensembles_by_name(tmp_path, monkeypatch):
    """--checkpoint flickr8k / flickr8k-cn name the provided pairs; a file of that name is still a file."""
    assert loading.checkpoint_paths('flickr8k-cn') == loading.PROVIDED_CN
    assert loading.checkpoint_paths(['flickr8k']) == loading.DEFAULT_CHECKPOINTS
    assert loading.checkpoint_paths(['a.pt', 'flickr8k-cn']) == ['a.pt', *loading.PROVIDED_CN]
    assert loading.checkpoint_paths('flickr8k-zh') == ['flickr8k-zh']              # not a name: a path
    assert all(os.path.isfile(p) for p in loading.PROVIDED_CN + loading.DEFAULT_CHECKPOINTS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'flickr8k-cn').write_bytes(b'')
    assert loading.checkpoint_paths('flickr8k-cn') == ['flickr8k-cn']


def test_evaluate_from_prepared_files_writes_the_table(tiny_checkpoint, synth_data, tmp_path, capsys):
    folder, name = synth_data
    out = tmp_path / 'metrics.json'
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'TEST',
                          '--beam-sizes', '1', '3', '--out', str(out)]) == 0
    report = json.load(open(out))
    assert report['split'] == 'TEST' and report['num_images'] == 6
    assert [r['beam_size'] for r in report['results']] == [1, 3]
    for r in report['results']:
        assert {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'nltk_Bleu_4'} <= set(r['metrics'])
        assert all(0.0 <= v for v in r['metrics'].values())
    assert len(report['captions']) == 2 * 6 and {'image', 'caption'} <= set(report['captions'][0])
    for r in report['results']:   # repetition and diversity of that beam size's own captions
        captions = [c['caption'] for c in report['captions'] if c['beam_size'] == r['beam_size']]
        assert r['diversity'] == metrics.diversity_scores(captions)
        assert 1 <= r['diversity']['distinct_words'] and 1 / 6 <= r['diversity']['unique_captions'] <= 1
        endings = metrics.ending_counts(json.load(open(os.path.join(folder, f'TRAIN_REFS_{name}.json'))))
        assert r['bad_endings'] == metrics.bad_ending_rate(captions, endings)   # against the TRAIN references
    table = capsys.readouterr().out
    assert 'Bleu_4' in table and '\n   3 ' in table and 'rep3' in table and 'unique' in table and 'badend' in table


def test_decoding_repeats_no_trigram_by_default_and_the_flag_switches_it_off(tiny_checkpoint, synth_data, tmp_path):
    """02 and 03 decode with search.DEFAULT_NO_REPEAT_NGRAM (3): no caption repeats a word trigram;
    --no-repeat-ngram 0 gives the unconstrained search (the tiny model then repeats itself)."""
    assert search.DEFAULT_NO_REPEAT_NGRAM == 3 == evaluate.NO_REPEAT_NGRAM == infer.NO_REPEAT_NGRAM
    folder, _ = synth_data
    reports = {}
    for flags in ((), ('--no-repeat-ngram', '0')):
        out = tmp_path / f'm{len(flags)}.json'
        assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'TRAIN',
                              '--max-images', '24', '--beam-sizes', '1', '3', '--metrics', 'nltk', '--out', str(out),
                              *flags]) == 0
        reports[flags] = {r['beam_size']: r['diversity'] for r in json.load(open(out))['results']}
    assert all(d['repeated_trigrams'] == 0 for d in reports[()].values())
    assert reports[('--no-repeat-ngram', '0')][1]['repeated_trigrams'] > 0
    image = datasets.CaptionDataset(folder, synth_data[1], 'TRAIN').paths[0]
    assert infer.main(['--img', image, '--checkpoint', tiny_checkpoint, '--out', str(tmp_path / 'inf'),
                       '--beam-size', '1']) == 0
    words = json.load(open(tmp_path / 'inf' / 'captions.json'))[0]['caption'].split()
    assert not metrics.repeats_ngram(words)


def test_evaluate_from_karpathy_json_matches_prepared_files(tiny_checkpoint, synth_data, tmp_path):
    folder, name = synth_data
    source = os.path.join(folder, 'synthetic_source')
    a, b = tmp_path / 'a.json', tmp_path / 'b.json'
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'VAL',
                          '--metrics', 'nltk', '--out', str(a)]) == 0
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--karpathy-json',
                          os.path.join(source, 'dataset_synthetic.json'), '--image-folder',
                          os.path.join(source, 'images'), '--split', 'val', '--metrics', 'nltk', '--out', str(b)]) == 0
    ra, rb = json.load(open(a)), json.load(open(b))
    assert ra['num_images'] == rb['num_images'] == 6
    assert ra['results'] == rb['results']


def test_help_of_inference_and_evaluation(capsys):
    for mod, flags in ((infer, ('--img', '--checkpoint', '--beam-size', '--batch-size', '--out', '--visualize')),
                       (evaluate, ('--karpathy-json', '--image-folder', '--split', '--beam-sizes', '--out'))):
        with pytest.raises(SystemExit):
            mod.main(['--help'])
        text = capsys.readouterr().out
        assert all(f in text for f in flags)

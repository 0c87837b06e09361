"""00_create_input_files.py, the pipeline of captioning/preparation/prepare.py and the readers of
formats.py (same folder) and datasets.py."""
import json
import os

import pytest
from conftest import script
from PIL import Image

import datasets
from captioning.preparation import formats, prepare

prep = script('00_create_input_files')


def make_images(folder, names, size=40):
    os.makedirs(folder, exist_ok=True)
    for k, n in enumerate(names):
        path = os.path.join(folder, n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new('RGB', (size, size), (10 * k % 255, 100, 200)).save(path)


def karpathy(tmp_path, images, name='dataset_test.json'):
    """Write a Karpathy JSON; images = [(filename, split, [sentences], filepath or None)]."""
    data = {'images': []}
    for i, (fn, split, sents, fp) in enumerate(images):
        entry = {'filename': fn, 'split': split, 'imgid': i,
                 'sentences': [{'tokens': s.lower().split(), 'raw': s} for s in sents]}
        if fp:
            entry['filepath'] = fp
        data['images'].append(entry)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def outputs(folder, base):
    def load(kind, split, ext='json'):
        path = os.path.join(folder, f'{split}_{kind}_{base}.{ext}')
        if ext == 'pkl':
            return datasets.read_paths_pickle(path)
        return json.load(open(path))
    return load


@pytest.fixture
def small_source(tmp_path):
    imgs = tmp_path / 'imgs'
    entries = [
        ('a.jpg', 'train', ['A dog runs', 'a dog plays', 'dog runs fast'], None),
        ('b.jpg', 'restval', ['a cat sits', 'a dog sits', 'the cat sleeps'], None),
        ('c.jpg', 'train', ['a dog runs', 'a cat runs'], None),
        ('d.jpg', 'val', ['a zebra runs', 'zebra zebra zebra'], None),
        ('e.jpg', 'test', ['a dog', 'a tall giraffe'], None),
        ('f.jpg', 'val', ['a dog runs'], 'sub'),
    ]
    make_images(str(imgs), ['a.jpg', 'b.jpg', 'c.jpg', 'd.jpg', 'e.jpg', 'sub/f.jpg'])
    return karpathy(tmp_path, entries), str(imgs)


def run(*args):
    return prep.main([str(a) for a in args])


def test_split_counts_paths_and_refs(small_source, tmp_path):
    js, imgs = small_source
    out = tmp_path / 'out'
    assert run('--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder', out,
               '--captions-per-image', '2', '--min-word-freq', '1') == 0
    base = 'toy_2_cap_per_img_1_min_word_freq'
    load = outputs(str(out), base)
    assert len(load('paths', 'TRAIN', 'pkl')) == 3            # train + restval
    assert len(load('paths', 'VAL', 'pkl')) == 2
    assert len(load('paths', 'TEST', 'pkl')) == 1
    assert load('paths', 'VAL', 'pkl')[1].endswith(os.path.join('sub', 'f.jpg'))   # filepath honoured
    assert len(load('CAPTIONS', 'TRAIN')) == 3 * 2 and len(load('CAPLENS', 'TRAIN')) == 3 * 2
    # REFS keep every raw sentence of the source, untouched (case, all of them)
    assert load('REFS', 'TRAIN')[0] == ['A dog runs', 'a dog plays', 'dog runs fast']
    assert load('REFS', 'VAL')[1] == ['a dog runs']


def test_vocabulary_counts_train_only_with_strict_threshold(small_source, tmp_path):
    js, imgs = small_source
    out = tmp_path / 'out'
    run('--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder', out,
        '--captions-per-image', '3', '--min-word-freq', '1')
    wm = json.load(open(out / 'WORDMAP_toy_3_cap_per_img_1_min_word_freq.json'))
    assert wm['<pad>'] == 0 and {'<start>', '<end>', '<unk>'} <= set(wm)
    assert sorted(wm.values()) == list(range(len(wm)))
    # TRAIN counts: dog 5, a 6, runs 3, cat 3, sits 2, plays 1, fast 1, the 1, sleeps 1
    assert {'a', 'dog', 'runs', 'cat', 'sits'} <= set(wm)
    assert not {'plays', 'fast', 'sleeps', 'the'} & set(wm)      # count 1 is not > 1
    assert 'zebra' not in wm and 'giraffe' not in wm             # VAL/TEST words never counted


def test_encode_decode_round_trip():
    wm = {'<pad>': 0, 'a': 1, 'dog': 2, '<unk>': 3, '<start>': 4, '<end>': 5}
    rev = {v: k for k, v in wm.items()}
    enc, n = prepare.encode_caption(['a', 'dog', 'flies'], wm, max_len=5)
    assert enc == [4, 1, 2, 3, 5, 0, 0] and n == 5
    assert prepare.decode_caption(enc, rev) == ['a', 'dog', '<unk>']


def test_sampling_is_deterministic_and_seeded(small_source, tmp_path):
    js, imgs = small_source
    caps = []
    for k, seed in enumerate((0, 0, 1)):
        out = tmp_path / f'out{k}'
        run('--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder', out,
            '--captions-per-image', '1', '--min-word-freq', '0', '--seed', seed)
        caps.append(outputs(str(out), 'toy_1_cap_per_img_0_min_word_freq')('CAPTIONS', 'TRAIN'))
    assert caps[0] == caps[1]
    assert caps[0] != caps[2]


def test_upsampling_repeats_captions_to_exactly_cpi(small_source, tmp_path):
    js, imgs = small_source
    out = tmp_path / 'out'
    run('--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder', out,
        '--captions-per-image', '5', '--min-word-freq', '0')
    load = outputs(str(out), 'toy_5_cap_per_img_0_min_word_freq')
    assert len(load('CAPTIONS', 'VAL')) == 2 * 5       # image f has one caption, repeated 5 times
    assert len(set(map(tuple, load('CAPTIONS', 'VAL')[5:]))) == 1


def test_long_captions_dropped_and_empty_images_skipped(tmp_path):
    imgs = tmp_path / 'imgs'
    make_images(str(imgs), ['a.jpg', 'b.jpg'])
    js = karpathy(tmp_path, [('a.jpg', 'train', ['a b c d e f', 'a b'], None),
                             ('b.jpg', 'train', ['x y z w v u t s'], None)])
    out = tmp_path / 'out'
    assert run('--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder', out,
               '--captions-per-image', '1', '--min-word-freq', '0', '--max-len', '4') == 0
    load = outputs(str(out), 'toy_1_cap_per_img_0_min_word_freq')
    assert len(load('paths', 'TRAIN', 'pkl')) == 1              # b.jpg lost its only caption
    assert load('CAPLENS', 'TRAIN') == [4]                      # <start> a b <end>
    assert len(load('CAPTIONS', 'TRAIN')[0]) == 4 + 2           # padded to max_len + 2
    assert load('REFS', 'TRAIN') == [['a b c d e f', 'a b']]    # refs stay untruncated


def test_own_csv_and_jsonl_with_and_without_split(tmp_path):
    imgs = tmp_path / 'imgs'
    names = [f'im{i}.jpg' for i in range(20)]
    make_images(str(imgs), names)
    csv_path = tmp_path / 'captions.txt'
    csv_path.write_text('image,caption\n' + ''.join(f'{n},"A photo, number {i}."\n{n},another shot\n'
                                                    for i, n in enumerate(names)))
    recs = formats.read_caption_table(str(csv_path), str(imgs), seed=3, val_fraction=0.1, test_fraction=0.2)
    splits = [r.split for r in recs]
    assert splits.count('TEST') == 4 and splits.count('VAL') == 2 and splits.count('TRAIN') == 14
    assert recs[0].tokens[0] == ['a', 'photo', 'number', '0'] and recs[0].raws[0] == 'A photo, number 0.'
    again = formats.read_caption_table(str(csv_path), str(imgs), seed=3, val_fraction=0.1, test_fraction=0.2)
    assert [r.split for r in again] == splits                    # seeded split is deterministic
    jl = tmp_path / 'caps.jsonl'
    jl.write_text('\n'.join(json.dumps({'image': n, 'caption': 'a thing', 'split': 'test' if i < 3 else 'train'})
                            for i, n in enumerate(names)))
    assert [r.split for r in formats.read_caption_table(str(jl), str(imgs))].count('TEST') == 3
    out = tmp_path / 'out'
    assert run('--dataset', 'mine', '--captions-file', csv_path, '--image-folder', imgs, '--output-folder', out,
               '--min-word-freq', '0', '--captions-per-image', '2') == 0
    assert (out / 'WORDMAP_mine_2_cap_per_img_0_min_word_freq.json').exists()


def test_flickr8k_token_file(tmp_path):
    imgs = tmp_path / 'imgs'
    make_images(str(imgs), ['1000_a.jpg', '1001_b.jpg'])
    tok = tmp_path / 'Flickr8k.token.txt'
    tok.write_text('1000_a.jpg#0\tA child in pink .\n1000_a.jpg#1\tA girl climbing .\n1001_b.jpg#0\tA dog .\n')
    recs = formats.read_caption_table(str(tok), str(imgs), val_fraction=0, test_fraction=0)
    assert [(r.name, len(r.raws)) for r in recs] == [('1000_a.jpg', 2), ('1001_b.jpg', 1)]


def assert_no_output(out):
    left = [f for f in os.listdir(out) if not f.startswith('.')] if os.path.isdir(out) else []
    assert left == [], left
    hidden = [f for f in os.listdir(out) if f.startswith('.')] if os.path.isdir(out) else []
    assert hidden == [], hidden


@pytest.mark.parametrize('case, message', [
    ('badjson', 'not valid JSON (line'),
    ('nokey', "images[1] (b.jpg): missing field 'split'"),
    ('badsplit', "field 'split' is 'dev'"),
    ('missing', '1 of 2 images are missing'),
    ('corrupt', 'cannot be decoded'),
    ('csvcols', "must name the columns 'image' and 'caption'"),
    ('jsonl', 'line 2: not valid JSON'),
    ('csvsplit', "line 3: split 'holdout'"),
])
def test_bad_input_is_named_and_leaves_no_output(tmp_path, capsys, case, message):
    imgs = tmp_path / 'imgs'
    make_images(str(imgs), ['a.jpg', 'b.jpg'])
    good = [('a.jpg', 'train', ['a dog'], None), ('b.jpg', 'val', ['a cat'], None)]
    args = ['--dataset', 'toy', '--image-folder', imgs, '--output-folder', tmp_path / 'out']
    if case == 'badjson':
        p = tmp_path / 'd.json'
        p.write_text('{"images": [}')
        args += ['--karpathy-json', p]
    elif case == 'nokey':
        js = json.loads(open(karpathy(tmp_path, good)).read())
        del js['images'][1]['split']
        (tmp_path / 'd.json').write_text(json.dumps(js))
        args += ['--karpathy-json', tmp_path / 'd.json']
    elif case == 'badsplit':
        args += ['--karpathy-json', karpathy(tmp_path, [good[0], ('b.jpg', 'dev', ['a cat'], None)])]
    elif case == 'missing':
        os.remove(imgs / 'b.jpg')
        args += ['--karpathy-json', karpathy(tmp_path, good)]
    elif case == 'corrupt':
        (imgs / 'b.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
        args += ['--karpathy-json', karpathy(tmp_path, good)]
    elif case == 'csvcols':
        (tmp_path / 'c.csv').write_text('file,text\na.jpg,a dog\n')
        args += ['--captions-file', tmp_path / 'c.csv']
    elif case == 'jsonl':
        (tmp_path / 'c.jsonl').write_text('{"image": "a.jpg", "caption": "a dog"}\n{"image": \n')
        args += ['--captions-file', tmp_path / 'c.jsonl']
    elif case == 'csvsplit':
        (tmp_path / 'c.csv').write_text('image,caption,split\na.jpg,a dog,train\nb.jpg,a cat,holdout\n')
        args += ['--captions-file', tmp_path / 'c.csv']
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert message in err
    assert_no_output(str(tmp_path / 'out'))


def test_skip_missing_goes_on_and_counts(tmp_path, capsys):
    imgs = tmp_path / 'imgs'
    make_images(str(imgs), ['a.jpg', 'c.jpg'])
    (imgs / 'd.jpg').write_bytes(b'garbage')
    js = karpathy(tmp_path, [('a.jpg', 'train', ['a dog'], None), ('b.jpg', 'train', ['a cat'], None),
                             ('c.jpg', 'val', ['a cow'], None), ('d.jpg', 'val', ['a bee'], None)])
    assert run('--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder',
               tmp_path / 'out', '--min-word-freq', '0', '--skip-missing') == 0
    assert 'images skipped (missing/undecodable): 2' in capsys.readouterr().out


def test_failed_rerun_keeps_previous_set_and_rerun_overwrites(small_source, tmp_path):
    js, imgs = small_source
    out = tmp_path / 'out'
    args = ['--dataset', 'toy', '--karpathy-json', js, '--image-folder', imgs, '--output-folder', out,
            '--min-word-freq', '0']
    assert run(*args) == 0
    before = sorted(os.listdir(out))
    os.remove(os.path.join(imgs, 'a.jpg'))
    assert run(*args) == 1
    assert sorted(os.listdir(out)) == before                      # the complete old set is intact
    assert run(*args, '--skip-missing') == 0
    assert sorted(os.listdir(out)) == before                      # overwritten in place, nothing stale
    assert len(outputs(str(out), 'toy_5_cap_per_img_0_min_word_freq')('paths', 'TRAIN', 'pkl')) == 2


def test_synthetic_is_deterministic_and_varied(tmp_path):
    from captioning.preparation import synthetic
    j1, _ = synthetic.generate(str(tmp_path / 's1'), 30, 5, 5, 48, seed=7)
    j2, _ = synthetic.generate(str(tmp_path / 's2'), 30, 5, 5, 48, seed=7)
    d1, d2 = json.load(open(j1)), json.load(open(j2))
    assert [i['sentences'] for i in d1['images']] == [i['sentences'] for i in d2['images']]
    for a, b in zip(d1['images'], d2['images']):
        assert (tmp_path / 's1/images' / a['filename']).read_bytes() == (tmp_path / 's2/images' / b['filename']).read_bytes()
    firsts = {i['sentences'][0]['raw'] for i in d1['images']}
    assert len(firsts) > 30                                       # captions differ from image to image
    assert all(len(i['sentences']) == 5 for i in d1['images'])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        prep.main(['--help'])
    text = capsys.readouterr().out
    for flag in ('--dataset', '--karpathy-json', '--image-folder', '--output-folder', '--captions-per-image',
                 '--min-word-freq', '--max-len', '--hdf5', '--seed', '--skip-missing', '--captions-file'):
        assert flag in text

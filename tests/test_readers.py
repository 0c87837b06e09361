"""The caption readers of preparation/formats.py on fixtures written here: Flickr8k-CN and Flickr8k token files with
split lists, AI Challenger JSON, official COCO caption JSON, CSV with a BOM, non-UTF-8 files, duplicate
rows, image paths that leave the image folder; and the tokenizer record 00 writes."""
import json
import os

import pytest
from conftest import script
from test_prepare import make_images

from captioning import text
from captioning.preparation import formats

prep = script('00_create_input_files')

ZH = {'a.jpg': ['一个男人在骑马。', '男人骑着一匹棕色的马。'],
      'b.jpg': ['两只狗在雪地里玩耍。', '两只狗在草地上奔跑。'],
      'c.jpg': ['一个女孩在吃冰淇淋。', '小女孩拿着冰淇淋。'],
      'd.jpg': ['一个男孩在海边。', '男孩站在沙滩上。']}


@pytest.fixture
def imgs(tmp_path):
    folder = tmp_path / 'imgs'
    make_images(str(folder), list(ZH))
    return folder


def run(*args):
    return prep.main([str(a) for a in args])


def test_flickr8k_cn_token_file_with_split_lists(tmp_path, imgs, capsys):
    cap = tmp_path / 'flickr8kzhc.caption.txt'
    cap.write_text(''.join(f'{n}#zhc#{k} {s}\n' for n, sents in ZH.items() for k, s in enumerate(sents)),
                   encoding='utf-8')
    (tmp_path / 'train.txt').write_text('a\nb\n')
    (tmp_path / 'val.txt').write_text('c.jpg\n')              # names with or without .jpg
    recs = formats.read_caption_table(str(cap), str(imgs), tokenizer='auto',
                                       split_lists={'TRAIN': str(tmp_path / 'train.txt'),
                                                    'VAL': str(tmp_path / 'val.txt')})
    assert [(r.name, r.split) for r in recs] == [('a.jpg', 'TRAIN'), ('b.jpg', 'TRAIN'), ('c.jpg', 'VAL')]
    assert recs[0].tokenizer == 'jieba'                        # mostly CJK -> jieba
    assert recs[0].tokens[0] == ['一个', '男人', '在', '骑马'] and recs[0].raws == ZH['a.jpg']
    out = tmp_path / 'out'
    assert run('--dataset', 'cn', '--captions-file', cap, '--train-list', tmp_path / 'train.txt',
               '--val-list', tmp_path / 'val.txt', '--image-folder', imgs, '--output-folder', out,
               '--min-word-freq', '0', '--captions-per-image', '2') == 0
    base = 'cn_2_cap_per_img_0_min_word_freq'
    assert text.read_tokenizer(str(out), base) == 'jieba'
    word_map = json.load(open(out / f'WORDMAP_{base}.json'))
    assert '骑马' in word_map and '。' not in word_map and word_map['<pad>'] == 0
    assert 'tokenizer: jieba' in capsys.readouterr().out


def test_flickr8k_english_token_file_tab_and_tokenizer_flag(tmp_path, imgs):
    tok = tmp_path / 'Flickr8k.token.txt'
    tok.write_text('a.jpg#0\tA café in Москва .\na.jpg#1\tA dog .\nb.jpg#0\tTwo dogs .\n', encoding='utf-8')
    recs = formats.read_caption_table(str(tok), str(imgs), val_fraction=0, test_fraction=0, tokenizer='auto')
    assert recs[0].tokenizer == 'words' and recs[0].tokens[0] == ['a', 'café', 'in', 'москва']
    cap = tmp_path / 'z.txt'
    cap.write_text('a.jpg#zhc#0 一个男人\n', encoding='utf-8')
    recs = formats.read_caption_table(str(cap), str(imgs), val_fraction=0, test_fraction=0, tokenizer='chars')
    assert recs[0].tokens == [['一', '个', '男', '人']]


def test_split_list_conflict_and_no_listed_image(tmp_path, imgs):
    cap = tmp_path / 'c.txt'
    cap.write_text('a.jpg#zhc#0 一个男人\n', encoding='utf-8')
    (tmp_path / 't.txt').write_text('a\n')
    (tmp_path / 'v.txt').write_text('x\na\n')
    with pytest.raises(ValueError, match=r'v.txt: line 2: image .a. is also in the TRAIN list'):
        formats.read_caption_table(str(cap), str(imgs), split_lists={'TRAIN': str(tmp_path / 't.txt'),
                                                                       'VAL': str(tmp_path / 'v.txt')})
    (tmp_path / 'none.txt').write_text('zzz\n')
    with pytest.raises(ValueError, match='none of its images is named in the split lists'):
        formats.read_caption_table(str(cap), str(imgs), split_lists={'TRAIN': str(tmp_path / 'none.txt')})


def ai_challenger(path, items):
    path.write_text(json.dumps([{'url': f'http://x/{n}', 'image_id': n, 'caption': c} for n, c in items]),
                    encoding='utf-8')
    return path


def test_ai_challenger_json_with_separate_validation_file(tmp_path, imgs):
    train = ai_challenger(tmp_path / 'caption_train_annotations.json', [(n, ZH[n]) for n in ('a.jpg', 'b.jpg', 'c.jpg')])
    val_imgs = tmp_path / 'val_imgs'
    make_images(str(val_imgs), ['v1.jpg'])
    val = ai_challenger(tmp_path / 'caption_validation_annotations.json', [('v1.jpg', ['一只猫在睡觉'])])
    recs = formats.read_caption_table(str(train), str(imgs), seed=0, val_fraction=0.5, test_fraction=0,
                                       tokenizer='auto', val_path=str(val), val_image_folder=str(val_imgs))
    splits = {r.name: r.split for r in recs}
    assert splits == {'a.jpg': 'TRAIN', 'b.jpg': 'TRAIN', 'c.jpg': 'TRAIN', 'v1.jpg': 'VAL'}   # val file = VAL
    assert recs[-1].path == os.path.join(str(val_imgs), 'v1.jpg') and recs[-1].tokenizer == 'jieba'
    # without splits: the seeded fractions
    recs = formats.read_caption_table(str(train), str(imgs), seed=0, val_fraction=0.34, test_fraction=0.34)
    assert sorted(r.split for r in recs) == ['TEST', 'TRAIN', 'VAL']
    out = tmp_path / 'out'
    assert run('--dataset', 'aic', '--captions-file', train, '--image-folder', imgs, '--val-captions-file', val,
               '--val-image-folder', val_imgs, '--output-folder', out, '--min-word-freq', '0',
               '--test-fraction', '0') == 0
    assert len(json.load(open(out / 'VAL_REFS_aic_5_cap_per_img_0_min_word_freq.json'))) == 1


@pytest.mark.parametrize('content, message', [
    ({'images': [{'filename': 'a.jpg', 'split': 'train', 'sentences': []}]}, 'looks like a Karpathy split JSON'),
    ({'foo': 1}, 'unrecognised JSON: expected AI Challenger'),
    ([{'image_id': 'a.jpg'}], r"\[0\] \(a.jpg\): field 'caption' must be a list of sentences, got nothing"),
    ([{'image_id': 'a.jpg', 'caption': '一个男人'}], "field 'caption' must be a list of sentences, got str"),
    ([{'url': 'x', 'caption': ['一个男人']}], r"\[0\]: expected an object with 'image_id'"),
    ([{'image_id': 'a.jpg', 'caption': ['。。']}], r"\[0\].caption\[0\]: 'caption' has no words"),
    ({'images': [{'id': 1, 'file_name': 'a.jpg'}], 'annotations': [{'image_id': 2, 'caption': 'a dog'}]},
     r"annotations\[0\]: image_id 2 is not in 'images'"),
    ({'images': [{'id': 1}], 'annotations': []}, r"images\[0\]: expected an object with 'id' and 'file_name'"),
])
def test_malformed_json_caption_files(tmp_path, imgs, capsys, content, message):
    path = tmp_path / 'caps.json'
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        formats.read_caption_table(str(path), str(imgs))
    assert run('--dataset', 'x', '--captions-file', path, '--image-folder', imgs, '--output-folder', tmp_path / 'o') == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: {path}') and 'Traceback' not in err


def coco_json(path, names_caps, extra_image=None):
    images = [{'id': 100 + i, 'file_name': n, 'height': 40, 'width': 40} for i, (n, _) in enumerate(names_caps)]
    if extra_image:
        images.append({'id': 999, 'file_name': extra_image})
    anns = [{'id': 7 * i + k, 'image_id': 100 + i, 'caption': c}
            for i, (_, caps) in enumerate(names_caps) for k, c in enumerate(caps)]
    path.write_text(json.dumps({'info': {}, 'licenses': [], 'images': images, 'annotations': anns}))
    return path


def test_official_coco_caption_json(tmp_path, imgs):
    path = coco_json(tmp_path / 'captions_train2017.json',
                     [('a.jpg', ['A man riding a horse.', 'A person on a horse']), ('b.jpg', ['Two dogs play.'])],
                     extra_image='unannotated.jpg')
    recs = formats.read_caption_table(str(path), str(imgs), val_fraction=0, test_fraction=0, tokenizer='auto')
    assert [(r.name, r.raws) for r in recs] == [('a.jpg', ['A man riding a horse.', 'A person on a horse']),
                                                ('b.jpg', ['Two dogs play.'])]     # images without captions left out
    assert recs[0].tokenizer == 'words' and recs[0].tokens[0] == ['a', 'man', 'riding', 'a', 'horse']


def test_csv_with_utf8_bom_and_duplicate_rows_merged(tmp_path, imgs, capsys):
    path = tmp_path / 'captions.csv'
    rows = 'image,caption\na.jpg,A dog runs\na.jpg,A dog  runs\nb.jpg,"A cat, sleeping"\na.jpg,a dog jumps\nb.jpg,A cat, sleeping\n'
    path.write_bytes(b'\xef\xbb\xbf' + rows.replace('A cat, sleeping\n', '"A cat, sleeping"\n').encode('utf-8'))
    recs = formats.read_caption_table(str(path), str(imgs), val_fraction=0, test_fraction=0)
    assert [(r.name, r.raws, r.merged_duplicates) for r in recs] == [
        ('a.jpg', ['A dog runs', 'a dog jumps'], 1), ('b.jpg', ['A cat, sleeping'], 1)]
    assert run('--dataset', 'bom', '--captions-file', path, '--image-folder', imgs, '--output-folder',
               tmp_path / 'out', '--min-word-freq', '0') == 0
    assert 'merged 2 duplicate caption row(s)' in capsys.readouterr().out


def test_token_file_keeps_identical_sentences_of_different_annotators(tmp_path, imgs):
    """Flickr8k-CN: two annotators may write the same sentence (#zhc#0 and #zhc#4): both are references;
    only a repeated line (same sentence id) is a duplicate."""
    cap = tmp_path / 'c.txt'
    cap.write_text('a.jpg#zhc#0 两匹马在沙漠上。\na.jpg#zhc#1 两只马在地上。\na.jpg#zhc#4 两匹马在沙漠上。\n'
                   'a.jpg#zhc#1 两只马在地上。\n', encoding='utf-8')
    rec, = formats.read_caption_table(str(cap), str(imgs), val_fraction=0, test_fraction=0)
    assert rec.raws == ['两匹马在沙漠上。', '两只马在地上。', '两匹马在沙漠上。'] and rec.merged_duplicates == 1


@pytest.mark.parametrize('name', ['captions.csv', 'Flickr8k.token.txt', 'caps.jsonl'])
def test_non_utf8_error_names_the_line(tmp_path, imgs, capsys, name):
    path = tmp_path / name
    lines = {'captions.csv': ['image,caption', 'a.jpg,a dog', 'b.jpg,un caf\xe9 noir'],
             'Flickr8k.token.txt': ['a.jpg#0\ta dog', 'b.jpg#0\tun caf\xe9 noir'],
             'caps.jsonl': ['{"image": "a.jpg", "caption": "a dog"}', '{"image": "b.jpg", "caption": "caf\xe9"}']}[name]
    path.write_bytes('\n'.join(lines).encode('latin-1') + b'\n')
    with pytest.raises(ValueError, match=f'{name}: line {len(lines)}: not UTF-8 text'):
        formats.read_caption_table(str(path), str(imgs))
    assert run('--dataset', 'x', '--captions-file', path, '--image-folder', imgs, '--output-folder', tmp_path / 'o') == 1
    assert f'line {len(lines)}: not UTF-8' in capsys.readouterr().err


@pytest.mark.parametrize('bad', ['../secret.jpg', '/etc/passwd', 'sub/../../x.jpg'])
def test_paths_leaving_the_image_folder_are_refused(tmp_path, imgs, capsys, bad):
    path = tmp_path / 'captions.csv'
    path.write_text(f'image,caption\na.jpg,a dog\n{bad},a cat\n')
    with pytest.raises(ValueError, match=f"captions.csv: line 3: image path '{bad}' leaves the image folder"):
        formats.read_caption_table(str(path), str(imgs))
    recs = formats.read_caption_table(str(path), str(imgs), allow_outside=True)
    assert recs[1].path == os.path.join(str(imgs), bad)
    # Karpathy JSON: the entry is named
    kj = tmp_path / 'k.json'
    kj.write_text(json.dumps({'images': [
        {'filename': 'a.jpg', 'split': 'train', 'sentences': [{'raw': 'a dog'}]},
        {'filename': os.path.basename(bad), 'filepath': os.path.dirname(bad) or '..', 'split': 'val',
         'sentences': [{'raw': 'a cat'}]}]}))
    with pytest.raises(ValueError, match=r'k.json: images\[1\] .*leaves the image folder'):
        formats.read_karpathy(str(kj), str(imgs))
    assert len(formats.read_karpathy(str(kj), str(imgs), allow_outside=True)) == 2
    assert run('--dataset', 'x', '--captions-file', path, '--image-folder', imgs, '--output-folder', tmp_path / 'o') == 1
    assert '--allow-outside-paths' in capsys.readouterr().err


def test_karpathy_raw_only_sentences_are_segmented(tmp_path, imgs):
    kj = tmp_path / 'k.json'
    kj.write_text(json.dumps({'images': [
        {'filename': n, 'split': 'train', 'sentences': [{'tokens': [], 'raw': s} for s in ZH[n]]} for n in ZH]},
        ensure_ascii=False), encoding='utf-8')
    recs = formats.read_karpathy(str(kj), str(imgs), tokenizer='auto')
    assert recs[0].tokenizer == 'jieba' and recs[0].tokens[0] == ['一个', '男人', '在', '骑马']
    # with `words`, the given tokens of an English Karpathy file are kept as they are
    kj.write_text(json.dumps({'images': [{'filename': 'a.jpg', 'split': 'train',
                                          'sentences': [{'tokens': ['a', 'dog'], 'raw': 'A Dog!'}]}]}))
    assert formats.read_karpathy(str(kj), str(imgs))[0].tokens == [['a', 'dog']]


def test_karpathy_json_with_bom_and_non_utf8(tmp_path, imgs):
    kj = tmp_path / 'k.json'
    body = json.dumps({'images': [{'filename': 'a.jpg', 'split': 'train', 'sentences': [{'raw': 'Un café noir'}]}]},
                      ensure_ascii=False, indent=1)
    kj.write_bytes(b'\xef\xbb\xbf' + body.encode('utf-8'))
    assert formats.read_karpathy(str(kj), str(imgs))[0].tokens == [['un', 'café', 'noir']]
    kj.write_bytes(body.encode('latin-1'))
    line = body.split('\n').index(next(x for x in body.split('\n') if 'caf' in x)) + 1
    with pytest.raises(ValueError, match=f'k.json: line {line}: not UTF-8 text'):
        formats.read_karpathy(str(kj), str(imgs))

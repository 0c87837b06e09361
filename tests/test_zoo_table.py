"""tools/zoo_table.py: the model zoo's table rows from run folders (no figure copied by hand)."""
import json
import os
import shutil
import sys

import pytest
from conftest import REPO, script

sys.path.insert(0, os.path.join(REPO, 'tools'))
import zoo_table  # noqa: E402

from captioning.scoring import metrics  # noqa: E402


@pytest.fixture(scope='module')
def zoo_run(synth_data, tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny run named as the zoo recipe names it, scored on VAL at beam 3 by 03_evaluate.py.
    The zoo's rows need METEOR, ROUGE-L and CIDEr: without the COCO toolkit (pycocoevalcap, and Java
    for METEOR and its tokenizer) 03's default scores BLEU only, so these tests skip and say why."""
    usable, why = metrics.coco_status()
    if not usable:
        pytest.skip(f'the zoo table needs the COCO toolkit\'s scores: {why} (.ci/run installs default-jre-headless)')
    folder, _ = synth_data
    run = tmp_path_factory.mktemp('zoo') / 'zoo_sat'
    run.mkdir()
    for name in (os.path.basename(tiny_checkpoint), 'metrics.jsonl'):
        shutil.copy(os.path.join(os.path.dirname(tiny_checkpoint), name), run / name)
    assert script('03_evaluate').main(['--checkpoint', str(run / os.path.basename(tiny_checkpoint)),
                                       '--data-folder', folder, '--split', 'VAL', '--beam-sizes', '1', '3',
                                       '--bad-endings', 'allow', '--out', str(run / 'val_metrics.json')]) == 0
    return run


def test_a_row_carries_the_scores_of_its_run_folder(zoo_run, capsys):
    assert zoo_table.main([str(zoo_run)]) == 0
    header, rule, row = capsys.readouterr().out.strip().split('\n')
    assert header == zoo_table.HEADER and rule.count('|') == header.count('|')
    cells = [c.strip() for c in row.strip('|').split('|')]
    scored = json.load(open(zoo_run / 'val_metrics.json'))['results'][1]
    assert scored['beam_size'] == 3
    assert cells[:2] == ['`sat`', 'cross-entropy']
    assert cells[3] == '1 (0)'                                   # one epoch logged, epoch 0 selected
    assert cells[5:12] == [f"{scored['metrics'][k]:.4f}" for k in zoo_table.SCORES]
    assert cells[12] == f"{scored['bad_endings']:.1%}" and cells[13] == str(scored['diversity']['distinct_words'])
    assert cells[14] == 'not measured' and cells[15] == '`make flickr8k-zoo DECODER=sat`'


def test_decode_time_comes_from_the_folders_benchmark(zoo_run, capsys):
    bench = {'benchmark': 'infer', 'results': [{'batch_size': 1, 'beam_size': 3, 'beam_s': 1.0},
                                               {'batch_size': 32, 'beam_size': 3, 'beam_s': 0.16}]}
    (zoo_run / 'bench_infer.json').write_text(json.dumps(bench))
    try:
        assert zoo_table.main([str(zoo_run), '--no-header']) == 0
    finally:
        os.remove(zoo_run / 'bench_infer.json')
    row = capsys.readouterr().out.strip()
    assert row.count('\n') == 0 and '| 5.0 |' in row           # 0.16 s / 32 images


def test_a_folder_that_cannot_make_a_row_is_one_line(zoo_run, tmp_path, capsys):
    bad = tmp_path / 'run'
    shutil.copytree(zoo_run, bad)
    scored = json.load(open(bad / 'val_metrics.json'))
    scored['results'] = [r for r in scored['results'] if r['beam_size'] != 3]
    (bad / 'val_metrics.json').write_text(json.dumps(scored))
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'metrics.jsonl').write_text('{"epoch": 0}\n')
    unscored = tmp_path / 'unscored'
    shutil.copytree(zoo_run, unscored)
    os.remove(unscored / 'val_metrics.json')
    for run, message in ((bad, 'no beam-size 3 result'), (empty, 'no BEST_checkpoint_*.pt'),
                         (unscored, 'val_metrics.json: missing (03_evaluate.py --checkpoint'),
                         (tmp_path / 'nothing', 'no such run folder')):
        assert zoo_table.main([str(run)]) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and err.count('\n') == 1


def test_a_row_scored_without_meteor_says_so(zoo_run, tmp_path, capsys):
    """Chinese (jieba) scoring leaves METEOR out (English-only): the cell says so; other scores are needed."""
    run = tmp_path / 'zoo_sat'
    shutil.copytree(zoo_run, run)
    scored = json.load(open(run / 'val_metrics.json'))
    for r in scored['results']:
        del r['metrics']['METEOR']
    (run / 'val_metrics.json').write_text(json.dumps(scored))
    assert zoo_table.main([str(run), '--no-header']) == 0
    cells = [c.strip() for c in capsys.readouterr().out.strip().strip('|').split('|')]
    assert cells[9] == 'not scored' and cells[11] == f"{scored['results'][1]['metrics']['CIDEr']:.4f}"
    for r in scored['results']:
        del r['metrics']['CIDEr']
    (run / 'val_metrics.json').write_text(json.dumps(scored))
    assert zoo_table.main([str(run)]) == 1
    assert 'metrics lacks CIDEr' in capsys.readouterr().err


def test_the_command_is_the_makefile_recipe_of_the_folders_name():
    """runs/zoo_<decoder>[_scst] and runs/zoo_cn_<decoder>[_scst] name the Makefile's zoo targets; any
    other folder, or a stage that does not match the name, points at the run's own config."""
    xe, scst = {'decoder': 'sat', 'objective': 'xe'}, {'decoder': 'sat', 'objective': 'scst'}
    assert zoo_table.reproduce('runs/zoo_sat', xe) == '`make flickr8k-zoo DECODER=sat`'
    assert zoo_table.reproduce('runs/zoo_sat_scst/', scst) == '`make flickr8k-zoo-scst DECODER=sat`'
    assert zoo_table.reproduce('runs/zoo_cn_sat', xe) == '`make flickr8k-cn-zoo DECODER=sat`'
    assert zoo_table.reproduce('runs/zoo_cn_sat_scst', scst) == '`make flickr8k-cn-zoo-scst DECODER=sat`'
    assert zoo_table.reproduce('runs/zoo_sat_scst', xe) == 'the config in `runs/zoo_sat_scst`'
    assert zoo_table.reproduce('runs/mine', xe) == 'the config in `runs/mine`'

"""`make demo` runs demo.py; its short version must keep working (the full one is the same code)."""
import json
import os

import demo


def test_quick_demo_runs_every_step(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert demo.main(['--quick', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    for n in range(1, 6):
        assert f'=== {n}/5' in printed
    report = json.load(open(out / 'test_metrics.json'))
    assert report['split'] == 'TEST' and 'Bleu_4' in report['results'][0]['metrics']
    assert len(list((out / 'attention').glob('*_attention.png'))) == 6
    assert 'TEST BLEU-4 (beam 3)' in printed and 'Outputs in' in printed
    assert os.path.exists(out / 'run' / 'metrics.jsonl')

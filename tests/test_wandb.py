"""wandb_log: every metrics.jsonl row also goes to wandb; off, wandb is never imported. A fake wandb module stands in
(no network, no real install): it records its calls to a file.

    python -m pytest tests/test_wandb.py -q
"""
import json
import sys

import pytest

from conftest import in_process

FAKE = """import json, os
def _rec(kind, **kw):
    with open(os.environ['FAKE_WANDB_LOG'], 'a') as f:
        f.write(json.dumps({'kind': kind, **kw}) + '\\n')
_rec('import')
def init(project=None, name=None, config=None):
    _rec('init', project=project, name=name, mode=config['mode'])
def log(data, step=None):
    _rec('log', data=data, step=step)
"""


@pytest.mark.parametrize('on', [True, False])
def test_wandb_gets_every_metrics_row(tmp_path, monkeypatch, on):
    (tmp_path / 'wandb.py').write_text(FAKE)
    calls = tmp_path / 'calls.jsonl'
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv('FAKE_WANDB_LOG', str(calls))
    monkeypatch.delitem(sys.modules, 'wandb', raising=False)  # the fake is imported afresh, and forgotten after
    out = tmp_path / 'out'
    p = in_process(['config/tiny.py', '--max_iters=3', f'--out_dir={out}', f'--wandb_log={on}', '--wandb_project=proj',
                    '--wandb_run_name=r1'])
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert len(rows) == 3
    if not on:
        assert not calls.exists() and 'wandb' not in sys.modules  # not even imported: the fake records its import
        return
    got = [json.loads(line) for line in open(calls)]
    assert got[:2] == [{'kind': 'import'}, {'kind': 'init', 'project': 'proj', 'name': 'r1', 'mode': 'sft'}]
    assert [(c['data'], c['step']) for c in got[2:]] == [(r, r['step']) for r in rows]

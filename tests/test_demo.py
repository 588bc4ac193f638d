"""demo.py --quick: sft -> dapo -> eval plumbing (sft checkpoint feeds rl, eval reads each stage, the table, the curves)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shown(completion: str) -> bool:
    _, opened, rest = completion.partition('<think>')
    body, closed, _ = rest.partition('</think>')
    return bool(opened and closed and body.strip())


@pytest.mark.slow
def test_demo_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, 'demo.py', '--quick', '--out', str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ('sft', 'dapo'):
        assert os.path.isfile(tmp_path / stage / 'ckpt' / 'model.safetensors'), stage
        assert os.path.isfile(tmp_path / stage / 'ckpt' / 'train_state.json'), stage
    with open(tmp_path / 'dapo' / 'ckpt' / 'train_state.json') as f:
        cfg = json.load(f)['config']
    assert cfg['mode'] == 'dapo' and cfg['max_iters'] == 3
    assert os.path.realpath(cfg['init_from']) == os.path.realpath(tmp_path / 'sft' / 'ckpt')  # sft fed rl

    with open(tmp_path / 'demo_summary.json') as f:
        demo = json.load(f)
    assert list(demo) == ['sft', 'dapo']
    lines = p.stdout.splitlines()
    assert '| stage | greedy acc | pass@2 | mean length | greedy shows work | train time | eval time |' in lines
    for stage in ('sft', 'dapo'):
        out = tmp_path / f'eval-{stage}'
        with open(out / 'summary.json') as f:
            s = json.load(f)['arith']
        assert s['n'] == 20 and s['n_samples'] == 2
        same = json.dumps({k: demo[stage][k] for k in s}, sort_keys=True) == json.dumps(s, sort_keys=True)
        assert same, (demo[stage], s)  # the demo reports what eval measured (json: NaN equals NaN)
        results = [n for n in os.listdir(out) if n.startswith('results-arith-') and '.rank' not in n]
        assert len(results) == 1
        with open(out / results[0]) as f:
            assert len(f.readlines()) == 20
        assert demo[stage]['train_s'] > 0 and demo[stage]['eval_s'] > 0
        row = next((x for x in lines if x.startswith(f'| {stage} |')), None)
        assert row is not None, f"no table row for {stage} in:\n{p.stdout[-2000:]}"
        m = re.match(r'\| \w+ \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \| (\d+)% \|', row)
        assert m, row
        with open(out / results[0]) as f:
            work = sum(shown(json.loads(x)['greedy']['completion']) for x in f) / 20
        assert demo[stage]['shows_work'] == work
        assert [float(x) for x in m.groups()] == pytest.approx(
            [round(100 * s['pass@1_greedy'], 1), round(100 * s['pass@2'], 1), round(s['len_mean'], 1),
             round(100 * work)], abs=0.051)
    # eval of the rl stage read the rl checkpoint: the command demo.py printed names it
    assert any(x.startswith('$ ') and 'eval.py' in x and f"--ckpt {tmp_path / 'dapo' / 'ckpt'}" in x for x in lines)
    # the rl run's training curves, drawn by plot.py and printed
    assert f"training curves of dapo: {tmp_path / 'curves.png'}" in lines
    with open(tmp_path / 'curves.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_shows_work_counts_non_empty_think(tmp_path):
    """the table's 'greedy shows work' column, on completions written by hand: 1 of 4 shows its steps."""
    import demo
    done = ['<think></think><answer>7</answer>', '<think>5+5=10\n1+1=2</think><answer>200</answer>',
            'no tags at all', '<think> \n</think><answer>3</answer>']
    with open(tmp_path / 'results-arith-x.jsonl', 'w') as f:
        for c in done:
            f.write(json.dumps({'greedy': {'completion': c}}) + '\n')
    (tmp_path / 'results-arith-x.rank0.jsonl').write_text('')  # rank files are not the merged results
    assert demo.shows_work(str(tmp_path)) == 0.25


"""demo.py --model smollm2 --quick: the real-model demo's plumbing on SmolLM2-135M-Instruct (base, sft, each rl mode,
each evaluated on the same held-out word problems; the table, the curves). its own file: pytest-xdist's loadfile
runs it beside test_demo.py's scratch demo.

    python -m pytest tests/test_real_demo.py -q
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_smollm2_quick(smollm, tmp_path):
    """demo.py --model smollm2 --quick: the base model and each stage evaluated on the same held-out word problems,
    through the chat template, each stage from the one before; the table reports what eval.py measured"""
    import data
    os.symlink(smollm, tmp_path / 'hf')  # converted once per test run (conftest); demo.py converts when it is absent
    p = subprocess.run([sys.executable, 'demo.py', '--model', 'smollm2', '--quick', '--out', str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    stages = ['base', 'sft', 'grpo', 'dr_grpo', 'dapo']
    with open(tmp_path / 'demo_summary.json') as f:
        demo = json.load(f)
    assert list(demo) == stages
    lines = p.stdout.splitlines()
    held_out = [json.loads(x) for x in open(tmp_path / 'problems.jsonl')]
    assert len(held_out) == 2 and all(r['question'].endswith('have now?') for r in held_out)
    trained = {r['question'] for r in data.arith_problems(2000, 'train', 1337, 3, 2, task='words')}
    assert not trained & {r['question'] for r in held_out}
    for stage in stages:
        src = ['--model', str(tmp_path / 'hf'), '--prompt_template', 'chat'] if stage == 'base' else \
            ['--ckpt', str(tmp_path / stage)]
        cmd = next(x for x in lines if x.startswith('$ ') and f"--out {tmp_path / f'eval-{stage}' / 'seed0'}" in x)
        assert ' '.join(src + ['--data', str(tmp_path / 'problems.jsonl')]) in cmd, cmd
        with open(tmp_path / f'eval-{stage}' / 'seed0' / 'summary.json') as f:
            s = json.load(f)['jsonl']
        assert demo[stage]['evals'] == [s] and s['n'] == 2 and s['n_samples'] == 2
        row = next(x for x in lines if x.startswith(f'| {stage} |')).split(' | ')
        assert [float(x.rstrip('%')) for x in row[1:6]] == pytest.approx(
            [100 * s[k] for k in ('pass@1_greedy', 'flex_pass@1_greedy', 'pass@2', 'flex_pass@2',
                                  'format_failure_rate')], abs=0.051)
        if stage != 'base':
            with open(tmp_path / stage / 'ckpt' / 'train_state.json') as f:
                cfg = json.load(f)['config']
            assert (cfg['arith_task'], cfg['prompt_template'], cfg['mode']) == ('words', 'chat', stage)
            want = tmp_path / ('hf' if stage == 'sft' else 'sft/ckpt')
            assert os.path.realpath(cfg['init_from']) == os.path.realpath(want)
            assert demo[stage]['train_s'] > 0 and demo[stage]['peak_rss_gib'] > 0.5 and demo[stage]['planned_gib'] > 0.5
    with open(tmp_path / 'curves.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    for stage in stages[1:]:  # 1.6 GB a checkpoint: pytest keeps the last three runs' tmp dirs
        shutil.rmtree(tmp_path / stage)

"""bench.py's train-step flops and its rl phase breakdown (the memory planner: tests/test_memory.py)."""
import os
import re
import subprocess
import sys

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_flops_by_hand():
    # qwen2.5-3b at 1024 tokens: 6 x 3,085,938,688 + 6 x 36 layers x 2048 x 1024
    assert bench.model_flops(3_085_938_688, 36, 2048, 1024) == 18_515_632_128 + 452_984_832
    assert bench.model_flops(10, 1, 4, 8) == 60 + 192


def test_rl_phases_cover_the_step():
    """every phase of a grpo step is timed: the phases add up to the step but for a small remainder, each >= 0"""
    p = subprocess.run([sys.executable, 'bench.py', '--rl', 'config/tiny.py', '--mode=grpo', '--max_iters=3',
                        '--batch_size=2', '--group_size=2', '--max_new_tokens=16', '--device=cpu'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    step = float(re.search(r'mean of 2 steps: (\d+) ms', p.stdout).group(1))
    ms = {k: float(v) for k, v in re.findall(r'^  (.+?)\s+(-?[\d.]+) ms', p.stdout, re.M)}
    assert list(ms) == list(bench.RL_PHASES) + ['other'], p.stdout
    assert all(ms[k] >= 0 for k in bench.RL_PHASES)
    assert ms['rollout'] > 0 and ms['update (loss, backward)'] > 0 and ms['log-probs (old, reference)'] > 0
    assert abs(sum(ms.values()) - step) <= 1 + 0.05 * len(ms)  # printed to 0.1 ms, the step to 1 ms
    assert abs(ms['other']) < 0.2 * step, ms  # a phase left out of the breakdown would show up here

"""plot.py on hand-made metrics.jsonl files: panels per mode, series lengths, smoothing, overlays, bad lines.

    python -m pytest -q tests/test_plot.py
"""
import json
import os
import subprocess
import sys

import pytest

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b'\x89PNG\r\n\x1a\n'
RL = ['reward / accuracy', 'completion length (tokens)', 'entropy (nats/token)', 'clip fraction (tokens)',
      '|log ratio| (staleness)', 'train/infer gap (|log p|)', 'zero-std group share']


def row(mode: str, step: int, overlap: bool = False, skipped: bool = False) -> dict:
    """one line as train.py writes it for mode; a skipped dapo update has no t_adv, t_logprobs, t_update, t_optim, entropy."""
    if mode == 'sft':
        return dict(step=step, loss=5.0 / step, tokens=1000, grad_norm=1.0, lr=1e-4 * step, time_ms=150.0 + step)
    m = dict(step=step, loss=-0.3, reward_mean=0.1 * step, reward_std=0.5, accuracy=0.1 * step, len_mean=20.0 + step,
             len_max=32.0, truncated_frac=0.0, zero_std_frac=0.05, entropy=0.2 - 0.01 * step, clip_low=0.001,
             clip_high=0.0, log_ratio=0.002 if overlap else 0.0, tokens=4000, grad_norm=0.5, lr=1e-5,
             time_ms=800.0 + step, t_rollout=0.25, t_reward=0.01, t_adv=0.0001, t_logprobs=0.002, t_update=0.4,
             t_optim=0.1, mismatch_mean=2e-7 + (0.002 if overlap else 0.0), mismatch_max=1e-6, unmasked_ends=0.0)
    if mode == 'grpo':
        m['kl'] = 0.001 * step
    if mode == 'dapo':
        m.update(gen_rounds=2, kept_groups=16)
    if overlap:
        m['t_wait'] = 0.001
    if skipped:
        for k in ('t_adv', 't_logprobs', 't_update', 't_optim', 'entropy', 'mismatch_mean', 'mismatch_max'):
            del m[k]
    return m


def write(d, rows: list[dict], tail: str = '') -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
        f.write(tail)
    return str(d)


def png_size(path) -> tuple[int, int]:
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == PNG and os.path.getsize(path) > 1000, path
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')  # the IHDR chunk


@pytest.mark.parametrize('xs,n,want', [
    ([1, 2, 3, 4, 5], 2, [1, 1.5, 2.5, 3.5, 4.5]),
    ([1, 2, 3, 4, 5], 3, [1, 1.5, 2, 3, 4]),   # the first points average what there is so far
    ([1, 2, 3, 4, 5], 10, [1, 1.5, 2, 2.5, 3]),  # a window past the end: the running mean
    ([4, 0, 8], 1, [4, 0, 8]),
    ([4, 0, 8], 0, [4, 0, 8]),
    ([], 5, []),
])
def test_smooth_is_a_trailing_mean(xs, n, want):
    assert plot.smooth(xs, n) == pytest.approx(want)


def test_resumed_file_keeps_the_last_line_of_a_step_and_skips_a_half_written_one(tmp_path):
    first = [dict(row('sft', s), loss=float(s)) for s in (1, 2, 3)]
    again = [dict(row('sft', s), loss=10.0 * s) for s in (3, 4, 5)]  # the resume redid step 3
    d = write(tmp_path, first + again, tail='\n{"step": 6, "loss": 0.4, "tok')
    rows, bad = plot.read_metrics(os.path.join(d, 'metrics.jsonl'))
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5] and bad == 1  # the blank line is not counted
    assert [r['loss'] for r in rows] == [1.0, 2.0, 30.0, 40.0, 50.0]
    assert plot.draw({'sft': rows}, str(tmp_path / 'c.png'))['loss (nats/token)'] == {'sft: loss': 5}
    p = subprocess.run([sys.executable, 'plot.py', d], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert 'skipped 1 line(s)' in p.stderr and p.stdout.strip() == f"curves: {os.path.join(d, 'curves.png')}"
    png_size(os.path.join(d, 'curves.png'))


def test_series_sums_phases_scales_and_drops_rows_without_the_key():
    rows = [row('dapo', 1), row('dapo', 2, skipped=True), row('dapo', 3)]
    assert plot.series(rows, ('t_rollout', 't_reward')) == ([1, 2, 3], [pytest.approx(0.26)] * 3)
    assert plot.series(rows, ('time_ms',), 1e-3) == ([1, 2, 3], [pytest.approx(0.801), pytest.approx(0.802),
                                                                 pytest.approx(0.803)])
    assert plot.series(rows, ('t_update', 't_optim')) == ([1, 3], [pytest.approx(0.5)] * 2)
    assert plot.series(rows, ('kl',)) == ([], [])


def test_panels_follow_the_keys():
    titles = lambda keys: [t for t, _ in plot.choose_panels(set(keys))]
    assert titles(row('sft', 1)) == ['loss (nats/token)', 'learning rate', 'step time (s)']
    rl = set(row('dr_grpo', 1)) - {'log_ratio'}
    assert titles(rl) == [t for t in RL if t != '|log ratio| (staleness)'] + ['step time (s)']
    assert titles({'step', 'reward_mean'}) == ['reward / accuracy']
    assert titles({'step'}) == []


# run -> the panels drawn, in order, and the step-time series
MODES = {
    'sft': (['loss (nats/token)', 'learning rate', 'step time (s)'], ['total']),
    'grpo': (RL[:3] + ['kl to reference'] + RL[3:] + ['step time (s)'], ['rollout+reward', 'logprobs', 'update',
                                                                          'total']),
    'dr_grpo': (RL + ['step time (s)'], ['rollout+reward', 'logprobs', 'update', 'total']),
    'dapo': (RL + ['generation rounds', 'step time (s)'], ['rollout+reward', 'logprobs', 'update', 'total']),
    'dapo-overlap': (RL + ['generation rounds', 'step time (s)'], ['rollout+reward', 'logprobs', 'update', 'wait',
                                                                   'total']),
}


@pytest.mark.parametrize('name', list(MODES))
def test_each_mode_draws_its_panels(tmp_path, name):
    mode, overlap = name.split('-')[0], name.endswith('overlap')
    rows = [row(mode, s, overlap, skipped=mode == 'dapo' and s == 4) for s in range(1, 7)]
    d = write(tmp_path / name, rows)
    drawn = plot.draw({name: plot.read_metrics(os.path.join(d, 'metrics.jsonl'))[0]}, str(tmp_path / 'c.png'), 3)
    panels, phases = MODES[name]
    assert list(drawn) == panels
    assert [k.split(': ')[1] for k in drawn['step time (s)']] == phases
    skipped = mode == 'dapo'  # step 4's update was skipped: no entropy, logprobs or update time
    assert drawn['step time (s)'][f'{name}: total'] == 6
    if mode != 'sft':
        assert drawn['reward / accuracy'] == {f'{name}: reward': 6, f'{name}: accuracy': 6}
        assert drawn['entropy (nats/token)'] == {f'{name}: entropy': 6 - skipped}
        assert drawn['step time (s)'][f'{name}: update'] == 6 - skipped
    assert png_size(tmp_path / 'c.png') == ((1320, 350) if mode == 'sft' else (1320, 930))  # 3 columns, 100 dpi


def test_overlay_of_three_modes_from_one_sft(tmp_path, monkeypatch):
    dirs = [write(tmp_path / m, [row(m, s) for s in range(1, 1 + n)]) for m, n in (('grpo', 5), ('dr_grpo', 4),
                                                                                    ('dapo', 3))]
    runs = {m: plot.read_metrics(os.path.join(d, 'metrics.jsonl'))[0]
            for m, d in zip(('grpo', 'dr_grpo', 'dapo'), dirs)}
    drawn = plot.draw(runs, str(tmp_path / 'x.png'))
    assert drawn['reward / accuracy'] == {'grpo: reward': 5, 'grpo: accuracy': 5, 'dr_grpo: reward': 4,
                                          'dr_grpo: accuracy': 4, 'dapo: reward': 3, 'dapo: accuracy': 3}
    assert drawn['kl to reference'] == {'grpo: kl': 5} and drawn['generation rounds'] == {'dapo: rounds': 3}
    png_size(tmp_path / 'x.png')
    # the command: the png goes beside the run dirs, labels come from the dir names
    p = subprocess.run([sys.executable, 'plot.py', *dirs, '--smooth', '2'], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"curves: {tmp_path / 'curves.png'}", p.stderr
    png_size(tmp_path / 'curves.png')
    # the same dir name under two parents (sequential vs overlapped): labels keep the parent
    seen = {}
    monkeypatch.setattr(plot, 'draw', lambda runs, path, n: seen.update(labels=list(runs), path=path, n=n))
    a, b = write(tmp_path / 'seq' / 'dapo', [row('dapo', 1)]), write(tmp_path / 'ovl' / 'dapo', [row('dapo', 1, True)])
    assert plot.plot_runs([a, b], smooth_n=4) == str(tmp_path / 'seq' / 'curves.png')
    assert seen == {'labels': ['seq/dapo', 'ovl/dapo'], 'path': str(tmp_path / 'seq' / 'curves.png'), 'n': 4}
    with pytest.raises(ValueError, match='1 labels for 2 runs'):
        plot.plot_runs([a, b], labels=['x'])


def test_without_matplotlib_the_command_says_how_to_install_it(tmp_path, monkeypatch):
    d = write(tmp_path / 'grpo', [row('grpo', s) for s in (1, 2)])
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match='pip install matplotlib'):
        plot.draw({'grpo': [row('grpo', 1)]}, str(tmp_path / 'c.png'))
    code = (f"import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', {d!r}]; "
            "runpy.run_path('plot.py', run_name='__main__')")
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and 'pip install matplotlib' in p.stderr, (p.returncode, p.stderr)
    assert not os.path.exists(os.path.join(d, 'curves.png'))

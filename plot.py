"""plot.py: a run's training curves from its metrics.jsonl, into a PNG beside it; several runs overlay.

    python plot.py out-demo/dapo                                   # -> out-demo/dapo/curves.png
    python plot.py out-demo/grpo out-demo/dr_grpo out-demo/dapo    # three modes from one sft -> out-demo/curves.png
    python plot.py out-seq/dapo out-ovl/dapo --labels seq,overlap --smooth 20 --out cmp.png
    python plot.py out-sft                                         # sft: loss, learning rate, step time

rl runs get reward and accuracy, completion length, entropy, kl (grpo), clip fractions, |log ratio| (the
staleness of overlapped runs), the train/infer gap, zero-std share, generation rounds (dapo) and step time by
phase; sft runs get loss, learning rate and step time. Panels and series are chosen from the keys present. Curves are a trailing
mean of the last --smooth steps over the raw values drawn faintly. Without matplotlib this says how to install it.
"""
import argparse
import json
import os
import sys

HINT = "plot.py needs matplotlib, which is not installed: pip install matplotlib"

# (title, kind, [(label, keys summed, scale)]): kind 'rl' | 'sft' | 'any' against the run's mode
PANELS = [
    ('reward / accuracy', 'rl', [('reward', ('reward_mean',), 1), ('accuracy', ('accuracy',), 1)]),
    ('completion length (tokens)', 'rl', [('mean', ('len_mean',), 1), ('max', ('len_max',), 1)]),
    ('entropy (nats/token)', 'rl', [('entropy', ('entropy',), 1)]),
    ('kl to reference', 'rl', [('kl', ('kl',), 1)]),
    ('clip fraction (tokens)', 'rl', [('low', ('clip_low',), 1), ('high', ('clip_high',), 1)]),
    ('|log ratio| (staleness)', 'rl', [('|log ratio|', ('log_ratio',), 1)]),
    ('train/infer gap (|log p|)', 'rl', [('mean', ('mismatch_mean',), 1), ('max', ('mismatch_max',), 1)]),
    ('zero-std group share', 'rl', [('zero std', ('zero_std_frac',), 1)]),
    ('generation rounds', 'rl', [('rounds', ('gen_rounds',), 1)]),
    ('loss (nats/token)', 'sft', [('loss', ('loss',), 1)]),
    ('learning rate', 'sft', [('lr', ('lr',), 1)]),
    # lines, not stacked: an overlapped run's rollout runs under its update, so the phases do not add up
    ('step time (s)', 'any', [('rollout+reward', ('t_rollout', 't_reward'), 1), ('logprobs', ('t_logprobs',), 1),
                              ('update', ('t_update', 't_optim'), 1), ('wait', ('t_wait',), 1), ('total', ('time_ms',), 1e-3)]),
]


def read_metrics(path: str) -> tuple[list[dict], int]:
    """rows sorted by step, the last line of a step winning (a resume rewrites it), and the lines that did not
    parse (a killed run's half-written last line)."""
    by_step, bad = {}, 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_step[int(row['step'])] = row
            except (ValueError, TypeError, KeyError):
                bad += 1
    return [by_step[s] for s in sorted(by_step)], bad


def smooth(xs: list[float], n: int) -> list[float]:
    """trailing moving average: y[i] = mean(xs[max(0, i-n+1) : i+1]); n <= 1 leaves xs as they are."""
    n = max(1, n)
    return [sum(xs[max(0, i - n + 1):i + 1]) / min(i + 1, n) for i in range(len(xs))]


def series(rows: list[dict], keys: tuple[str, ...], scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(steps, scale * sum of keys) over the rows that have every key (a skipped update logs no t_update)."""
    pts = [(r['step'], scale * sum(r[k] for k in keys)) for r in rows if all(r.get(k) is not None for k in keys)]
    return [s for s, _ in pts], [v for _, v in pts]


def choose_panels(keys: set[str]) -> list[tuple[str, list[tuple[str, tuple[str, ...], float]]]]:
    """the panels with at least one series whose keys are all present; rl when any run logged rewards."""
    mode = 'rl' if 'reward_mean' in keys else 'sft'
    return [(title, specs) for title, kind, specs in PANELS
            if kind in (mode, 'any') and any(set(k) <= keys for _, k, _ in specs)]


def draw(runs: dict[str, list[dict]], path: str, smooth_n: int = 10) -> dict[str, dict[str, int]]:
    """draw runs (label -> rows) into path; returns panel title -> {'run: series': points drawn}."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise ImportError(HINT) from None
    panels = choose_panels({k for rows in runs.values() for r in rows for k in r})
    if not panels:
        raise ValueError(f"no known metrics in {', '.join(runs)}")
    cols = min(3, len(panels))
    nrow = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4.4 * cols, 2.9 * nrow + 0.6), squeeze=False)
    styles, drawn = ['-', '--', ':', '-.'], {}  # colour tells a panel's series apart, line style the run
    for ax, (title, specs) in zip(axes.flat, panels):
        drawn[title], shown = {}, {}
        for r, (name, rows) in enumerate(runs.items()):
            for c, (label, keys, scale) in enumerate(specs):
                xs, ys = series(rows, keys, scale)
                if not xs:
                    continue
                raw = smooth_n <= 1 or keys == ('lr',)  # lr is a schedule, not a noisy measure
                if not raw:
                    ax.plot(xs, ys, color=f'C{c}', lw=0.6, alpha=0.2)
                ax.plot(xs, ys if raw else smooth(ys, smooth_n), color=f'C{c}', ls=styles[r % 4], lw=1.4)
                drawn[title][f'{name}: {label}'], shown[c] = len(xs), label
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(shown) > 1:  # above the curves, in headroom made for it: 'best' lands on the raw lines
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + (hi - lo) * 0.14 * -(-len(shown) // 3))
            ax.legend(handles=[Line2D([], [], color=f'C{c}', label=l) for c, l in sorted(shown.items())], fontsize=7,
                      loc='upper center', ncol=3, frameon=False, handlelength=1.5, columnspacing=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.supxlabel('step', fontsize=9)
    if len(runs) > 1:
        fig.legend(handles=[Line2D([], [], color='0.2', ls=styles[r % 4], label=name) for r, name in enumerate(runs)],
                   loc='upper right', ncol=len(runs), fontsize=9, frameon=False)
    sm = f'trailing mean of {smooth_n} steps over raw' if smooth_n > 1 else 'raw'
    fig.suptitle(f"{f'{len(runs)} runs' if len(runs) > 1 else next(iter(runs))} ({sm})", x=0.01, ha='left', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if path.endswith('.png'):  # a 256-colour palette (pillow comes with matplotlib): noisy lines, a third of the bytes
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert('RGB').quantize(256)
        im.save(path, optimize=True)
    return drawn


def plot_runs(dirs: list[str], out: str = '', labels: list[str] | None = None, smooth_n: int = 10) -> str:
    """read each run dir's metrics.jsonl (or a metrics file itself), draw them on one figure, return its path."""
    files = [d if os.path.isfile(d) else os.path.join(d, 'metrics.jsonl') for d in dirs]
    if labels is None:  # the dir names; the last two parts where those collide (seq/dapo vs ovl/dapo)
        parts = [os.path.normpath(os.path.dirname(os.path.abspath(f))).split(os.sep) for f in files]
        labels = [p[-1] for p in parts]
        if len(set(labels)) < len(labels):
            labels = ['/'.join(p[-2:]) for p in parts]
    if len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} runs")
    runs = {}
    for label, f in zip(labels, files):
        rows, bad = read_metrics(f)
        if bad:
            print(f"{f}: skipped {bad} line(s) that did not parse", file=sys.stderr)
        if not rows:
            raise ValueError(f"{f}: no metrics")
        runs[label] = rows
    out = out or os.path.join(os.path.dirname(os.path.abspath(files[0])) if len(files) == 1 else
                              os.path.dirname(os.path.dirname(os.path.abspath(files[0]))), 'curves.png')
    draw(runs, out, smooth_n)
    return out


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('runs', nargs='+', help="run dirs (out_dir of train.py) or metrics.jsonl files")
    ap.add_argument('--smooth', type=int, default=10, help="trailing mean over this many steps (1: raw)")
    ap.add_argument('--out', default='', help="png path (default: RUN_DIR/curves.png; several runs: beside the first)")
    ap.add_argument('--labels', default='', help="comma-separated run names (default: the dir names)")
    args = ap.parse_args()
    try:
        path = plot_runs(args.runs, args.out, args.labels.split(',') if args.labels else None, args.smooth)
    except (ImportError, OSError, ValueError) as e:
        sys.exit(f"plot.py: {e}")
    print(f"curves: {path}")

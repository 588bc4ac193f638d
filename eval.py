"""eval.py: GSM8K / MATH500 (or any jsonl) accuracy, pass@k and the baseline analysis, with the rollout engine (engine.py).

    python eval.py --ckpt out-sft/ckpt --dataset gsm8k --limit 200
    python eval.py --model Qwen/Qwen2.5-3B --dataset both --n_samples 8 --temperature 0.7
    python eval.py --ckpt out-demo/rl/ckpt --dataset arith --limit 200 --n_samples 8
    torchrun --standalone --nproc_per_node=2 eval.py --ckpt out-sft/ckpt --dataset both

Two scores, as lm-evaluation-harness reports GSM8K: strict (the <answer> tag, what the RL reward reads: pass@1_greedy,
pass@k, ...) and flexible (with no tag, the last \\boxed{}, else the last number: flex_pass@1_greedy, flex_pass@k, ...).
Problems are cut into fixed batches, each seeded by its index, and batch b runs on rank b % world, so 1 and 2
ranks give the same results, and a restarted eval skips the batches already in out/results.*.jsonl.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import checkpoint
import data
import engine
import rewards


def pass_at_k(n: int, c: int, k: int) -> float:
    """unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_problems(args, cfg: dict) -> list[dict]:
    """-> [{'id', 'question', 'gold'}] for one dataset name, or args.data."""
    if args.dataset == 'arith':
        rows = data.arith_problems(args.limit or 500, 'test', cfg['seed'], cfg['arith_terms'], cfg['arith_digits'],
                                   task=cfg['arith_task'])
        return [{'id': f'arith-{i}', 'question': r['question'], 'gold': r['answer']} for i, r in enumerate(rows)]
    if args.dataset in ('gsm8k', 'math500'):
        import datasets
        name, conf = {'gsm8k': ('openai/gsm8k', 'main'), 'math500': ('HuggingFaceH4/MATH-500', None)}[args.dataset]
        raw, src = datasets.load_dataset(name, conf, split='test').to_list(), name
        qf, af = ('question', 'answer') if args.dataset == 'gsm8k' else ('problem', 'answer')
    else:
        src, qf, af = args.data, args.question_field, args.answer_field
        with open(args.data) as f:
            raw = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, r in enumerate(raw[:args.limit or None]):
        for field in (qf, af):
            if not isinstance(r.get(field), str) or not r[field].strip():
                v = 'missing' if r.get(field) is None else f"{r[field]!r:.40}"
                raise SystemExit(f"{src} row {i}: field '{field}' is {v}, expected a non-empty string "
                                 f"(keys: {sorted(r)}); set --question_field / --answer_field")
        gold = rewards.gsm8k_gold(r[af]) if '####' in r[af] else r[af].strip()
        pid = str(r.get('unique_id') or r.get('id') or f'{args.dataset}-{i}')
        out.append({'id': pid, 'question': r[qf], 'gold': gold})
    if not out:
        raise SystemExit(f"{src}: no problems (expected rows with '{qf}' and '{af}' fields)")
    return out


def score(text: str, gold: str, n_tokens: int, truncated: bool) -> dict:
    ans, flex = rewards.extract_answer(text), rewards.extract_flexible(text)
    return {'completion': text, 'answer': ans, 'correct': rewards.is_correct(ans, gold), 'flex_answer': flex,
            'flex_correct': rewards.is_correct(flex, gold), 'length': n_tokens, 'truncated': truncated}


def run_batch(model, tok, batch: list[dict], args, cfg: dict, eos_ids: list[int], seed: int) -> list[dict]:
    prompts = [data.format_prompt(p['question'], cfg['prompt_template'], tok, cfg['system_prompt']) for p in batch]
    ids = [tok.encode_prompt(p) for p in prompts]
    runs = [('greedy', 1, 0.0)] + ([('samples', args.n_samples, args.temperature)] if args.n_samples else [])
    res = [dict(p, prompt=q) for p, q in zip(batch, prompts)]
    for key, n, temp in runs:
        gen = torch.Generator(device=args.device).manual_seed(seed)
        out = engine.generate(model, ids, n_samples=n, max_new_tokens=args.max_new_tokens, temperature=temp,
                              top_p=1.0, eos_ids=eos_ids, stop_strings=['</answer>'], tok=tok, pad_id=eos_ids[0],
                              generator=gen, engine=args.engine)
        lens, trunc = out['mask'].sum(-1).tolist(), out['truncated'].tolist()
        for i, r in enumerate(res):
            s = [score(tok.decode([x for x in out['ids'][j, :lens[j]].tolist() if x not in eos_ids]), r['gold'],
                       lens[j], trunc[j]) for j in range(i * n, (i + 1) * n)]
            r[key] = s[0] if key == 'greedy' else s
    return res


def fingerprint(path: str, skip: str = '') -> list:
    """(name, size, mtime) of a file, or of every file under a dir but those under skip (the eval's own outputs):
    cheap, and any rewrite of a weight or tokenizer file changes it."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.abspath(path), st.st_size, st.st_mtime_ns]]
    out = []
    for d, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if os.path.abspath(os.path.join(d, x)) != os.path.abspath(skip))
        out += [f for name in sorted(files) for f in fingerprint(os.path.join(d, name))]
    return out


def results_tag(ds: str, args, cfg: dict, eos_ids: list[int], dtype, path: str, out_dir: str) -> str:
    """the results file's name: everything that changes a completion is in it, so a resume never reuses another
    eval's rows: every argument but where results go and how they are summed up, the settings, the stop token, the
    precision, and each model and data file as it is now (a model retrained into the same dir is another model)."""
    gen = {k: v for k, v in vars(args).items() if k not in ('out', 'k', 'limit')}
    key = json.dumps([ds, gen, cfg, eos_ids, str(dtype), fingerprint(path, out_dir), fingerprint(args.data or '')])
    return f"{ds}-{'greedy' if not args.n_samples else f'n{args.n_samples}-t{args.temperature}'}-" \
           f"{args.max_new_tokens}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def read_results(pattern: str) -> dict:
    """{problem id: row} from every rank's results file; a line cut by an interrupt is skipped (its batch reruns)."""
    done = {}
    for fn in glob.glob(pattern):
        with open(fn) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done[r['id']] = r
                except json.JSONDecodeError:
                    pass
    return done


def summarize(rows: list[dict], ks: list[int], temperature: float) -> dict:
    """accuracy, pass@k, and the baseline analysis (lengths of correct vs wrong, truncation, format failures)."""
    greedy = [r['greedy'] for r in rows]
    s = {'n': len(rows), 'pass@1_greedy': sum(g['correct'] for g in greedy) / len(rows),
         'flex_pass@1_greedy': sum(g['flex_correct'] for g in greedy) / len(rows),
         'truncation_rate': sum(g['truncated'] for g in greedy) / len(rows),
         'format_failure_rate': sum(g['answer'] is None for g in greedy) / len(rows)}
    for name, keep in (('correct', True), ('incorrect', False)):
        ls = sorted(g['length'] for g in greedy if g['correct'] == keep)
        s[f'len_{name}_mean'] = sum(ls) / len(ls) if ls else None  # None, not NaN: summary.json stays strict json
        s[f'len_{name}_median'] = ls[len(ls) // 2] if ls else None
    s['len_mean'] = sum(g['length'] for g in greedy) / len(rows)
    if rows[0].get('samples'):
        n = len(rows[0]['samples'])
        cs = [sum(x['correct'] for x in r['samples']) for r in rows]
        s['temperature'], s['n_samples'] = temperature, n
        s['pass@1_sampled'] = sum(c / n for c in cs) / len(rows)
        fs = [sum(x['flex_correct'] for x in r['samples']) for r in rows]
        s['flex_pass@1_sampled'] = sum(c / n for c in fs) / len(rows)
        for k in sorted({k for k in ks if 1 < k <= n} | {2 ** i for i in range(1, int(math.log2(n)) + 1)}):
            s[f'pass@{k}'] = sum(pass_at_k(n, c, k) for c in cs) / len(rows)
            s[f'flex_pass@{k}'] = sum(pass_at_k(n, c, k) for c in fs) / len(rows)
        s['skipped_k'] = [k for k in ks if k > n]  # pass@k needs k <= n samples: noted, never fatal
        if s['skipped_k']:
            print(f"pass@{','.join(map(str, s['skipped_k']))} skipped: only {n} samples per problem", file=sys.stderr)
        # the gap uses the largest k asked for that was computed, else the largest computed at all
        kg = max((k for k in ks if 1 < k <= n), default=max((k for k in range(2, n + 1) if f'pass@{k}' in s), default=1))
        s['gap_k'] = kg
        s['gap'] = s[f'pass@{kg}' if kg > 1 else 'pass@1_sampled'] - s['pass@1_greedy']
    return s


def table(summaries: dict) -> str:
    names = list(summaries)
    lines = ['| Metric | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    first = next(iter(summaries.values()))
    keys = ['n'] + [k for k in first if k.startswith('pass@')] + [k for k in first if k.startswith('flex_pass@')] + \
           ['gap', 'len_mean', 'len_correct_mean', 'len_incorrect_mean', 'truncation_rate', 'format_failure_rate']
    for k in keys:
        cells = []
        for s in summaries.values():
            v = s.get(k)
            cells.append('-' if v is None else f'{v}' if k == 'n' else f'{100 * v:.1f}%'
                         if k.startswith(('pass', 'flex', 'gap', 'trunc', 'format')) else f'{v:.1f}')
        base = k.removeprefix('flex_')
        label = {'pass@1_greedy': 'pass@1 (greedy)', 'pass@1_sampled': 'pass@1 (sampled)',
                 'gap': 'gap (pass@k - greedy)'}.get(base, base) + (', flexible' if k != base else '')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(summaries: dict, path: str):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return  # plots are optional; the tables are always printed
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, s in summaries.items():
        ks = sorted(int(k[5:]) for k in s if k.startswith('pass@') and k[5:].isdigit())
        if ks:
            ax.plot(ks, [s[f'pass@{k}'] for k in ks], marker='o', label=name)
    ax.set_xscale('log', base=2), ax.set_xlabel('k'), ax.set_ylabel('pass@k'), ax.legend()
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument('--ckpt', help="a reasoning-engine checkpoint dir (out_dir/ckpt, or out_dir)")
    src.add_argument('--model', help="any hub name or local Hugging Face model dir")
    ap.add_argument('--dataset', default='gsm8k', choices=['gsm8k', 'math500', 'both', 'arith', 'jsonl'])
    ap.add_argument('--data', help="a .jsonl file of problems (implies --dataset jsonl)")
    ap.add_argument('--question_field', default='question')
    ap.add_argument('--answer_field', default='answer', help="the gold answer, or a GSM8K solution with ####")
    ap.add_argument('--limit', type=int, default=0, help="first N problems per dataset (0: all)")
    ap.add_argument('--max_new_tokens', type=int, default=1024)
    ap.add_argument('--n_samples', type=int, default=0, help="samples per problem for sampled pass@1 / pass@k")
    ap.add_argument('--k', default='1,8', help="comma-separated k for pass@k")
    ap.add_argument('--temperature', type=float, default=0.7)
    ap.add_argument('--batch_size', type=int, default=16, help="problems per generation batch")
    ap.add_argument('--prompt_template', default='', help="base models: 'r1' (default) | 'chat' | '...{question}...'")
    ap.add_argument('--gguf_file', default='', help="with --model: load this GGUF file from the model dir")
    ap.add_argument('--eos_token', default='', help="the token a completion ends with (default: the one that ends an "
                    "assistant turn in the chat template under 'chat', else the tokenizer's eos)")
    ap.add_argument('--out', default='', help="output dir (default: <ckpt>/eval or eval-out)")
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--engine', default='static', choices=['static', 'hf'],
                    help="decode: 'static' (qwen2/llama: static kv cache, cuda graphs) | 'hf' (any model's forward)")
    args = ap.parse_args(argv)
    if args.data:
        args.dataset = 'jsonl'
    if args.dataset == 'jsonl' and not (args.data and os.path.isfile(args.data)):
        raise SystemExit(f"--data {args.data!r}: no such file (needed for --dataset jsonl)")
    ks = [int(k) for k in args.k.split(',')]
    cfg = {'prompt_template': args.prompt_template or 'r1', 'system_prompt': 'You are a helpful assistant.',
           'eos_token': args.eos_token, 'seed': 1337, 'arith_terms': 3, 'arith_digits': 2, 'arith_task': 'chain'}
    path = args.ckpt or args.model
    if args.ckpt:
        path = os.path.realpath(os.path.join(path, 'ckpt') if os.path.isdir(os.path.join(path, 'ckpt')) else path)
        if not os.path.isdir(path):
            raise SystemExit(f"--ckpt {args.ckpt!r}: no such directory")
        if not os.path.isfile(os.path.join(path, 'train_state.json')):
            raise SystemExit(f"--ckpt {args.ckpt!r}: not a reasoning-engine checkpoint (no train_state.json); "
                             f"use --model for plain Hugging Face models")
        with open(os.path.join(path, 'train_state.json')) as f:
            saved = json.load(f)['config']
        cfg.update({k: saved[k] for k in cfg if k in saved})  # the template the checkpoint was trained with
        if args.prompt_template:
            cfg['prompt_template'] = args.prompt_template
        if args.eos_token:
            cfg['eos_token'] = args.eos_token
    elif args.dataset == 'arith':
        raise SystemExit("--dataset arith needs --ckpt (the task's settings come from the checkpoint)")
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    if ddp:
        if args.device.startswith('cuda'):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if args.device.startswith('cuda') else torch.float32
    extra = {'gguf_file': args.gguf_file} if args.gguf_file else {}
    if args.gguf_file:
        from transformers import AutoTokenizer
        tok = data.Tokenizer(hf=AutoTokenizer.from_pretrained(path, **extra))
    else:
        tok = checkpoint.load_pretrained(path, '--model', data.Tokenizer.load)
    model = (checkpoint.load_checkpoint_model(path, dtype) if checkpoint.is_checkpoint(path) else
             AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)).to(args.device).eval()
    try:
        eos_ids = [tok.token_id(cfg['eos_token'] or tok.default_eos(cfg['prompt_template']))]
    except ValueError as e:  # no single-token eos, or no chat template to read one from
        raise SystemExit(f"--eos_token {cfg['eos_token']!r}, --prompt_template {cfg['prompt_template']!r}: {e}") from None
    n_pos = model.config.max_position_embeddings
    out_dir = args.out or (os.path.join(path, 'eval') if args.ckpt else 'eval-out')
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    names = ['gsm8k', 'math500'] if args.dataset == 'both' else [args.dataset]
    for ds, problems in [(ds, load_problems(argparse.Namespace(**{**vars(args), 'dataset': ds}), cfg)) for ds in names]:
        longest = max(len(tok.encode_prompt(data.format_prompt(p['question'], cfg['prompt_template'], tok,
                                                                cfg['system_prompt']))) for p in problems)
        if longest + args.max_new_tokens > n_pos:  # never run past the model's positions, nor size a cache for it
            raise SystemExit(f"--max_new_tokens {args.max_new_tokens} after the longest {ds} prompt ({longest} tokens) "
                             f"needs {longest + args.max_new_tokens} positions; the model has {n_pos}")
        tag = results_tag(ds, args, cfg, eos_ids, dtype, path, out_dir)
        done = read_results(os.path.join(out_dir, f'results-{tag}.rank*.jsonl'))
        batches = [problems[s:s + args.batch_size] for s in range(0, len(problems), args.batch_size)]
        t0, n_new, n_ok = time.time(), 0, 0
        questions = {p['id']: p['question'] for p in problems}
        done = {i: r for i, r in done.items() if questions.get(i) == r['question']}
        mine = os.path.join(out_dir, f'results-{tag}.rank{rank}.jsonl')
        if os.path.isfile(mine) and os.path.getsize(mine):
            with open(mine, 'rb+') as f:  # an interrupt can leave half a line: end it, the parser skips it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b'\n':
                    f.write(b'\n')
        with open(mine, 'a') as f:
            for b, batch in enumerate(batches):
                if b % world != rank or all(p['id'] in done for p in batch):
                    continue
                for r in run_batch(model, tok, batch, args, cfg, eos_ids, args.seed * 100003 + b):
                    f.write(json.dumps(r) + '\n')
                    n_new, n_ok = n_new + 1, n_ok + r['greedy']['correct']
                f.flush()
                if rank == 0:
                    rate = n_new / (time.time() - t0)
                    print(f"\r{ds}: {n_new * world}/{len(problems)} problems | {rate * world:.2f} problems/s | "
                          f"greedy acc {n_ok / n_new:.3f}", end='', file=sys.stderr, flush=True)
        if rank == 0:
            print(file=sys.stderr)
        if ddp:
            dist.barrier()
        if rank == 0:
            done.update(read_results(os.path.join(out_dir, f'results-{tag}.rank*.jsonl')))
            rows = [done[p['id']] for p in problems]
            with open(os.path.join(out_dir, f'results-{tag}.jsonl'), 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows)
            summaries[ds] = summarize(rows, ks, args.temperature)
    if rank == 0:
        with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
            json.dump(summaries, f, indent=1)
        plot(summaries, os.path.join(out_dir, 'pass_at_k.png'))
        print(table(summaries))
        print(f"results: {out_dir}/summary.json")
    if ddp:
        dist.destroy_process_group()
    return summaries


if __name__ == '__main__':
    main()

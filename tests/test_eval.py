"""eval.py: the pass@k estimator, end-to-end runs on GSM8K- and MATH500-format JSONL, resume, 1 vs 2 ranks, errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as ev
import rewards
import data
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
ENV = dict(os.environ, OMP_NUM_THREADS='1')
# the tiny checkpoint is trained on a task that differs from eval.py's fallbacks (seed 1337, 3 terms, 2 digits,
# 'chain'), so `--dataset arith` can only match data.arith_problems if it reads the settings from the checkpoint
SEED, TERMS, DIGITS, TASK = 7, 4, 2, 'column'
GEN = ['--limit', '6', '--max_new_tokens', '24', '--n_samples', '3', '--k', '1,2', '--batch_size', '2']


def run_eval(args, nproc=1, check=True):
    """eval.py args: one process runs in this one (eval.main), more under torchrun."""
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    p = in_process([str(a) for a in args], main=ev.main) if nproc == 1 else \
        subprocess.run(launch + ['eval.py'] + [str(a) for a in args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        pytest.fail(f"eval.py {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def one(out, pattern):
    """the one file in out named results-*<pattern>."""
    if pattern.startswith('.rank'):  # one rank's file, else the merged one (names end in a settings hash)
        names = [n for n in os.listdir(out) if n.startswith('results-') and n.endswith(pattern)]
    else:
        names = [n for n in os.listdir(out) if n.startswith('results-') and '.rank' not in n and n.endswith('.jsonl')]
    assert len(names) == 1, f"{out}: expected one results-*{pattern}, found {sorted(os.listdir(out))}"
    return os.path.join(out, names[0])


def summary(out):
    with open(os.path.join(out, 'summary.json')) as f:
        return json.load(f)


def canon(x):
    return json.dumps(x, sort_keys=True)  # NaN (len_correct_mean with no correct answers) compares equal


def real_rows(name, n):
    path = os.path.join(SHARED, name)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.fixture(scope='module')
def sft(tmp_path_factory):
    out = tmp_path_factory.mktemp('sft')
    p = in_process(['config/tiny.py', f'--out_dir={out}', '--max_iters=30', f'--seed={SEED}', f'--arith_terms={TERMS}',
                    f'--arith_digits={DIGITS}', f'--arith_task={TASK}'])
    assert p.returncode == 0, p.stderr[-3000:]
    return str(out)


@pytest.fixture(scope='module')
def gsm8k_file(tmp_path_factory):
    """5 real GSM8K test rows when ../shared/data has them, else 5 written here; then a '#### 1,080' row."""
    rows = real_rows('gsm8k_test.jsonl', 5) or [
        {'question': f'Tom has {a} apples and buys {b} more. How many apples does he have?',
         'answer': f'Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}'}
        for a, b in [(3, 4), (10, 62), (7, 0), (25, 25), (8, 9)]]
    rows.append({'question': 'A shop sells 540 pens a day. How many pens does it sell in two days?',
                 'answer': 'It sells 540 * 2 = <<540*2=1080>>1080 pens.\n#### 1,080'})
    path = tmp_path_factory.mktemp('data') / 'gsm8k.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


@pytest.fixture(scope='module')
def math500_file(tmp_path_factory):
    rows = real_rows('math500_test.jsonl', 5) or [
        {'problem': 'What is $\\frac{2}{4}$ in lowest terms?', 'answer': '\\frac{1}{2}', 'unique_id': 'test/a/1.json'},
        {'problem': 'Compute $\\sqrt{16}$.', 'answer': '4', 'unique_id': 'test/a/2.json'},
        {'problem': 'Simplify $\\sqrt{8}$.', 'answer': '2\\sqrt{2}', 'unique_id': 'test/a/3.json'},
        {'problem': 'Solve $2x = 1$ for $x$.', 'answer': ' \\frac{1}{2} ', 'unique_id': 'test/a/4.json'},
        {'problem': 'What is $\\pi$ radians in degrees?', 'answer': '180^\\circ', 'unique_id': 'test/a/5.json'}]
    rows.append({'problem': 'What is $0.5$ as a common fraction?', 'answer': '\\frac{1}{2}',
                 'unique_id': 'test/b/6.json'})
    path = tmp_path_factory.mktemp('data') / 'math500.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


@pytest.fixture(scope='module')
def gsm8k_run(sft, gsm8k_file, tmp_path_factory):
    """one complete eval (out A): 6 problems in 3 batches of 2, 3 samples each."""
    out = str(tmp_path_factory.mktemp('eval-a'))
    p = run_eval(['--ckpt', sft, '--data', gsm8k_file, *GEN, '--out', out])
    return out, p


# -----------------------------------------------------------------------------
# pass@k: 1 - C(n-c, k) / C(n, k)


@pytest.mark.parametrize('n,c,k,want', [
    (4, 0, 4, 0.0), (4, 1, 4, 1.0), (4, 3, 4, 1.0),  # n = k: any correct sample passes
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),
    (8, 0, 1, 0.0), (8, 0, 5, 0.0),  # c = 0
    (8, 8, 1, 1.0), (8, 8, 3, 1.0),  # c = n
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 1, 0.3),  # k = 1 is c / n
    (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (6, 1, 3, 0.5),  # 1 - C(5,3)/C(6,3) = 1 - 10/20
])
def test_pass_at_k_hand_values(n, c, k, want):
    assert ev.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('n,c,k', [(200, 13, 10), (100, 50, 64), (64, 1, 8), (256, 255, 128)])
def test_pass_at_k_matches_binomial_formula(n, c, k):
    assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9, abs=1e-12)


def test_summarize_hand_values():
    """3 problems x 4 samples, flags chosen so every number is worked out by hand."""
    def g(correct, length, truncated=False, answer='1', flex=None):
        return {'completion': '', 'answer': answer, 'correct': correct, 'length': length, 'truncated': truncated,
                'flex_correct': correct if flex is None else flex}
    rows = [{'greedy': g(True, 10), 'samples': [g(True, 1), g(False, 1, flex=True), g(False, 1), g(False, 1)]},
            {'greedy': g(False, 30, truncated=True, answer=None, flex=True), 'samples': [g(False, 1)] * 4},
            {'greedy': g(False, 20), 'samples': [g(True, 1)] * 3 + [g(False, 1)]}]
    s = ev.summarize(rows, [1, 4], temperature=0.7)
    assert s['n'] == 3 and s['n_samples'] == 4
    assert s['pass@1_greedy'] == pytest.approx(1 / 3)
    assert s['pass@1_sampled'] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert s['pass@2'] == pytest.approx((0.5 + 0 + 1) / 3)  # c=1: 1 - C(3,2)/C(4,2) = 1/2; c=3: n-c < k
    assert s['pass@4'] == pytest.approx(2 / 3)
    assert s['gap'] == pytest.approx(2 / 3 - 1 / 3)  # max k <= n is 4
    assert s['truncation_rate'] == pytest.approx(1 / 3) and s['format_failure_rate'] == pytest.approx(1 / 3)
    assert s['len_correct_mean'] == 10 and s['len_incorrect_mean'] == 25 and s['len_mean'] == 20
    # flexible: problem 2's greedy and one more sample of problem 1 count
    assert s['flex_pass@1_greedy'] == pytest.approx(2 / 3)
    assert s['flex_pass@1_sampled'] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert s['flex_pass@2'] == pytest.approx((5 / 6 + 0 + 1) / 3)  # c=2: 1 - C(2,2)/C(4,2) = 5/6
    table = ev.table({'x': s})
    assert '| pass@1 (greedy) | 33.3% |' in table and '| pass@1 (greedy), flexible | 66.7% |' in table
    assert '| pass@4, flexible | 66.7% |' in table


def summary_rows(n_samples, correct_per_problem):
    """eval rows of problems with c of n_samples samples correct, for c in correct_per_problem (greedy: c > 0)"""
    return [{'greedy': {'correct': c > 0, 'flex_correct': c > 0, 'truncated': False, 'answer': '1', 'length': 5},
             'samples': [{'correct': i < c, 'flex_correct': i < c} for i in range(n_samples)]} for c in correct_per_problem]


@pytest.mark.parametrize('n, ks, gap_k', [(4, [1, 8], 4), (8, [16], 8), (8, [1, 2, 16], 2), (1, [1, 8], 1)])
def test_eval_skips_k_above_n_samples(n, ks, gap_k):
    # a k above n_samples has no estimate: summarize lists it in skipped_k and the gap uses the largest k <= n
    s = ev.summarize(summary_rows(n, [0, 1, n]), ks, 0.7)
    assert s['skipped_k'] == [k for k in ks if k > n] and s['gap_k'] == gap_k
    want = s[f'pass@{gap_k}'] if gap_k > 1 else s['pass@1_sampled']
    assert s['gap'] == pytest.approx(want - 2 / 3)
    assert all(f'pass@{k}' not in s for k in ks if k > n)
    json.dumps(s)  # summary.json is written from this
    assert 'gap' in ev.table({'x': s})


# -----------------------------------------------------------------------------
# end to end on a tiny checkpoint


def check_rows(rows, problems, n_samples, max_new_tokens):
    """rows match the problems in order, carry the documented fields, and their flags agree with rewards.py."""
    assert [r['id'] for r in rows] == [p['id'] for p in problems]
    assert len({r['id'] for r in rows}) == len(rows)
    for r, p in zip(rows, problems):
        assert r['gold'] == p['gold'] and r['prompt'] == p['question'] + '\n'  # config/tiny.py's '{question}\n'
        assert len(r['samples']) == n_samples
        for s in [r['greedy']] + r['samples']:
            assert set(s) >= {'completion', 'answer', 'correct', 'length', 'truncated'}
            assert 1 <= s['length'] <= max_new_tokens
            assert not s['truncated'] or s['length'] == max_new_tokens
            assert s['answer'] == rewards.extract_answer(s['completion'])
            assert s['correct'] == rewards.is_correct(s['answer'], r['gold'])
            assert s['flex_answer'] == rewards.extract_flexible(s['completion'])
            assert s['flex_correct'] == rewards.is_correct(s['flex_answer'], r['gold']) >= s['correct']


def check_summary(s, rows, k):
    """every number in summary.json, recomputed from the per-problem rows."""
    n = len(rows[0]['samples'])
    greedy = [r['greedy'] for r in rows]
    cs = [sum(x['correct'] for x in r['samples']) for r in rows]
    assert s['n'] == len(rows) and s['n_samples'] == n
    assert s['pass@1_greedy'] == pytest.approx(sum(g['correct'] for g in greedy) / len(rows))
    assert s['pass@1_sampled'] == pytest.approx(sum(c / n for c in cs) / len(rows))
    assert s[f'pass@{k}'] == pytest.approx(sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in cs) / len(rows))
    assert s['truncation_rate'] == pytest.approx(sum(g['truncated'] for g in greedy) / len(rows))
    assert s['format_failure_rate'] == pytest.approx(sum(g['answer'] is None for g in greedy) / len(rows))
    assert s['len_mean'] == pytest.approx(sum(g['length'] for g in greedy) / len(rows))
    fs = [sum(x['flex_correct'] for x in r['samples']) for r in rows]
    assert s['flex_pass@1_greedy'] == pytest.approx(sum(g['flex_correct'] for g in greedy) / len(rows))
    assert s[f'flex_pass@{k}'] == pytest.approx(sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in fs) / len(rows))


def test_eval_gsm8k_jsonl(gsm8k_run, gsm8k_file):
    out, p = gsm8k_run
    raw = read_jsonl(gsm8k_file)
    problems = [{'id': f'jsonl-{i}', 'question': r['question'],
                 'gold': r['answer'].split('####')[-1].replace(',', '').strip()} for i, r in enumerate(raw)]
    assert problems[-1]['gold'] == '1080'
    rows = read_jsonl(one(out, '24.jsonl'))
    check_rows(rows, problems, n_samples=3, max_new_tokens=24)
    assert read_jsonl(one(out, '.rank0.jsonl')) == rows  # one rank, batches in order: written as it went
    s = summary(out)
    assert list(s) == ['jsonl']
    check_summary(s['jsonl'], rows, k=2)
    assert 'pass@1 (greedy)' in p.stdout and 'pass@1 (sampled)' in p.stdout and '| pass@2 |' in p.stdout


def test_eval_math500_jsonl(sft, math500_file, tmp_path):
    run_eval(['--ckpt', os.path.join(sft, 'ckpt'), '--data', math500_file, '--question_field', 'problem',
              *GEN, '--out', tmp_path])
    raw = read_jsonl(math500_file)
    problems = [{'id': r['unique_id'], 'question': r['problem'], 'gold': r['answer'].strip()} for r in raw]
    assert problems[-1]['gold'] == '\\frac{1}{2}'
    rows = read_jsonl(one(tmp_path, '24.jsonl'))
    check_rows(rows, problems, n_samples=3, max_new_tokens=24)
    check_summary(summary(tmp_path)['jsonl'], rows, k=2)


# -----------------------------------------------------------------------------
# resume: an interrupted eval skips the batches it finished and ends with the same summary


def interrupted(gsm8k_run, tmp_path, tail):
    """out B: out A's rank file cut after the first batch (2 rows), plus `tail`; those rows are marked."""
    out_a, _ = gsm8k_run
    lines = open(one(out_a, '.rank0.jsonl')).read().splitlines(True)
    kept = [json.dumps(dict(json.loads(x), kept=True)) + '\n' for x in lines[:2]]  # regenerated rows lose the mark
    with open(os.path.join(tmp_path, os.path.basename(one(out_a, '.rank0.jsonl'))), 'w') as f:
        f.write(''.join(kept) + tail(lines[2]))
    return out_a, kept


@pytest.mark.parametrize('cut', ['line', 'half_line'])
def test_resume_skips_done_batches(gsm8k_run, gsm8k_file, sft, tmp_path, cut):
    out_a, kept = interrupted(gsm8k_run, tmp_path, (lambda x: '') if cut == 'line' else (lambda x: x[:len(x) // 2]))
    run_eval(['--ckpt', sft, '--data', gsm8k_file, *GEN, '--out', tmp_path])
    rank0 = open(one(tmp_path, '.rank0.jsonl')).read()
    assert rank0.startswith(''.join(kept))  # the first batch was not rewritten
    assert rank0.count('"id": "jsonl-0"') == 1 and rank0.count('"id": "jsonl-1"') == 1  # nor generated again
    rows, rows_a = read_jsonl(one(tmp_path, '24.jsonl')), read_jsonl(one(out_a, '24.jsonl'))
    assert rows[:2] == [json.loads(x) for x in kept]  # the merge took the first batch from the old file
    assert rows[2:] == rows_a[2:]
    assert canon(summary(tmp_path)) == canon(summary(out_a))


def test_results_of_another_data_file_are_not_reused(gsm8k_run, math500_file, sft, tmp_path):
    """a second --data file into an out dir that holds another file's results must not be scored from them."""
    out_a, _ = gsm8k_run
    shutil.copy(one(out_a, '.rank0.jsonl'), tmp_path)
    with open(math500_file) as f:  # the same ids (jsonl-0..5) as the GSM8K file: no unique_id field here
        rows = [{'question': r['problem'], 'answer': r['answer']} for r in map(json.loads, f)]
    data = tmp_path / 'other.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run_eval(['--ckpt', sft, '--data', data, *GEN, '--out', tmp_path])
    got = read_jsonl(one(tmp_path, '24.jsonl'))
    assert [r['question'] for r in got] == [r['question'] for r in rows]
    assert [r['gold'] for r in got] == [r['answer'].strip() for r in rows]


# -----------------------------------------------------------------------------
# 2 ranks (gloo) give the 1-rank results


@pytest.mark.slow
def test_two_ranks_equal_one(gsm8k_run, gsm8k_file, sft, tmp_path):
    out_a, _ = gsm8k_run
    p = run_eval(['--ckpt', sft, '--data', gsm8k_file, *GEN, '--out', tmp_path], nproc=2)
    assert 'pass@1 (greedy)' in p.stdout
    r0, r1 = read_jsonl(one(tmp_path, '.rank0.jsonl')), read_jsonl(one(tmp_path, '.rank1.jsonl'))
    assert [r['id'] for r in r0] == ['jsonl-0', 'jsonl-1', 'jsonl-4', 'jsonl-5']  # batch b on rank b % 2
    assert [r['id'] for r in r1] == ['jsonl-2', 'jsonl-3']
    assert read_jsonl(one(tmp_path, '24.jsonl')) == read_jsonl(one(out_a, '24.jsonl'))
    assert canon(summary(tmp_path)) == canon(summary(out_a))


# -----------------------------------------------------------------------------
# --dataset arith: the held-out split of the task the checkpoint was trained on


def test_arith_reads_task_from_checkpoint(sft, tmp_path):
    run_eval(['--ckpt', sft, '--dataset', 'arith', '--limit', '8', '--max_new_tokens', '4', '--batch_size', '8',
              '--out', tmp_path])
    rows = read_jsonl(one(tmp_path, '4.jsonl'))
    want = data.arith_problems(8, 'test', SEED, TERMS, DIGITS, task=TASK)
    assert [(r['question'], r['gold']) for r in rows] == [(w['question'], w['answer']) for w in want]
    assert all(len(r['question'].split()) == 2 * TERMS + 1 for r in rows)  # 4 numbers, 3 operators, '= ?'
    assert all(r['prompt'] == r['question'] + '\n' for r in rows)
    seen = {r['question'] for r in data.arith_problems(20000, 'train', SEED, TERMS, DIGITS, task=TASK)}  # sft's
    assert not seen & {r['question'] for r in rows}
    s = summary(tmp_path)['arith']
    assert s['n'] == 8 and 'pass@1_greedy' in s and 'pass@1_sampled' not in s  # no --n_samples: greedy only


# -----------------------------------------------------------------------------
# errors: one clear line and a non-zero exit, no traceback


def test_error_missing_ckpt_dir(tmp_path):
    p = run_eval(['--ckpt', tmp_path / 'nope', '--dataset', 'arith'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"--ckpt '{tmp_path / 'nope'}': no such directory"


@pytest.mark.parametrize('case', ['empty_dir', 'unknown_dataset', 'row_without_answer', 'row_without_question',
                                  'number_not_string', 'empty_file', 'missing_model_dir', 'missing_data_file'])
def test_error_is_one_line(sft, tmp_path, capsys, case):
    """in-process: a SystemExit whose message is one line is what Python prints without a traceback."""
    data = tmp_path / 'bad.jsonl'
    data.write_text(json.dumps({'question': '1 + 1 = ?', 'answer': '#### 2'}) + '\n' +
                    json.dumps({'question': '2 + 2 = ?', 'answer': '#### 4'}) + '\n' +
                    json.dumps({'question': '3 + 3 = ?', 'solution': '#### 6'}) + '\n')
    num, empty = tmp_path / 'num.jsonl', tmp_path / 'empty.jsonl'
    num.write_text(json.dumps({'question': '1 + 1 = ?', 'answer': 18}) + '\n')
    empty.write_text('\n')
    argv, want = {
        'empty_dir': (['--ckpt', str(tmp_path)], ['not a reasoning-engine checkpoint', 'train_state.json']),
        'unknown_dataset': (['--ckpt', sft, '--dataset', 'gsm9k'], ['--dataset', "invalid choice: 'gsm9k'"]),
        'row_without_answer': (['--ckpt', sft, '--data', str(data), '--out', str(tmp_path / 'o')],
                               ['row 2', "'answer'", 'missing']),
        'row_without_question': (['--ckpt', sft, '--data', str(data), '--question_field', 'problem',
                                  '--out', str(tmp_path / 'o')], ['row 0', "'problem'", 'missing']),
        'number_not_string': (['--ckpt', sft, '--data', str(num), '--out', str(tmp_path / 'o')],
                              ['row 0', "'answer'", 'is 18, expected a non-empty string']),
        'empty_file': (['--ckpt', sft, '--data', str(empty), '--out', str(tmp_path / 'o')], [str(empty), 'no problems']),
        'missing_model_dir': (['--model', str(tmp_path / 'no' / 'model')], [repr(str(tmp_path / 'no' / 'model')),
                                                                             'no such directory']),
        'missing_data_file': (['--ckpt', sft, '--data', str(tmp_path / 'x.jsonl')], ['x.jsonl', 'no such file']),
    }[case]
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code != 0 and e.value.code is not None
    assert '\n' not in msg.strip() and all(w in msg for w in want), msg
    assert not os.path.exists(tmp_path / 'o' / 'summary.json')


def test_results_name_every_input_that_changes_a_completion(tmp_path):
    """a second quantization in the same dir (--gguf_file), a model retrained into the same dir, another stop token or
    precision: another results file, never the first one's rows. --out, --k and --limit change no completion."""
    import argparse
    import time
    model = tmp_path / 'model'
    model.mkdir()
    (model / 'a.gguf').write_bytes(b'a')
    (model / 'config.json').write_text('{}')
    ap = lambda **kw: argparse.Namespace(**{**dict(gguf_file='a.gguf', data='', out='', k='1,8', limit=0, n_samples=0,
                                                  temperature=0.7, max_new_tokens=64, seed=0, engine='static'), **kw})
    tag = lambda args=None, eos=(2,), dtype=torch.float32: ev.results_tag('gsm8k', args or ap(), {'prompt_template': 'chat'},
                                                                       list(eos), dtype, str(model), str(tmp_path / 'out'))
    first = tag()
    assert tag(ap(out='elsewhere', k='1,2', limit=5)) == first
    assert tag(ap(gguf_file='b.gguf')) != first and tag(eos=(3,)) != first and tag(dtype=torch.bfloat16) != first
    time.sleep(0.01)
    (model / 'a.gguf').write_bytes(b'b')  # retrained in place
    assert tag() != first

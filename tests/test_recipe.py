"""the README's recipe as a user runs it: config/sft.py, then config/dr_grpo.py (overlapped) from its checkpoint, then
eval.py, each under torchrun on 2 ranks (gloo, CPU), from the recipe's working directory layout (out-sft/ckpt), on a
real pretrained model (SmolLM2-135M-Instruct as a HF dir) and the GSM8K sample in tests/data; config/grpo.py and
config/dapo.py from the same checkpoint in one process. overridden: what a CPU needs (device, sizes, steps), the data
(no hub here) and the chat template an instruct model speaks. tests/probe.py counts what no log shows: layers
recomputed in backward, gradient bytes per rank.

    python -m pytest tests/test_recipe.py -q
    RECIPE_DEVICE=cuda RECIPE_NPROC=1 python -m pytest tests/test_recipe.py -q    # gpu_check.sh, on one GPU
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import bench
import data
import rewards
import train
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST, TRAIN = (os.path.join(ROOT, 'tests', 'data', f'gsm8k_{s}_sample.jsonl') for s in ('test', 'train'))
DEVICE, NPROC = os.environ.get('RECIPE_DEVICE', 'cpu'), int(os.environ.get('RECIPE_NPROC', '2'))
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={NPROC}']
PROBE = [os.path.join(ROOT, 'tests', 'probe.py'), os.path.join(ROOT, 'train.py')]
CPU = [f'--device={DEVICE}', '--prompt_template=chat', '--ckpt_interval=1000']
SFT = [os.path.join(ROOT, 'config', 'sft.py'), f'--dataset={TRAIN}', '--batch_size=4', '--micro_batch_size=1',
       '--max_iters=2'] + CPU
RL = [f'--dataset={TRAIN}', '--batch_size=2', '--group_size=2', '--micro_batch_size=1', '--max_new_tokens=16',
      '--max_iters=1', '--max_gen_rounds=2'] + CPU


def run(cwd, args, launcher=TORCHRUN, check=True):
    p = subprocess.run(launcher + args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert not check or p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def metrics(path):
    return train.read_metrics(os.path.join(path, 'metrics.jsonl'))


def probes(cwd):
    return [json.load(open(os.path.join(cwd, f'probe_rank{r}.json'))) for r in range(NPROC)]


def assert_recomputed(cwd, what):
    for r, p in enumerate(probes(cwd)):
        assert p['forwards'] > 0 and p['recomputed'] == p['forwards'], f"{what}, rank {r}: {p['forwards']} layer " \
            f"forwards with grad, {p['recomputed']} recomputed in backward (activation_checkpointing = True)"


def wait_for_steps(out, n, p, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(os.path.join(out, 'metrics.jsonl')) and len(metrics(out)) >= n:
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")


@pytest.fixture(scope='module')
def recipe(smollm, steps, tmp_path_factory):
    """the sft stage stopped by SIGTERM to torchrun after its first step, then resumed; and the losses of an
    uninterrupted run, in this process on one rank (the same global batch: 1 or 2 ranks give the same steps)."""
    cwd = tmp_path_factory.mktemp('recipe')
    args = SFT + [f'--init_from={smollm}']
    # torchrun's default: the workers get 30 s from the signal before it kills them
    p = subprocess.Popen(TORCHRUN + ['--shutdown_timeout=30'] + PROBE + args, cwd=cwd, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_steps(cwd / 'out-sft', 1, p)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)  # the launcher, as a scheduler does; it forwards the signal to the workers
    out, err = p.communicate(timeout=120)
    assert (cwd / 'out-sft' / 'ckpt').exists(), out[-3000:] + err[-5000:]
    stopped = {'seconds': time.time() - t0, 'out': out, 'err': err, 'steps': len(metrics(cwd / 'out-sft')),
               'ckpt': json.load(open(cwd / 'out-sft' / 'ckpt' / 'train_state.json'))['step'], 'probes': probes(cwd)}
    run(cwd, PROBE + args + ['--init_from=resume'])
    return {'cwd': cwd, 'stopped': stopped, 'uninterrupted': steps(args)}


def test_sigterm_to_torchrun_keeps_the_last_finished_step(recipe):
    s = recipe['stopped']
    assert "stopped by a signal" in s['out'], s['out'][-2000:] + s['err'][-2000:]
    assert s['ckpt'] == s['steps'] == 1, s  # the step in flight abandoned, the finished one kept
    print(f"stopped in {s['seconds']:.1f} s")  # written and exited inside torchrun's 30 s: the message comes last
    assert not (recipe['cwd'] / 'out-sft' / 'ckpt.stop.tmp').exists()


def test_sft_resumes_as_if_never_stopped_and_its_loss_falls(recipe):
    got, want = metrics(recipe['cwd'] / 'out-sft'), recipe['uninterrupted']
    assert [m['step'] for m in got] == [m['step'] for m in want] == [1, 2]
    for a, b in zip(got, want):  # step 2 is the resumed run's: its weights and its place in the data came back
        assert math.isclose(a['loss'], b['loss'], rel_tol=1e-5), (got, want)
    assert want[-1]['loss'] < want[0]['loss'], want
    assert 0.3 < want[0]['loss'] < 3.0, want  # a pretrained model already predicts gsm8k prose; random weights: ~10
    assert "data: 8 sft examples" in recipe['stopped']['out'] and "(0 dropped" in recipe['stopped']['out']
    assert_recomputed(recipe['cwd'], 'sft resumed from its checkpoint')
    n_layer = json.load(open(recipe['cwd'] / 'out-sft' / 'ckpt' / 'config.json'))['num_hidden_layers']
    for r, p in enumerate(recipe['stopped']['probes']):  # from the pretrained model; its step 2 stopped part-way
        assert p['forwards'] >= p['recomputed'] >= n_layer * 4 // NPROC, f"sft from the pretrained model, rank {r}: " \
            f"{p['forwards']} layer forwards with grad, {p['recomputed']} recomputed (activation_checkpointing = True)"


def test_each_rank_holds_the_planned_gradient_bytes(recipe):
    import configurator
    cfg = {k: getattr(train, k) for k in train.config_keys}
    configurator.configure(cfg, SFT + [f"--init_from={recipe['cwd'] / 'out-sft' / 'ckpt'}"])
    planned = bench.plan_memory(cfg, NPROC, bench.model_shape(cfg)[0], 24 * 2 ** 30,
                                cuda=DEVICE == 'cuda')['components']['gradients']
    for r, p in enumerate(probes(recipe['cwd'])):  # after each of a rank's micro-batches of the resumed step
        assert max(p['unsharded_grad_bytes']) == 0, p  # grad_sync 'micro': nobody holds a full gradient
        assert len(p['sharded_grad_bytes']) == 4 // NPROC and math.isclose(max(p['sharded_grad_bytes']), planned, rel_tol=0.01), \
            (r, max(p['sharded_grad_bytes']), planned, p['n_params'])


def test_dr_grpo_overlapped_from_the_sft_checkpoint(recipe):
    """the recipe's rl stage on 2 ranks, its rollouts from the overlap's inference copy of the sharded model"""
    cwd = recipe['cwd']
    p = run(cwd, PROBE + [os.path.join(ROOT, 'config', 'dr_grpo.py')] + RL + ['--overlap=True'])
    m = metrics(cwd / 'out-dr_grpo')
    assert [r['step'] for r in m] == [1] and math.isfinite(m[0]['loss']) and m[0]['tokens'] > 0, p.stdout[-2000:]
    assert "init out-sft/ckpt" in p.stdout and "data: 8 rl prompts" in p.stdout  # the recipe's own checkpoint
    assert "overlapped rollouts" in p.stdout and 'kl' not in m[0]
    assert_recomputed(cwd, 'dr_grpo, overlapped')


@pytest.mark.parametrize('config', ['grpo', 'dapo'])
def test_rl_config_from_the_sft_checkpoint_in_one_process(recipe, config, tmp_path):
    """rl from a {question, answer} file with no reasoning, chat prompts, the tokenizer's own <|im_end|> as eos. 16 new
    tokens rarely hold an answer: without dynamic sampling dapo updates whatever the rewards, as grpo does."""
    qa = tmp_path / 'qa.jsonl'
    qa.write_text(''.join(json.dumps({'question': r['question'], 'answer': r['answer'].split('####')[-1].strip()})
                          + '\n' for r in map(json.loads, open(TRAIN))))
    p = in_process([os.path.join(ROOT, 'config', f'{config}.py')] + RL + [
        f'--dataset={qa}', f"--init_from={recipe['cwd'] / 'out-sft' / 'ckpt'}", f'--out_dir={tmp_path / "out"}',
        '--dynamic_sampling=False'])
    assert p.returncode == 0, p.stderr[-3000:]
    m = metrics(tmp_path / 'out')
    assert [r['step'] for r in m] == [1] and math.isfinite(m[0]['loss']) and m[0]['tokens'] > 0, m
    assert ('kl' in m[0]) == (config == 'grpo') and 'data: 8 rl prompts' in p.stdout
    # autocast = 'auto': a 135M model computes under bf16 autocast where this cpu multiplies bf16 in hardware
    assert DEVICE != 'cpu' or ('under bf16 autocast' in p.stdout) == train.cpu_bf16_units(), p.stdout[:2000]


def test_eval_reads_the_checkpoint_and_reports_both_scores(recipe):
    """eval.py on 2 ranks from the checkpoint's own chat template: the format is stated inside the user turn, before
    the assistant's; every completion's flexible answer is rewards.extract_flexible's, and flexible >= strict."""
    cwd = recipe['cwd']
    run(cwd, [os.path.join(ROOT, 'eval.py'), '--ckpt', 'out-sft', '--data', TEST, '--limit', '2', '--batch_size', '1',
              '--max_new_tokens', '24', '--device', DEVICE])
    out = cwd / 'out-sft' / 'ckpt' / 'eval'
    s = json.load(open(out / 'summary.json'))['jsonl']
    merged = [f for f in out.glob('results-*.jsonl') if '.rank' not in f.name]  # the ranks' own files merged
    assert len(merged) == 1, merged
    rows = [json.loads(line) for line in open(merged[0])]
    assert s['n'] == len(rows) == 2
    for r in rows:
        assert r['prompt'].index(data.R1_TAGS) < r['prompt'].index('<|im_start|>assistant'), r['prompt']
        g = r['greedy']
        assert g['flex_answer'] == rewards.extract_flexible(g['completion']) and g['flex_correct'] >= g['correct']
    assert s['flex_pass@1_greedy'] >= s['pass@1_greedy'], s

"""1 vs 2 ranks, resume equals uninterrupted, atomic checkpoints, Hugging Face checkpoint format.

The training runs share four fixtures (each a few seconds of 2-core CPU), all with a global batch of 16:
  a:  1 rank, 4 micro-batches of 4, 6 steps, a checkpoint every 3 steps (the uninterrupted reference)
  b1: as a, but 3 steps, then --init_from=resume to 6 steps
  b2: as b1 on 2 ranks (torchrun, gloo, FSDP2), each rank's 8 examples grouped by length and packed end to end into
      micro-batches of at most 256 tokens (as many on both ranks)
  c:  1 rank, one micro-batch of 16, 3 steps
  h:  as b1, its first leg a 2-node job (two torchrun launchers on this machine, 2 ranks each) as hsdp (replicas=2:
      a replica group per node, sharded within it), resumed on 1 rank
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import data
import optim
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['config/tiny.py', '--ckpt_interval=3', '--batch_size=16', '--micro_batch_size=4']  # lr_decay_iters from the
# config (60), not max_iters, so every leg follows one schedule


def metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def assert_same(got, want, rel, what):
    assert [m['step'] for m in got] == [m['step'] for m in want], what
    for g, w in zip(got, want):
        assert math.isclose(g['loss'], w['loss'], rel_tol=rel), f"{what}: step {w['step']} {g['loss']} vs {w['loss']}"
        assert g['tokens'] == w['tokens'] and g['lr'] == w['lr'], (what, g, w)


@pytest.fixture(scope='module')
def run_a(run_train, tmp_path_factory):
    out = tmp_path_factory.mktemp('a')
    run_train(ARGS + [f'--out_dir={out}', '--max_iters=6'])
    return out


def interrupted(run_train, out, nproc, extra=(), nproc2=None, extra2=None):
    run_train(ARGS + [f'--out_dir={out}', '--max_iters=3', *extra], nproc=nproc)
    shutil.copytree(os.path.realpath(out / 'ckpt'), out / 'leg1_ckpt')  # step 3, before resume replaces it
    run_train(ARGS + [f'--out_dir={out}', '--max_iters=6', '--init_from=resume', *(extra if extra2 is None else extra2)],
              nproc=nproc if nproc2 is None else nproc2)
    return out


@pytest.fixture(scope='module')
def run_b1(run_train, tmp_path_factory):
    return interrupted(run_train, tmp_path_factory.mktemp('b1'), 1)


@pytest.fixture(scope='module')
def run_b2(run_train, tmp_path_factory):
    return interrupted(run_train, tmp_path_factory.mktemp('b2'), 2, ['--pack=True', '--micro_batch_tokens=256'])


def two_nodes(args: list, nproc_per_node: int) -> list[subprocess.Popen]:
    """train.py as a 2-node job on this machine: two torchrun launchers (--nnodes=2, a --node_rank each) meeting at
    one endpoint, as two machines meet at the first one's address"""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cmd = lambda i: [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--nproc_per_node={nproc_per_node}',
                     f'--node_rank={i}', '--master_addr=127.0.0.1', f'--master_port={port}', 'train.py', *map(str, args)]
    return [subprocess.Popen(cmd(i), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for i in (0, 1)]


@pytest.fixture(scope='module')
def run_h(run_train, tmp_path_factory):
    out = tmp_path_factory.mktemp('h')
    nodes = two_nodes(ARGS + [f'--out_dir={out}', '--max_iters=3', '--replicas=2'], nproc_per_node=2)
    for node in nodes:
        o, e = node.communicate(timeout=300)
        assert node.returncode == 0, o[-2000:] + e[-3000:]
    shutil.copytree(os.path.realpath(out / 'ckpt'), out / 'leg1_ckpt')
    run_train(ARGS + [f'--out_dir={out}', '--max_iters=6', '--init_from=resume'])
    return out


@pytest.fixture(scope='module')
def run_c(run_train, tmp_path_factory):
    out = tmp_path_factory.mktemp('c')
    run_train(ARGS + [f'--out_dir={out}', '--max_iters=3', '--micro_batch_size=16'])
    return out


# -----------------------------------------------------------------------------


def test_one_vs_four_micro_batches_same_losses(run_a, run_c):
    a, c = metrics(run_a), metrics(run_c)
    assert_same(c, a[:3], 1e-5, 'one micro-batch of 16 vs four of 4')
    assert c[-1]['loss'] < c[0]['loss'], "three steps at lr up to 1.5e-3 lower the loss"


@pytest.mark.slow
def test_resume_equals_uninterrupted(run_a, run_b1):
    a, b = metrics(run_a), metrics(run_b1)
    assert [m['step'] for m in b] == [1, 2, 3, 4, 5, 6], "the resumed leg continues the step count"
    assert_same(b, a, 1e-6, '1 rank, resumed at step 3')
    state = json.load(open(run_b1 / 'ckpt' / 'train_state.json'))
    assert state['step'] == 6 and state['data_pos'] == 6 * 16


@pytest.mark.slow
def test_two_ranks_match_one_rank(run_a, run_b2):
    # the global batch does not depend on the world size: same examples, same all-reduced loss; nor on how a rank cuts
    # its examples into micro-batches (every denominator is step-wide): packed by length vs padded in data order
    a, b = metrics(run_a), metrics(run_b2)
    assert all(m['pad_ratio'] == 1 for m in b) and all(m['pad_ratio'] > 1 for m in a), (a, b)
    assert_same(b[:3], a[:3], 1e-5, '2 ranks vs 1 rank, steps 1-3')
    assert_same(b[3:], a[3:], 1e-5, '2 ranks resumed at step 3 vs 1 rank uninterrupted, steps 4-6')
    assert json.load(open(run_b2 / 'ckpt' / 'train_state.json'))['world_size'] == 2


@pytest.mark.slow
def test_hsdp_matches_one_rank_and_resumes_on_one(run_a, run_h):
    # 2 replica groups of 2 shards: each group reduce-scatters within itself and all-reduces across groups, and the
    # step-wide denominators are global, so the losses are one rank's; its checkpoint (replicated, sharded DTensors)
    # reshards onto 1 rank, which logs steps 4-6 as the uninterrupted run does
    a, h = metrics(run_a), metrics(run_h)
    assert_same(h[:3], a[:3], 1e-5, 'hsdp 2 x 2 vs 1 rank, steps 1-3')
    assert_same(h[3:], a[3:], 1e-5, 'the 2 x 2 checkpoint resumed on 1 rank vs 1 rank uninterrupted, steps 4-6')
    assert json.load(open(run_h / 'leg1_ckpt' / 'train_state.json'))['world_size'] == 4
    assert sorted(f for f in os.listdir(run_h / 'leg1_ckpt') if f.startswith('rank')) == [f'rank{r}.json' for r in range(4)]


def children(pid: int) -> list[int]:
    """the processes whose parent is pid (from /proc)"""
    out = []
    for d in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{d}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except OSError:  # gone meanwhile
            continue
        out += [int(d)] * (ppid == pid)
    return out


@pytest.mark.slow
def test_a_node_that_dies_stops_the_other_with_an_error(tmp_path):
    # a 2-node job, 1 rank a node; after the first step node 1 dies (its launcher and its worker, SIGKILL): node 0's
    # next collective fails on the closed connection, and its launcher exits with the failure, not a hang. (a node
    # that dies before the ranks first connect leaves the others waiting for the process group's timeout: 30 min)
    nodes = two_nodes(ARGS + [f'--out_dir={tmp_path}', '--max_iters=100000'], nproc_per_node=1)
    try:
        t0 = time.time()
        log = tmp_path / 'metrics.jsonl'
        while not (log.exists() and train.read_metrics(log)):  # the file is opened before step 1 is logged
            assert time.time() - t0 < 120 and all(n.poll() is None for n in nodes), "no first step"
            time.sleep(0.2)
        dead = [nodes[1].pid] + children(nodes[1].pid)
        for pid in dead:
            os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        try:
            out, err = nodes[0].communicate(timeout=90)
        except subprocess.TimeoutExpired:  # a hang
            os.killpg(nodes[0].pid, signal.SIGKILL)
            out, err = nodes[0].communicate()
            o1, e1 = nodes[1].communicate()
            raise AssertionError(f"killed {dead}; node 0 still running after 90 s:\n{out[-1500:]}\n{err[-3000:]}\n"
                                 f"node 1:\n{o1[-1000:]}\n{e1[-2000:]}")
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    assert nodes[0].returncode != 0 and 'train.py FAILED' in err and 'Connection' in err, err[-3000:]
    print(f"node 0 stopped {time.time() - t0:.1f} s after node 1 died")


@pytest.mark.slow
def test_torchrun_with_one_rank_matches_a_plain_process(run_train, run_c, tmp_path):
    # under torchrun even 1 rank is FSDP2-sharded (DTensor weights): the losses and the saved weights must match
    # (one sharded rank still gathers a full state dict for model.safetensors, which cannot hold a DTensor)
    from safetensors.torch import load_file
    run_train(ARGS + [f'--out_dir={tmp_path}', '--max_iters=3', '--micro_batch_size=16'], torchrun=True)
    assert_same(metrics(tmp_path), metrics(run_c), 1e-5, 'torchrun with 1 rank vs a plain process')
    got, want = load_file(tmp_path / 'ckpt' / 'model.safetensors'), load_file(run_c / 'ckpt' / 'model.safetensors')
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize('leg1, nproc', [('b2', 1), ('b1', 2), ('h', 2), ('h', 4)],
                         ids=['2->1', '1->2', 'hsdp 2x2->2', 'hsdp 2x2->1x4'])
def test_resume_on_another_world_size(run_train, run_a, run_b1, run_b2, run_h, tmp_path, leg1, nproc):
    # the step-3 checkpoint of a 2-rank (1-rank, hsdp 2 x 2) run resumed on 1 rank (2 ranks, 2 or 4 flat ranks):
    # weights and adam moments reshard, the data stream is global, so steps 4-6 log the uninterrupted 1-rank run's
    # losses to float tolerance
    out = tmp_path / 'out'
    shutil.copytree({'b1': run_b1, 'b2': run_b2, 'h': run_h}[leg1] / 'leg1_ckpt', out / 'ckpt_000003')
    os.symlink('ckpt_000003', out / 'ckpt')
    shutil.copy(run_a / 'metrics.jsonl', out / 'metrics.jsonl')  # steps 4-6 are dropped and redone
    p = run_train(ARGS + [f'--out_dir={out}', '--max_iters=6', '--init_from=resume'], nproc=nproc)
    assert ('resharded' in p.stdout) == (nproc != {'b1': 1, 'b2': 2, 'h': 4}[leg1])  # 2 x 2 -> 1 x 4: the same world
    got, want = metrics(out), metrics(run_a)
    assert_same(got, want, 1e-5, f'resumed on {nproc} rank(s)')
    print(f"{leg1} -> {nproc}: max relative loss difference vs uninterrupted "
          f"{max(abs(g['loss'] - w['loss']) / w['loss'] for g, w in zip(got[3:], want[3:])):.1e}")


# -----------------------------------------------------------------------------
# the checkpoint is a Hugging Face model directory


@pytest.mark.slow
def test_checkpoint_is_hugging_face_format(run_a, run_b1):
    from transformers import AutoModelForCausalLM
    ckpt = str(run_b1 / 'leg1_ckpt')  # the weights after step 3
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == 'qwen2' and model.config.architectures == ['Qwen2ForCausalLM']
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = data.Tokenizer.load(ckpt)
    text = '7 + 5 = ?\n<think>7 + 5 = 12</think><answer>12</answer><|endoftext|>'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for s in data.SPECIALS:
        assert len(tok.encode(s)) == 1 and tok.encode(s)[0] in ids
    # step 4's loss, recomputed from the step-3 checkpoint on step 4's batch, is what the run logged
    state = json.load(open(os.path.join(ckpt, 'train_state.json')))
    cfg = state['config']
    assert state['step'] == 3 and state['data_pos'] == 3 * cfg['batch_size']
    rows = data.load_rows(cfg, cfg['split'])
    eos = tok.token_id('<|endoftext|>')
    examples, _ = data.tokenize_sft(rows, tok, cfg['prompt_template'], cfg['system_prompt'], eos, cfg['max_seq_len'])
    idx = data.step_indices(len(examples), cfg['batch_size'], state['data_pos'], cfg['seed'])
    ids, attn, mask = data.collate_sft([examples[i] for i in idx], eos)
    with torch.no_grad():
        lp = train.token_logprobs(model, ids, attn, ids.shape[1] - 1, vocab=tok.n_vocab)
    loss = (-(lp * mask).sum() / mask.sum()).item()
    logged = metrics(run_a)[3]
    assert logged['step'] == 4 and math.isclose(loss, logged['loss'], rel_tol=1e-5), (loss, logged)


# -----------------------------------------------------------------------------
# atomic save: a crash while writing the next checkpoint leaves out_dir/ckpt at the previous one


@pytest.fixture
def tiny():
    tok = data.Tokenizer.bytes_level()
    cfg = dict(init_from='scratch', n_layer=1, n_head=2, n_kv_head=1, n_embd=32, n_ff=64, master_dtype='fp32', seed=0)
    model = train.build_model(cfg, tok)
    opt = optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, state_dtype=torch.float32)
    return model, opt, tok


def step_and_save(out_dir, step, model, opt, tok):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * step)  # a recognisable change per step
    checkpoint.save_checkpoint(str(out_dir), step, model, opt, tok, {'step': step, 'world_size': 1}, {'rng': [1, 2]}, rank=0,
                          world=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_loads_as(ckpt, weights, step):
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert set(loaded) == set(weights)
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k
    assert json.load(open(os.path.join(ckpt, 'train_state.json')))['step'] == step


def test_crash_mid_save_keeps_previous_checkpoint(tiny, tmp_path, monkeypatch):
    import safetensors.torch
    model, opt, tok = tiny
    w1 = step_and_save(tmp_path, 1, model, opt, tok)
    assert os.path.realpath(tmp_path / 'ckpt') == str(tmp_path / 'ckpt_000001')

    real = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'\x00' * 100)  # half a file, then the process dies
        raise KeyboardInterrupt('killed mid-save')
    monkeypatch.setattr(safetensors.torch, 'save_file', crash)
    with pytest.raises(KeyboardInterrupt):
        step_and_save(tmp_path, 2, model, opt, tok)
    assert os.path.realpath(tmp_path / 'ckpt') == str(tmp_path / 'ckpt_000001')
    assert_loads_as(str(tmp_path / 'ckpt'), w1, 1)
    assert not (tmp_path / 'ckpt_000002').exists()

    monkeypatch.setattr(safetensors.torch, 'save_file', real)
    w3 = step_and_save(tmp_path, 3, model, opt, tok)
    assert os.path.realpath(tmp_path / 'ckpt') == str(tmp_path / 'ckpt_000003')
    assert_loads_as(str(tmp_path / 'ckpt'), w3, 3)
    assert sorted(os.listdir(tmp_path)) == ['ckpt', 'ckpt_000003'], "old and half-written checkpoints are removed"


def test_crash_while_resaving_the_same_step_keeps_a_checkpoint(tiny, tmp_path, monkeypatch):
    # e.g. `python train.py config/tiny.py` run twice into the same out_dir: the second run saves step 60 again.
    # killed between deleting the old ckpt_000060 and renaming the new one, out_dir/ckpt must still load.
    model, opt, tok = tiny
    w1 = step_and_save(tmp_path, 1, model, opt, tok)

    rename = os.rename

    def killed(src, dst):  # the checkpoint dir's rename; torch.distributed.checkpoint renames its own files too
        if os.path.basename(dst).startswith('ckpt_'):
            raise KeyboardInterrupt('killed mid-save')
        return rename(src, dst)
    with monkeypatch.context() as mp:
        mp.setattr(train.os, 'rename', killed)
        with pytest.raises(KeyboardInterrupt):
            step_and_save(tmp_path, 1, model, opt, tok)
    ckpt = os.path.realpath(tmp_path / 'ckpt')
    assert os.path.isdir(ckpt), f"out_dir/ckpt -> {os.readlink(tmp_path / 'ckpt')}, which no longer exists"
    assert_loads_as(ckpt, w1, 1)


def test_normal_save_moves_ckpt_and_removes_old(tiny, tmp_path):
    model, opt, tok = tiny
    for p in model.parameters():  # one optimizer step, so there are moments to save
        p.grad = torch.ones_like(p)
    opt.step()
    step_and_save(tmp_path, 1, model, opt, tok)
    w2 = step_and_save(tmp_path, 2, model, opt, tok)
    assert os.path.islink(tmp_path / 'ckpt') and os.readlink(tmp_path / 'ckpt') == 'ckpt_000002'  # relative: movable
    assert sorted(os.listdir(tmp_path)) == ['ckpt', 'ckpt_000002']
    assert_loads_as(str(tmp_path / 'ckpt'), w2, 2)
    # the moments by parameter name, full size: any world size can reshard them; the rest is json
    opt2 = optim.AdamW(model.parameters(), lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, state_dtype=torch.float32)
    state, rs = checkpoint.load_checkpoint(str(tmp_path / 'ckpt'), dict(model.named_parameters()), opt2, rank=0,
                                      world=1)
    assert state['world_size'] == 1 and rs == {'rng': [1, 2]} and opt2.param_groups[0]['lr'] == 1e-3
    for p in model.parameters():
        assert torch.equal(opt2.state[p]['m'], opt.state[p]['m']) and opt2.state[p]['step'] == 1

"""what only a GPU can show (skipped without one; gpu_check.sh runs it): captured decode graphs equal the slow
path, captures survive a concurrent training thread, the overlapped stream path learns nothing from a race, packed
rows through torch's variable-length flash kernel score as padded ones.

    python -m pytest tests/test_cuda.py -q      # on a CUDA machine
"""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import data
import engine
import train
from test_engine import TOK, prompts, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gen(m, kind, seed=0, **kw):
    kw = dict(dict(n_samples=4, max_new_tokens=24, temperature=0.7, top_p=0.9, eos_ids=list(range(0, 256, 16)),
                   stop_strings=['e'], tok=TOK, pad_id=0), **kw)
    return engine.generate(m, prompts(), generator=torch.Generator('cuda').manual_seed(seed), engine=kind, **kw)


@pytest.mark.parametrize('amp', [False, True])
def test_packed_rows_through_the_varlen_kernel_score_as_padded_ones(amp):
    """fsdp2's bf16 parameters (amp False: a bf16 model), or fp32 master weights under bf16 autocast (one gpu, whose
    rope leaves q and k fp32): log-probs and the gradient of a packed row through use_varlen against the padded
    batch through sdpa, to bf16's rounding"""
    torch.manual_seed(0)
    m = tiny().cuda().to(torch.float32 if amp else torch.bfloat16).train()
    ps = [p for p in prompts() for _ in range(2)]
    comps = [torch.randint(3, 200, (n,)).tolist() for n in (5, 17, 9, 30, 1, 12)]
    ctx = lambda: torch.autocast('cuda', torch.bfloat16, enabled=amp)

    def scored(packed):
        m.zero_grad(set_to_none=True)
        ids, attn, cm, pk = data.collate_packed(ps, comps) if packed else data.collate_rl(ps, comps, 0) + (None,)
        with ctx():
            lp = train.token_logprobs(m, ids.cuda(), attn.cuda(), cm.shape[1], vocab=TOK.n_vocab,
                                      packed=pk and train.to_device(pk, 'cuda'))
        (-(lp * cm.cuda()).sum()).backward()
        return lp.float() * cm.cuda(), m.model.layers[0].self_attn.q_proj.weight.grad.float().clone()
    want, g = scored(False)
    train.use_varlen(m)
    got, g2 = scored(True)
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)
    assert (g2 - g).norm() < 0.05 * g.norm(), ((g2 - g).norm(), g.norm())


def test_captured_buckets_equal_the_slow_path_fp32():
    # 3 prompts x 4 = 12 rows stop one by one: buckets 12, 8, 4, 2, 1 each captured and replayed
    m = tiny().cuda()
    a, b = gen(m, 'static'), gen(m, 'hf')
    assert len(set(a['mask'].sum(-1).tolist())) >= 3
    assert torch.equal(a['ids'], b['ids']) and torch.equal(a['mask'], b['mask'])
    torch.testing.assert_close(a['logprobs'], b['logprobs'], rtol=0, atol=1e-3)


def test_run_ahead_on_graphs_draws_the_tokens_of_the_synchronous_loop():
    # the default on cuda: the pinned read-back of step t overlaps the replay of step t+1, a bucket changes a step late
    m = tiny().cuda()
    a, b = gen(m, 'static', run_ahead=True), gen(m, 'static', run_ahead=False)
    assert len(set(a['mask'].sum(-1).tolist())) >= 3
    assert all(torch.equal(a[k], b[k]) for k in ('ids', 'mask', 'truncated'))
    torch.testing.assert_close(a['logprobs'], b['logprobs'], rtol=0, atol=1e-3)


def test_a_kept_cache_captures_each_bucket_once_and_decodes_as_a_fresh_one():
    # the overlap's KVCache, kept for the run over weights that keep their addresses: a second rollout (other
    # seed, fewer prompts, a window wider than its prompts) replays the graphs the first captured, and draws what a
    # fresh cache draws; refreshing the weights in place keeps them; autocast's casts do not
    m = tiny().cuda()
    kv = engine.KVCache(rows=12, prompt_len=max(map(len, prompts())) + 3)
    first = gen(m, 'static', kv=kv)
    assert torch.equal(first['ids'], gen(m, 'static')['ids'])
    graphs = dict(kv.graphs)
    assert len(graphs) >= 3
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)  # the refresh: new values, same addresses
    ps = prompts()[1:]
    fresh = engine.generate(m, ps, generator=torch.Generator('cuda').manual_seed(5), engine='static', n_samples=4,
                            max_new_tokens=24, temperature=0.7, top_p=0.9, eos_ids=list(range(0, 256, 16)),
                            stop_strings=['e'], tok=TOK, pad_id=0)
    kept = engine.generate(m, ps, generator=torch.Generator('cuda').manual_seed(5), engine='static', n_samples=4,
                           max_new_tokens=24, temperature=0.7, top_p=0.9, eos_ids=list(range(0, 256, 16)),
                           stop_strings=['e'], tok=TOK, pad_id=0, kv=kv)
    assert torch.equal(kept['ids'], fresh['ids']) and torch.equal(kept['mask'], fresh['mask'])
    torch.testing.assert_close(kept['logprobs'], fresh['logprobs'], rtol=0, atol=1e-3)
    assert all(kv.graphs[b] is g for b, g in graphs.items() if b in kv.graphs) and kv.graphs.keys() & graphs.keys()
    m32 = tiny().cuda()
    with torch.autocast('cuda', torch.bfloat16):
        gen(m32, 'static', kv=kv)
        g1 = dict(kv.graphs)
        gen(m32, 'static', kv=kv)
    assert not any(kv.graphs.get(b) is g for b, g in g1.items())  # never kept over casts: each rollout's are new
    infer = train.inference_copy(m32, 'cuda', bf16=False, amp=True)  # one gpu's copy stores bf16 Linear weights
    with torch.autocast('cuda', torch.bfloat16):
        gen(infer, 'static', kv=kv)
        g2 = dict(kv.graphs)
        gen(infer, 'static', kv=kv)
    assert g2 and all(kv.graphs.get(b) is g for b, g in g2.items())  # the same seed visits the same buckets


def test_captured_decode_under_autocast_matches_a_full_forward():
    # the single-gpu path: fp32 weights under bf16 autocast; the engine's log-probs vs the trainer's forward
    m = tiny().cuda()
    with torch.autocast('cuda', torch.bfloat16):
        out = gen(m, 'static')
        L = out['mask'].sum(-1).long().tolist()
        comps = [out['ids'][r, :n].tolist() for r, n in enumerate(L)]
        ids, attn, cm = data.collate_rl([p for p in prompts() for _ in range(4)], comps, 0)
        with torch.no_grad():
            full = train.token_logprobs(m, ids.cuda(), attn.cuda(), cm.shape[1], 0.7, vocab=TOK.n_vocab)
    d = ((full - out['logprobs'][:, :cm.shape[1]]).abs() * cm.cuda()).sum() / cm.sum()
    assert d < 0.05, f"mean |dlogp| {d:.3g}"


def test_capture_while_another_thread_trains():
    # overlap: the rollout thread captures graphs on its stream while the main thread allocates, computes, syncs
    m, pol = tiny().cuda(), tiny(seed=1).cuda().train()
    want = gen(m, 'static')
    stop, res = threading.Event(), {}

    def roll():
        with torch.cuda.stream(torch.cuda.Stream()):
            res['out'] = gen(m, 'static')
        stop.set()
    th = threading.Thread(target=roll)
    th.start()
    ids = torch.randint(0, 256, (8, 64), device='cuda')
    while not stop.is_set():
        lp = train.token_logprobs(pol, ids, torch.ones_like(ids), 32, vocab=TOK.n_vocab)
        (-lp.mean()).backward()
        lp.sum().item()  # a host sync in the training thread during the other's capture
    th.join()
    assert torch.equal(res['out']['ids'], want['ids'])


@pytest.mark.parametrize('nproc', [0, 1])
def test_overlap_stream_path_at_lr0(tmp_path, nproc):
    # the bf16 inference copy decodes as the fp32-under-autocast policy up to bf16 rounding: rewards may differ by a
    # few samples, so this checks the run, the staleness it logs, and that it is small at lr 0
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc else [])
    args = ['train.py', 'config/tiny.py', '--device=cuda', '--mode=dapo', '--max_iters=3', '--batch_size=4',
            '--overlong=soft', '--overlong_buffer=40', '--learning_rate=0', '--min_lr=0', '--overlap=True',
            f'--out_dir={tmp_path}']
    p = subprocess.run(launch + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ms = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [m['step'] for m in ms] == [1, 2, 3] and all(m['log_ratio'] < 0.05 for m in ms), ms


@pytest.mark.parametrize('mode', ['sft', 'dapo'])
def test_memory_plan_matches_max_memory_allocated_at_3b(mode):
    """bench.py's planner against torch.cuda.max_memory_allocated: a Qwen2.5-3B-shaped model on one gpu (fp32 master
    weights under bf16 autocast, bf16 adam moments, checkpointing), two micro-batches then the optimizer step"""
    import bench
    from test_memory import cfg_of, measured_step, qwen3b
    cfg = cfg_of(mode=mode, batch_size=4 if mode == 'sft' else 1, group_size=4, micro_batch_size=2, max_seq_len=1024,
                 max_new_tokens=512, master_dtype='fp32', optim_dtype='bf16', activation_checkpointing=True, overlap=False)
    got = measured_step(qwen3b(), cfg, 'cuda', prompt_len=256)[2]
    plan = bench.plan_memory(cfg, 1, qwen3b(), 141 * 2 ** 30, prompt_len=256)
    want = plan['peaks']['rl update' if mode == 'dapo' else 'sft step']
    with open(os.path.join(os.environ.get('OUT', '/tmp'), 'memory_check.txt'), 'a') as f:
        f.write(f"{mode}: max_memory_allocated {got / 2 ** 30:.2f} GiB | planned {want / 2 ** 30:.2f} GiB | "
                f"error {100 * (want / got - 1):+.1f}%\n")
    assert abs(want / got - 1) < 0.15, (want / 2 ** 30, got / 2 ** 30)


@pytest.mark.parametrize('T', [192, 320])  # T % 128 == 64: where cudnn's attention returned NaN grad_q
def test_padded_backward_is_finite_at_the_lengths_cudnn_broke(T):
    """train.py's attention choice, a Qwen2.5-shaped head (128), left-padded rows of which one is almost all padding,
    under bf16 autocast: every gradient finite."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    train.choose_sdpa()
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)).cuda()
    ids = torch.randint(0, 512, (4, T), device='cuda')
    attn = torch.ones_like(ids)
    attn[1, :T // 2], attn[2, :T - 3], attn[3, :1] = 0, 0, 0
    with torch.autocast('cuda', torch.bfloat16):
        lp = train.token_logprobs(m, ids, attn, 32)
    (lp * attn[:, -32:]).sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in m.parameters())

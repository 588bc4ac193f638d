"""fast decode: decode_step equals the HF forward, greedy equals model.generate, static equals the slow engine,
compaction equals running rows alone, sampling log-probs equal a full forward, FSDP2 (2 ranks) equals unwrapped.

    python -m pytest tests/test_decode.py -q
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
import bench  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402

TOK = data.Tokenizer.bytes_level()
EOS = TOK.token_id('<|endoftext|>')
PROMPTS = ['12 + 34 = ?\n', 'hi', '<think>a longer prompt, with <answer> tags and more words']
FAMILIES = ('qwen2', 'llama', 'qwen2-yarn')


def tiny(family='qwen2', std=0.5, seed=0):
    """2 layers, GQA 4/2. qwen2: tied, q/k/v biases. llama: untied, head_dim 32 != 64/4, all biases, llama3 rope.
    qwen2-yarn: attention_scaling != 1. weights (biases, norms too) large enough that outputs depend on the prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    if family == 'llama':
        rope = dict(rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
        m = LlamaForCausalLM(LlamaConfig(**kw, head_dim=32, attention_bias=True, mlp_bias=True,
                                         tie_word_embeddings=False, rope_parameters=rope))
    else:
        rope = dict(rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
        m = Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True,
                                         **({'rope_parameters': rope} if family == 'qwen2-yarn' else {})))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if 'norm' in n else 0.0, 0.2 if 'norm' in n else std, generator=g)
    return m.eval()


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    torch.set_num_threads(1)  # 2 shared cores; tiny matmuls gain nothing from threads


def prompts():
    return [TOK.encode(p) for p in PROMPTS]


def gen(m, kind='static', n_samples=1, max_new_tokens=12, temperature=0.0, top_p=1.0, eos_ids=(EOS,),
        stop_strings=(), seed=0, ps=None):
    return engine.generate(m, ps or prompts(), n_samples=n_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_ids=list(eos_ids), stop_strings=list(stop_strings),
                       tok=TOK, pad_id=EOS, generator=torch.Generator().manual_seed(seed), engine=kind)


def lengths(out):
    return out['mask'].sum(-1).long().tolist()


def prefill(m, ps):
    from transformers import DynamicCache
    P = max(map(len, ps))
    ids = torch.tensor([[EOS] * (P - len(p)) + p for p in ps])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ps])
    cache = DynamicCache(config=m.config)
    m(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0), cache=cache)
    return cache, attn


# -----------------------------------------------------------------------------
# decode_step and the static cache == the HF forward


@pytest.mark.parametrize('kept', [False, True], ids=['own', 'kept'])
@pytest.mark.parametrize('buckets', [None, engine.BUCKETS], ids=['exact', 'buckets'])
@pytest.mark.parametrize('family', FAMILIES)
@torch.no_grad()
def test_static_engine_logits_equal_full_forward(family, buckets, kept):
    # 3 left-padded prompts x G=2, teacher-forced random tokens; rows leave at steps 2, 3 and 4; every live row's
    # logits vs a full unpadded forward of that row alone. exact: compaction at every stop (the CPU default).
    # buckets (the CUDA policy, run eagerly here): 6 -> 4 rows (moves one row), 3 live in 4 (one padded row),
    # then 2 (moves both). kept: the overlap's KVCache, kept for the run, after another rollout filled it (5 rows in
    # 8, so dead rows with buckets) and left a nan in a column the next rollout masks (a masked nan still spreads)
    m, g, G, T = tiny(family, std=0.2), torch.Generator().manual_seed(0), 2, 6
    kv = None
    if kept:
        kv = engine.KVCache(rows=8, prompt_len=11)
        other = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 9, 3, 5, 8)]
        fill = engine.static_engine(m, *prefill(m, other), 1, T, buckets, kv=kv)
        for _ in range(T - 1):
            fill(torch.randint(0, 256, (5,), generator=g), None)
        kv.K[:, :, :, 0], kv.V[:, :, :, 0] = float('nan'), float('nan')
    ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 4, 2)]
    cache, attn = prefill(m, ps)
    advance = engine.static_engine(m, cache, attn, G, T, buckets, kv=kv)
    live, fed = list(range(len(ps) * G)), [[] for _ in range(len(ps) * G)]
    drop, worst = {2: {1, 4}, 3: {0}, 4: {5}}, 0.0
    for t in range(T - 1):
        kept = None
        if t in drop:
            kept = [k for k, r in enumerate(live) if r not in drop[t]]
            live = [live[k] for k in kept]
        nxt = torch.randint(0, 256, (len(live),), generator=g)
        for r, x in zip(live, nxt.tolist()):
            fed[r].append(x)
        got = advance(nxt, kept)  # (n, V) fp32
        assert got.shape == (len(live), m.config.vocab_size) and got.isfinite().all()  # max() below skips a nan
        for k, r in enumerate(live):
            want = m(input_ids=torch.tensor([ps[r // G] + fed[r]])).logits[0, -1]
            worst = max(worst, (got[k] - want).abs().max().item())
    assert live == [2, 3] and worst < 2e-5, worst


def test_decode_step_makes_no_host_reads():
    # on CUDA each of these is a device-to-host sync, illegal inside graph capture (DECODE-NOTES section 2)
    m, N, S, D = tiny(), 3, 10, 16
    K, V = torch.zeros(2, N, 2, S, D), torch.zeros(2, N, 2, S, D)
    valid = torch.zeros(N, S, dtype=torch.bool)
    valid[:, 3:6] = True
    with torch.no_grad(), torch.profiler.profile() as prof:
        engine.decode_step(m, torch.tensor([5, 6, 7]), torch.tensor([3, 2, 4]), torch.tensor(5), K, V, valid)
    names = {e.name for e in prof.events()}
    assert 'aten::index_copy_' in names and not names & {'aten::item', 'aten::_local_scalar_dense', 'aten::is_nonzero'}
    assert K[:, :, :, 5].abs().sum() > 0 and K[:, :, :, :5].abs().sum() == 0  # wrote its slot, nothing else


# -----------------------------------------------------------------------------
# greedy == model.generate; static == hf engine == engine.generate


@pytest.mark.parametrize('family', FAMILIES[:2])
def test_greedy_matches_hf_generate(family):
    m, n_new, G = tiny(family), 16, 2
    free = gen(m, eos_ids=[], max_new_tokens=n_new)
    stop = free['ids'][1, 4].item()  # one row produces it early, so rows stop at different steps
    ours = gen(m, eos_ids=[stop], max_new_tokens=n_new, n_samples=G)
    L = lengths(ours)
    assert min(L) < n_new and max(L) == n_new, L
    P = max(map(len, prompts()))
    ids = torch.tensor([[stop] * (P - len(p)) + p for p in prompts()])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts()])
    hf = m.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=n_new, eos_token_id=stop,
                    pad_token_id=stop, suppress_tokens=list(range(TOK.n_vocab, m.config.vocab_size)))[:, P:]
    for r, n in enumerate(L):
        assert ours['ids'][r, :n].tolist() == hf[r // G, :n].tolist(), r
        assert n == n_new or ours['ids'][r, n - 1].item() == stop


@pytest.mark.parametrize('family', FAMILIES[:2])
def test_static_equals_hf_engine_sampling(family):
    # T 0.7, top-p 0.9, G 3, eos ids and stop strings: same random numbers drawn, so the same tokens
    m = tiny(family)
    free = gen(m, eos_ids=[], n_samples=3, temperature=0.7, top_p=0.9, seed=3)
    stops = sorted({chr(x) for x in free['ids'][:, 2:6].flatten().tolist() if 33 <= x < 127})[:3]
    kw = dict(n_samples=3, temperature=0.7, top_p=0.9, eos_ids=range(0, 256, 16), stop_strings=stops, seed=3)
    a, b = gen(m, 'static', **kw), gen(m, 'hf', **kw)
    L = lengths(a)
    assert len(set(L)) >= 3 and any(TOK.decode(a['ids'][r, n - 1:n].tolist()) in stops for r, n in enumerate(L)), L
    assert torch.equal(a['ids'], b['ids']) and torch.equal(a['mask'], b['mask'])
    assert torch.equal(a['truncated'], b['truncated'])
    torch.testing.assert_close(a['logprobs'], b['logprobs'], rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# compaction: rows that stop one by one == each row alone


def test_compaction_equals_rows_alone():
    m = tiny()
    eos = list(range(0, 256, 6))
    batch = gen(m, eos_ids=eos, max_new_tokens=14)
    L = lengths(batch)
    assert len(set(L)) == 3, L  # three rows, three different stop steps
    for i, p in enumerate(prompts()):
        alone = gen(m, eos_ids=eos, max_new_tokens=14, ps=[p])
        assert torch.equal(alone['ids'][0], batch['ids'][i]) and torch.equal(alone['mask'][0], batch['mask'][i])
        torch.testing.assert_close(alone['logprobs'][0], batch['logprobs'][i], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# sampling log-probs == a full forward over the finished sequences


@pytest.mark.parametrize('temperature,top_p', [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_logprobs_equal_full_forward(temperature, top_p):
    m = tiny()
    out = gen(m, n_samples=3, max_new_tokens=10, temperature=temperature, top_p=top_p, eos_ids=range(0, 256, 8),
              seed=1)
    L = lengths(out)
    assert len(set(L)) >= 3 and min(L) < 10, L
    comps = [out['ids'][r, :n].tolist() for r, n in enumerate(L)]
    ids, attn, cm = data.collate_rl([p for p in prompts() for _ in range(3)], comps, EOS)
    with torch.no_grad():
        full = train.token_logprobs(m, ids, attn, cm.shape[1], temperature, 4, vocab=TOK.n_vocab)
    C = cm.shape[1]
    assert torch.equal(cm.bool(), out['mask'][:, :C]) and (out['logprobs'][:, C:] == 0).all()
    assert (full * cm - out['logprobs'][:, :C]).abs().max() < 1e-4
    assert out['logprobs'][out['mask']].lt(0).all()


def test_oov_ids_never_sampled():
    m = tiny(seed=1)
    with torch.no_grad():
        m.model.embed_tokens.weight[TOK.n_vocab:] *= 100  # tied: without the mask these rows would win
    out = gen(m, n_samples=20, max_new_tokens=4, temperature=1.0)
    assert (out['ids'] < TOK.n_vocab).all() and torch.isfinite(out['logprobs']).all()


# -----------------------------------------------------------------------------
# bandwidth share (bench.py)


def test_bandwidth_share_qwen25_3b_by_hand():
    from transformers import Qwen2Config
    cfg = Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    w, kv = bench.decode_bytes(cfg)
    # per layer: q 2048*2048+2048, k and v 2048*256+256 each, o 2048*2048, mlp 3*2048*11008, norms 2*2048
    # = 77,076,992; x36 + final norm 2048 = 2,774,773,760; + lm_head 151936*2048 = 311,164,928 -> 3,085,938,688
    assert w == 3_085_938_688 * 2 and kv == 36 * 2 * 2 * 128 * 2 == 36_864
    # 128 rows x 512 slots x 36,864 B = 2,415,919,104; + weights = 8,587,796,480 B per step; 3400/128 = 26.5625 steps/s
    share = bench.bandwidth_share(3400, 128, 512, w, kv, bench.PEAK_BW['H200'])
    assert share == pytest.approx(8_587_796_480 * 26.5625 / 4.8e12, rel=1e-12) and round(share, 4) == 0.0475


@pytest.mark.parametrize('family', FAMILIES[:2])
def test_decode_bytes_count_the_model(family):
    # every parameter but the input embedding (tied: the lm_head reads the same matrix, so it counts once)
    m = tiny(family)
    n = sum(p.numel() for p in m.parameters())
    read = n if m.config.tie_word_embeddings else n - m.model.embed_tokens.weight.numel()
    kv = 2 * 2 * m.config.num_key_value_heads * m.model.layers[0].self_attn.head_dim * 4  # 2 layers, K and V, fp32
    assert bench.decode_bytes(m.config, 4) == (read * 4, kv)


# -----------------------------------------------------------------------------
# FSDP2, 2 ranks (gloo): gathered() leaves the unsharded weights on the submodules the decode step calls

WORKER = r'''
import copy, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
sys.path.insert(0, REPO); sys.path.insert(0, HERE)
import train, test_decode as t

torch.set_num_threads(1)
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
ref = t.tiny()  # same seed on every rank
model = train.shard(copy.deepcopy(ref), init_device_mesh('cpu', (world,)), None)
ps = t.prompts()[rank:] + t.prompts()[:rank]  # each rank its own batch: rows stop at different steps per rank
kw = dict(n_samples=2, max_new_tokens=10, temperature=0.8, top_p=0.9, eos_ids=range(0, 256, 8), ps=ps, seed=rank)
with train.gathered(model):
    w = model.model.layers[0].self_attn.q_proj.weight
    assert not isinstance(w, DTensor) and w.shape == ref.model.layers[0].self_attn.q_proj.weight.shape
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one unsharded tensor on both
    outs = [t.gen(model, e, **kw) for e in ('static', 'hf')]
assert isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor)  # resharded after the rollout
want = t.gen(ref, 'static', **kw)
for got, atol in zip(outs, (1e-6, 1e-4)):  # static: the same ops on the same weights; hf: other kernels
    assert all(torch.equal(got[k], want[k]) for k in ('ids', 'mask', 'truncated')), rank
    torch.testing.assert_close(got['logprobs'], want['logprobs'], rtol=0, atol=atol)
print(f'rank {rank} ok lengths {want["mask"].sum(-1).long().tolist()}')
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp_static_decode_equals_unwrapped(tmp_path):
    script = tmp_path / 'fsdp_decode_worker.py'
    script.write_text(f'HERE, REPO = {HERE!r}, {REPO!r}\n' + WORKER)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script)], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count(' ok ') == 2, p.stdout

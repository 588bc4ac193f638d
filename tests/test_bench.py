"""bench.py's train-step flops, the bytes a decode step reads and their share of the bandwidth limit, its rl phase
breakdown, and the fields its rollout and overlap benches print (the memory planner: tests/test_memory.py). timings
are machine-dependent: no test passes or fails on one."""
import re

import pytest
import torch

import bench
import train
from conftest import in_process
from test_engine import FAMILIES, tiny


def bench_main(args: list[str]) -> str:
    """what `python bench.py args` prints from the repo root, run in this process."""
    p = in_process(args, main=bench.main)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_model_flops_by_hand():
    # qwen2.5-3b at 1024 tokens: 6 x 3,085,938,688 + 6 x 36 layers x 2048 x 1024
    assert bench.model_flops(3_085_938_688, 36, 2048, 1024) == 18_515_632_128 + 452_984_832
    assert bench.model_flops(10, 1, 4, 8) == 60 + 192


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


def test_rl_phases_cover_the_step():
    """every phase of a grpo step is timed: the phases add up to the step but for a small remainder, each >= 0; and the
    steps' train/infer gap"""
    p = bench_main(['--rl', 'config/tiny.py', '--mode=grpo', '--max_iters=3', '--batch_size=2', '--group_size=2',
                    '--max_new_tokens=16', '--device=cpu'])
    step = float(re.search(r'mean of 2 steps: (\d+) ms', p).group(1))
    ms = {k: float(v) for k, v in re.findall(r'^  (.+?)\s+(-?[\d.]+) ms', p, re.M)}
    assert list(ms) == list(bench.RL_PHASES) + ['other'], p
    assert all(ms[k] >= 0 for k in bench.RL_PHASES)
    assert ms['rollout'] > 0 and ms['update (loss, backward)'] > 0 and ms['log-probs (old, reference)'] > 0
    assert abs(sum(ms.values()) - step) <= 1 + 0.05 * len(ms)  # printed to 0.1 ms, the step to 1 ms
    assert abs(ms['other']) < 0.2 * step, ms  # a phase left out of the breakdown would show up here
    gap = re.search(r'train/infer gap \|log pi_trainer - log pi_engine\|: mean ([\d.e+-]+), max ([\d.e+-]+)$', p, re.M)
    assert gap and 0 <= float(gap[1]) <= float(gap[2]) < 1e-4, p  # fp32 on both sides: ~1e-7


def test_rollout_prints_sampling_share():
    """the rollout bench times engine.sample on the rollout's (N, V) logits against its decode step"""
    p = bench_main(['--device', 'cpu', '--skip', 'train', '--repeats', '1', '--prompts', '2', '--group_size', '3',
                    '--new_tokens', '8'])
    m = re.search(r'sampling \(engine\.sample on (\d+) x (\d+) fp32 logits\): ([\d.]+) ms/step \| decode step ([\d.]+) '
                  r'ms \| ([\d.]+)% of the step', p)
    assert m, p
    assert (int(m[1]), int(m[2])) == (6, 320)  # prompts x group_size rows, the tiny model's embedding rows
    assert 0 < float(m[3]) / float(m[4]) < 1


def test_train_step_on_a_cpu_times_bf16_autocast_against_fp32():
    """the same step twice in one process, fp32 then under bf16 autocast, and which one autocast = 'auto' picks here:
    fp32 for the tiny model whatever the cpu (its matmuls are too small for the casts to pay)"""
    p = bench_main(['--device', 'cpu', '--skip', 'rollout', '--repeats', '1', '--micro_batch', '1', '--seq_len', '16',
                    '--accum', '2'])
    m = re.search(r'under cpu bf16 autocast: \d+ tok/s \| \d+ ms \| ([\d.]+)x fp32 \| bf16 matrix units \(amx, '
                  r'avx512-bf16\): (yes|no) \| autocast = .auto. picks (fp32|bf16)', p)
    assert m and float(m[1]) > 0, p
    assert (m[2] == 'yes') == train.cpu_bf16_units() and m[3] == 'fp32', p


def test_overlap_prints_decode_tok_s_and_bandwidth_share():
    """bench.py --overlap reports each side's rollout decode tok/s and, with --card, its share of the bandwidth limit"""
    p = bench_main(['--repeats', '1', '--card', 'H200', '--overlap', 'config/tiny.py', '--mode=dr_grpo', '--max_iters=3',
                    '--batch_size=2', '--group_size=2', '--max_new_tokens=16', '--device=cpu'])
    for side in ('sequential', 'overlapped'):
        m = re.search(rf'rollout decode, {side}: ([\d.]+) tok/s \(4 rows x len_mean / t_rollout\) \| ([\d.]+)% of the '
                      r'memory-bandwidth limit', p)
        assert m, p  # a number: not nan, so every step's rollout was counted
        assert 0 <= float(m[2]) < 100  # a 1M model on the cpu: a share that rounds to 0.0%
    # the same cores on both sides: half the threads a side overlapped (at least one), both halves sequential
    side = max(1, torch.get_num_threads() // 2)
    assert f'intra-op threads: sequential {2 * side}, overlapped {side} a side' in p, p


def test_update_prints_each_cut_and_packing_pads_nothing():
    """bench.py --update: the same sequences (random lengths 20-60 after 64-token prompts) through the update cut in
    data order and by a token budget, padded and packed; the budget's padding is lower, packing's none, each line names
    its micro-batches"""
    out = bench_main(['--repeats', '1', '--update', 'config/tiny.py', '--mode=dr_grpo', '--batch_size=2', '--group_size=4',
                      '--micro_batch_size=2', '--max_new_tokens=8', '--spread', '20-60'])
    assert '8 sequences of' in out, out
    pad = {k: float(v) for k, v in re.findall(r'^  (data order|by length, m|by length, p).*padding x([\d.]+)$', out, re.M)}
    assert set(pad) == {'data order', 'by length, m', 'by length, p'}, out
    assert pad['by length, p'] == 1 <= pad['by length, m'] < pad['data order'], out  # packed: no padding at all
    assert re.search(r'micro_batch_tokens \d+ ', out), out
    assert re.search(r'^  ratio to data order: grouped [\d.]+x, packed [\d.]+x$', out, re.M), out

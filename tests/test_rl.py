"""RL core: advantages, the clipped policy loss (value and gradient, by hand), step-wide normalisation across
micro-batches and ranks, the step's statistics, dynamic sampling, overlong shaping, short runs of every mode on the tiny
config, and grpo's reference.

    python -m pytest tests/test_rl.py -q              # everything (the 2-rank tests are marked slow)
    python -m pytest tests/test_rl.py -q -m 'not slow'
"""
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from conftest import in_process  # noqa: E402

MODES = ('grpo', 'dr_grpo', 'dapo')


def k3(d: float) -> float:
    return math.exp(d) - d - 1


# -----------------------------------------------------------------------------
# advantages


def test_advantages_by_hand():
    # three groups of G=3
    #   [0, 1, 2]: mean 1, deviations (-1, 0, 1), sample var (1 + 0 + 1) / 2 = 1, std 1
    #   [5, 5, 5]: constant -> 0 in every mode
    #   [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), sample var (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.5773503
    r = torch.tensor([0., 1., 2., 5., 5., 5., 1., 0., 0.])
    s3 = 0.5773502691896258 + 1e-4
    want = torch.tensor([-1 / 1.0001, 0., 1 / 1.0001, 0., 0., 0., (2 / 3) / s3, (-1 / 3) / s3, (-1 / 3) / s3])
    for mode in ('grpo', 'dapo'):
        got = train.compute_advantages(r, 3, mode=mode)
        assert got.shape == (9,)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got = train.compute_advantages(r, 3, mode='dr_grpo')  # no std: just r - mean
    torch.testing.assert_close(got, torch.tensor([-1., 0., 1., 0., 0., 0., 2 / 3, -1 / 3, -1 / 3]), rtol=0, atol=1e-6)


def test_advantages_unbiased_std_and_eps():
    # G=2, [0, 1]: mean .5, sample std sqrt((.25 + .25) / 1) = 0.7071068 (the population std would give 0.5)
    got = train.compute_advantages(torch.tensor([0., 1.]), 2, mode='grpo')
    torch.testing.assert_close(got, torch.tensor([-0.5, 0.5]) / (0.7071067811865476 + 1e-4), rtol=0, atol=1e-6)
    # tiny spread: the +1e-4 keeps it bounded: (1e-6 / 2) / (0.7071e-6 + 1e-4) = 5e-7 / 1.007071e-4 = 0.0049649
    got = train.compute_advantages(torch.tensor([0., 1e-6]), 2, mode='dapo')
    torch.testing.assert_close(got, torch.tensor([-0.0049649, 0.0049649]), rtol=1e-3, atol=0)


@pytest.mark.parametrize('mode', MODES)
def test_advantages_groups_independent(mode):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(4 * 5, generator=g)
    base = train.compute_advantages(r, 5, mode=mode)
    r2 = r.clone()
    r2[5:10] = torch.tensor([9., -3., 0., 0., 100.])  # change group 1 only
    got = train.compute_advantages(r2, 5, mode=mode)
    keep = torch.ones(20, dtype=torch.bool)
    keep[5:10] = False
    assert torch.equal(got[keep], base[keep])
    assert not torch.allclose(got[5:10], base[5:10])
    assert got.view(4, 5).sum(-1).abs().max() < 1e-5  # centred per group


# -----------------------------------------------------------------------------
# policy loss on a (2, 3) example, value and gradient by hand
#
# mask [[1,1,1],[1,1,0]]: sequence 1 has one padding position
# ratios r = exp(logp - old): [[1.5, 0.5, 1.1], [0.7, 1.25, pad]], advantages A = [1, -2]
# token loss l = -min(r A, clip(r, 1-eps_low, 1+eps_high) A), eps 0.2/0.2:
#   seq 0 (A=1):  r=1.5 -> min(1.5, 1.2) = 1.2, l = -1.2 (clipped high: zero grad)
#                 r=0.5 -> min(0.5, 0.8) = 0.5, l = -0.5 (below 1-eps but A>0: not clipped, grad flows)
#                 r=1.1 -> l = -1.1
#   seq 1 (A=-2): r=0.7 -> min(-1.4, -1.6) = -1.6, l = 1.6 (clipped low: zero grad)
#                 r=1.25 -> min(-2.5, -2.4) = -2.5, l = 2.5 (above 1+eps but A<0: not clipped)
#   sums: seq 0 -2.8, seq 1 4.1; clip_low 1/5 tokens, clip_high 1/5 tokens
# dapo, eps_high 0.28: r=1.5 -> 1.28, l = -1.28; r=1.25 is now inside: still l = 2.5; sums -2.88, 4.1
# grpo, beta 0.1, d = ref - logp = [[.5, -.5, 0], [1, -1, pad]]; k3(d) = e^d - d - 1:
#   k3(.5) = 0.1487213, k3(-.5) = 0.1065307, k3(0) = 0, k3(1) = 0.7182818, k3(-1) = 0.3678794
# gradient w.r.t. logp: unclipped -A r, clipped 0; kl beta (1 - e^d)

LOGP = [[-1.0, -2.0, -0.5], [-1.5, -0.3, 1e4]]  # 1e4: garbage at the padding position
RATIO = [[1.5, 0.5, 1.1], [0.7, 1.25, 1.0]]
D_REF = [[0.5, -0.5, 0.0], [1.0, -1.0, 0.0]]
MASK = [[1., 1., 1.], [1., 1., 0.]]


def example(garbage_old=-3e4, garbage_ref=-1e4):
    logp = torch.tensor(LOGP, requires_grad=True)
    old = torch.tensor(LOGP) - torch.tensor(RATIO).log()
    ref = torch.tensor(LOGP) + torch.tensor(D_REF)
    old[1, 2], ref[1, 2] = garbage_old, garbage_ref
    return logp, old, torch.tensor([1.0, -2.0]), torch.tensor(MASK), ref


def test_policy_loss_grpo_by_hand():
    logp, old, A, mask, ref = example()
    loss, st = train.policy_loss(logp, old, A, mask, mode='grpo', ref_logprobs=ref, beta=0.1)
    # seq 0: (-2.8 + 0.1 (0.1487213 + 0.1065307 + 0)) / 3 = -0.9248249
    # seq 1: (4.1 + 0.1 (0.7182818 + 0.3678794)) / 2 = 2.1043081; mean over the 2 sequences: 0.5897416
    assert loss.item() == pytest.approx(0.5897415639, abs=1e-6)
    assert st['clip_low'].item() == pytest.approx(1 / 5) and st['clip_high'].item() == pytest.approx(1 / 5)
    # mean k3 over the 5 real tokens: (0.1487213 + 0.1065307 + 0 + 0.7182818 + 0.3678794) / 5 = 0.2682826
    assert st['kl'].item() == pytest.approx(0.2682826, abs=1e-6)
    loss.backward()
    # d/dlogp = (-A r [0 if clipped] + beta (1 - e^d)) / len_i / B
    want = [[0.1 * (1 - math.exp(0.5)) / 6,  # clipped: kl only -> -0.0108120
             (-0.5 + 0.1 * (1 - math.exp(-0.5))) / 6,  # -0.0767755
             -1.1 / 6],  # -0.1833333
            [0.1 * (1 - math.e) / 4,  # clipped: kl only -> -0.0429570
             (2.5 + 0.1 * (1 - math.exp(-1))) / 4,  # 0.6408030
             0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(want), rtol=0, atol=1e-6)
    assert logp.grad[1, 2].item() == 0.0


def test_policy_loss_grpo_without_kl():
    logp, old, A, mask, ref = example()
    loss, st = train.policy_loss(logp, old, A, mask, mode='grpo')  # beta 0: no reference needed
    assert loss.item() == pytest.approx((-2.8 / 3 + 4.1 / 2) / 2, abs=1e-6)  # 0.5583333
    loss.backward()
    want = [[0.0, -0.5 / 6, -1.1 / 6], [0.0, 2.5 / 4, 0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize('max_len', [3, 4])
def test_policy_loss_dr_grpo_by_hand(max_len):
    logp, old, A, mask, ref = example()
    loss, st = train.policy_loss(logp, old, A, mask, mode='dr_grpo', max_len=max_len)
    # (-2.8 + 4.1) / (B x max_len) = 1.3 / 6 = 0.2166667 (max_len 3) or 1.3 / 8 = 0.1625 (max_len 4)
    assert loss.item() == pytest.approx(1.3 / (2 * max_len), abs=1e-6)
    assert 'kl' not in st  # no reference in dr_grpo
    assert st['clip_low'].item() == pytest.approx(0.2) and st['clip_high'].item() == pytest.approx(0.2)
    loss.backward()
    want = torch.tensor([[0.0, -0.5, -1.1], [0.0, 2.5, 0.0]]) / (2 * max_len)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-6)


def test_policy_loss_dapo_by_hand():
    logp, old, A, mask, ref = example()
    loss, st = train.policy_loss(logp, old, A, mask, mode='dapo', eps_low=0.2, eps_high=0.28)
    # (-1.28 - 0.5 - 1.1 + 1.6 + 2.5) / 5 tokens = 1.22 / 5 = 0.244
    assert loss.item() == pytest.approx(0.244, abs=1e-6)
    assert st['clip_low'].item() == pytest.approx(0.2) and st['clip_high'].item() == pytest.approx(0.2)
    loss.backward()
    want = torch.tensor([[0.0, -0.5, -1.1], [0.0, 2.5, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-6)


def test_tis_weights_scale_the_surrogate_not_the_kl():
    """truncated importance sampling by hand: ratio 1, A = +1 on two tokens weighted 0.5 and 2."""
    lp, w, mask, A = torch.zeros(1, 2, requires_grad=True), torch.tensor([[0.5, 2.0]]), torch.ones(1, 2), torch.ones(1)
    loss, _ = train.policy_loss(lp, lp.detach(), A, mask, mode='dapo', is_weights=w)
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)  # -A * w per token, over 2 tokens
    loss.backward()
    torch.testing.assert_close(lp.grad, -w / 2)
    # grpo's kl is not weighted: ref 0.5 above the policy on token 1 gives k3 = e^0.5 - 0.5 - 1 = 0.148721
    ref = torch.tensor([[0.5, 0.0]])
    loss, st = train.policy_loss(lp, lp.detach(), A, mask, mode='grpo', ref_logprobs=ref, beta=0.1, is_weights=w)
    assert loss.item() == pytest.approx((-0.5 - 2.0 + 0.1 * 0.148721) / 2, abs=1e-6)  # one sequence: its mean


def test_policy_loss_clip_high_only_above_eps_high():
    # ratio 1.25 with A > 0: clipped with eps_high 0.2, not with 0.28
    logp = torch.zeros(1, 1)
    old = -torch.tensor([[math.log(1.25)]])
    A, mask = torch.tensor([1.0]), torch.ones(1, 1)
    _, st = train.policy_loss(logp, old, A, mask, mode='dapo', eps_high=0.2)
    assert st['clip_high'].item() == 1.0
    _, st = train.policy_loss(logp, old, A, mask, mode='dapo', eps_high=0.28)
    assert st['clip_high'].item() == 0.0


def test_clip_fractions_count_only_the_active_side():
    # a clip counts only where it cuts the gradient: low when r < 1 - eps and A < 0, high when r > 1 + eps and A > 0
    # A = (1, -1); ratios [[.5, .6, 1.5, 1.0], [.5, 1.5, 1.6, .1 (padding)]]
    #   low:  only (1, 0) -> 1 of 7 real tokens ((0, 0), (0, 1) have A > 0: the min keeps the unclipped term)
    #   high: only (0, 2) -> 1 of 7 ((1, 1), (1, 2) have A < 0)
    ratio = torch.tensor([[.5, .6, 1.5, 1.0], [.5, 1.5, 1.6, .1]])
    mask = torch.tensor([[1., 1., 1., 1.], [1., 1., 1., 0.]])
    _, st = train.policy_loss(ratio.log(), torch.zeros(2, 4), torch.tensor([1.0, -1.0]), mask, mode='dapo')
    assert st['clip_low'].item() == pytest.approx(1 / 7) and st['clip_high'].item() == pytest.approx(1 / 7)


@pytest.mark.parametrize('mode', MODES)
def test_policy_loss_norm_overrides_denominator(mode):
    logp, old, A, mask, ref = example()
    loss, _ = train.policy_loss(logp, old, A, mask, mode=mode, ref_logprobs=ref, beta=0.1, max_len=3, norm=10.0)
    # grpo: sum of the per-sequence means (with kl) / 10 = (-0.9248249 + 2.1043081) / 10
    # dr_grpo, dapo (eps_high 0.2 here): sum of token losses / 10 = 1.3 / 10
    want = {'grpo': (-0.9248249357 + 2.1043080635) / 10, 'dr_grpo': 0.13, 'dapo': 0.13}[mode]
    assert loss.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('garbage', [1e4, -1e4, 1e30])
def test_padding_gets_zero_grad_and_no_nan(mode, garbage):
    logp, old, A, mask, ref = example(garbage_old=-garbage, garbage_ref=-garbage)
    with torch.no_grad():
        logp[1, 2] = garbage
    loss, st = train.policy_loss(logp, old, A, mask, mode=mode, ref_logprobs=ref, beta=0.1, max_len=3)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in st.values())
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1, 2].item() == 0.0
    ref_loss, _ = train.policy_loss(*example()[:4], mode=mode, ref_logprobs=example()[4], beta=0.1, max_len=3)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)  # padding values do not matter


@pytest.mark.parametrize('d', [1000.0, -1000.0, 60.0])
def test_kl_overflow_guard(d):
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = logp.detach() + d  # exp(1000) = inf without a clamp
    loss, st = train.policy_loss(logp, logp.detach(), torch.tensor([0.5]), torch.ones(1, 2), mode='grpo',
                                 ref_logprobs=ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(st['kl']) and torch.isfinite(logp.grad).all()
    assert st['kl'].item() > 10  # clamped, but still large: the guard must not hide a huge divergence


def test_on_policy_loss_is_zero_for_grpo_but_gradient_is_not():
    # pitfall C16: ratio 1, centred advantages -> grpo's loss is 0, its gradient is -A / len / B per token
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 5, generator=g) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    A = train.compute_advantages(torch.tensor([1., 0., 0., 1.]), 4, mode='grpo')
    loss, st = train.policy_loss(logp, logp.detach(), A, mask, mode='grpo')
    assert abs(loss.item()) < 1e-6
    assert st['clip_low'].item() == 0 and st['clip_high'].item() == 0
    loss.backward()
    want = -A[:, None] / mask.sum(-1, keepdim=True) / 4 * mask
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-6)


def test_on_policy_skip_of_the_old_forward_is_exact():
    # num_iterations 1: train.py takes old = the update forward's own log-probs, detached, instead of a separate
    # no-grad forward. That is exact only if the no-grad forward gives the same bits, entropy included.
    tok = data.Tokenizer.bytes_level()
    model = train.build_model(dict(init_from='scratch', n_embd=32, n_ff=64, n_layer=2, n_head=4, n_kv_head=2,
                                   seed=0, master_dtype='fp32'), tok)
    ids, attn, cm = data.collate_rl([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], 0)
    A = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        old, ent0 = train.token_logprobs(model, ids, attn, 4, 0.7, 3, entropy=True, vocab=tok.n_vocab)
    grads = []
    for use_own in (False, True):
        model.zero_grad(set_to_none=True)
        lp, ent = train.token_logprobs(model, ids, attn, 4, 0.7, 3, entropy=True, vocab=tok.n_vocab)
        assert torch.equal(lp.detach(), old) and torch.equal(ent, ent0)
        loss, _ = train.policy_loss(lp, lp.detach() if use_own else old, A, cm, mode='dapo', eps_high=0.28)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_policy_loss_rejects_unknown_mode():
    logp, old, A, mask, _ = example()
    with pytest.raises(ValueError, match='mode'):
        train.policy_loss(logp, old, A, mask, mode='ppo')


# -----------------------------------------------------------------------------
# step-wide normalisation: 1, 2, 4 micro-batches and 2 ranks give the same gradient (pitfalls A1-A4)

B8, T8 = 8, 6  # 8 sequences, max_new_tokens 6
LENS = [6, 1, 3, 5, 2, 6, 4, 1]


def batch8():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(B8, T8, generator=g) * 2
    old = logp + (torch.rand(B8, T8, generator=g) - 0.5) * 0.8  # ratios in exp(+-0.4): both clips active
    ref = logp + (torch.rand(B8, T8, generator=g) - 0.5)
    A = train.compute_advantages(torch.tensor([1., 0., 0., 1., 0., 0., 0., 1.]), 4, mode='grpo')
    mask = (torch.arange(T8)[None] < torch.tensor(LENS)[:, None]).float()
    return logp, old, ref, A, mask


def global_norm(mode, mask):
    # as train.py: grpo sequences, dr_grpo sequences x max_new_tokens, dapo completion tokens (all reduced once)
    return {'grpo': float(mask.shape[0]), 'dr_grpo': float(mask.shape[0] * T8), 'dapo': mask.sum().item()}[mode]


def grad_of(mode, logp, old, ref, A, mask, parts, *, norm, scale=1.0, average=False):
    """sum (or mean) over micro-batches `parts` (lists of rows) of policy_loss * scale; each micro-batch is cut
    to its own longest completion, as collate_rl does. -> gradient w.r.t. logp (B, T)."""
    leaf = logp.clone().requires_grad_()
    eps_high = 0.28 if mode == 'dapo' else 0.2
    for rows in parts:
        rows = torch.tensor(rows)
        C = int(mask[rows].sum(-1).max())
        loss, _ = train.policy_loss(leaf[rows, :C], old[rows, :C], A[rows], mask[rows, :C], mode=mode,
                                    ref_logprobs=ref[rows, :C], beta=0.1, eps_high=eps_high, max_len=T8, norm=norm)
        (loss * scale / (len(parts) if average else 1)).backward()
    return leaf.grad


def test_batch8_exercises_both_clips():
    logp, old, ref, A, mask = batch8()
    _, st = train.policy_loss(logp, old, A, mask, mode='grpo', ref_logprobs=ref, beta=0.1)
    assert st['clip_low'] > 0 and st['clip_high'] > 0


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('n_micro', [1, 2, 4])
def test_microbatch_invariance(mode, n_micro):
    logp, old, ref, A, mask = batch8()
    full = grad_of(mode, logp, old, ref, A, mask, [list(range(8))], norm=None)  # one batch, its own norm
    assert full.abs().sum() > 0
    size = 8 // n_micro
    parts = [list(range(s, s + size)) for s in range(0, 8, size)]
    got = grad_of(mode, logp, old, ref, A, mask, parts, norm=global_norm(mode, mask))
    torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-8)


def test_naive_microbatch_mean_differs_for_dapo():
    # pitfall A1: token-mean per micro-batch then / GA is not the global token-mean (this proves the test above
    # can fail): micro-batches of 2 with 7, 8, 8, 5 tokens weigh their tokens differently
    logp, old, ref, A, mask = batch8()
    full = grad_of('dapo', logp, old, ref, A, mask, [list(range(8))], norm=None)
    parts = [[0, 1], [2, 3], [4, 5], [6, 7]]
    naive = grad_of('dapo', logp, old, ref, A, mask, parts, norm=None, average=True)
    assert not torch.allclose(naive, full, rtol=1e-3, atol=1e-6)
    # and a double scaling (global norm, then / GA again, pitfall A2) shrinks it by GA
    double = grad_of('dapo', logp, old, ref, A, mask, parts, norm=global_norm('dapo', mask), average=True)
    torch.testing.assert_close(double * 4, full, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('mode', MODES)
def test_world_size_invariance_simulated(mode):
    # 2 "ranks" x 2 micro-batches: each rank backprops loss * world with the global norm; FSDP averages the
    # ranks' gradients -> equals the 1-rank, 1-micro-batch gradient
    logp, old, ref, A, mask = batch8()
    full = grad_of(mode, logp, old, ref, A, mask, [list(range(8))], norm=None)
    world, norm = 2, global_norm(mode, mask)
    ranks = [grad_of(mode, logp, old, ref, A, mask, [[0, 1], [2, 3]], norm=norm, scale=world),
             grad_of(mode, logp, old, ref, A, mask, [[4, 5], [6, 7]], norm=norm, scale=world)]
    torch.testing.assert_close(sum(ranks) / world, full, rtol=1e-6, atol=1e-8)
    # forgetting the x world leaves the gradient world times too small
    half = [grad_of(mode, logp, old, ref, A, mask, [[0, 1], [2, 3]], norm=norm),
            grad_of(mode, logp, old, ref, A, mask, [[4, 5], [6, 7]], norm=norm)]
    assert not torch.allclose(sum(half) / world, full)


# -----------------------------------------------------------------------------
# rl statistics: the step's sums are built on the device the collectives use


def test_group_sums_live_on_the_collective_device():
    groups = [{'rewards': [1.0, 0.0], 'comps': [[1, 2, 3], [4]], 'trunc': [False, True], 'correct': [True, False]},
              {'rewards': [0.5, 0.5], 'comps': [[5, 6], [7, 8, 9, 10]], 'trunc': [False, False], 'correct': [False, False]}]
    sums, mx = train.group_sums(groups, 'meta')  # the device is whatever the run's collectives use, never the host
    assert sums.device.type == 'meta' and mx.device.type == 'meta'
    sums, mx = train.group_sums(groups, 'cpu')
    # rewards 1, 0, .5, .5: sum 2, squares 1.5; 4 completions of 3+1+2+4 = 10 tokens; 1 truncated, 1 correct;
    # the second group is constant; 2 groups; longest completion 4
    assert sums.tolist() == [2.0, 1.5, 4, 10, 1, 1, 1, 2, 0] and mx.tolist() == [4.0]
    groups[1]['ends'] = 1  # one of its completions stopped on a token the mask left out
    assert train.group_sums(groups, 'cpu')[0].tolist()[-1] == 1


# -----------------------------------------------------------------------------
# dynamic sampling


@pytest.mark.parametrize('keep,target,world,want', [
    ([True, False, True, True, False, True, True], 4, 2, [0, 2, 3, 5]),
    ([True, False, True, True, False, True, True], 10, 2, [0, 2, 3, 5]),  # 5 kept -> 4, a multiple of 2
    ([True, False, True, True, False, True, True], 10, 3, [0, 2, 3]),
    ([True, False, True, True, False, True, True], 3, 1, [0, 2, 3]),
    ([False, False, True], 4, 2, []),  # one kept group cannot be split over 2 ranks
    ([False] * 5, 4, 1, []),
    ([True] * 8, 8, 2, list(range(8))),
])
def test_select_groups_table(keep, target, world, want):
    assert train.select_groups(keep, target, world) == want


@pytest.mark.parametrize('missing,rate,batch,world,want', [
    (3, 13 / 16, 16, 1, 5),   # 3 / 0.8125 = 3.7 -> 4, plus one
    (3, 13 / 16, 16, 2, 6),   # in whole shares: 3 prompts per rank
    (1, 1.0, 16, 1, 2),
    (16, 0.0, 16, 2, 16),     # nothing kept yet: a whole batch, never more
    (10, 0.5, 16, 4, 16),     # 21 wanted, capped at the batch
])
def test_next_round_size_table(missing, rate, batch, world, want):
    assert train.next_round_size(missing, rate, batch, world) == want


def test_select_groups_properties():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = int(torch.randint(0, 20, (1,), generator=g))
        keep = (torch.rand(n, generator=g) < 0.6).tolist()
        target = int(torch.randint(1, 12, (1,), generator=g))
        world = int(torch.randint(1, 4, (1,), generator=g))
        sel = train.select_groups(keep, target, world)
        kept = [i for i, k in enumerate(keep) if k]
        assert sel == kept[:len(sel)]  # only kept groups, in order, a prefix of them
        assert len(sel) <= target and len(sel) % world == 0
        assert len(sel) == min(len(kept), target) // world * world  # as many as allowed


# -----------------------------------------------------------------------------
# overlong shaping through shaped_rewards

GOOD = '<think>2 + 2 = 4</think><answer>4</answer>'
WRONG = '<think>2 + 2 = 5</think><answer>5</answer>'
CUT = '<think>2 + 2 is a sum of two numbers, so'  # truncated without an answer
HIDDEN = '<think>maybe <answer>4</answer> but'  # the answer is inside unclosed reasoning: not an answer


def shaped(kind, texts, lens, trunc, **kw):
    args = dict(kind=kind, max_new_tokens=100, penalty=0.5, buffer=20, factor=1.0, fmt=0.0)
    args.update(kw)
    return train.shaped_rewards(texts, ['4'] * len(texts), lens, trunc, **args)


def test_shaping_none():
    assert shaped('none', [GOOD, WRONG, CUT, HIDDEN], [30, 30, 100, 100], [False, False, True, True]) == [1, 0, 0, 0]


def test_shaping_fixed():
    # -0.5 only for a truncated completion without an answer; a truncated one that has a complete answer keeps it
    got = shaped('fixed', [GOOD, WRONG, CUT, HIDDEN, GOOD, CUT], [30, 30, 100, 100, 100, 40],
                 [False, False, True, True, True, False])
    assert got == pytest.approx([1.0, 0.0, -0.5, -0.5, 1.0, 0.0])
    got = shaped('fixed', [CUT], [100], [True], penalty=0.25)
    assert got == pytest.approx([-0.25])


def test_shaping_soft():
    # DAPO's soft overlong punishment, max 100, buffer 20, factor 1: 0 up to 80 tokens, then linear
    # ((100 - 20) - n) / 20: n=85 -> -0.25, n=90 -> -0.5, n=100 -> -1; added to the verifiable reward
    got = shaped('soft', [GOOD, GOOD, GOOD, WRONG, GOOD, CUT], [30, 80, 85, 90, 100, 100],
                 [False, False, False, False, False, True])
    assert got == pytest.approx([1.0, 1.0, 0.75, -0.5, 0.0, -1.0])
    got = shaped('soft', [WRONG, WRONG], [90, 100], [False, True], factor=0.5)  # factor: penalty at the max
    assert got == pytest.approx([-0.25, -0.5])


# -----------------------------------------------------------------------------
# tiny-config runs of every mode (RL from a quick SFT checkpoint)


def env():
    e = dict(os.environ, OMP_NUM_THREADS='1')  # 2 shared cores: one thread per process is faster and steadier
    return e


def run(args, cwd=REPO, timeout=180, torchrun=False, nproc=2):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if torchrun
                              else []) + args
    p = (in_process(args[1:]) if args[0] == 'train.py' and not torchrun and cwd == REPO else  # one process: in this one
         subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout))
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[:3000]}\n...\n{p.stderr[-2000:]}"
    return p


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize('setting,cuda,ddp,n_params,cpu_bf16,want', [
    ('auto', True, False, 10 ** 6, False, True),  # one gpu: fp32 master weights under autocast
    ('auto', True, True, 3 * 10 ** 9, False, False),  # fsdp2 on gpus: its bf16 parameters, no autocast over them
    ('auto', False, True, 135 * 10 ** 6, True, True),  # smollm2 on a cpu with amx, 2 ranks
    ('auto', False, False, 10 ** 6, True, False),  # the demo's model: casts cost more than its small matmuls save
    ('auto', False, False, 135 * 10 ** 6, False, False),  # no bf16 matrix units: bf16 matmuls run in software
    ('bf16', False, False, 10 ** 6, False, True), ('off', True, False, 3 * 10 ** 9, True, False)])
def test_auto_autocast_runs_bf16_where_it_pays(setting, cuda, ddp, n_params, cpu_bf16, want):
    assert train.use_autocast(setting, cuda, ddp, n_params, cpu_bf16) is want


def test_autocast_casts_each_weight_once_per_phase(tmp_path):
    # grpo as one gpu runs it (one process, fp32 master weights under bf16 autocast; here the cpu's autocast), from the
    # recipe's config with a scratch model of a few layers: autocast caches a weight's cast only until its outermost
    # context exits, and only for leaves that require grad. the rollout, the reference's forwards and the update (4
    # micro-batches, each recomputed in backward) each cast a weight once: the policy's twice a step, the reference's
    # once. per micro-batch contexts cast the policy's 1 + 2 x 4 times a step and the frozen reference's 4 times
    e = dict(env(), PROBE_CASTS='1')
    args = [os.path.join(REPO, 'config', 'grpo.py'), '--init_from=scratch', '--dataset=arith', '--device=cpu',
            '--prompt_template={question}\n', '--max_iters=2', '--batch_size=2', '--group_size=2', '--micro_batch_size=1',
            '--max_new_tokens=8', '--autocast=bf16', f'--out_dir={tmp_path / "out"}']
    p = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'probe.py'), os.path.join(REPO, 'train.py')] + args,
                       cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    m = metrics(tmp_path / 'out')
    assert [r['step'] for r in m] == [1, 2] and abs(m[0]['kl']) < 1e-6, m  # the reference computes as the policy
    probe = json.load(open(tmp_path / 'probe_rank0.json'))
    assert probe['recomputed'] == probe['forwards'] == 2 * 4 * 2, probe  # 2 layers, 4 micro-batches, 2 steps
    counts = list(probe['casts'].values())
    assert sorted(set(counts)) == [2, 4] and counts.count(2) == counts.count(4), counts  # reference, policy


# the soft overlong penalty over the last 40 of 48 tokens gives completions of different lengths different
# rewards even when the briefly trained model gets no answer right, so advantages and gradients are nonzero
RL = ['config/tiny.py', '--max_iters=2', '--batch_size=4', '--overlong=soft', '--overlong_buffer=40']


BASE_KEYS = ('loss', 'reward_mean', 'reward_std', 'clip_low', 'clip_high', 'entropy', 'zero_std_frac', 'len_mean',
             'len_max', 'truncated_frac', 't_rollout', 't_reward', 't_adv', 't_logprobs', 't_update', 't_optim')


def test_the_train_infer_gap_is_logged_and_tis_corrects_it(sft_ckpt):
    """the sampler's log-probs against the update's first forward, every step: ~0 in fp32 (the engine computes what
    the trainer does), visible under bf16 autocast, where tis has something to correct."""
    args = RL + ['--mode=dapo', '--max_iters=1', f'--init_from={sft_ckpt}']
    (fp32,), _ = bench.run_steps(args, skip=0)
    (bf16,), _ = bench.run_steps(args + ['--autocast=bf16'], skip=0)
    assert fp32['mismatch_mean'] < 1e-5 and fp32['mismatch_max'] < 1e-4, fp32
    assert bf16['mismatch_mean'] > 1e-5 and bf16['mismatch_max'] >= bf16['mismatch_mean'], bf16
    # a cap of 1 under bf16: the tokens the trainer finds likelier than the sampler did are capped, the rest weighed
    (capped,), _ = bench.run_steps(args + ['--autocast=bf16', '--tis_cap=1.0'], skip=0)
    assert capped['reward_mean'] == bf16['reward_mean'] and 0 < capped['tis_capped'] < 1, capped
    assert capped['loss'] != bf16['loss'] and capped['loss'] == pytest.approx(bf16['loss'], rel=1e-2)


def test_micro_batches_by_hand():
    sizes = [(3, 1), (3, 5), (2, 2), (4, 4), (1, 1)]  # (prompt, completion): padded 4, 8, 4, 8, 2 alone
    assert data.micro_batches(sizes, 2) == [[0, 1], [2, 3], [4]]  # no budget: data order, 2 rows at a time
    # longest first: [1] (4+5 with 3 would pad to 2 x 9 = 18 > 16); [3, 0] pads to 2 x (4+4) = 16; [2, 4] to 8
    assert data.micro_batches(sizes, 4, 16) == [[1], [3, 0], [2, 4]]
    assert data.micro_batches(sizes, 4, 16, at_least=4) == [[1], [3], [0], [2, 4]]  # the fullest one halved
    assert data.micro_batches(sizes, 4, 1) == [[1], [3], [0], [2], [4]]  # each over the budget alone: one row each
    # packed, a micro-batch costs its lengths' sum (4, 8, 4, 8, 2): [1, 3] is 16; [0, 2, 4] 10
    assert data.micro_batches(sizes, 4, 16, packed=True) == [[1, 3], [0, 2, 4]]
    assert data.micro_batches(sizes, 2, 16, packed=True) == [[1, 3], [0, 2], [4]]  # still at most `rows` rows
    with pytest.raises(ValueError, match='cannot fill 6'):
        data.micro_batches(sizes, 4, 1, at_least=6)


@pytest.mark.parametrize('mode,pack', [('grpo', False), ('dapo', False), ('grpo', True), ('dapo', True)])
def test_a_token_budget_gives_the_same_step_with_less_padding(sft_ckpt, mode, pack):
    """sequences grouped by length into micro-batches of at most 64 tokens, padded or packed end to end (no padding):
    every denominator is step-wide, so the loss, the gradient's norm and each statistic are those of data-order
    micro-batches of 4."""
    args = RL + [f'--mode={mode}', '--max_iters=1', f'--init_from={sft_ckpt}', '--micro_batch_size=4']
    (plain,), _ = bench.run_steps(args, skip=0)
    (grouped,), _ = bench.run_steps(args + ['--micro_batch_tokens=64', f'--pack={pack}'], skip=0)
    for k in ('loss', 'grad_norm', 'entropy', 'mismatch_mean', 'tokens', 'reward_mean'):
        assert grouped[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-7), (k, plain[k], grouped[k])
    assert 1 <= grouped['pad_ratio'] < plain['pad_ratio'], (plain['pad_ratio'], grouped['pad_ratio'])
    assert (grouped['pad_ratio'] == 1) == pack, grouped['pad_ratio']


def test_packed_rows_reach_the_variable_length_kernel_as_its_bounds(monkeypatch):
    """on gpus a packed row runs torch's varlen flash kernel (use_varlen). here a reference kernel stands in for it,
    sdpa per sequence: each sequence's (T, H, D) slice attends causally within itself. the packed log-probs are the
    padded ones to bf16 rounding (the kernel computes in bf16); a padded batch through use_varlen is sdpa's, exactly."""
    from torch.nn.attention import varlen
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert q.dtype == torch.bfloat16 and window_size == (-1, 0) and torch.equal(cu_q, cu_k) and enable_gqa
        calls.append(cu_q.tolist() + [max_q, max_k])
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1).float() for x in (q, k, v)), is_causal=True, scale=scale, enable_gqa=True)
            .transpose(0, 1) for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]).to(q.dtype)
    monkeypatch.setattr(varlen, 'varlen_attn', kernel)
    tok = data.Tokenizer.bytes_level()
    model = train.build_model(dict(init_from='scratch', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_ff=128,
                                   master_dtype='fp32', seed=0), tok)
    ps, cs = [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5]], [[10, 11, 12, 13], [14], [20, 21]]
    ids, attn, cm = data.collate_rl(ps, cs, 0)
    want = train.token_logprobs(model, ids, attn, cm.shape[1])
    train.use_varlen(model)
    assert torch.equal(train.token_logprobs(model, ids, attn, cm.shape[1]), want) and not calls
    pids, pattn, pcm, pk = data.collate_packed(ps, cs)
    got = train.token_logprobs(model, pids, pattn, pcm.shape[1], packed=pk)
    # one call per layer: the three sequences' bounds, and the longest one's length
    assert calls == [[0, 7, 10, 17, 7, 7]] * 2 and torch.equal(pcm, cm)
    assert ((got - want) * cm).abs().max() < 1e-2 and (got * (1 - cm)).abs().max() == 0, (got, want)


@pytest.mark.parametrize('extra,said', [(['--tis_cap=0.5'], 'tis_cap = 0.5, expected 0 (off) or >= 1'),
                                        (['--tis_cap=2', '--overlap=True'], 'tis_cap with overlap = True')])
def test_a_tis_cap_that_corrects_nothing_is_refused(extra, said, tmp_path):
    p = in_process(['config/tiny.py', '--mode=dapo', f'--out_dir={tmp_path}'] + extra)
    assert p.returncode != 0 and said in p.stderr, p.stderr[-2000:]


def test_unmasked_ends_by_hand():
    eos, stops = [9], ['</answer>']
    comps = [[5, 9], [5, 6], [5, 6], [5, 6], []]
    texts = ['a', 'x</answer>', 'x</answ', 'abc', '']
    # stopped on eos: fine; on the stop string: fine; its last token cut off: counted; truncated: fine; empty: counted
    assert train.unmasked_ends(comps, [False, False, False, True, False], texts, eos, stops) == 2
    assert train.unmasked_ends(comps[:1], [False], ['a'], [7], stops) == 1  # another end token


def test_an_end_outside_the_mask_raises_its_alarm_once(sft_ckpt, tmp_path, monkeypatch):
    """a sampler that leaves each stopped completion's last token out of its mask (pad == eos masks eos this way):
    the alarm is printed once, and kept in every step's metrics row it fires on."""
    def cut(*a, **k):
        out = real(*a, **k)
        n = out['mask'].sum(-1)
        for i in (~out['truncated']).nonzero().flatten().tolist():
            out['mask'][i, n[i] - 1] = False
        return out
    real = train.generate
    monkeypatch.setattr(train, 'generate', cut)
    p = run(['train.py'] + RL + ['--mode=dr_grpo', '--max_iters=3', f'--init_from={sft_ckpt}', f'--out_dir={tmp_path}'])
    ms = metrics(tmp_path)
    assert all(m['unmasked_ends'] > 0 and 'outside the loss mask' in m['alarm'] for m in ms), ms
    assert p.stdout.count('alarm at step') == 1 and 'alarm at step 1:' in p.stdout, p.stdout


def test_a_growing_gap_raises_its_alarm_once():
    import types
    said = []
    r = types.SimpleNamespace(overlap=False, gap_floor=None, alarmed=set(), log=said.append)
    rows = [{'step': i + 1, 'mismatch_mean': g} for i, g in enumerate([2e-4, 1e-4, 9e-4, 1.1e-3, 5e-3, 8e-3])]
    for m in rows:
        train.alarms(r, m)
    # 9e-4 is 9x the smallest (1e-4); 1.1e-3 is 11x it and above 1e-3: from there on
    assert ['alarm' in m for m in rows] == [False, False, False, True, True, True]
    assert len(said) == 1 and said[0].startswith('alarm at step 4: the train/infer gap grew')
    r = types.SimpleNamespace(overlap=True, gap_floor=None, alarmed=set(), log=said.append)
    for m in [{'step': 1, 'mismatch_mean': 1e-7}, {'step': 2, 'mismatch_mean': 0.1}]:  # overlapped: the lag
        train.alarms(r, m)
        assert 'alarm' not in m


@pytest.mark.parametrize('mode', MODES)
def test_tiny_run(mode, sft_ckpt, tmp_path):
    run(['train.py'] + RL + [f'--mode={mode}', f'--out_dir={tmp_path}', f'--init_from={sft_ckpt}'])
    ms = metrics(tmp_path)
    assert [m['step'] for m in ms] == [1, 2]
    for m in ms:
        for k in BASE_KEYS:
            assert isinstance(m.get(k), (int, float)) and math.isfinite(m[k]), (k, m)
        assert ('kl' in m) == (mode == 'grpo')
        assert ('gen_rounds' in m) == (mode == 'dapo')
        assert 0 <= m['zero_std_frac'] < 1 and m['grad_norm'] > 0  # some signal: the update is not a no-op
        # num_iterations 1: old log-probs come from the same weights, the ratio is exactly 1, nothing clips
        assert m['clip_low'] == 0 and m['clip_high'] == 0
    if mode == 'grpo':
        # step 1: ratio 1, centred advantages, per-sequence mean -> 0; kl 0 (the reference is the init)
        assert abs(ms[0]['loss']) < 1e-6 and ms[0]['kl'] == 0
        assert ms[1]['kl'] > 0  # the policy moved; the reference stayed frozen
    if mode == 'dapo':
        assert all(1 <= m['gen_rounds'] <= 4 and 0 < m['kept_groups'] <= 4 for m in ms)
    assert os.path.isfile(os.path.join(tmp_path, 'ckpt', 'model.safetensors'))


def test_two_iterations_score_the_batch_again_after_a_step(sft_ckpt):
    """num_iterations = 2 (in process, train.py's step functions): the second pass scores the same batch under the
    weights the first optimizer step changed, so its ratio departs from 1; one pass logs exactly 0 (the old log-probs
    are its own forward's, detached). were num_iterations ignored, both would log 0."""
    args = RL + ['--mode=dapo', '--max_iters=1', f'--init_from={sft_ckpt}', '--device=cpu']
    (one,), _ = bench.run_steps(args + ['--num_iterations=1'], skip=0)
    (two,), _ = bench.run_steps(args + ['--num_iterations=2'], skip=0)
    assert one['reward_mean'] == two['reward_mean'] and one['len_mean'] == two['len_mean']  # the same rollout
    assert one['log_ratio'] == 0 and two['log_ratio'] > 1e-4, (one['log_ratio'], two['log_ratio'])
    assert math.isfinite(two['loss']) and 0 <= two['clip_low'] <= 1 and 0 <= two['clip_high'] <= 1


def test_dapo_step_without_signal_is_logged_and_checkpointed(tmp_path):
    # random weights never answer and there is no shaping: every group is constant, so dynamic sampling keeps
    # nothing and the update is skipped. The step still counts, so it must still be logged (gen_rounds), and
    # the run must still write its final checkpoint ("one is always written at the end").
    run(['train.py', 'config/tiny.py', '--mode=dapo', '--max_iters=1', '--batch_size=2', '--overlong=none',
         '--max_gen_rounds=1', '--max_new_tokens=8', f'--out_dir={tmp_path}'])
    assert os.path.isfile(os.path.join(tmp_path, 'ckpt', 'model.safetensors')), os.listdir(tmp_path)
    (m,) = metrics(tmp_path)
    assert m['step'] == 1 and m['gen_rounds'] == 1 and m['zero_std_frac'] == 1


@pytest.mark.slow
def test_rl_resume_draws_the_same_samples(sft_ckpt, tmp_path):
    # sampling seeds come from (seed, step, round, rank) and the prompt stream from data_pos, so a dapo run cut
    # after step 2 and resumed must log what the uninterrupted run logged (rewards, lengths, rounds, loss)
    base = ['train.py'] + RL + ['--mode=dapo', f'--init_from={sft_ckpt}', '--max_iters=4']
    run(base + [f'--out_dir={tmp_path / "a"}'])
    run(base + [f'--out_dir={tmp_path / "b"}', '--max_iters=2'])
    run(base + [f'--out_dir={tmp_path / "b"}', '--init_from=resume'])
    a, b = metrics(tmp_path / 'a'), metrics(tmp_path / 'b')
    assert [m['step'] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ('reward_mean', 'len_mean', 'gen_rounds', 'kept_groups', 'tokens'):
            assert x[k] == y[k], (k, x, y)
        assert math.isclose(x['loss'], y['loss'], rel_tol=1e-6, abs_tol=1e-9), (x, y)


# -----------------------------------------------------------------------------
# grpo's reference computes as the policy does: the same log-probs under autocast, kl exactly 0 at step 1


def test_reference_computes_as_the_policy_under_autocast():
    tok = data.Tokenizer.bytes_level()
    cfg = dict(init_from='scratch', n_embd=64, n_ff=128, n_layer=2, n_head=4, n_kv_head=2, seed=0)
    policy = train.build_model(dict(cfg, master_dtype='fp32'), tok).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)

    def lp(model):  # one gpu: fp32 master weights under bf16 autocast (cpu autocast stands in for cuda here)
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
            return train.token_logprobs(model, ids, attn, 12, vocab=tok.n_vocab)
    ref = train.build_model(dict(cfg, master_dtype=train.ref_dtype('fp32', cuda=True, ddp=False)), tok).eval()
    assert torch.equal(lp(ref), lp(policy))
    bf16 = train.build_model(dict(cfg, master_dtype='bf16'), tok).eval()  # computes otherwise: the check can fail
    assert not torch.equal(lp(bf16), lp(policy))
    assert train.ref_dtype('fp32', cuda=True, ddp=True) == 'bf16'  # fsdp2's mixed precision casts both to bf16
    assert train.ref_dtype('fp32', cuda=False, ddp=True) == 'fp32'


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [1, 2])
def test_grpo_kl_is_zero_at_step_one(nproc, tmp_path):
    run(['train.py', 'config/tiny.py', '--mode=grpo', '--max_iters=1', '--batch_size=4', '--max_new_tokens=16',
         f'--out_dir={tmp_path}'], timeout=300, torchrun=nproc == 2)
    assert metrics(tmp_path)[0]['kl'] == 0.0


# -----------------------------------------------------------------------------
# 2 ranks (gloo): a dapo run with dynamic sampling, and the real FSDP2 gradient vs 1 process


@pytest.mark.slow
@pytest.mark.parametrize('nproc,extra', [(2, []), (4, ['--replicas=2', '--overlap=True'])], ids=['2 ranks', 'hsdp 2x2'])
def test_multi_rank_dapo_dynamic_sampling(sft_ckpt, tmp_path, nproc, extra):
    # micro-batches by a token budget: each rank groups its own sequences, so their counts differ unless equalized.
    # hsdp: the same regeneration decisions on all 4 ranks of a 2-d mesh, the overlapped copy refreshed from it
    run(['train.py'] + RL + ['--mode=dapo', f'--out_dir={tmp_path}', f'--init_from={sft_ckpt}', '--micro_batch_size=4',
         '--micro_batch_tokens=48', *extra], torchrun=True, nproc=nproc, timeout=240)  # a hang is a timeout: a failure
    ms = metrics(tmp_path)
    assert [m['step'] for m in ms] == [1, 2]
    for m in ms:
        assert 1 <= m['gen_rounds'] <= 4 and m['kept_groups'] % nproc == 0 and 0 < m['kept_groups'] <= 4
        assert math.isfinite(m['loss']) and m['grad_norm'] > 0


WORKER = r'''
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
sys.path.insert(0, REPO)
import data, train

ddp = 'RANK' in os.environ
rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
torch.set_num_threads(1)
tok = data.Tokenizer.bytes_level()
cfg = dict(init_from='scratch', n_embd=32, n_ff=64, n_layer=2, n_head=4, n_kv_head=2, seed=0, master_dtype='fp32')
model = train.build_model(cfg, tok)
if ddp:
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group('gloo')
    model = train.shard(model, init_device_mesh('cpu', (world,)), None)

# fixed data: 8 sequences with different prompt and completion lengths; old/ref log-probs are the current ones
# shifted by fixed per-token offsets so ratios are != 1 and both clips are active
g = torch.Generator().manual_seed(0)
MAX_NEW, N = 7, 8
prompts = [torch.randint(0, 256, (2 + i % 3,), generator=g).tolist() for i in range(N)]
comps = [torch.randint(0, 261, (1 + (3 * i) % MAX_NEW,), generator=g).tolist() for i in range(N)]
shift_old = (torch.rand(N, MAX_NEW, generator=g) - 0.5) * 0.8
shift_ref = torch.rand(N, MAX_NEW, generator=g) - 0.5
adv = train.compute_advantages(torch.tensor([1., 0., 0., 1., 0., 1., 1., 1.]), 4, mode='grpo')


def grads(mode, micro_size):
    model.zero_grad(set_to_none=True)
    per = N // world
    mine = list(range(rank * per, (rank + 1) * per))
    micro = [mine[s:s + micro_size] for s in range(0, per, micro_size)]
    n_local = torch.tensor([float(per), float(sum(len(comps[i]) for i in mine))])
    if ddp:
        dist.all_reduce(n_local)
    n_seq, n_tok = n_local.tolist()
    norm = {'grpo': n_seq, 'dr_grpo': n_seq * MAX_NEW, 'dapo': n_tok}[mode]
    clip = torch.zeros(2)
    for k, idx in enumerate(micro):
        ids, attn, cm = data.collate_rl([prompts[i] for i in idx], [comps[i] for i in idx], 256)
        C = cm.shape[1]
        with torch.no_grad():
            cur = train.token_logprobs(model, ids, attn, C, 0.7, 3, vocab=tok.n_vocab)
        old, ref = cur + shift_old[idx, :C], cur + shift_ref[idx, :C]
        if ddp:
            model.set_requires_gradient_sync(k == len(micro) - 1)
        lp = train.token_logprobs(model, ids, attn, C, 0.7, 3, vocab=tok.n_vocab)
        loss, st = train.policy_loss(lp, old, adv[idx], cm, mode=mode, ref_logprobs=ref, beta=0.1,
                                     eps_high=0.28 if mode == 'dapo' else 0.2, max_len=MAX_NEW, norm=norm)
        (loss * world).backward()
        clip += torch.stack([st['clip_low'], st['clip_high']]) * cm.sum()
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
    if ddp:
        dist.all_reduce(clip)
    out['_clip'] = clip
    return out


res = {(mode, m): grads(mode, m) for mode in ('grpo', 'dr_grpo', 'dapo') for m in ((2,) if ddp else (2, 8))}
if rank == 0:
    torch.save(res, sys.argv[1])
if ddp:
    dist.barrier()  # no rank tears gloo down while another is still in it
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_rank_fsdp_gradient_equals_one_process(tmp_path, monkeypatch):
    script = tmp_path / 'rl_grad_worker.py'
    script.write_text(f'REPO = {REPO!r}\n' + WORKER)
    run([str(script), str(tmp_path / 'two.pt')], cwd=tmp_path, timeout=240, torchrun=True)
    monkeypatch.setattr(sys, 'argv', [str(script), str(tmp_path / 'one.pt')])
    runpy.run_path(str(script), run_name='__main__')  # the one process: this one
    one, two = torch.load(tmp_path / 'one.pt'), torch.load(tmp_path / 'two.pt')
    for mode in MODES:
        single, four_micro, two_rank = one[(mode, 8)], one[(mode, 2)], two[(mode, 2)]
        assert single['_clip'][0] > 0 and single['_clip'][1] > 0, 'both clips should be active'
        names = [k for k in single if k != '_clip']
        assert names and set(names) == set(two_rank) - {'_clip'}
        assert sum(single[k].abs().sum() for k in names) > 0
        for k in names:
            torch.testing.assert_close(four_micro[k], single[k], rtol=1e-5, atol=1e-7, msg=f'{mode} 4 micro {k}')
            torch.testing.assert_close(two_rank[k], single[k], rtol=1e-5, atol=1e-7, msg=f'{mode} 2 ranks {k}')


def test_every_phase_is_named_in_a_cpu_profile(sft_ckpt, tmp_path):
    # the nvtx ranges are torch.profiler labels too (train.phase), so a cpu trace shows time by phase
    from torch.profiler import profile
    with profile() as prof:
        run(['train.py'] + RL + ['--mode=grpo', f'--init_from={sft_ckpt}', f'--out_dir={tmp_path}'])
    keys = {e.key for e in prof.key_averages()}
    for name in ('rollout_generation', 'reward_computation', 'advantage_computation', 'old_logprobs',
                 'policy_loss_backward', 'optimizer_step', 'policy_update'):
        assert name in keys, name

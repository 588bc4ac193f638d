"""
reasoning-engine: SFT on <think>/<answer> traces, then critic-free RL (GRPO / Dr. GRPO / DAPO), in one file.

    python train.py config/tiny.py                                    # SFT, tiny scratch model, CPU, seconds
    python train.py config/tiny.py --mode=dapo                        # RL on CPU (also grpo, dr_grpo)
    python train.py config/tiny.py --mode=dapo --overlap=True         # rollout N+1 runs while update N trains
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py  # same job on 2 ranks (gloo, FSDP2)
    torchrun --standalone --nproc_per_node=2 train.py config/sft.py   # Qwen2.5-3B GSM8K SFT on 2 GPUs

How the RL modes differ here. Per completion token: ratio = exp(logp - logp_old),
l = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), logp from logits / temperature.
1. grpo (DeepSeekMath https://arxiv.org/abs/2402.03300, R1 https://arxiv.org/abs/2501.12948):
   A = (r - mean_g) / (std_g + 1e-4); l += beta * k3 KL to a frozen reference;
   loss = mean over sequences of (sum of the sequence's token losses / its length).
2. dr_grpo (https://arxiv.org/abs/2503.20783): A = r - mean_g (no std); no KL and no reference model;
   loss = sum of token losses / (sequences x max_new_tokens), a constant, so no length bias.
3. dapo (https://arxiv.org/abs/2503.14476): A as grpo; no reference; clip-higher (eps_high 0.28);
   loss = sum of token losses / completion tokens; dynamic sampling (groups whose G rewards are all equal
   are dropped and only the missing share regenerated); overlong reward shaping.
Every denominator spans the whole optimizer step (all micro-batches on all ranks), so 1 or 4 micro-batches
and 1 or 2 ranks give the same gradient. With num_iterations=1 the old log-probs are the update forward's own,
detached, so the ratio is exactly 1 (grpo's loss is then ~0, its gradient is not: watch the reward). With overlap=True
step N+1 is generated from theta_N (a frozen inference copy) while update N runs, one step off-policy: the old
log-probs are the engine's sampling log-probs under theta_N, so the clipped ratio corrects for the lag.
"""
import contextlib
import copy
import json
import math
import os
import sys
import types
import time
from concurrent.futures import Future, ThreadPoolExecutor

import nvtx
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import rewards
from checkpoint import (Preemption, is_checkpoint, load_checkpoint, load_checkpoint_model, load_pretrained,
                        save_checkpoint)
from configurator import configure
from data import (Tokenizer, collate_packed, collate_rl, collate_sft, format_prompt, load_rows, micro_batches, pad_rows,
                  step_indices, tokenize_sft)
from engine import KVCache, generate
from optim import AdamW

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoints (out_dir/ckpt -> newest ckpt_NNNNNN) and metrics.jsonl
init_from = 'Qwen/Qwen2.5-3B'  # hub name | local HF dir (e.g. an SFT out_dir/ckpt) | 'scratch' | 'resume'
ckpt_interval = 100  # steps between checkpoints; one is always written at the end
log_interval = 1  # steps between log lines
wandb_log = False  # also send every metrics.jsonl row to wandb (rank 0); off: wandb is never imported
wandb_project = 'reasoning-engine'
wandb_run_name = 'run'
# data
dataset = 'openai/gsm8k'  # hub name | path/to/file.jsonl | 'arith' (built-in synthetic task)
dataset_config = 'main'  # hub dataset config name ('' for none)
split = 'train'  # hub split; for 'arith': 'train' | 'test' (disjoint problems)
question_field = 'question'  # field holding the problem
answer_field = 'answer'  # field holding the final answer, or a GSM8K solution ('reasoning #### answer')
reasoning_field = ''  # sft: field holding the reasoning; '' means answer_field is a GSM8K solution. rl never reads it
prompt_template = 'r1'  # 'r1' (plain text, base models) | 'chat' (chat template, R1 format in the user turn) | '...{question}...'
system_prompt = 'You are a helpful assistant.'  # 'chat' only: always explicit (Qwen base vs instruct differ)
eos_token = ''  # end of completion; '' = '<|im_end|>' with 'chat', else the tokenizer's end of text
max_seq_len = 1024  # sft: longer examples are dropped and counted in the log
arith_terms = 3  # 'arith': numbers per problem (terms - 1 operations)
arith_digits = 2  # 'arith': digits per number
arith_trace_frac = 1.0  # 'arith': fraction of sft traces that show the steps; the rest answer with an empty think
arith_task = 'chain'  # 'arith': 'chain' (+/- with a running total) | 'column' (sums added column by column) |
# 'words' (a chain told as a story, for pretrained models)
arith_size = 20000  # 'arith': problems generated per split; the run draws epochs of them
# model ('scratch' only: a Qwen2-architecture model with random weights and an offline byte tokenizer)
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 64
n_ff = 256  # mlp width
# optimization
mode = 'sft'  # 'sft' | 'grpo' | 'dr_grpo' | 'dapo'
max_iters = 1000  # optimizer steps (rl: rollout batches) in this run
lr_decay_iters = 1000  # cosine ends here (not at max_iters, so a run can stop early and resume)
warmup_iters = 20
learning_rate = 1e-5
min_lr = 1e-6
weight_decay = 0.0  # on 2-d weights only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
max_skips = 3  # a step whose loss or gradient norm is not finite is skipped; more in a row than this stop the run
batch_size = 64  # global per step, whatever the world size: sft examples | rl prompts (x group_size samples)
micro_batch_size = 4  # sequences per forward/backward on each rank
micro_batch_tokens = 0  # sft and rl updates: > 0 groups sequences by length, longest first, into micro-batches of at
# most this many padded tokens (and micro_batch_size rows): less padding, the same gradient; 0: micro_batch_size rows in
# data order
pack = False  # sft and rl updates: each micro-batch's sequences end to end in one row, no padding (micro_batch_tokens then
# counts real tokens); attention stays within each sequence (on gpus torch's variable-length flash kernel)
replicas = 1  # hsdp: shard within groups of world / replicas ranks (a node), replicate across the groups; 1: flat fsdp
grad_sync = 'micro'  # fsdp2: 'micro' reduce-scatters every micro-batch's gradients (each rank holds its 1/world shard);
# 'step' reduces once per step, one collective instead of n_micro, but each rank accumulates full fp32 gradients
master_dtype = 'fp32'  # 'fp32' | 'bf16': fp32 master weights apply 1e-6-sized updates; bf16 loses them
optim_dtype = 'bf16'  # 'fp32' | 'bf16': adam moments; bf16 halves their memory (fits 3B on 2x24 GB)
# rl
group_size = 8  # G samples per prompt
max_new_tokens = 1024
temperature = 1.0  # sampling temperature; log-probs use logits / temperature too
top_p = 1.0  # < 1 changes the behaviour policy away from logits / T: keep 1 for rl
stop_strings = ['</answer>']  # generation also stops on these (and on eos)
num_iterations = 1  # mu: optimizer steps per rollout batch
overlap = False  # generate step N+1 (from a frozen copy of the weights before update N) while update N runs
engine = 'static'  # rollout decode: 'static' (static kv cache, own decode step, cuda graphs) | 'hf' (model forward)
beta = 0.1  # grpo: k3 KL coefficient
eps_low = 0.2
eps_high = 0.0  # 0 = the mode's default: 0.28 for dapo, else eps_low
dynamic_sampling = True  # dapo: drop constant-reward groups and generate more
max_gen_rounds = 4  # dapo: generation rounds per step at most
overlong = 'auto'  # 'auto' (dapo: 'fixed', the seed's; else 'none') | 'none' | 'fixed' | 'soft' (DAPO paper)
overlong_penalty = 0.5  # 'fixed': reward -= this when truncated without an answer
overlong_buffer = 256  # 'soft': linear penalty over the last this-many tokens
overlong_factor = 1.0  # 'soft': penalty at max_new_tokens
format_reward = 0.0  # reward for a well-formed but wrong completion
tis_cap = 0.0  # > 0: truncated importance sampling (verl, trl): each token's surrogate x min(pi_old / pi_engine, tis_cap),
# the trainer's old log-probs over the sampler's, which corrects the train/infer gap; 0 off
# system
device = 'cuda'  # 'cuda' | 'cpu'
seed = 1337
activation_checkpointing = True  # recompute each decoder layer in backward
logprob_chunk = 256  # positions per fp32 log-softmax chunk (never a (B, T, V) fp32 tensor)
autocast = 'auto'  # 'auto': bf16 autocast where it pays (use_autocast) | 'bf16' | 'off'
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, list))]
MODES = ('sft', 'grpo', 'dr_grpo', 'dapo')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
AMP_CPU_MIN_PARAMS = 50_000_000  # cpu bf16 autocast pays from here (amx: 2.2x on smollm2-135m, 0.85x on the 1m demo)
GAP_GROWTH, GAP_MIN = 10.0, 1e-3  # the gap alarm: a mean gap this many times the run's smallest, and above this

# -----------------------------------------------------------------------------
# model


def build_model(cfg: dict, tok: Tokenizer):
    """a Qwen2-architecture model with random weights for 'scratch', else loaded from a hub name, a local HF dir or a
    reasoning-engine checkpoint; in train mode, without dropout."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    dtype = DTYPES[cfg['master_dtype']]
    if cfg['init_from'] == 'scratch':
        mc = Qwen2Config(vocab_size=(tok.n_vocab + 63) // 64 * 64, hidden_size=cfg['n_embd'],
                         intermediate_size=cfg['n_ff'], num_hidden_layers=cfg['n_layer'],
                         num_attention_heads=cfg['n_head'], num_key_value_heads=cfg['n_kv_head'],
                         max_position_embeddings=4096, tie_word_embeddings=True)
        torch.manual_seed(cfg['seed'])  # identical init on every rank
        model = Qwen2ForCausalLM(mc).to(dtype)
    elif is_checkpoint(cfg['init_from']):
        model = load_checkpoint_model(cfg['init_from'], dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg['init_from'], dtype=dtype)
    for mod in model.modules():  # the update scores exactly what the sampler drew from: no dropout anywhere
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, 'attention_dropout', None), float):
            mod.attention_dropout = 0.0
    # from_pretrained returns eval mode, and HF recomputes checkpointed layers only in train mode
    return model.train()


def shard(model, mesh, param_dtype, frozen: bool = False):
    """FSDP2: one unit per decoder layer plus the root (embeddings and the tied lm_head share the root group). the
    trained root stays gathered from forward to backward (fsdp2's own choice for a root, made explicit so that a
    rollout's gathered() finds it and puts it back); a frozen model (grpo's reference) has no backward to reshard its
    root, so it reshards after every forward, as the layers do."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=frozen)
    return model


def choose_sdpa():
    """attention kernels on gpus, chosen: cudnn's, torch's first choice on sm90, returns NaN grad_q under a padding
    mask when seq_len % 128 == 64 (pytorch#196678, torch >= 2.11; trl#7181 on qwen2.5). flash takes no mask, so a
    padded batch runs the memory-efficient kernel, and an unpadded one flash."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def cpu_bf16_units() -> bool:
    """whether this cpu multiplies bf16 in hardware (amx tiles, avx512-bf16); without them a bf16 matmul takes a
    software path, 6-9x slower than fp32's on an avx2 epyc (docs/results.md)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def use_autocast(setting: str, cuda: bool, ddp: bool, n_params: int, cpu_bf16: bool) -> bool:
    """bf16 autocast over the fp32 master weights: 'bf16' always, 'off' never, 'auto' where it pays. on one gpu; not
    under fsdp2 on gpus, whose parameters already compute in bf16; on a cpu with bf16 matrix units for a model of at
    least AMP_CPU_MIN_PARAMS, where the matmuls dominate (on a small one the casts cost more than they save)."""
    if setting != 'auto':
        return setting == 'bf16'
    return not ddp if cuda else cpu_bf16 and n_params >= AMP_CPU_MIN_PARAMS


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """hf's attention (use_varlen) for a packed row on gpus: torch's variable-length flash kernel, each sequence
    attending causally within itself (bounds cu_seq_lens_q, from token_logprobs); any other call runs sdpa."""
    from torch.nn.attention import varlen
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    q, k, v = (x[0].transpose(0, 1).to(torch.bfloat16) for x in (query, key, value))  # (1, H, T, D) -> (T, H, D)
    out = varlen.varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                             window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])  # (-1, 0): causal
    return out[None].to(query.dtype), None  # (1, T, H, D); rope leaves q, k fp32 under autocast


def use_varlen(model):
    """packed rows through varlen_attention. hf still builds their block-diagonal mask from the positions (T x T bools,
    64 MiB at 8,192 tokens), which varlen_attention leaves unread, and which padded batches need."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register('varlen', varlen_attention)
    AttentionMaskInterface.register('varlen', sdpa_mask)
    model.set_attn_implementation('varlen')
    return model


def ref_dtype(master_dtype: str, cuda: bool, ddp: bool) -> str:
    """the frozen reference must compute exactly as the policy did at step 0, or the kl is not 0 there. fsdp2 on gpus
    casts both to bf16 for compute (MixedPrecisionPolicy), so bf16 storage is the same numbers at half the memory;
    elsewhere autocast (one gpu) or nothing (cpu) runs on the stored weights, so store them as the policy does."""
    return 'bf16' if cuda and ddp else master_dtype


@contextlib.contextmanager
def phase(name: str):
    """a named phase of the step: an nvtx range for nsight on gpus, and a torch.profiler label everywhere, so a cpu
    trace of profile.sh lists time by phase too, not only by operator."""
    with nvtx.annotate(name), torch.profiler.record_function(name):
        yield


def get_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """linear warmup then cosine to min_lr at decay_iters (nanoGPT)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# -----------------------------------------------------------------------------
# log-probs: fp32 log-softmax in chunks of positions, recomputed in backward, so only the logits stay alive


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, n_tail: int, temperature: float = 1.0,
                   chunk: int = 256, entropy: bool = False, vocab: int | None = None, packed: tuple | None = None):
    """log p(ids[:, -n_tail:]) under logits[..., :vocab] / temperature -> (B, n_tail) [, entropy (B, n_tail)].
    packed: (pos, keep, cu, longest, cm) of data.collate_packed's one row (ids (1, T)): the completions' log-probs laid
    out as their mask cm (N, n_tail), 0 past each completion's end.

    vocab is the tokenizer's size: the sampler never draws the padded embedding rows past it, so neither may
    the trainer's distribution include them."""
    if packed is None:
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions from the mask: left padding is harmless
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=n_tail + 1).logits[:, :-1, :vocab]  # (B, n_tail, V), possibly bf16
        targets = ids[:, -n_tail:]
    else:  # no attention mask: hf reads the sequences' bounds from the restarting positions (or varlen's cu)
        pos, keep, cu, n, _ = packed
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, cu_seq_lens_q=cu,
                       cu_seq_lens_k=cu, max_length_q=n, max_length_k=n).logits[..., :vocab]  # (1, K, V)
        targets = ids[:, keep + 1]
    out, ent = [], []
    for s in range(0, logits.shape[1], chunk):
        lg, tg = logits[:, s:s + chunk], targets[:, s:s + chunk]
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, lg, tg, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(lg, tg, temperature))
        if entropy:
            with torch.no_grad():
                lp = torch.log_softmax(lg.float() / temperature, -1)
                ent.append(-(lp.exp() * lp).sum(-1))
    lp, ent = torch.cat(out, 1), torch.cat(ent, 1) if entropy else None
    if packed is not None:  # (1, K) -> (N, n_tail): keep runs through the completions in the mask's row-major order
        at = packed[4].bool()
        lp = lp.new_zeros(at.shape).masked_scatter(at, lp)
        ent = ent.new_zeros(at.shape).masked_scatter(at, ent) if entropy else None
    return (lp, ent) if entropy else lp


@contextlib.contextmanager
def gathered(model):
    """gather FSDP2 weights once for a whole rollout phase (never per token); a no-op without FSDP.
    no collective runs inside, so ranks whose rows stop at different lengths cannot hang."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # each group's own setting comes back on exit: the root's is to stay gathered from forward to backward (True
    # would all-gather the embedding and lm_head again in the backward of every micro-batch)
    was = [reshards_after_forward(m) for m in mods]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, r in zip(mods, was):
            m.reshard()
            m.set_reshard_after_forward(r, recurse=False)


def reshards_after_forward(m) -> bool:
    """an FSDP2 module's setting, as set_reshard_after_forward takes it (fsdp2 keeps it as the mesh a forward leaves
    the parameters on: None means they stay gathered)."""
    group = m._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


# -----------------------------------------------------------------------------
# advantages and the policy loss: each mode's differences stand here together (the module docstring's formulas): the
# advantage's std, the reference's kl, the loss's denominator, clip-higher, dynamic sampling and overlong shaping


def mode_defaults(c: dict) -> dict:
    """the settings a mode implies where the config leaves them to it (0, 'auto'): dapo's clip-higher, eps_high 0.28
    (else eps_low, a symmetric clip), and dapo's overlong penalty, 'fixed' (the seed's; else 'none')."""
    return dict(c, eps_high=c['eps_high'] or (0.28 if c['mode'] == 'dapo' else c['eps_low']),
                overlong={'auto': 'fixed' if c['mode'] == 'dapo' else 'none'}.get(c['overlong'], c['overlong']))


def loss_norm(mode: str, n_seq: float, n_tok: float, max_len: int | None) -> float:
    """the loss's denominator over one optimizer step (all micro-batches, all ranks): grpo the sequences (each one's
    token losses already averaged over its own length), dr_grpo sequences x max_new_tokens (a constant: no length
    bias), dapo the completion tokens (token-level)."""
    if mode == 'grpo':
        return n_seq
    if mode == 'dr_grpo':
        if max_len is None:
            raise ValueError("dr_grpo's denominator needs max_len (max_new_tokens)")
        return n_seq * max_len
    if mode == 'dapo':
        return n_tok
    raise ValueError(f"mode {mode!r} is not one of 'grpo', 'dr_grpo', 'dapo'")


def compute_advantages(rewards: torch.Tensor, group_size: int, *, mode: str) -> torch.Tensor:
    """rewards (B*G,) in group order -> advantages (B*G,): grpo/dapo (r - mean) / (std + 1e-4), dr_grpo r - mean."""
    r = rewards.float().view(-1, group_size)  # (B, G)
    adv = r - r.mean(-1, keepdim=True)
    if mode in ('grpo', 'dapo'):
        adv = adv / (r.std(-1, keepdim=True) + 1e-4)  # sample std (N-1), as torch.std
    return adv.view(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                mode: str, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
                eps_high: float = 0.2, max_len: int | None = None, norm: float | None = None,
                is_weights: torch.Tensor | None = None):
    """clipped surrogate (+ grpo's k3 KL) -> (loss, stats). logprobs/old/ref/mask/is_weights (B, T), advantages (B,).

    norm is the step-wide denominator (all micro-batches, all ranks): grpo sequences, dr_grpo sequences x
    max_len, dapo completion tokens. None computes it from this batch alone. is_weights (detached) scale each token's
    surrogate, not its kl: truncated importance sampling's min(pi_old / pi_engine, cap)."""
    if mode not in MODES[1:]:
        raise ValueError(f"policy_loss: mode {mode!r} is not one of {MODES[1:]}")
    mask = mask.float()
    A = advantages[:, None]  # (B, 1)
    ratio = torch.exp((logprobs - old_logprobs) * mask)  # masked before exp: padding cannot overflow
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    tok_loss = -torch.minimum(ratio * A, clipped * A)  # (B, T)
    if is_weights is not None:
        tok_loss = tok_loss * is_weights
    stats = {}
    if mode == 'grpo' and beta:
        d = ((ref_logprobs - logprobs) * mask).clamp(-20, 20)  # clamp the log-ratio before exp (kl blow-ups)
        kl = torch.exp(d) - d - 1  # k3, >= 0
        tok_loss = tok_loss + beta * kl
        stats['kl'] = (kl * mask).sum().detach() / mask.sum().clamp(min=1)
    norm = loss_norm(mode, mask.shape[0], mask.sum().clamp(min=1), max_len) if norm is None else norm
    tok_loss = tok_loss * mask
    # grpo: each sequence's mean token loss
    loss = ((tok_loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum() if mode == 'grpo' else tok_loss.sum()) / norm
    n = mask.sum().clamp(min=1)
    stats['log_ratio'] = ((logprobs - old_logprobs).abs() * mask).sum().detach() / n  # staleness, when off-policy
    stats['clip_low'] = (((ratio < 1 - eps_low) & (A < 0)).float() * mask).sum().detach() / n
    stats['clip_high'] = (((ratio > 1 + eps_high) & (A > 0)).float() * mask).sum().detach() / n
    return loss, stats


def shaped_rewards(texts: list[str], golds: list[str], lengths: list[int], truncated: list[bool], *, kind: str,
                   max_new_tokens: int, penalty: float, buffer: int, factor: float, fmt: float) -> list[float]:
    """verifiable reward plus the overlong shaping chosen by kind ('none' | 'fixed' | 'soft')."""
    out = []
    for text, gold, n, trunc in zip(texts, golds, lengths, truncated):
        r = rewards.reward(text, gold, format_reward=fmt)
        if kind == 'fixed':
            r += rewards.truncation_penalty(text, trunc, penalty=penalty)
        elif kind == 'soft':
            r += rewards.overlong_penalty(n, max_new_tokens, buffer=buffer, factor=factor)
        out.append(r)
    return out


def unmasked_ends(comps: list[list[int]], truncated: list[bool], texts: list[str], eos_ids: list[int],
                  stop_strings: list[str]) -> int:
    """completions that stopped (not truncated) but neither end in an end token nor hold a stop string: the token that
    stopped them fell outside the loss mask, so the model is never taught to stop (a mask built from token values,
    with pad == eos, does this)."""
    return sum(not t and (not c or c[-1] not in eos_ids) and not any(s in x for s in stop_strings)
               for c, t, x in zip(comps, truncated, texts))


def group_sums(groups: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """this rank's sums for the step's statistics -> (reward sum, sum of squares, completions, tokens, truncated,
    correct, constant-reward groups, groups, unmasked ends) (9,) float64 and the longest completion (1,). built on the device
    the collectives run on: nccl refuses host tensors (gloo does not, so only a gpu run showed it)."""
    r = [x for g in groups for x in g['rewards']]
    cl = [len(c) for g in groups for c in g['comps']]
    sums = [sum(r), sum(x * x for x in r), len(r), sum(cl), sum(x for g in groups for x in g['trunc']),
            sum(x for g in groups for x in g['correct']), sum(max(g['rewards']) - min(g['rewards']) <= 1e-6 for g in groups),
            len(groups), sum(g.get('ends', 0) for g in groups)]
    return (torch.tensor(sums, dtype=torch.float64, device=device),
            torch.tensor([float(max(cl, default=0))], device=device))


def next_round_size(missing: int, keep_rate: float, batch_size: int, world: int) -> int:
    """dynamic sampling: prompts for the next round, enough for the missing groups at the keep rate seen so far
    plus one, in whole shares per rank, never more than a batch (regenerating a whole batch wasted most of it)"""
    want = math.ceil(missing / max(keep_rate, 0.1)) + 1
    return min(batch_size, math.ceil(want / world) * world)


def select_groups(keep: list[bool], target: int, world: int) -> list[int]:
    """dynamic sampling: indices of the first kept groups, at most target, a multiple of world (equal per rank)."""
    idx = [i for i, k in enumerate(keep) if k][:target]
    return idx[:len(idx) // world * world]


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl, without a last line that a kill left half-written."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


# -----------------------------------------------------------------------------
# validation


def validate(c: dict, world: int):
    """one check per impossible setting, each naming the key, the value and what was expected."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(f"config error: {msg}")
    need(c['mode'] in MODES, f"mode = {c['mode']!r}, expected one of {MODES}")
    for k in ('master_dtype', 'optim_dtype'):
        need(c[k] in DTYPES, f"{k} = {c[k]!r}, expected one of {tuple(DTYPES)}")
    for k in ('max_iters', 'batch_size', 'micro_batch_size', 'group_size', 'max_new_tokens', 'num_iterations',
              'max_gen_rounds', 'max_seq_len', 'arith_size', 'logprob_chunk', 'ckpt_interval', 'log_interval'):
        need(c[k] >= 1, f"{k} = {c[k]}, expected >= 1")
    for k in ('learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'max_skips'):
        need(c[k] >= 0, f"{k} = {c[k]}, expected >= 0")
    for k in ('beta1', 'beta2'):
        need(0 <= c[k] < 1, f"{k} = {c[k]}, expected in [0, 1)")
    need(0 <= c['arith_trace_frac'] <= 1, f"arith_trace_frac = {c['arith_trace_frac']}, expected in [0, 1]")
    need(c['arith_task'] in ('chain', 'column', 'words'),
         f"arith_task = {c['arith_task']!r}, expected 'chain', 'column' or 'words'")
    need(c['arith_terms'] >= 2 and c['arith_digits'] >= 1,
         f"arith_terms = {c['arith_terms']}, arith_digits = {c['arith_digits']}, expected >= 2 and >= 1")
    need(c['replicas'] >= 1 and world % c['replicas'] == 0,
         f"replicas = {c['replicas']}, expected >= 1 and dividing the world size ({world})")
    need(c['micro_batch_tokens'] >= 0, f"micro_batch_tokens = {c['micro_batch_tokens']}, expected >= 0 (0: off)")
    need(c['lr_decay_iters'] >= c['warmup_iters'] >= 0,
         f"lr_decay_iters ({c['lr_decay_iters']}) must be >= warmup_iters ({c['warmup_iters']}) >= 0")
    need(c['device'] in ('cpu', 'cuda') or c['device'].startswith('cuda:'), f"device = {c['device']!r}, expected 'cpu' or 'cuda'")
    need(not c['device'].startswith('cuda') or torch.cuda.is_available(),
         f"device = {c['device']!r} but no CUDA device is available (use --device=cpu)")
    need(c['prompt_template'] in ('r1', 'chat') or '{question}' in c['prompt_template'],
         f"prompt_template = {c['prompt_template']!r}, expected 'r1', 'chat' or a string containing '{{question}}'")
    need(c['prompt_template'] != 'chat' or c['init_from'] != 'scratch',
         "prompt_template = 'chat' needs a tokenizer with a chat template; init_from = 'scratch' has none")
    need(c['autocast'] in ('auto', 'bf16', 'off'), f"autocast = {c['autocast']!r}, expected 'auto', 'bf16' or 'off'")
    need(c['autocast'] != 'bf16' or world == 1 or not c['device'].startswith('cuda'),
         "autocast = 'bf16' under fsdp2 on gpus: its parameters already compute in bf16 (use 'auto')")
    need(c['grad_sync'] in ('micro', 'step'), f"grad_sync = {c['grad_sync']!r}, expected 'micro' or 'step'")
    need(c['engine'] in ('static', 'hf'), f"engine = {c['engine']!r}, expected 'static' or 'hf'")
    need(c['overlong'] in ('auto', 'none', 'fixed', 'soft'),
         f"overlong = {c['overlong']!r}, expected 'auto', 'none', 'fixed' or 'soft'")
    need(c['init_from'] != 'scratch' or (c['n_embd'] % c['n_head'] == 0 and c['n_head'] % c['n_kv_head'] == 0),
         f"n_embd ({c['n_embd']}) must divide by n_head ({c['n_head']}), which must divide by n_kv_head ({c['n_kv_head']})")
    if c['mode'] == 'sft':
        need(not c['overlap'], "overlap = True overlaps rl rollouts with updates; mode = 'sft' has no rollout")
        need(c['batch_size'] % (world * c['micro_batch_size']) == 0,
             f"batch_size ({c['batch_size']}) must be divisible by world_size x micro_batch_size "
             f"({world}x{c['micro_batch_size']})")
    else:
        need(c['batch_size'] % world == 0, f"batch_size ({c['batch_size']} prompts) must be divisible by world_size ({world})")
        need(c['group_size'] >= 2, f"group_size = {c['group_size']}, expected >= 2 (advantages are relative to the group)")
        need(c['temperature'] > 0, f"temperature = {c['temperature']}, expected > 0 for rl sampling")
        need(0 < c['top_p'] <= 1, f"top_p = {c['top_p']}, expected in (0, 1]")
        need(0 <= c['eps_low'] < 1 and c['eps_high'] >= 0, f"eps_low ({c['eps_low']}) must be in [0, 1), eps_high ({c['eps_high']}) >= 0")
        need(c['beta'] >= 0, f"beta = {c['beta']}, expected >= 0")
        need(c['tis_cap'] == 0 or c['tis_cap'] >= 1, f"tis_cap = {c['tis_cap']}, expected 0 (off) or >= 1 (a cap "
             f"below 1 weighs every token by less than 1: a learning-rate scale, not a correction)")
        need(not (c['tis_cap'] and c['overlap']), "tis_cap with overlap = True: the old log-probs are the engine's, so "
             "the weight is always 1 (the clipped ratio corrects the gap)")
        need(c['overlong'] != 'soft' or 0 < c['overlong_buffer'] <= c['max_new_tokens'],
             f"overlong_buffer ({c['overlong_buffer']}) must be in 1..max_new_tokens ({c['max_new_tokens']}) with overlong='soft'")


def check_positions(c: dict, n_pos: int, longest_prompt: int):
    """a sequence never runs past the model's positions (nor sizes a kv cache for more)."""
    if c['mode'] == 'sft' and c['max_seq_len'] > n_pos:
        raise SystemExit(f"config error: max_seq_len = {c['max_seq_len']}, but the model has {n_pos} positions")
    if c['mode'] != 'sft' and longest_prompt + c['max_new_tokens'] > n_pos:
        raise SystemExit(f"config error: max_new_tokens = {c['max_new_tokens']} after the longest prompt ({longest_prompt} "
                         f"tokens) needs {longest_prompt + c['max_new_tokens']} positions; the model has {n_pos}")


# -----------------------------------------------------------------------------
# the run: one object holds the settings and what is built from them; the step's functions below take it


class Run(types.SimpleNamespace):
    """the settings (config keys, as attributes), this rank's place (ddp, rank, world, master, device, cuda, mesh),
    the data (tok, eos_ids, pad_id, rows, then examples or prompts), and what the run builds (model, amp_on, ref, infer,
    infer_kv, params, optimizer, preempt, log, and under overlap threads, side, bg_group, pending)."""


def setup(config: dict) -> Run:
    """the settings, resolved and checked, and this process's place: its rank, device and process group."""
    r = Run(**config, config=config)
    r.ddp = int(os.environ.get('RANK', -1)) != -1
    r.rank, r.world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if r.ddp else (0, 1)
    validate(config, r.world)
    r.master, r.mesh = r.rank == 0, None
    if r.ddp:
        from torch.distributed.device_mesh import init_device_mesh
        if r.device.startswith('cuda'):
            r.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(r.device)
        dist.init_process_group('nccl' if r.device.startswith('cuda') else 'gloo')
        # replicas > 1: a 2-d mesh, on which fully_shard shards along 'shard' and replicates along 'replicate' (hsdp)
        shape, names = ((r.replicas, r.world // r.replicas), ('replicate', 'shard')) if r.replicas > 1 else \
            ((r.world,), None)
        r.mesh = init_device_mesh('cuda' if r.device.startswith('cuda') else 'cpu', shape, mesh_dim_names=names)
    r.cuda = r.device.startswith('cuda')
    if r.cuda:
        choose_sdpa()
    r.log = (lambda *a: print(*a, flush=True)) if r.master else (lambda *a: None)
    r.gap_floor, r.alarmed = None, set()
    return r


def build(r: Run, init: str, init_from_run: str):
    """tokenizer, model (sharded), the overlap's inference copy, grpo's reference and the optimizer from `init` (a
    hub name, a dir, 'scratch' or a resumed checkpoint); grpo's reference from the run's original init."""
    r.tok = Tokenizer.bytes_level() if init == 'scratch' else load_pretrained(init, 'init_from', Tokenizer.load)
    try:
        eos_id = r.tok.token_id(r.eos_token or r.tok.default_eos(r.prompt_template))
    except ValueError as e:  # no single-token eos_token, or no chat template to read one from
        raise SystemExit(f"config error: eos_token = {r.eos_token!r}, prompt_template = {r.prompt_template!r}: {e}") from None
    r.eos_ids, r.pad_id = [eos_id], eos_id  # padding is never read: every mask comes from lengths, never token values
    cfg = dict(r.config, init_from=init)
    r.model = build_model(cfg, r.tok)
    r.amp_on = use_autocast(r.autocast, r.cuda, r.ddp, sum(p.numel() for p in r.model.parameters()), cpu_bf16_units())
    # overlap: the frozen copy rollouts generate from (bf16 under fsdp2 on gpus); the optimizer never writes it
    r.infer = inference_copy(r.model, r.device, bf16=r.cuda and r.ddp, amp=r.amp_on) if r.overlap else None
    if r.pack and r.cuda:
        use_varlen(r.model)
    if r.activation_checkpointing:
        r.model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})
    param_dtype = torch.bfloat16 if r.cuda else None
    if r.ddp:
        r.model = shard(r.model, r.mesh, param_dtype)
    r.model.to(r.device)
    r.ref = None
    if r.mode == 'grpo' and r.beta > 0:  # frozen, sharded like the policy, from the run's original init
        ref_cfg = dict(cfg, init_from=init_from_run, master_dtype=ref_dtype(r.master_dtype, r.cuda, r.ddp))
        r.ref = build_model(ref_cfg, r.tok).requires_grad_(r.amp_on).eval()  # autocast caches casts of leaves needing grad
        r.ref = use_varlen(r.ref) if r.pack and r.cuda else r.ref
        r.ref = (shard(r.ref, r.mesh, param_dtype, frozen=True) if r.ddp else r.ref).to(r.device)
    r.params = dict(r.model.named_parameters())  # at rest: the sharded parameters the optimizer updates and checkpoints hold
    r.optimizer = AdamW(r.params.values(), lr=r.learning_rate, betas=(r.beta1, r.beta2), weight_decay=r.weight_decay,
                        state_dtype=DTYPES[r.optim_dtype])


def resume(r: Run, path: str) -> tuple[dict, dict]:
    """the optimizer's state, the counters and this rank's rng from checkpoint `path`, which build() read the weights
    from -> (train_state.json, this rank's state: rng and an overlapped run's finished rollout)."""
    state, rstate = load_checkpoint(path, r.params, r.optimizer, r.rank, r.world)
    if 'rng' in rstate:
        torch.set_rng_state(torch.tensor(rstate['rng'], dtype=torch.uint8))
    else:
        r.log(f"resume: {path} was written by {state['world_size']} ranks, this run has {r.world}: weights and "
              f"optimizer resharded; the cpu rng and an overlapped run's pending rollout start afresh")
    if r.overlap and rstate.get('pending') is None:
        r.log("resume: no finished rollout was saved (a stop abandons the one in flight): the first step generates "
              "its own from the resumed weights")
    return state, rstate


def load_data(r: Run):
    """the rows, then sft examples or rl prompts. the whole global batch is chosen by (seed, data_pos); each rank takes
    its contiguous slice."""
    try:
        r.rows = load_rows(r.config, r.split)
    except ValueError as e:
        raise SystemExit(f"data error: {e}") from None
    if r.mode == 'sft':
        r.examples, dropped = tokenize_sft(r.rows, r.tok, r.prompt_template, r.system_prompt, r.eos_ids[0], r.max_seq_len)
        r.log(f"data: {len(r.examples)} sft examples from {r.dataset} ({dropped} dropped: longer than max_seq_len "
              f"{r.max_seq_len})")
        if not r.examples:
            raise SystemExit(f"no sft example fits max_seq_len = {r.max_seq_len}")
    else:
        r.prompts = [r.tok.encode_prompt(format_prompt(x['question'], r.prompt_template, r.tok, r.system_prompt))
                     for x in r.rows]
        r.log(f"data: {len(r.prompts)} rl prompts from {r.dataset}")
    check_positions(r.config, r.model.config.max_position_embeddings, max(map(len, r.prompts)) if r.mode != 'sft' else 0)


# -----------------------------------------------------------------------------
# the step: sft_step, or an rl step = rollout (prompts in, scored groups out) then update (groups in, optimizer step
# done); train_step runs one, sequential or overlapped


def amp(r: Run):
    """bf16 autocast when the run computes under it. a new context per use: an autocast object keeps its previous state
    when entered, so two threads must not share one."""
    return torch.autocast(r.device.split(':')[0], torch.bfloat16) if r.amp_on else contextlib.nullcontext()


def casts(r: Run, backward: bool):
    """autocast drops its cached bf16 weight casts (one cache per process) when a thread leaves its outermost autocast
    context: `casts` spans what runs on unchanged weights (a step's micro-batches, a rollout's rounds), so each weight
    is cast once there, not per micro-batch and again in its recompute. not so on a gpu's update: autograd recomputes
    in its device thread, which leaves autocast at nesting 0 and so clears the cache each backward. nor across the
    backwards of fsdp2 (cpu ranks): a cast cached by the first micro-batch is an older autograd node in the next one's
    backward, which the engine runs after fsdp2's post-backward hook has reduce-scattered the layer, so the weight's
    gradient would stay unreduced and count a micro-batch late. `casts` computes nothing in autocast itself, and ends
    before any optimizer step (a cached cast would be stale)."""
    on = r.amp_on and not (backward and r.ddp)
    return torch.autocast(r.device.split(':')[0], enabled=False) if on else contextlib.nullcontext()


def sync(r: Run):
    """phase timings wait for this thread's gpu work (not the overlapped rollout's stream)."""
    if r.cuda:
        torch.cuda.current_stream().synchronize()


def all_sum(r: Run, x: torch.Tensor) -> torch.Tensor:
    if r.ddp:
        dist.all_reduce(x)
    return x


def optimizer_step(r: Run, m: dict):
    """clip and step, unless the loss or the gradient norm is not finite: then no rank steps. the norm is global under
    fsdp2 and the loss all-reduced, so every rank sees the same values and decides alike, with no collective of its own."""
    with phase('optimizer_step'):
        gn = torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.grad_clip if r.grad_clip > 0 else float('inf'))
        m['grad_norm'] = gn.full_tensor() if isinstance(gn, DTensor) else gn
        bad = [k for k in ('loss', 'grad_norm') if k in m and not math.isfinite(float(m[k]))]  # host sync
        if bad:
            m.update(skipped=True, skip_reason=f"non-finite {' and '.join(bad)}")
        else:
            with r.preempt.lock:  # a stop cannot write weights that are half updated
                r.preempt.finished = None
                r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
    sync(r)


def to_device(xs: tuple, device: str) -> tuple:
    return tuple(x.to(device) if torch.is_tensor(x) else x for x in xs)


def cut(r: Run, sizes: list[tuple[int, int]]) -> list[list[int]]:
    """this rank's micro-batches (indices into its sequences' (prompt, completion) sizes): micro_batch_size rows in
    data order, or grouped by length under micro_batch_tokens, as many on every rank (fsdp2's collectives run per
    micro-batch). the loss's denominators are step-wide, so the cut never changes the gradient."""
    out = micro_batches(sizes, r.micro_batch_size, r.micro_batch_tokens, packed=r.pack)
    if r.ddp and r.micro_batch_tokens:
        n = torch.tensor(len(out), device=r.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        out = micro_batches(sizes, r.micro_batch_size, r.micro_batch_tokens, at_least=int(n), packed=r.pack)  # host sync
    return out


def sft_step(r: Run, data_pos: int) -> tuple[dict, int]:
    """one optimizer step of next-token loss on the completions -> (metrics, data_pos after)."""
    per_rank = r.batch_size // r.world
    idx = step_indices(len(r.examples), r.batch_size, data_pos, r.seed)[r.rank * per_rank:(r.rank + 1) * per_rank]
    exs = [r.examples[i] for i in idx]  # (ids, n_prompt): the completion and eos carry the loss
    micro = []
    for mb in cut(r, [(len(x), 0) for x, _ in exs]):
        if r.pack:
            micro.append(collate_packed([exs[i][0][:exs[i][1]] for i in mb], [exs[i][0][exs[i][1]:] for i in mb]))
        else:
            micro.append(collate_sft([exs[i] for i in mb], r.pad_id) + (None,))
    norm = all_sum(r, sum(mk.sum() for _, _, mk, _ in micro).to(r.device))  # global loss-token count, once
    loss_sum, m = torch.zeros((), device=r.device), {}
    with casts(r, backward=True):  # each weight cast once per optimizer step
        for k, (ids, attn, mk, pk) in enumerate(micro):
            r.preempt.park()  # a stop under way: the step is abandoned at its next micro-batch
            if r.ddp:
                r.model.set_requires_gradient_sync(r.grad_sync == 'micro' or k == len(micro) - 1)
            ids, attn, mk = ids.to(r.device), attn.to(r.device), mk.to(r.device)
            pk = pk and to_device(pk, r.device)
            with phase('forward'), amp(r):
                lp = token_logprobs(r.model, ids, attn, mk.shape[1], 1.0, r.logprob_chunk, vocab=r.tok.n_vocab,
                                    packed=pk)
                loss = -(lp * mk).sum() / norm
            with phase('backward'):
                (loss * r.world).backward()  # x world cancels FSDP's gradient averaging, exactly once
            loss_sum += loss.detach()
    m['loss'] = all_sum(r, loss_sum)
    m['tokens'] = all_sum(r, sum(a.sum() for _, a, _, _ in micro).to(r.device))
    computed = torch.tensor(float(sum(ids.numel() for ids, _, _, _ in micro)), device=r.device)
    m['pad_ratio'] = all_sum(r, computed) / m['tokens']  # tokens computed / tokens that count
    optimizer_step(r, m)
    return m, data_pos + r.batch_size


def rollout(r: Run, step: int, data_pos: int, policy, pg=None) -> tuple[list[dict], dict, int]:
    """one step's generation rounds from `policy` (the gathered model, or the inference copy when overlapped)
    -> (this rank's groups, stats as floats, data_pos after). dapo keeps generating until batch_size groups
    with distinct rewards (or max_gen_rounds). every collective here runs on pg."""
    m, groups, rounds, t0 = {'t_reward': 0.0}, [], 0, time.time()
    n_gen = r.batch_size  # prompts this round: the batch, then only what dynamic sampling still lacks
    G = r.group_size
    while True:
        r.preempt.park()
        per_rank = n_gen // r.world
        idx = step_indices(len(r.prompts), n_gen, data_pos, r.seed)[r.rank * per_rank:(r.rank + 1) * per_rank]
        data_pos += n_gen
        gen = torch.Generator(device=r.device).manual_seed(r.seed * 1_000_003 + step * 1009 + rounds * 101 + r.rank)
        policy.eval()
        with phase('rollout_generation'), gathered(policy), amp(r):
            out = generate(policy, [r.prompts[i] for i in idx], n_samples=G, max_new_tokens=r.max_new_tokens,
                           temperature=r.temperature, top_p=r.top_p, eos_ids=r.eos_ids, stop_strings=r.stop_strings,
                           tok=r.tok, pad_id=r.pad_id, generator=gen, engine=r.engine,
                           kv=r.infer_kv if policy is r.infer else None)
        policy.train(policy is r.model)
        rounds += 1
        t1 = time.time()
        with phase('reward_computation'):
            lens, trunc = out['mask'].sum(-1).tolist(), out['truncated'].tolist()  # host sync
            ids = out['ids'].tolist()  # host sync
            lps = out['logprobs'].tolist()  # the sampler's: an overlapped update's old log-probs, and the gap's
            comp = [ids[i][:n] for i, n in enumerate(lens)]
            texts = [r.tok.decode([x for x in c if x not in r.eos_ids]) for c in comp]
            golds = [r.rows[i]['answer'] for i in idx for _ in range(G)]
            rew = shaped_rewards(texts, golds, lens, trunc, kind=r.overlong, max_new_tokens=r.max_new_tokens,
                                 penalty=r.overlong_penalty, buffer=r.overlong_buffer, factor=r.overlong_factor,
                                 fmt=r.format_reward)
            correct = [rewards.is_correct(rewards.extract_answer(t), g) for t, g in zip(texts, golds)]
        for j, i in enumerate(idx):  # lps: the behaviour policy's log-probs, the overlapped update's old ones
            s = slice(j * G, (j + 1) * G)
            groups.append({'prompt': r.prompts[i], 'comps': comp[s], 'rewards': rew[s], 'trunc': trunc[s],
                           'correct': correct[s], 'lps': [lp[:n] for lp, n in zip(lps[s], lens[s])],
                           'ends': unmasked_ends(comp[s], trunc[s], texts[s], r.eos_ids, r.stop_strings)})
        m['t_reward'] += time.time() - t1
        if r.mode != 'dapo' or not r.dynamic_sampling:
            stat_groups = groups
            break
        # dynamic sampling: every rank sees every group, so all agree on what is kept (no hang)
        every = [groups]
        if r.ddp:
            every = [None] * r.world
            dist.all_gather_object(every, groups, group=pg)
        pool = [g for x in every for g in x]  # round-robin order is irrelevant: all ranks agree
        keep = [max(g['rewards']) - min(g['rewards']) > 1e-6 for g in pool]  # exact test, not std > 0
        if sum(keep) >= r.batch_size or rounds >= r.max_gen_rounds:
            sel = select_groups(keep, r.batch_size, r.world)
            share = len(sel) // r.world
            stat_groups, groups = pool, [pool[i] for i in sel[r.rank * share:(r.rank + 1) * share]]
            m.update(gen_rounds=rounds, kept_groups=len(sel), zero_std_frac=1 - sum(keep) / len(pool))
            break
        n_gen = next_round_size(r.batch_size - sum(keep), sum(keep) / len(keep), r.batch_size, r.world)
    m['t_rollout'] = time.time() - t0 - m['t_reward']
    # statistics over all ranks, from everything generated (dapo's pool is already global)
    sums, mx = group_sums(stat_groups, r.device if pg is None else 'cpu')  # pg: the background's gloo group
    if r.ddp and not (r.mode == 'dapo' and r.dynamic_sampling):
        dist.all_reduce(sums, group=pg)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=pg)
    s, n = sums.tolist(), sums[2].item()  # host sync
    m.update(reward_mean=s[0] / n, reward_std=math.sqrt(max(s[1] / n - (s[0] / n) ** 2, 0)), accuracy=s[5] / n,
             len_mean=s[3] / n, len_max=mx.item(), truncated_frac=s[4] / n, unmasked_ends=s[8])
    m.setdefault('zero_std_frac', s[6] / s[7])
    return groups, m, data_pos


def update(r: Run, groups: list[dict], m: dict, step: int):
    """one optimizer step (num_iterations of them) on the groups' sequences. old log-probs: overlapped, the behaviour
    policy's, recorded by the engine (never a recompute with the current weights, which would switch the correction
    off); else the policy's own before the update (mu = 1: the first forward's, detached)."""
    if not groups:  # dapo found no signal in max_gen_rounds: no update, on every rank alike
        r.log(f"step {step + 1}: no group with distinct rewards after {m['gen_rounds']} rounds; update skipped")
        m.update(loss=0.0, tokens=0, clip_low=0.0, clip_high=0.0, log_ratio=0.0)
        return optimizer_step(r, m)
    t2, dev = time.time(), r.device
    seq_p = [g['prompt'] for g in groups for _ in g['comps']]
    seq_c = [c for g in groups for c in g['comps']]
    seq_lp = [lp for g in groups for lp in g['lps']]
    with phase('advantage_computation'):
        adv = compute_advantages(torch.tensor([x for g in groups for x in g['rewards']]), r.group_size, mode=r.mode)
    m['t_adv'], t2 = time.time() - t2, time.time()
    micro = []
    for idx in cut(r, [(len(p), len(c)) for p, c in zip(seq_p, seq_c)]):
        ps, cs = [seq_p[i] for i in idx], [seq_c[i] for i in idx]
        ids, attn, cm, pk = collate_packed(ps, cs) if r.pack else collate_rl(ps, cs, r.pad_id) + (None,)
        eng = pad_rows([seq_lp[i] for i in idx], cm.shape[1]).to(dev)  # the sampler's log-probs of its own tokens
        micro.append([ids.to(dev), attn.to(dev), cm.to(dev), adv[idx].to(dev), eng if r.overlap else None, eng,
                      pk and to_device(pk, dev)])
    n_local = torch.tensor([float(len(seq_c)), sum(map(len, seq_c))], device=dev)
    n_seq, n_tok = all_sum(r, n_local).tolist()  # host sync: the step-wide denominators, once
    norm = loss_norm(r.mode, n_seq, n_tok, r.max_new_tokens)
    logprobs = lambda model, mb, **kw: token_logprobs(model, mb[0], mb[1], mb[2].shape[1], r.temperature,
                                                      r.logprob_chunk, vocab=r.tok.n_vocab, packed=mb[6], **kw)
    with torch.no_grad(), phase('old_logprobs'), amp(r):  # one context: each weight cast once
        for mb in micro:
            if not r.overlap and r.num_iterations > 1:  # mu = 1 takes them from the update's own first forward
                mb[4] = logprobs(r.model, mb)
            mb.append(logprobs(r.ref, mb) if r.ref is not None else None)
    sync(r)
    m['t_logprobs'] = time.time() - t2
    t3, (ent_sum, gap_sum, gap_max) = time.time(), (torch.zeros((), device=dev) for _ in range(3))
    for it in range(r.num_iterations):
        if it > 0:
            optimizer_step(r, m)
        loss_sum, st_sum = torch.zeros((), device=dev), {}
        with casts(r, backward=True):  # each weight cast once per optimizer step; the optimizer step is outside
            for k, mb in enumerate(micro):
                ids, attn, cm, a, old, eng, _, rlp = mb
                r.preempt.park()  # a stop under way: the step is abandoned at its next micro-batch
                if r.ddp:
                    r.model.set_requires_gradient_sync(r.grad_sync == 'micro' or k == len(micro) - 1)
                with phase('policy_loss_backward'), amp(r):
                    lp = logprobs(r.model, mb, entropy=it == 0)
                    if it == 0:  # the entropy of the policy the batch is scored under, and the train/infer gap
                        lp, ent = lp
                        ent_sum += (ent * cm).sum()
                        gap = (lp.detach() - eng).abs() * cm  # overlapped: the one-step lag too (= log_ratio)
                        gap_sum, gap_max = gap_sum + gap.sum(), torch.maximum(gap_max, gap.max())
                    old_lp = lp.detach() if old is None else old
                    # tis: pi_old / pi_engine per token (overlapped, old is the engine's: 1)
                    tis = ((old_lp - eng) * cm).exp() if r.tis_cap > 0 else None
                    loss, st = policy_loss(lp, old_lp, a, cm, mode=r.mode, ref_logprobs=rlp, beta=r.beta,
                                           eps_low=r.eps_low, eps_high=r.eps_high, norm=norm,
                                           is_weights=None if tis is None else tis.clamp(max=r.tis_cap))
                    if tis is not None:
                        st['tis_capped'] = ((tis > r.tis_cap).float() * cm).sum() / cm.sum().clamp(min=1)
                (loss * r.world).backward()  # x world cancels FSDP's gradient averaging, exactly once
                loss_sum += loss.detach()
                w = cm.sum()
                for key, v in st.items():  # token-weighted across micro-batches
                    st_sum[key] = st_sum.get(key, 0) + v * w
    m['loss'] = all_sum(r, loss_sum)
    for key, v in st_sum.items():
        m[key] = all_sum(r, v) / n_tok
    m['tokens'] = all_sum(r, sum(mb[1].sum() for mb in micro).to(dev))
    m['pad_ratio'] = all_sum(r, torch.tensor(float(sum(mb[0].numel() for mb in micro)), device=dev)) / m['tokens']
    m['entropy'] = all_sum(r, ent_sum) / n_tok
    m['mismatch_mean'] = all_sum(r, gap_sum) / n_tok  # mean and max |log pi_trainer - log pi_engine| of sampled tokens
    if r.ddp:
        dist.all_reduce(gap_max, op=dist.ReduceOp.MAX)
    m['mismatch_max'] = gap_max
    sync(r)
    m['t_update'], t4 = time.time() - t3, time.time()
    optimizer_step(r, m)
    m['t_optim'] = time.time() - t4


# overlap: the next step's rollout runs in a background thread (its own cuda stream and process group) on a frozen
# inference copy, while this step's update runs here. the copy is refreshed at one point per step, from this thread,
# while the background is idle; the background returns host data only (lists, floats), so no tensor crosses streams
# but the copy, whose refresh the side stream waits for through an event.


def inference_copy(model, device: str, bf16: bool, amp: bool):
    """the frozen copy an overlapped run generates from, computing exactly as the trainer does: under fsdp2 on gpus
    both run bf16 parameters (MixedPrecisionPolicy), so the copy is bf16. under autocast (one gpu) the trainer's
    matmuls run autocast's bf16 casts of its fp32 weights, while its embeddings and norms (not autocast) keep the
    residual stream fp32; the copy stores just that: each Linear's parameters in bf16 (the same rounding as autocast's
    cast, made at each refresh, at addresses that stay, so the decode graphs are captured once per run), the rest in
    the master dtype, and a tied lm_head its own bf16 weight (a bf16 copy throughout put 4% of tokens outside the
    clip at lr 0)."""
    infer = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16 if bf16 else None).eval()
    if amp:
        if infer.lm_head.weight is infer.get_input_embeddings().weight:
            infer.lm_head.weight = torch.nn.Parameter(infer.lm_head.weight.detach().clone())
        for m in infer.modules():
            if isinstance(m, torch.nn.Linear):
                m.to(torch.bfloat16)
    return infer.requires_grad_(False)


@torch.no_grad()
def refresh(infer, model):
    """copy the policy's weights into the inference copy. under fsdp2 each full_tensor is an all-gather: every rank
    calls this at the same point of the step, from the main thread, so the collectives line up."""
    src = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head has its own weight in the copy
    for name, p in infer.named_parameters():  # cast before the gather: a bf16 copy moves half the bytes
        p.copy_(src[name].to(p.dtype).full_tensor() if isinstance(src[name], DTensor) else src[name])


def start_overlap(r: Run, longest_prompt: int):
    """the background's thread, stream and process group, and its engine state, kept for the run: the copy's
    weights keep their addresses, so each bucket's graph is captured once (a round of dapo never has more rows than
    the batch)."""
    r.infer_kv = KVCache(r.batch_size // r.world * r.group_size, longest_prompt)
    # the side stream runs at high priority: a decode step is ~700 small kernels, which then slot in between the
    # update's long GEMMs instead of queueing behind them (fsdp2's own communication streams are high priority too)
    r.threads, r.side = ThreadPoolExecutor(1), torch.cuda.Stream(priority=-1) if r.cuda else None
    # gloo: the background exchanges host data only, so it never runs a device collective beside the update's
    r.bg_group = dist.new_group(backend='gloo') if r.ddp else None
    r.threads_before = torch.get_num_threads()
    if not r.cuda:  # one intra-op thread per side, so the two do not fight for the cores
        torch.set_num_threads(max(1, r.threads_before // 2))


def launch(r: Run, step: int, data_pos: int) -> Future:
    """step's rollout from the inference copy, in the background, after the refresh's copies on this stream."""
    ev = torch.cuda.Event() if r.cuda else None
    if r.cuda:
        ev.record()

    def background():
        if r.cuda:
            torch.cuda.set_device(r.device)  # a new thread starts on gpu 0, where it would open a context
        with phase('async_next_rollout'), torch.cuda.stream(r.side) if r.cuda else contextlib.nullcontext():
            if r.cuda:
                r.side.wait_event(ev)
            with casts(r, backward=False):  # autocast's nesting is per thread
                out = rollout(r, step, data_pos, r.infer, r.bg_group)
            if r.cuda:
                r.side.synchronize()
        return out
    return r.threads.submit(background)


def set_lr(r: Run, step: int) -> float:
    lr = get_lr(step, r.learning_rate, r.min_lr, r.warmup_iters, r.lr_decay_iters)
    for g in r.optimizer.param_groups:
        g['lr'] = lr
    return lr


def train_step(r: Run, step: int, data_pos: int) -> tuple[dict, int]:
    """one optimizer step: sft, or rollout then update, sequential or overlapped -> (metrics, data_pos after)."""
    if r.mode == 'sft':
        return sft_step(r, data_pos)
    if not r.overlap:
        with casts(r, backward=False):
            groups, m, data_pos = rollout(r, step, data_pos, r.model)
    else:  # one step off-policy: these groups came from theta_{N-1}; step N+1's are generated from theta_N meanwhile
        if r.pending is None:  # the first step generates from its own weights, in the foreground
            refresh(r.infer, r.model)
            r.pending = launch(r, step, data_pos)
        t_wait = time.time()
        groups, m, data_pos = r.pending.result()
        m = dict(m, t_wait=time.time() - t_wait)  # the rollout time the update did not hide
        refresh(r.infer, r.model)  # theta_N: the one synchronised point of the step, on every rank alike
        r.pending = launch(r, step + 1, data_pos)  # the last step too: the final checkpoint stores it, for a resume
    with phase('policy_update'):
        update(r, groups, m, step)
    return m, data_pos


def save(r: Run, step: int, state: dict, rank_state: dict, pg=None, stop: bool = False):
    save_checkpoint(r.out_dir, step, r.model, r.optimizer, r.tok, state, rank_state, r.rank, r.world, params=r.params,
                    pg=pg, export=not stop, tmp='ckpt.stop.tmp' if stop else 'ckpt.tmp', link_lock=r.preempt.link_lock)
    if stop:
        r.log(f"step {step}: stopped by a signal; the last finished step is in {r.out_dir}/ckpt (--init_from=resume "
              f"continues)")


def alarms(r: Run, m: dict):
    """a step's alarms -> m['alarm'], each printed once a run: a completion that stopped on a token outside the loss
    mask, and a growing train/infer gap (sequential runs: overlapped, the gap holds the one-step lag, which the clipped
    ratio already corrects)."""
    said = []
    if m.get('unmasked_ends'):
        said.append(('mask', f"{m['unmasked_ends']:.0f} completions stopped on a token outside the loss mask: the model "
                             f"is not taught to stop"))
    gap = m.get('mismatch_mean')
    if gap is not None and not r.overlap and math.isfinite(gap):
        if r.gap_floor is not None and gap > GAP_MIN and gap > GAP_GROWTH * r.gap_floor:
            said.append(('gap', f"the train/infer gap grew: mean |log pi_trainer - log pi_engine| {gap:.2e}, "
                                f"{gap / max(r.gap_floor, 1e-12):.0f}x its smallest this run ({r.gap_floor:.2e})"))
        r.gap_floor = gap if r.gap_floor is None else min(r.gap_floor, gap)
    if said:
        m['alarm'] = '; '.join(text for _, text in said)
        for kind, text in said:
            if kind not in r.alarmed:
                r.alarmed.add(kind)
                r.log(f"alarm at step {m['step']}: {text}")


def log_line(m: dict, max_iters: int, mode: str, overlap: bool) -> str:
    """a step's metrics -> its log line."""
    rl = '' if mode == 'sft' else (f" | reward {m['reward_mean']:.3f} | acc {m['accuracy']:.3f} | len {m['len_mean']:.0f}"
                                   f" | clip {m['clip_low']:.3f}/{m['clip_high']:.3f}"
                                   + (f" | kl {m['kl']:.4f}" if 'kl' in m else '')
                                   + (f" | |log ratio| {m['log_ratio']:.4f}" if overlap else '')
                                   + (f" | gap {m['mismatch_mean']:.1e}" if 'mismatch_mean' in m else '')
                                   + (f" | rounds {m['gen_rounds']}" if 'gen_rounds' in m else ''))
    skip = f" | skipped: {m['skip_reason']}" if m.get('skipped') else ''
    return (f"step {m['step']}/{max_iters} | loss {m['loss']:.4f}{skip}{rl} | lr {m['lr']:.1e} | "
            f"{m['time_ms']:.0f} ms")


# -----------------------------------------------------------------------------
def main(argv: list[str], signals: bool = True):
    """the run: configure, the mode's defaults, build, resume, then the loop. signals: SIGTERM and SIGINT write the last
    finished step and end the process (False where the caller owns the process: the tests run main in theirs)."""
    config = {k: globals()[k] for k in config_keys}
    configure(config, argv)  # config keys only: MODES, R1_TAGS and the like are not settings
    config = mode_defaults(config)  # what a 0 or 'auto' leaves to the mode
    r = setup(config)
    torch.manual_seed(r.seed)
    os.makedirs(r.out_dir, exist_ok=True)

    # resume reads the model, tokenizer and counters from out_dir/ckpt; the run's settings come from argv
    state, rstate, init = {'step': 0, 'data_pos': 0, 'init_from': r.init_from}, {}, r.init_from
    if r.init_from == 'resume':
        init = os.path.realpath(os.path.join(r.out_dir, 'ckpt'))
        if not is_checkpoint(init):
            raise SystemExit(f"init_from = 'resume' but {r.out_dir}/ckpt is not a checkpoint (no train_state.json and "
                             f"state/)")
        with open(os.path.join(init, 'train_state.json')) as f:
            state = json.load(f)  # the run's original init, for grpo's reference
    config['init_from'] = init  # what the model is read from (what the checkpoint's config says it was)
    build(r, init, state['init_from'])
    if r.init_from == 'resume':
        state, rstate = resume(r, init)
    step, data_pos = state['step'], state['data_pos']
    n_params = sum(p.numel() for p in r.model.parameters())
    r.log(f"mode {r.mode} | {n_params / 1e6:.2f}M params | world {r.world} | device {r.device} | master {r.master_dtype}"
          f"{' under bf16 autocast' if r.amp_on else ''} | adam {r.optim_dtype} | init {init}"
          + (" | overlapped rollouts" if r.overlap else ''))
    load_data(r)
    r.pending, r.preempt, done = None, None, False  # pending, overlap: the future of the next step's rollout
    try:  # from here on, whatever ends the run gives back what it took (threads, signals): in process too
        if r.overlap:
            start_overlap(r, max(map(len, r.prompts)))
            if rstate.get('pending') is not None:  # resumed: the checkpoint's finished one
                r.pending = Future()
                r.pending.set_result(tuple(rstate['pending']))
        metrics_path = os.path.join(r.out_dir, 'metrics.jsonl')
        if r.master:  # a fresh run starts the file anew; a resumed one drops the steps it will redo. atomic: a kill
            # here leaves the old file or the new one
            old = read_metrics(metrics_path) if r.init_from == 'resume' and os.path.exists(metrics_path) else []
            with open(metrics_path + '.tmp', 'w') as f:
                f.writelines(json.dumps(m) + '\n' for m in old if m['step'] <= step)
            os.replace(metrics_path + '.tmp', metrics_path)
        if r.wandb_log and r.master:
            import wandb
            wandb.init(project=r.wandb_project, name=r.wandb_run_name, config=config)
        r.preempt = Preemption(lambda *a: save(r, *a, stop=True), r.ddp, r.device, r.log, signals=signals)
        r.preempt.saved = step
        r.preempt.mark((step, dict(state, world_size=r.world, config=config), {'rng': torch.get_rng_state().tolist()}))
        skips, t_last = 0, time.time()
        while step < r.max_iters:
            lr = set_lr(r, step)
            m, data_pos = train_step(r, step, data_pos)  # the hot part; the rest of the loop is bookkeeping
            step += 1
            dt = time.time() - t_last
            t_last = time.time()
            m = {k: (v.item() if torch.is_tensor(v) else v) for k, v in m.items()}  # host sync: logging
            m.update(step=step, lr=lr, time_ms=dt * 1000)
            alarms(r, m)
            if r.master:
                with open(metrics_path, 'a') as f:
                    f.write(json.dumps(m) + '\n')
                if r.wandb_log:
                    wandb.log(m, step=step)
                if step % r.log_interval == 0 or step == r.max_iters or m.get('skipped'):
                    print(log_line(m, r.max_iters, r.mode, r.overlap), flush=True)
            skips = skips + 1 if m.get('skipped') else 0
            if skips > r.max_skips:
                raise SystemExit(f"step {step}: {skips} steps in a row with a {m['skip_reason']} (max_skips = "
                                 f"{r.max_skips}); stopping. the last checkpoint, {r.out_dir}/ckpt, holds finite weights")
            state = {'step': step, 'data_pos': data_pos, 'init_from': state['init_from'], 'world_size': r.world,
                     'config': config}
            rank_state = {'rng': torch.get_rng_state().tolist()}
            r.preempt.mark((step, state, rank_state))  # a stop from here on writes this step, not the rollout in flight
            if step % r.ckpt_interval == 0 or step == r.max_iters:
                save(r, step, state, dict(rank_state, pending=r.pending.result() if r.pending is not None else None))
                r.preempt.saved = step
            r.preempt.park()
        done = True
    except SystemExit:
        raise
    except BaseException:
        # a peer that stopped exits while this rank's main thread may sit in a collective with it: the failure that
        # follows is no error, this rank's writer ends the process
        if r.preempt is not None:
            r.preempt.park(anywhere=True)
        raise
    finally:
        if r.overlap and hasattr(r, 'threads'):  # an error's exit does not wait for the rollout in flight
            r.threads.shutdown(wait=done, cancel_futures=not done)
            torch.set_num_threads(r.threads_before)
        if r.preempt is not None:
            r.preempt.close()
    if r.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

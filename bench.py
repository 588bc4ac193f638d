"""bench.py: rollout tokens/s against model.generate, the shares of a decode step that sampling and the stop check take
(against a per-row check of every row's window), training-step throughput, MFU and peak memory, time per rl phase,
rl steps sequential vs overlapped (and their decode tokens/s), and a memory planner (will a config fit, and what would).

    python bench.py                                   # tiny scratch model on CPU
    python bench.py --preset qwen3b --device cuda     # random-weight Qwen2.5-3B-shaped model, real sizes
    python bench.py --ckpt out-demo/sft/ckpt --skip train   # trained demo model: rows stop at different lengths
    python bench.py --overlap config/demo_rl.py --init_from=out-demo/sft/ckpt --max_iters=12   # rl sequential vs overlapped
    python bench.py --rl config/tiny.py --mode=dapo --max_iters=6    # ms per phase of an rl step: rollout ... optimizer
    python bench.py --memory config/dapo.py --world 2 --gpu_gb 24     # per-gpu memory plan of any config + overrides

Every speed is printed next to a baseline measured in the same process (these machines are shared and noisy):
our engine vs `model.generate` on the same model and prompts, each timed best of --repeats.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

import torch

import configurator
import data
import engine
import optim
import train

PRESETS = {  # qwenNb: the shapes of Qwen/Qwen2.5-Nb (3b tied embeddings, the others untied), random weights
    'tiny': dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, n_ff=512, vocab=None),
    'qwen3b': dict(n_layer=36, n_head=16, n_kv_head=2, n_embd=2048, n_ff=11008, vocab=151936, n_tok=151665,
                   hf='Qwen/Qwen2.5-3B'),
    'qwen7b': dict(n_layer=28, n_head=28, n_kv_head=4, n_embd=3584, n_ff=18944, vocab=152064, n_tok=151665,
                   hf='Qwen/Qwen2.5-7B', tied=False),
    'qwen14b': dict(n_layer=48, n_head=40, n_kv_head=8, n_embd=5120, n_ff=13824, vocab=152064, n_tok=151665,
                    hf='Qwen/Qwen2.5-14B', tied=False),
    'qwen32b': dict(n_layer=64, n_head=40, n_kv_head=8, n_embd=5120, n_ff=27648, vocab=152064, n_tok=151665,
                    hf='Qwen/Qwen2.5-32B', tied=False),
    'qwen72b': dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, n_ff=29568, vocab=152064, n_tok=151665,
                    hf='Qwen/Qwen2.5-72B', tied=False),
}  # n_tok: the real tokenizer's size (Qwen2.5: 151,665 ids, 151,936 embedding rows); the log-softmax and sampler span it
# hf: the hub model whose shapes a preset is (--memory plans it from the preset when it is not in the HF cache)
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'RTX 4090': 165e12}  # dense bf16
PEAK_BW = {'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.0e12, 'RTX 4090': 1.0e12}  # bytes/s: H100 SXM, A100 80 GB


def decode_bytes(config, dtype_bytes: int = 2) -> tuple[int, int]:
    """HF Qwen2/Llama config -> (weight bytes read per decode step, KV-cache bytes per cached token).

    weights: all but the input embedding, whose lookup reads only the batch's rows; the lm_head is read whole, tied or
    not. biases: qwen2 has q/k/v biases and no o_proj bias; llama has attention_bias (q/k/v/o) and mlp_bias."""
    c = config
    h, H, Hkv, ff = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    D = getattr(c, 'head_dim', None) or h // H
    qwen = c.model_type == 'qwen2'
    attn_bias, mlp_bias = getattr(c, 'attention_bias', False), getattr(c, 'mlp_bias', False)
    layer = ((H + 2 * Hkv) * D * (h + (qwen or attn_bias))  # q, k, v
             + H * D * h + (not qwen and attn_bias) * h  # o
             + 3 * h * ff + mlp_bias * (2 * ff + h)  # gate, up, down
             + 2 * h)  # two rmsnorms
    weights = c.num_hidden_layers * layer + h + c.vocab_size * h  # + final norm + lm_head
    return weights * dtype_bytes, c.num_hidden_layers * 2 * Hkv * D * dtype_bytes


def bandwidth_share(tok_s: float, rows: int, ctx: float, weight_bytes: int, kv_bytes_per_token: int,
                    peak_bw: float) -> float:
    """share of peak_bw that tok_s uses: (weight bytes + rows x ctx x KV bytes) per step x steps/s / peak_bw.
    ctx: KV slots each row reads per step (the static engine attends over its whole window, prompt + new tokens)."""
    return (weight_bytes + rows * ctx * kv_bytes_per_token) * (tok_s / rows) / peak_bw


def card_bw(cuda: bool, card: str) -> float | None:
    """PEAK_BW of the cuda device (its name), else of --card; None for a card not in the table"""
    name = torch.cuda.get_device_name() if cuda else card
    return next((v for k, v in PEAK_BW.items() if k in name), None)


# -----------------------------------------------------------------------------
# memory planner: per-gpu bytes of everything train.py holds, phase by phase, from the shapes and the config alone

GiB = 2 ** 30
MAX_BATCH = 4096  # the rollout batch search stops here
ALLOWANCE = (1.0 * GiB, 0.05)  # cuda context, cublas and nccl workspaces (outside max_memory_allocated); allocator slack
UNSYNCED = 'gradients, unsharded (grad_sync step)'


def model_shape(cfg: dict, preset: str = '') -> tuple[dict, str]:
    """(L, h, H, Hkv, D, ff, V embedding rows, n_tok tokenizer size, tied, bias), and where it came from: --preset, the
    config's own dims for 'scratch', init_from's config.json (a local dir or a cached hub model), the preset of a hub
    model that is one, or, for config/sft.py's checkpoint before sft has run (the rl configs' init_from), the model
    config/sft.py trains. any other model is an error: planning it as some other model would answer the wrong question."""
    from transformers import AutoConfig
    src = cfg['init_from']
    if preset:
        return preset_shape(preset), f"preset {preset}"
    if src == 'scratch':
        V = (data.Tokenizer.bytes_level().n_vocab + 63) // 64 * 64
        return dict(L=cfg['n_layer'], h=cfg['n_embd'], H=cfg['n_head'], Hkv=cfg['n_kv_head'],
                    D=cfg['n_embd'] // cfg['n_head'], ff=cfg['n_ff'], V=V, n_tok=V, tied=True, bias=True), 'scratch'
    try:
        c = AutoConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError):
        c = None
    if c is not None:
        s = dict(L=c.num_hidden_layers, h=c.hidden_size, H=c.num_attention_heads, Hkv=c.num_key_value_heads,
                 D=getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads, ff=c.intermediate_size,
                 V=c.vocab_size, tied=c.tie_word_embeddings, bias=c.model_type == 'qwen2')
        return dict(s, n_tok=s['V']), f"{src} config.json"
    hub = next((k for k, p in PRESETS.items() if p.get('hf') == src), None)
    if hub:
        return preset_shape(hub), f"preset {hub} ({src}, not in the HF cache)"
    sft = {k: getattr(train, k) for k in train.config_keys}
    with contextlib.redirect_stdout(io.StringIO()):
        configurator.configure(sft, [os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'sft.py')])
    if not os.path.exists(src) and os.path.normpath(src) == os.path.normpath(os.path.join(sft['out_dir'], 'ckpt')):
        s, how = model_shape(dict(cfg, init_from=sft['init_from']))
        return s, f"{how}, the model config/sft.py trains ({src} does not exist before it has run)"
    why = ('a directory without a readable config.json' if os.path.isdir(src)
           else 'no such directory, and no such model in the local HF cache')
    raise SystemExit(f"bench.py --memory: cannot read the model init_from = {src!r} ({why}); pass --preset NAME "
                     f"({', '.join(PRESETS)}) for its shapes, or set init_from to a directory with a config.json")


def preset_shape(name: str) -> dict:
    p = PRESETS[name]
    return dict(L=p['n_layer'], h=p['n_embd'], H=p['n_head'], Hkv=p['n_kv_head'], D=p['n_embd'] // p['n_head'],
                ff=p['n_ff'], V=p['vocab'] or 320, n_tok=p.get('n_tok') or p['vocab'] or 320, tied=p.get('tied', True),
                bias=True)


def layer_params(s: dict) -> int:
    q, kv = s['H'] * s['D'], s['Hkv'] * s['D']
    return s['h'] * (q + 2 * kv) + s['bias'] * (q + 2 * kv) + q * s['h'] + 3 * s['h'] * s['ff'] + 2 * s['h']


def n_params(s: dict) -> int:
    return s['V'] * s['h'] * (1 if s['tied'] else 2) + s['L'] * layer_params(s) + s['h']


def act_bytes(s: dict, regime: str, a: int = 4) -> tuple[int, int, int]:
    """bytes per token that autograd saves: (a decoder layer, a checkpointed layer's input, final norm + lm_head input).
    hf qwen2/llama: rmsnorm keeps its fp32 input and normalised output, projections their input, sdpa q, k, v, out and
    an fp32 logsumexp per head, the swiglu mlp 4 x ff. regime: 'plain' (no casts, a bytes each: cpu), 'autocast'
    (one gpu: fp32 residual stream, bf16 matmul outputs), 'fsdp' (bf16 params: bf16 residual, norms upcast to fp32).
    measured on cpu with saved_tensors_hooks (tests/test_memory.py), derived for the two gpu regimes."""
    h, q, kv, H, ff = s['h'], s['H'] * s['D'], s['Hkv'] * s['D'], s['H'], s['ff']
    if regime == 'plain':
        return a * (6 * h + 2 * q + 2 * kv + H + 4 * ff + 2), a * h, a * (3 * h + 1)
    norm = 10 * h if regime == 'autocast' else 8 * h  # fp32 input (a copy when bf16) + fp32 normalised + bf16 output
    return 2 * norm + 4 * q + 4 * kv + 4 * H + 8 * ff + 8, (4 if regime == 'autocast' else 2) * h, norm


def plan_memory(cfg: dict, world: int, s: dict, gpu_bytes: float, *, cuda: bool = True, prompt_len: int = 256,
                opt: tuple | None = None, replicas: int = 1) -> dict:
    """per-gpu bytes of train.py running cfg on world ranks: the components, the peak of each phase, the bytes a card
    needs for the largest (peak + ALLOWANCE), and the largest micro_batch_size and rollout batch that fit gpu_bytes;
    sync_bytes: what grad_sync 'micro' sends per rank per optimizer step beyond 'step'. replicas > 1 (hsdp): the
    states are sharded over world / replicas ranks, the batch still split over all.
    opt: (fp32 temporaries per element, elements per chunk or None for whole parameters); default optim.AdamW's."""
    W, N, V, h, L, Lp = world, n_params(s), s['V'], s['h'], s['L'], layer_params(s)
    Sh = W // replicas  # ranks a state is sharded over
    mb, ob = train.DTYPES[cfg['master_dtype']].itemsize, train.DTYPES[cfg['optim_dtype']].itemsize
    fsdp, rl = W > 1, cfg['mode'] != 'sft'
    regime = ('fsdp' if fsdp else 'autocast') if cuda else 'plain'
    cb = 2 if cuda else mb  # bytes of what is computed: gathered or cast weights, kv cache, logits
    n_seq = cfg['batch_size'] // W * (cfg['group_size'] if rl else 1)  # sequences per rank per optimizer step
    # fsdp2 without gradient sync (grad_sync 'step': every micro-batch but the last) accumulates each rank's whole
    # unsharded gradients in reduce_dtype, fp32, until the last backward reduce-scatters them; 'micro' reduce-scatters
    # after every backward, so only the 1/Sh shard accumulates. one micro-batch accumulates nothing, one rank shards nothing
    unsynced = lambda B: N * 4 if fsdp and cfg['grad_sync'] == 'step' and n_seq > B else 0
    c = {'master weights': N * mb / Sh, 'gradients': N * mb / Sh,
         UNSYNCED: unsynced(cfg['micro_batch_size']), 'adam moments': 2 * N * ob / Sh,
         'reference (grpo)': N * (2 if cuda and fsdp else mb) / Sh if cfg['mode'] == 'grpo' and cfg['beta'] > 0 else 0,
         'inference copy (overlap)': 0}
    if rl and cfg['overlap']:  # as the trainer computes: fsdp2 on gpus bf16; one gpu what autocast computes with (bf16
        # Linear weights, a tied lm_head's own among them, the embedding and norms in the master dtype); cpu the master
        c['inference copy (overlap)'] = (N * 2 if fsdp else N * 2 + V * h * (mb if s['tied'] else mb - 2)) if cuda else N * mb
    temps, chunk = opt or (optim.AdamW.TEMPS, optim.AdamW.CHUNK)
    c['optimizer step temporaries'] = temps * 4 * (min(chunk, N / Sh) if chunk else max(V * h, s['ff'] * h) / Sh)
    # weights in compute precision: autocast caches a bf16 copy of every weight for the whole forward (and the lm_head's
    # stays saved for backward; the first recompute, in autograd's device thread, ends the cache, which is
    # process-wide, at the backward's start); fsdp2 keeps the root (embedding = tied lm_head) gathered from forward to
    # backward and ~2 layers at a time (current + prefetch), plus a layer's unsharded grads and their fp32
    # reduce-scatter input
    emb = V * h * cb
    cw_fwd = N * 2 if regime == 'autocast' else emb + 2 * Lp * cb if fsdp else 0
    cw_bwd = emb + Lp * 2 if regime == 'autocast' else emb + 2 * Lp * cb + Lp * (cb + 4) if fsdp else 0
    layer_b, resid_b, head_b = act_bytes(s, regime, mb)
    resident = (c['master weights'] + c['adam moments'] + c['reference (grpo)'] + c['inference copy (overlap)'])
    T = prompt_len + cfg['max_new_tokens'] if rl else cfg['max_seq_len']
    n_logit = cfg['max_new_tokens'] + 1 if rl else T  # positions the lm_head computes (logits_to_keep)
    S = prompt_len + cfg['max_new_tokens'] - 1  # a rollout row's kv window

    def step(B: int, ckpt: bool) -> tuple[float, dict]:
        """peak of an optimizer step of micro-batches of B sequences (gradients accumulate from the first backward)"""
        ch, logits = min(cfg['logprob_chunk'], n_logit), B * n_logit * V * cb
        chunk32 = B * ch * s['n_tok'] * 4  # one fp32 log-prob chunk, over the tokenizer's columns
        u = {'activations (saved)': B * T * ((resid_b if ckpt else layer_b) * L + head_b), 'logits': logits}
        # forward: the logits and one log-prob chunk's float(), / T, log_softmax (rl: the entropy's lp, exp, lp * exp)
        u['forward transient'] = cw_fwd + logits + chunk32 * (3 if rl else 2)
        # backward, first the head: logits, their grad, a chunk's recompute and grad; then a layer at a time: its
        # recomputed activations (checkpointing), the mlp's gradients (~ff a token), the residual stream's grads
        u['backward transient'] = cw_bwd + max(2 * logits + 3 * chunk32,
                                               B * T * ((layer_b if ckpt else 0) + s['ff'] * cb + 2 * h * 4))
        grads = unsynced(B) or c['gradients']  # what accumulates from the first backward to the optimizer step
        peak = resident + u['activations (saved)'] + max(grads * (n_seq > B) + u['forward transient'],
                                                         grads + u['backward transient'])
        return max(peak, resident + c['gradients'] + c['optimizer step temporaries']), u

    def rollout(n_prompts: int) -> tuple[float, dict]:
        """peak of a generation round of n_prompts (global) x group_size rows; gradients are freed by then"""
        b = n_prompts // W
        r = {'kv cache': L * 2 * s['Hkv'] * s['D'] * cb * (b * cfg['group_size'] * S + b * prompt_len),  # + prefill's
             'decode logits': b * cfg['group_size'] * V * (cb + 4 * 4),  # logits, fp32 copy, / T, log_softmax, probs
             'rollout weights': 0 if cfg['overlap']  # the copy holds what it computes with
             else N * cb if cuda or fsdp else 0}  # gathered | autocast cache
        return resident + sum(r.values()), r

    need = lambda b: b * (1 + ALLOWANCE[1]) + ALLOWANCE[0] * cuda  # on cpu: no context, the slack alone
    peak, u = step(cfg['micro_batch_size'], cfg['activation_checkpointing'])
    c.update(u)
    p = {'rl update' if rl else 'sft step': peak}
    if rl:
        p['rollout'], r = rollout(cfg['batch_size'])
        c.update(r)
        if cfg['overlap']:  # the next rollout generates (from the copy) while this update trains
            p['overlapped'] = peak + r['kv cache'] + r['decode logits']
    out = {'components': c, 'peaks': p, 'peak': max(p.values()), 'n_params': N, 'regime': regime, 'T': T}
    # 'micro' reduce-scatters the N x 4 bytes of fp32 gradients after each micro-batch instead of once a step: a ring
    # reduce-scatter sends (Sh - 1) / Sh of them from each rank, and under hsdp a ring all-reduce of the 1/Sh shard
    # across the replicas 2 (replicas - 1) / replicas of that
    out['n_micro'] = -(-n_seq // cfg['micro_batch_size'])
    out['sync_bytes'] = (out['n_micro'] - 1) * ((Sh - 1) / Sh + 2 * (replicas - 1) / replicas / Sh) * N * 4
    out['need'] = need(out['peak'])
    out['fits'] = out['need'] <= gpu_bytes
    out['max_micro'] = {ck: max([b for b in range(1, n_seq + 1) if need(step(b, ck)[0]) <= gpu_bytes]
                                + [0]) for ck in (True, False)}
    if rl:
        def ok(n):  # the rollout alone, or overlapped with this update
            ro, r = rollout(n)
            return need(peak + r['kv cache'] + r['decode logits'] if cfg['overlap'] else ro) <= gpu_bytes
        out['max_batch'] = max([n for n in range(W, MAX_BATCH + 1, W) if ok(n)] + [0])
        out['rows'], out['window'] = n_seq, S
    return out


def memory_report(argv: list[str], world: int, gpu_gb: float, preset: str, prompt_len: int, replicas: int = 1) -> str:
    """bench.py --memory: the plan of a config (+ overrides) beside the seed's precision scheme and the seed's table"""
    cfg = {k: getattr(train, k) for k in train.config_keys}
    with contextlib.redirect_stdout(io.StringIO()):  # its 'override:' lines
        configurator.configure(cfg, argv)
    if replicas < 1 or world % replicas:
        raise SystemExit(f"bench.py --memory: --replicas {replicas} must be >= 1 and divide --world {world}")
    if cfg['batch_size'] % world:
        raise SystemExit(f"bench.py --memory: batch_size = {cfg['batch_size']} must be divisible by --world {world}, as in "
                         f"train.py (each rank takes an equal share)")
    s, src = model_shape(cfg, preset)
    gpu, cuda = gpu_gb * GiB, cfg['device'].startswith('cuda')
    plan = lambda c: plan_memory(c, world, s, gpu, cuda=cuda, prompt_len=prompt_len, replicas=replicas)
    ours = plan(cfg)
    seed = plan(dict(cfg, master_dtype='bf16', optim_dtype='fp32'))  # the seed's bf16 weights and grads, fp32 adam
    g = lambda b: f"{b / GiB:7.2f}"
    N = ours['n_params']
    lines = [f"memory plan: {' '.join(argv)} | {src}: {f'{N / 1e9:.2f}B' if N >= 1e9 else f'{N / 1e6:.2f}M'} params | world {world}"
             f"{f' (hsdp: {replicas} replicas x {world // replicas} shards)' if replicas > 1 else ''} | "
             f"{'cuda, ' + ours['regime'] if cuda else 'cpu'} | per gpu, GiB | card {gpu_gb:g} GiB",
             f"{'':44}{'seed scheme':>12}{'this config':>12}   (seed: bf16 weights + fp32 adam; this: master "
             f"{cfg['master_dtype']}, adam {cfg['optim_dtype']})"]
    lines += [f"  {k:42}{g(seed['components'][k]):>12}{g(v):>12}" for k, v in ours['components'].items() if v]
    lines.append("  peaks (transients do not coexist: a peak is not the sum of the rows above)")
    lines += [f"  {k:42}{g(seed['peaks'][k]):>12}{g(v):>12}" for k, v in ours['peaks'].items()]
    lines.append(f"  {'needs: peak x 1.05 + 1 GiB (context, allocator)' if cuda else 'needs: peak x 1.05 (allocator)':42}"
                 f"{g(seed['need']):>12}{g(ours['need']):>12}"
                 f"   -> this config {'fits' if ours['fits'] else 'does NOT fit'} in {gpu_gb:g} GiB")
    rl = cfg['mode'] != 'sft'
    lines.append(f"  shapes: micro_batch_size {cfg['micro_batch_size']} x {ours['T']} tokens, activation checkpointing "
                 f"{cfg['activation_checkpointing']}, grad_sync {cfg['grad_sync']}" + (f"; rollout {ours['rows']} rows x "
                 f"{ours['window']}-token window (prompts assumed {prompt_len} tokens: --prompt_len)" if rl else ''))
    if ours['sync_bytes']:  # sharded, and more than one micro-batch: the two grad_sync values differ
        other = plan(dict(cfg, grad_sync='step' if cfg['grad_sync'] == 'micro' else 'micro'))
        fit = f"needs {other['need'] / GiB:.2f} GiB, {'fits' if other['fits'] else 'does NOT fit'}"
        rs = (f"+{ours['sync_bytes'] / 1e9:.1f} GB sent per rank per optimizer step ({ours['n_micro']} reduce-scatters of "
              f"the {N * 4 / 1e9:.2f} GB of fp32 gradients instead of 1)")
        held = f"{N * 4 / GiB:.2f} GiB of unsharded fp32 gradients per rank"
        lines.append(f"  grad_sync micro costs {rs}; step would hold {held} instead ({fit})" if cfg['grad_sync'] == 'micro'
                     else f"  grad_sync step holds {held} between micro-batches; micro ({fit}) would cost {rs}")
    n = lambda x: x or 'none'
    lines.append(f"  largest micro_batch_size that fits: {n(ours['max_micro'][True])} with activation checkpointing, "
                 f"{n(ours['max_micro'][False])} without" + (f"; largest batch_size (prompts x {cfg['group_size']}) "
                 f"whose {'overlapped ' if cfg['overlap'] else ''}rollout fits: {n(ours['max_batch'])}"
                 f"{' (or more)' if ours['max_batch'] == MAX_BATCH else ''}" if rl else ''))
    # the seed's table counts GB (1e9) at micro_batch 1: its rows from the plan of each scheme at micro_batch_size 1
    gb = lambda b: f"{b / 1e9:.1f}"
    rows = {}
    for name, p in (('seed', plan(dict(cfg, master_dtype='bf16', optim_dtype='fp32', micro_batch_size=1))),
                    ('ours', plan(dict(cfg, micro_batch_size=1)))):
        c = p['components']
        grads = max(c['gradients'], c[UNSYNCED])  # grad_sync step: the unsharded ones, alive through the micro-batches
        state, extra = c['master weights'] + grads + c['adam moments'], c['reference (grpo)'] + c['inference copy (overlap)']
        rollout = sum(c.get(k, 0) for k in ('kv cache', 'decode logits', 'rollout weights'))
        rows[name] = [gb(c['master weights']), gb(grads), gb(c['adam moments']), gb(state),
                      gb(max(p['peaks'][k] for k in p['peaks'] if k in ('sft step', 'rl update')) - state - extra),
                      gb(p['need'] - p['peak'] + rollout), gb(p['need'])]
    seed_rows = ['weights', 'gradients', 'adam moments', 'subtotal', 'activations (checkpointed, micro_batch 1)',
                 'cuda overhead + rollout buffers', 'total']
    lines.append(f"  the seed's 2 x RTX 4090 table, GB = 1e9 bytes   {'seed':>8}{'planner, seed scheme':>22}"
                 f"{'planner, this config':>22}")
    lines += [f"    {k:44}{v:>8}{a:>22}{b:>22}" for k, v, a, b in
              zip(seed_rows, ['3', '3', '12', '18', '~2-3', '~2-3', '~22-24'], rows['seed'], rows['ours'])]
    return '\n'.join(lines)


def build(preset: str, device: str, ckpt: str = ''):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    if ckpt:
        dtype = torch.bfloat16 if device.startswith('cuda') else torch.float32
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval(), data.Tokenizer.load(ckpt)
    p, tok = PRESETS[preset], data.Tokenizer.bytes_level()
    # the byte tokenizer stands in for qwen's, at qwen's size: random prompts, no stop strings, so nothing is decoded
    tok.n_vocab = p.get('n_tok', tok.n_vocab)
    mc = Qwen2Config(vocab_size=p['vocab'] or 320, hidden_size=p['n_embd'], intermediate_size=p['n_ff'],
                     num_hidden_layers=p['n_layer'], num_attention_heads=p['n_head'],
                     num_key_value_heads=p['n_kv_head'], max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith('cuda') else torch.float32
    with torch.device(device):
        model = Qwen2ForCausalLM(mc).to(dtype)
    return model.eval(), tok


def timed(fn, repeats: int, device: str) -> float:
    """best of repeats, after one untimed call: whichever runs first must not pay for kernel choice and the
    allocator's first blocks of these shapes (a cold first call made the engine look 2.9x slower on an H200)"""
    fn()
    best = float('inf')
    for _ in range(repeats):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench_rollout(model, tok, args) -> dict:
    """same prompts, sampled at T=1, G samples per prompt. random model: every row runs to new_tokens; with
    --ckpt: real prompts that stop on eos at different lengths (ours drops finished rows, generate pads them)."""
    g = torch.Generator().manual_seed(0)
    if args.ckpt:
        with open(os.path.join(args.ckpt, 'train_state.json')) as f:
            cfg = json.load(f)['config']
        rows = data.arith_problems(args.prompts, 'test', cfg['seed'], cfg['arith_terms'], cfg['arith_digits'],
                                   task=cfg.get('arith_task', 'chain'))
        prompts = [tok.encode_prompt(data.format_prompt(r['question'], cfg['prompt_template'], tok, '')) for r in rows]
        eos = [tok.token_id(tok.default_eos(cfg['prompt_template']))]
    else:
        prompts = [torch.randint(0, 256, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        eos = []
    n_tok, n_steps = {}, {}

    def ours(kind, stops=(), ahead=None):
        out = engine.generate(model, prompts, n_samples=args.group_size, max_new_tokens=args.new_tokens,
                              temperature=1.0, top_p=1.0, eos_ids=eos, stop_strings=list(stops), tok=tok, pad_id=0,
                              generator=torch.Generator(device=args.device).manual_seed(0), engine=kind,
                              run_ahead=ahead)
        n_tok[kind], n_steps[kind] = int(out['mask'].sum()), int(out['mask'].sum(-1).max())  # host sync

    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=args.device)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    n_hf = [0]

    def hf():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=args.group_size, max_new_tokens=args.new_tokens,
                             min_new_tokens=None if eos else args.new_tokens, pad_token_id=0,
                             eos_token_id=eos[0] if eos else None)
        new = out[:, P:]
        n_hf[0] = int((new != 0).sum()) if eos else new.numel()

    # static (ours), hf (our slow path: the model forward on a dynamic cache), model.generate; each warmed up first
    t = {e: timed(lambda: ours(e), args.repeats, args.device) for e in ('static', 'hf')}
    t_hf = timed(hf, args.repeats, args.device)
    r = {'engine_tok_s': n_tok['static'] / t['static'], 'slow_tok_s': n_tok['hf'] / t['hf'],
         'generate_tok_s': n_hf[0] / t_hf, 'engine_tokens': n_tok['static'], 'generate_tokens': n_hf[0]}
    r['speedup'], r['vs_slow'] = r['engine_tok_s'] / r['generate_tok_s'], r['engine_tok_s'] / r['slow_tok_s']
    # sampling's share of a decode step: engine.sample alone, eager over the full vocabulary, on
    # fp32 logits of the rollout's (N, V), against the engine's time per step (prefill included: <1% at 512 tokens)
    N, V = len(prompts) * args.group_size, model.config.vocab_size
    logits = torch.randn(N, V, device=args.device)
    logits[:, tok.n_vocab:] = -float('inf')  # as generate masks the padded embedding rows
    gen, k = torch.Generator(device=args.device).manual_seed(0), 20  # k calls a timing: one is ~1 ms on a gpu
    r['sampling_ms'] = timed(lambda: [engine.sample(logits, 1.0, 1.0, gen) for _ in range(k)], args.repeats,
                             args.device) / k * 1000
    r['step_ms'] = t['static'] / n_steps['static'] * 1000
    r['sampling_share'], r['shape'] = r['sampling_ms'] / r['step_ms'], (N, V)
    # the stop check on the rollout's rows; the presets' byte tokenizer stands in at its own size, not qwen's
    by = data.Tokenizer.load(args.tokenizer) if args.tokenizer else tok if args.ckpt else data.Tokenizer.bytes_level()
    r |= bench_stop_check(by, N, args.new_tokens, args.device, args.repeats)
    r['check_share'], r['per_row_share'] = r['check_ms'] / r['step_ms'], r['per_row_ms'] / r['step_ms']
    # the rollout's own check (eos and '</answer>'), with the host in lockstep, then running a step behind the device
    lock, ahead = (timed(lambda: ours('static', ['</answer>'], a), args.repeats, args.device) for a in (False, True))
    r['lockstep_ms'], r['ahead_ms'] = (x / n_steps['static'] * 1000 for x in (lock, ahead))
    r['check_tok'] = os.path.basename(os.path.normpath(p)) if (p := args.tokenizer or args.ckpt) else 'byte'
    bw = card_bw(args.device.startswith('cuda'), args.card)
    if bw:  # rows run to the end without eos (random weights): exact; with early stops an upper estimate
        w, kv = decode_bytes(model.config, next(model.parameters()).element_size())
        rows, ctx = len(prompts) * args.group_size, max(map(len, prompts)) + args.new_tokens
        r['bw_share'] = bandwidth_share(r['engine_tok_s'], rows, ctx, w, kv, bw)
        r['bw_limit_tok_s'] = r['engine_tok_s'] / r['bw_share']
    return r


def bench_stop_check(tok, rows: int, steps: int, device: str, repeats: int) -> dict:
    """the host bookkeeping of a decode step, eos and the stop string '</answer>': engine.stop_check (a table lookup on
    the device, one read back, windows decoded for the rows it flags) against the simple per-row check (every
    token read back, every row's window decoded), on the same rows: r1 completions whose reasoning runs i / rows of the
    steps in row i (the last ones truncated), each row leaving at its stop as in generate. both must stop the same rows
    at the same steps; the token table is built once per tokenizer and stop strings (cached), timed apart."""
    eos, stops = [tok.token_id(tok.default_eos('r1'))], ['</answer>']
    body = tok.encode('\n'.join(p['reasoning'] for p in data.arith_problems(64, 'train', 0, 3, 2)) + '\n')
    body = body * (steps // len(body) + 2)
    seqs = [(tok.encode('<think>') + body[i:i + steps * i // rows] + tok.encode(f'</think><answer>{i}</answer>')
             + eos * steps)[:steps] for i in range(rows)]
    window, eos_set = max(len(s.encode()) for s in stops), set(eos)
    ends = lambda ids: ids[-1] in eos_set or any(s in tok.decode(ids[-window:]) for s in stops)
    stop = [next((t for t in range(steps) if ends(s[:t + 1])), steps) for s in seqs]
    lives = [[i for i in range(rows) if stop[i] >= t] for t in range(steps)]  # the rows generate keeps at each step
    lives = [x for x in lives if x]
    cols = [torch.tensor([seqs[i][t] for i in x], device=device) for t, x in enumerate(lives)]  # each step's nxt
    live_t = [torch.tensor(x) for x in lives]  # generate keeps live as a tensor, the per-row check kept a list
    res = {}

    def per_row():
        texts, res['per_row'] = [[] for _ in range(rows)], []
        for col, live in zip(cols, lives):
            done = []
            for i, x in zip(live, col.tolist()):  # host sync
                texts[i].append(x)
                done.append(x in eos_set or any(s in tok.decode(texts[i][-window:]) for s in stops))
            res['per_row'].append(done)

    def ours():
        check = engine.stop_check(tok, eos, stops, rows, steps, device)
        res['ours'] = [check(col, live, t) for t, (col, live) in enumerate(zip(cols, live_t))]

    t0 = time.perf_counter()
    table = engine.stop_ends.__wrapped__(tok, tuple(stops), tok.n_vocab)
    r = {'table_ms': (time.perf_counter() - t0) * 1000, 'check_rows': rows,
         'decoded': sum(table[c.cpu()].sum().item() for c in cols) / sum(map(len, cols))}  # of the live rows' windows
    r['check_ms'], r['per_row_ms'] = (timed(f, repeats, device) / len(cols) * 1000 for f in (ours, per_row))
    want = [[stop[i] == t for i in x] for t, x in enumerate(lives)]
    assert [[j in d for j in range(len(x))] for d, x in zip(res['ours'], lives)] == res['per_row'] == want, \
        'the checks stop different rows'
    return r


def model_flops(n_params: int, n_layer: int, hidden: int, seq_len: int) -> int:
    """training flops per token: 6 per parameter (forward 2, backward 4) + causal attention's q k^T and p v, 2 x 2 x
    hidden x (seq_len / 2 keys on average) per layer forward, x 3 with backward = 6 n_layer hidden seq_len (palm's
    12 L h T counts every key)"""
    return 6 * n_params + 6 * n_layer * hidden * seq_len


def bench_train(model, tok, args, amp: bool) -> dict:
    """train.py's step as a run does it: --accum micro-batches of micro_batch x seq_len (forward, backward), then one
    optimizer step; on cuda fp32 master weights under bf16 autocast as on one gpu, on a cpu under it if `amp`. mfu
    counts the model's flops (6 N + attention, per token); hfu adds the forward that activation checkpointing
    recomputes."""
    cuda = args.device.startswith('cuda')
    model.train()
    if cuda:
        model.float()  # fp32 master weights under bf16 autocast, as train.py on one GPU
    if args.ckpt_layers:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})
    opt = optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, state_dtype=torch.bfloat16)
    B, T = args.micro_batch, args.seq_len
    ids = torch.randint(0, min(tok.n_vocab, 256), (B, T), device=args.device)
    attn = torch.ones_like(ids)
    autocast = torch.autocast(args.device.split(':')[0], torch.bfloat16, enabled=cuda or amp)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {}

    def step():
        t0 = time.perf_counter()
        with torch.autocast(args.device.split(':')[0], enabled=False):  # train.py's `casts`: one cast per step
            for _ in range(args.accum):
                with autocast:
                    loss = -train.token_logprobs(model, ids, attn, T - 1, 1.0, 256, vocab=tok.n_vocab).mean()
                loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if t2 - t0 < times.get('best', float('inf')):  # the breakdown of the step timed() reports, the fastest
            times.update(best=t2 - t0, micro_batches=t1 - t0, optimizer=t2 - t1)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dt = timed(step, args.repeats, args.device)
    n_params, c = sum(p.numel() for p in model.parameters()), model.config
    tokens = args.accum * B * T
    flops = model_flops(n_params, c.num_hidden_layers, c.hidden_size, T) * tokens
    out = {'train_tok_s': tokens / dt, 'step_ms': dt * 1000, 'micro_batches_ms': times['micro_batches'] * 1000,
           'optimizer_ms': times['optimizer'] * 1000}
    name = torch.cuda.get_device_name() if cuda else args.card
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak:
        out['mfu'] = flops / dt / peak
        out['hfu'] = out['mfu'] * (4 / 3 if args.ckpt_layers else 1)  # the recomputed forward: a third more work
    if cuda:
        out['peak_mem_gb'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def run_steps(train_args: list[str], read=lambda r: None, skip: int = 1) -> tuple[list[dict], object]:
    """train.py's steps in this process, as its loop runs them (setup, build, data, then train_step, timed step to
    step), without checkpoints or metrics files -> (each step's metrics but the first `skip` (warm-up: kernel choice,
    allocator, an overlapped run's first rollout that nothing hides), read(the run)): what the caller needs of the
    run, never the run itself, which would keep its model and optimizer through the next one"""
    cfg = {k: getattr(train, k) for k in train.config_keys}
    with contextlib.redirect_stdout(io.StringIO()):  # 'override:' and 'data:' lines
        configurator.configure(cfg, train_args)
        r = train.setup(train.mode_defaults(cfg))
        torch.manual_seed(r.seed)
        train.build(r, r.init_from, r.init_from)
        train.load_data(r)
    r.pending, r.preempt = None, train.Preemption(None, r.ddp, r.device, r.log, signals=False)  # signals: the caller's
    rows, data_pos, t = [], 0, time.time()
    try:
        if r.overlap:
            train.start_overlap(r, max(map(len, r.prompts)))
        for step in range(r.max_iters):
            lr = train.set_lr(r, step)
            m, data_pos = train.train_step(r, step, data_pos)
            rows.append({k: (v.item() if torch.is_tensor(v) else v) for k, v in m.items()})  # host sync
            rows[-1].update(step=step + 1, lr=lr, time_ms=(time.time() - t) * 1000)
            t = time.time()
    finally:
        if r.overlap and hasattr(r, 'threads'):
            r.threads.shutdown()  # the last step's launch: waited for, not abandoned mid-rollout
            torch.set_num_threads(r.threads_before)  # an overlapped run gives each side half the threads
        r.preempt.close()
    return rows[skip:], read(r)


RL_PHASES = {'rollout': ('t_rollout',), 'reward': ('t_reward',), 'advantages': ('t_adv',),
             'log-probs (old, reference)': ('t_logprobs',), 'update (loss, backward)': ('t_update',),
             'optimizer step': ('t_optim',)}


def bench_rl(train_args: list[str]) -> dict:
    """mean ms per phase of train.py's rl steps (metrics.jsonl: each phase waits for its own gpu work) and of the whole
    step (means, so the phases add up to it); 'other' is what no phase covers (statistics' all-reduces, logging); and
    the train/infer gap over the steps: the mean of mismatch_mean, the largest mismatch_max"""
    rows = [m for m in run_steps(train_args)[0] if 't_update' in m]  # a dapo step without signal skips its update
    mean = lambda f: statistics.fmean(map(f, rows)) if rows else float('nan')
    r = {k: mean(lambda m: 1000 * sum(m[x] for x in keys)) for k, keys in RL_PHASES.items()}
    r['step'] = mean(lambda m: m['time_ms'])
    r['other'] = r['step'] - sum(r[k] for k in RL_PHASES)
    gap = mean(lambda m: m['mismatch_mean']), max((m['mismatch_max'] for m in rows), default=float('nan'))
    return r | {'steps': len(rows), 'gap': gap}


def bench_update(train_args: list[str], repeats: int, spread: str) -> dict:
    """the rl update's tokens/s (tokens that count: prompts and completions) with micro-batches cut in data order against
    the same sequences grouped by length under micro_batch_tokens (default: micro_batch_size x the mean row), padded
    and packed end to end, in this process, on the same weights (lr 0) and threads. the sequences: one rollout of the run's, or with spread
    'lo-hi' G completions a prompt of uniform random lengths in lo..hi (r1's run ~100-1,000) after 64-token prompts."""
    def measure(r):
        groups = train.rollout(r, 0, 0, r.model)[0]
        if spread:
            lo, hi = map(int, spread.split('-'))
            g, V, G = torch.Generator().manual_seed(0), r.tok.n_vocab, r.group_size
            lens = torch.randint(lo, hi + 1, (r.batch_size // r.world, G), generator=g).tolist()
            groups = [{'prompt': torch.randint(V, (64,), generator=g).tolist(), 'comps': [torch.randint(
                V, (n,), generator=g).tolist() for n in ns], 'rewards': torch.rand(G, generator=g).tolist(),
                'lps': [[0.0] * n for n in ns]} for ns in lens]
        rows = [len(x['prompt']) + len(c) for x in groups for c in x['comps']]
        budget = r.micro_batch_tokens or r.micro_batch_size * round(statistics.fmean(rows))
        out = {'budget': budget, 'rows': len(rows), 'len_min': min(rows), 'len_max': max(rows)}
        for name, tokens, pack in (('plain', 0, False), ('grouped', budget, False), ('packed', budget, True)):
            r.micro_batch_tokens, r.pack, m = tokens, pack, {}
            t = timed(lambda: train.update(r, groups, m, 0), repeats, r.device)
            out[name] = {'tok_s': float(m['tokens']) / t, 'pad_ratio': float(m['pad_ratio']), 'ms': t * 1000}
        return out
    return run_steps(train_args + ['--max_iters=1', '--learning_rate=0', '--min_lr=0'], read=measure, skip=0)[1]


def bench_overlap(train_args: list[str], repeats: int, card: str) -> dict:
    """train.py's rl loop, sequential then overlapped, alternating, in this process: per-phase medians over all steps
    but each run's first. decode tok/s: the rollout's tokens (len_mean x rows) / t_rollout, over the steps of one
    generation round (metrics.jsonl does not say how many rows dapo's later rounds had), and its share of the
    bandwidth limit as bench_rollout's, the kv window from the data set's longest prompt"""
    def reads(r):  # what a decode step reads: bf16 weight casts and kv under autocast or fsdp2 on gpus, else the
        # master dtype; the rows of a round on this rank; the engine's window
        nbytes = 2 if r.cuda or r.amp_on else train.DTYPES[r.master_dtype].itemsize
        w, kv = decode_bytes(r.model.config, nbytes)
        rows, ctx = r.batch_size // r.world * r.group_size, max(map(len, r.prompts)) + r.max_new_tokens
        return w, kv, rows, ctx, card_bw(r.cuda, card)

    # the same cores on both sides: overlapped, each side runs max(1, threads // 2) intra-op threads, so on a cpu the
    # sequential baseline gets both halves (with OMP_NUM_THREADS=1 it would otherwise run on one core against two)
    threads, cfg = torch.get_num_threads(), {k: getattr(train, k) for k in train.config_keys}
    with contextlib.redirect_stdout(io.StringIO()):
        configurator.configure(cfg, train_args)
    side = max(1, threads // 2)
    seq_threads = threads if cfg['device'].startswith('cuda') else 2 * side
    steps = {False: [], True: []}
    try:
        for _ in range(repeats):
            for ov in (False, True):
                torch.set_num_threads(threads if ov else seq_threads)
                rows, (w, kv, n, ctx, bw) = run_steps(train_args + [f'--overlap={ov}'], reads)
                steps[ov] += rows
    finally:
        torch.set_num_threads(threads)
    one_round = lambda ov: [m for m in steps[ov] if m.get('gen_rounds', 1) == 1]
    tok_s = {ov: statistics.median([m['len_mean'] * n / m['t_rollout'] for m in one_round(ov)] or [float('nan')])
             for ov in (False, True)}
    share = {ov: bandwidth_share(tok_s[ov], n, ctx, w, kv, bw) for ov in (False, True)} if bw else {}
    med = lambda ov, f: statistics.median(f(m) for m in steps[ov]) / 1000 if steps[ov] else float('nan')
    t_roll = med(False, lambda m: 1000 * (m['t_rollout'] + m['t_reward']))
    t_upd = med(False, lambda m: 1000 * (m.get('t_adv', 0) + m.get('t_logprobs', 0) + m.get('t_update', 0)
                                         + m.get('t_optim', 0)))
    t_seq, t_ovl = med(False, lambda m: m['time_ms']), med(True, lambda m: m['time_ms'])
    cap = (t_roll + t_upd) / max(t_roll, t_upd)  # both phases fully hidden behind the longer one
    return {'rollout_s': t_roll, 'update_s': t_upd, 'seq_step_s': t_seq, 'overlap_step_s': t_ovl,
            'overlap_wait_s': med(True, lambda m: 1000 * m['t_wait']), 'speedup': t_seq / t_ovl, 'cap': cap,
            'of_cap': t_seq / t_ovl / cap, 'steps': (len(steps[False]), len(steps[True])), 'decode_tok_s': tok_s,
            'bw_share': share, 'rows': n, 'threads': (seq_threads, side)}


def main(argv: list[str]):
    """bench.py's command line (the module docstring); prints its report."""
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default=None, choices=list(PRESETS), help="default tiny (--memory: the config's model)")
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--ckpt', default='', help="a demo checkpoint: real prompts with early stops")
    ap.add_argument('--tokenizer', default='', help="HF tokenizer for the stop check (default: --ckpt's, else bytes)")
    ap.add_argument('--prompts', type=int, default=8)
    ap.add_argument('--group_size', type=int, default=8)
    ap.add_argument('--prompt_len', type=int, default=None, help='default 64 (--memory: 256, for gsm8k r1 prompts)')
    ap.add_argument('--new_tokens', type=int, default=64)
    ap.add_argument('--micro_batch', type=int, default=4)
    ap.add_argument('--seq_len', type=int, default=256)
    ap.add_argument('--accum', type=int, default=4, help="micro-batches per optimizer step (train bench)")
    ap.add_argument('--ckpt_layers', type=int, default=1, help="1: activation checkpointing (train bench), 0: off")
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--skip', default='', help="'rollout' or 'train' to skip one part")
    ap.add_argument('--card', default='', help=f"bandwidth table entry when not on cuda: {', '.join(PEAK_BW)}")
    ap.add_argument('--world', type=int, default=2, help="--memory: ranks (gpus) the run shards over")
    ap.add_argument('--gpu_gb', type=float, default=24, help="--memory: memory of one card, GiB")
    ap.add_argument('--replicas', type=int, default=1, help="--memory: hsdp replica groups (train.py's replicas)")
    ap.add_argument('--memory', nargs=argparse.REMAINDER, default=None,
                    help="train.py config and overrides (last on the line): the per-gpu memory plan")
    ap.add_argument('--rl', nargs=argparse.REMAINDER, default=None,
                    help="train.py arguments (last on the line): median time per phase of its rl steps")
    ap.add_argument('--spread', default='', help="--update: completion lengths lo-hi (e.g. 100-1000), else a rollout's")
    ap.add_argument('--update', nargs=argparse.REMAINDER, default=None,
                    help="train.py arguments (last on the line): the rl update's tokens/s, data order vs by length")
    ap.add_argument('--overlap', nargs=argparse.REMAINDER, default=None,
                    help="train.py arguments (last on the line): time its rl steps sequential and overlapped")
    args = ap.parse_args(argv)
    # bench's own options may also follow the train.py arguments: --overlap config/demo_rl.py --repeats 2
    own = {'memory': (('world', int), ('gpu_gb', float), ('preset', str), ('prompt_len', int), ('replicas', int)),
           'rl': (), 'overlap': (('repeats', int), ('card', str)), 'update': (('repeats', int), ('spread', str))}
    for name, keys in own.items():
        if getattr(args, name) is not None and keys:
            mp = argparse.ArgumentParser(prog=f'bench.py --{name}', allow_abbrev=False)
            for k, t in keys:
                mp.add_argument(f'--{k}', type=t, default=getattr(args, k), choices=list(PRESETS) if k == 'preset' else None)
            m, rest = mp.parse_known_args(getattr(args, name))
            vars(args).update(vars(m), **{name: rest})
    if args.memory is not None:
        print(memory_report(args.memory, args.world, args.gpu_gb, args.preset or '', args.prompt_len or 256,
                            args.replicas))
        return
    if args.rl is not None:
        r = bench_rl(args.rl)
        print(f"rl step ({' '.join(args.rl)}), mean of {r['steps']} steps: {r['step']:.0f} ms")
        for k in list(RL_PHASES) + ['other']:
            print(f"  {k:28s}{r[k]:9.1f} ms  {100 * r[k] / r['step']:5.1f}%")
        print(f"  train/infer gap |log pi_trainer - log pi_engine|: mean {r['gap'][0]:.2e}, max {r['gap'][1]:.2e}")
        return
    if args.update is not None:
        r = bench_update(args.update, args.repeats, args.spread)
        print(f"rl update ({' '.join(args.update)}{', spread ' + args.spread if args.spread else ''}): {r['rows']} "
              f"sequences of {r['len_min']}-{r['len_max']} tokens, best of {args.repeats}")
        for name, what in (('plain', 'data order'), ('grouped', f"by length, micro_batch_tokens {r['budget']}"),
                           ('packed', 'by length, packed end to end (pack = True)')):
            print(f"  {what:44s}{r[name]['tok_s']:9.0f} tok/s  {r[name]['ms']:8.0f} ms  padding x{r[name]['pad_ratio']:.2f}")
        print(f"  ratio to data order: grouped {r['grouped']['tok_s'] / r['plain']['tok_s']:.2f}x, packed "
              f"{r['packed']['tok_s'] / r['plain']['tok_s']:.2f}x")
        return
    if args.overlap is not None:
        r = bench_overlap(args.overlap, args.repeats, args.card)
        print(f"rl step ({' '.join(args.overlap)}), median of {r['steps'][0]} + {r['steps'][1]} steps: "
              f"rollout {r['rollout_s'] * 1000:.0f} ms | update {r['update_s'] * 1000:.0f} ms | sequential "
              f"{r['seq_step_s'] * 1000:.0f} ms | overlapped {r['overlap_step_s'] * 1000:.0f} ms (waits "
              f"{r['overlap_wait_s'] * 1000:.0f} ms for the rollout) | speedup {r['speedup']:.2f}x | cap "
              f"{r['cap']:.2f}x | {100 * r['of_cap']:.0f}% of the cap | intra-op threads: sequential {r['threads'][0]}, "
              f"overlapped {r['threads'][1]} a side")
        for name, ov in (('sequential', False), ('overlapped', True)):
            print(f"  rollout decode, {name}: {r['decode_tok_s'][ov]:.0f} tok/s ({r['rows']} rows x len_mean / t_rollout)"
                  + (f" | {100 * r['bw_share'][ov]:.1f}% of the memory-bandwidth limit" if r['bw_share'] else ''))
        return
    args.preset, args.prompt_len = args.preset or 'tiny', args.prompt_len or 64
    model, tok = build(args.preset, args.device, args.ckpt)
    dev = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'cpu x{torch.get_num_threads()} threads'
    n = sum(p.numel() for p in model.parameters())
    print(f"bench: {args.ckpt or 'preset ' + args.preset} | {n / 1e6:.1f}M params | {dev}")
    if args.skip != 'rollout':
        r = bench_rollout(model, tok, args)
        print(f"rollout ({args.prompts} prompts x {args.group_size} samples, <= {args.new_tokens} new tokens): "
              f"engine {r['engine_tok_s']:.0f} tok/s | model.generate {r['generate_tok_s']:.0f} tok/s | "
              f"ratio {r['speedup']:.2f}x | slow path (engine='hf') {r['slow_tok_s']:.0f} tok/s, {r['vs_slow']:.2f}x"
              + (f" | {100 * r['bw_share']:.1f}% of the memory-bandwidth limit ({r['bw_limit_tok_s']:.0f} tok/s)"
                 if 'bw_share' in r else ''))
        print(f"  sampling (engine.sample on {r['shape'][0]} x {r['shape'][1]} fp32 logits): {r['sampling_ms']:.3f} "
              f"ms/step | decode step {r['step_ms']:.3f} ms | {100 * r['sampling_share']:.1f}% of the step")
        print(f"  stop check (eos and '</answer>' on {r['check_rows']} rows, {r['check_tok']} tokenizer, "
              f"{100 * r['decoded']:.1f}% of the windows decoded): {r['check_ms']:.3f} ms/step | per-row decode "
              f"{r['per_row_ms']:.3f} ms/step | ratio {r['per_row_ms'] / r['check_ms']:.1f}x | "
              f"{100 * r['check_share']:.1f}% of the step (per-row {100 * r['per_row_share']:.1f}%) | token table "
              f"{r['table_ms']:.0f} ms, once per tokenizer")
        print(f"  run ahead (the host checks step t while the device decodes t+1): {r['ahead_ms']:.3f} ms/step | host in "
              f"lockstep {r['lockstep_ms']:.3f} ms/step | {r['lockstep_ms'] / r['ahead_ms']:.2f}x"
              + ('' if args.device.startswith('cuda') else " | a cpu is its own device: nothing overlaps"))
    if args.skip != 'train':
        r = bench_train(model, tok, args, amp=False)
        print(f"train step ({args.accum} micro-batches of {args.micro_batch} x {args.seq_len} tokens, then the optimizer; "
              f"checkpointing {'on' if args.ckpt_layers else 'off'}): {r['train_tok_s']:.0f} tok/s | {r['step_ms']:.0f} ms "
              f"(micro-batches {r['micro_batches_ms']:.0f}, optimizer {r['optimizer_ms']:.0f})"
              + (f" | mfu {100 * r['mfu']:.1f}%, hfu {100 * r['hfu']:.1f}%" if 'mfu' in r else '')
              + (f" | peak {r['peak_mem_gb']:.1f} GiB" if 'peak_mem_gb' in r else ''))
        if not args.device.startswith('cuda'):  # the same step under bf16 autocast, against the fp32 one above
            a = bench_train(model, tok, args, amp=True)
            units, pick = train.cpu_bf16_units(), train.use_autocast('auto', False, False, n, train.cpu_bf16_units())
            print(f"  under cpu bf16 autocast: {a['train_tok_s']:.0f} tok/s | {a['step_ms']:.0f} ms | "
                  f"{r['step_ms'] / a['step_ms']:.2f}x fp32 | bf16 matrix units (amx, avx512-bf16): "
                  f"{'yes' if units else 'no'} | autocast = 'auto' picks {'bf16' if pick else 'fp32'}")


if __name__ == '__main__':
    main(sys.argv[1:])

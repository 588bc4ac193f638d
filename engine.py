"""
engine.py: the rollout engine. prefill each prompt once, share its KV cache across its G samples, drop finished rows;
decode from a static KV cache with our own one-token forward (a Qwen2/Llama HF model's own modules), a CUDA graph per
batch-size bucket on GPU. train.py rolls out with it, eval.py and bench.py generate with it.

    out = generate(model, prompts, n_samples=8, max_new_tokens=256, temperature=1.0, top_p=1.0, eos_ids=[eos],
                   stop_strings=['</answer>'], tok=tok, pad_id=eos)  # ids, mask, logprobs (N, T), truncated (N,)
"""
import functools
import inspect

import torch
import torch.nn.functional as F


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) fp32 -> tokens (N,), log-probs (N,) under logits / temperature (greedy: under logits)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        sp.masked_fill_((sp.cumsum(-1) - sp) > top_p, 0.0)  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# graph sizes: live rows are padded up to the next one (vLLM/SGLang use similar lists); the top bucket is N itself
BUCKETS = sorted([1, 2, 4, 8] + [m << k for k in range(3, 12) for m in (2, 3)])


def rms(x, n):
    x32 = x.float()  # as HF's RMSNorm: normalise in fp32, round to the input dtype, then scale
    return n.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + n.variance_epsilon)).to(x.dtype)


def rot(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def decode_step(model, tok, pos, slot, K, V, valid):
    """one token per row through a Qwen2/Llama HF model's own modules, no host syncs -> logits (B, vocab).

    tok, pos (B,) long; slot 0-d long, the cache column this step writes; K, V (L, B, Hkv, S, D), written in place;
    valid (B, S) bool, the columns each row attends to (slot included)."""
    mm, B, Hkv, D = model.model, tok.shape[0], K.shape[2], K.shape[-1]
    rope = mm.rotary_emb  # inv_freq and attention_scaling already hold theta and the rope_type's scaling (e.g. llama3)
    f = pos[:, None].float() * rope.inv_freq.float()
    e = torch.cat((f, f), -1)[:, None, None]  # (B, 1, 1, D)
    x = mm.embed_tokens(tok)[:, None]  # (B, 1, hidden)
    cos, sin = (e.cos() * rope.attention_scaling).to(x.dtype), (e.sin() * rope.attention_scaling).to(x.dtype)
    for i, layer in enumerate(mm.layers):
        a, mlp, h = layer.self_attn, layer.mlp, rms(x, layer.input_layernorm)
        # gqa: the H/Hkv query heads of a kv head become its query length (HF's head order is kv-major), so every
        # sdpa backend reads each kv head once; enable_gqa may repeat_interleave K/V (the math backend does)
        q = rot(a.q_proj(h).view(B, Hkv, -1, D), cos, sin)  # (B, Hkv, H/Hkv, D)
        # write in place; the column is a tensor, so a captured graph writes wherever slot points at replay
        K[i].index_copy_(2, slot.view(1), rot(a.k_proj(h).view(B, Hkv, 1, D), cos, sin).to(K.dtype))
        V[i].index_copy_(2, slot.view(1), a.v_proj(h).view(B, Hkv, 1, D).to(V.dtype))
        o = F.scaled_dot_product_attention(q, K[i], V[i], attn_mask=valid[:, None, None])  # (B, Hkv, H/Hkv, D)
        x = x + a.o_proj(o.reshape(B, 1, -1))
        h = rms(x, layer.post_attention_layernorm)
        x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
    return model.lm_head(rms(x, mm.norm))[:, 0]


CAPTURE_STREAMS = {}


def capture_stream(device) -> torch.cuda.Stream:
    """one stream per gpu for every capture, made once (a new stream per rollout draws from the pool nccl also uses).
    a graph replays its kernels at the priority of the stream it was captured on: high, as the overlap's side stream,
    so decode steps are not queued behind a busy trainer."""
    if device not in CAPTURE_STREAMS:
        CAPTURE_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return CAPTURE_STREAMS[device]


def capture(fn, pool, stream):
    """fn() recorded as a CUDA graph -> (graph, its output). warm-up on the side stream first (torch notes on CUDA
    graphs): cuBLAS workspaces, kernel choice and autocast's weight casts must exist before capture."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    # thread_local: an overlapped update allocates and syncs in the main thread while the rollout thread captures
    with torch.cuda.graph(g, pool=pool, stream=stream, capture_error_mode='thread_local'):
        out = fn()
    return g, out


def on(xs: list[int], dev: torch.device) -> torch.Tensor:
    """a host list of indices as a tensor on dev. on cuda through pinned memory: a copy from pageable memory waits for
    the stream, where the run-ahead loop has queued the next decode step."""
    t = torch.tensor(xs, dtype=torch.long)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else t


class KVCache:
    """the static engine's state: K/V buffers of `rows` rows over a fixed window (`prompt_len` prompt columns, then the
    new tokens), and each bucket's captured graph. the overlap keeps one for the run: its inference copy's weights keep
    their addresses, so each bucket is captured once per run. graphs are captured again when the weights they read
    have moved (fsdp2 gathers anew at each rollout) or are autocast's casts of fp32 Linear weights (made anew at each
    rollout). without one, each rollout makes its own, of its own rows and prompt length."""

    def __init__(self, rows: int, prompt_len: int):
        self.rows, self.prompt_len = rows, prompt_len
        self.shape, self.weights, self.graphs, self.pool = None, None, {}, None

    def buffers(self, L: int, Hkv: int, S: int, D: int, dtype, dev):
        """(re)allocate K, V (L, rows, Hkv, S, D), valid (rows, S), pos, tok (rows,), slot () when the shape changes;
        -> whether K and V are kept from an earlier rollout."""
        if self.shape == (L, Hkv, S, D, dtype, dev):
            return True
        self.graphs, self.pool, self.shape = {}, None, (L, Hkv, S, D, dtype, dev)
        self.K = torch.zeros(L, self.rows, Hkv, S, D, dtype=dtype, device=dev)
        self.V = torch.zeros_like(self.K)
        self.valid = torch.zeros(self.rows, S, dtype=torch.bool, device=dev)
        self.pos, self.tok = (torch.zeros(self.rows, dtype=torch.long, device=dev) for _ in range(2))
        self.slot = torch.zeros((), dtype=torch.long, device=dev)
        return False

    def keep_graphs(self, model, cuda: bool):
        """drop the graphs unless the weights they read are where they were when captured: not autocast's casts."""
        casts = torch.is_autocast_enabled('cuda') and any(p.dtype == torch.float32 for m in model.modules()
                                                          if isinstance(m, torch.nn.Linear) for p in m.parameters())
        weights = None if casts else [p.data_ptr() for p in model.parameters()]
        if weights is None or weights != self.weights:
            # a new pool too: the allocator does not take new captures into a pool whose graphs have all been freed
            self.graphs, self.weights, self.pool = {}, weights, None
        if cuda and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()


def static_engine(model, cache, attn, n_samples: int, max_new_tokens: int, buckets=None, kv: KVCache | None = None):
    """copy the prefill cache G times into kv's static (L, rows, Hkv, prompt_len+T-1, D) buffers -> advance(nxt, kept)
    -> logits (n, V), kept: the positions (host list) of the live rows that stay, None if all do; nxt (n,) their next
    tokens. kv: a persistent KVCache (rows >= B*G, prompt_len >= P), else one for this rollout alone.

    prompts end at column P0 = kv.prompt_len (left-padded into [0, P0)); step t writes column P0+t for every row. the
    batch runs at the smallest bucket >= live rows (cpu: the live count); a bucket's dead rows compute what nobody
    reads. on cuda each bucket is a graph, captured by hand (no compile time, no triton, our buffers) lazily, so
    largest first, and kept in kv."""
    c, rope = model.config, model.model.rotary_emb
    if (c.model_type not in ('qwen2', 'llama') or rope.rope_type in ('dynamic', 'longrope')
            or any(t != 'full_attention' for t in getattr(c, 'layer_types', None) or [])):
        raise ValueError(f"engine='static' supports qwen2/llama with full attention and a fixed rope; got "
                         f"{c.model_type}, rope {rope.rope_type}, layers {set(getattr(c, 'layer_types', None) or [])}")
    (B, P), G, dev = attn.shape, n_samples, attn.device
    N = B * G
    kv = kv or KVCache(N, P)
    if N > kv.rows or P > kv.prompt_len:
        raise ValueError(f"{B} prompts x {n_samples} samples of up to {P} tokens do not fit a KVCache of {kv.rows} rows "
                         f"and {kv.prompt_len} prompt columns")
    P0, S = kv.prompt_len, kv.prompt_len + max_new_tokens - 1  # the last token is sampled, never fed
    ks, vs = [x.keys for x in cache.layers], [x.values for x in cache.layers]  # (B, Hkv, P, D) each
    Hkv, D, cuda = ks[0].shape[1], ks[0].shape[3], attn.is_cuda
    buckets = (BUCKETS if cuda else ()) if buckets is None else buckets
    # the projections' output dtype (bf16 under autocast over fp32 weights; HF's keys there are fp32 after rope)
    kept = kv.buffers(len(ks), Hkv, S, D, vs[0].dtype, dev)
    kv.keep_graphs(model, cuda)
    K, V, valid, pos, tok, slot = kv.K, kv.V, kv.valid, kv.pos, kv.tok, kv.slot
    if kept:  # a masked column still spreads a non-finite value (-inf + nan): no rollout inherits one
        K.zero_(), V.zero_()
    for i, (k, v) in enumerate(zip(ks, vs)):  # row b*G+j <- prompt b, via broadcast: no repeated temporary
        K[i, :N, :, P0 - P:P0].unflatten(0, (B, G)).copy_(k[:, None])
        V[i, :N, :, P0 - P:P0].unflatten(0, (B, G)).copy_(v[:, None])
    valid.zero_()
    valid[:N, P0 - P:P0] = attn.bool().repeat_interleave(G, 0)
    pos.zero_()
    pos[:N] = attn.sum(-1).repeat_interleave(G)  # position of the token fed next
    stream = capture_stream(dev) if cuda else None
    at = list(range(N))  # cache row of each live row, on the host; idx is the same on the device
    t, idx = 0, torch.arange(N, device=dev)
    b = min([x for x in buckets if x >= N] + [kv.rows]) if buckets else N
    graph, out = kv.graphs.get(b, (None, None))

    def advance(nxt, kept):
        nonlocal t, b, at, idx, graph, out
        if kept is not None:
            at = [at[k] for k in kept]
            n = len(at)
            if (nb := min([x for x in buckets if x >= n] + [kv.rows]) if buckets else n) < b:
                # compact into rows [0, n): move the live rows sitting at n or above into the holes below n. only
                # they are copied (a full gather K[:, :n] = K[:, idx] would move every row, every time)
                holes, movers = sorted(set(range(n)) - set(at)), [r for r in at if r >= n]
                if movers:
                    src, dst = on(movers, dev), on(holes, dev)
                    for x, d in ((K, 1), (V, 1), (valid, 0), (pos, 0)):
                        x.index_copy_(d, dst, x.index_select(d, src))
                    to = dict(zip(movers, holes))
                    at = [to.get(r, r) for r in at]
                b = nb
                graph, out = kv.graphs.get(b, (None, None))
            idx = on(at, dev)
        tok.index_copy_(0, idx, nxt)
        slot.fill_(P0 + t)
        valid[:, P0 + t] = True

        def step(w=S):  # the batch is the bucket's [:b] views of the max-size buffers, the first w columns
            return decode_step(model, tok[:b], pos[:b], slot, K[:, :b, :, :w], V[:, :b, :, :w], valid[:b, :w])
        if not cuda:  # no graph: attend over the columns written so far, not the whole window (~3x less on the demo)
            out = step(P0 + t + 1)
        else:
            if graph is None:
                graph, out = kv.graphs[b] = capture(step, kv.pool, stream)
            graph.replay()  # rewrites out in place
        pos.add_(1)
        t += 1
        return out.index_select(0, idx).float()  # a copy: the next replay overwrites the graph's output

    return advance


def hf_engine(model, cache, attn, n_samples: int, kw: str):
    """the slow path (engine='hf'): the HF forward on a DynamicCache that grows a column a token, finished rows dropped."""
    cache.batch_repeat_interleave(n_samples)
    attn = attn.repeat_interleave(n_samples, 0)
    pos = attn.sum(-1)  # (n,) next position of each live row

    def advance(nxt, kept):
        nonlocal attn, pos
        if kept is not None:
            keep = on(kept, attn.device)
            cache.batch_select_indices(keep)
            attn, pos = attn[keep], pos[keep]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos[:, None], use_cache=True,
                       **{kw: cache}).logits[:, -1].float()
        pos = pos + 1
        return logits

    return advance


@functools.lru_cache(maxsize=8)
def stop_ends(tok, stop_strings: tuple[str, ...], n_vocab: int) -> torch.Tensor:
    """(n_vocab,) bool: the tokens that can complete a stop string. a stop string first shows in the decoded window
    with the token that carries its last character, whose text up to that character ends with the stop string or is
    the end of it. a token counts when its text (read after an anchor token: sentencepiece drops a text's leading
    space) has such a character, is empty, or is partial utf-8 (U+FFFD: its bytes may finish a character begun before).
    a decode that rewrites text across tokens (transformers' clean_up_tokenization_spaces, never for bpe: 'a' ' n' "'t"
    -> "an't" completes 'an' on the 't') makes every token count. cached: one decode per id, 0.2 s for SmolLM2's 49k."""
    if not stop_strings:
        return torch.zeros(n_vocab, dtype=torch.bool)
    if tok.decode(tok.encode("a n't")) != "a n't":
        return torch.ones(n_vocab, dtype=torch.bool)
    a = tok.encode('a')
    head = tok.decode(a)
    texts = (tok.decode(a + [i]) for i in range(n_vocab))
    tails = (x[len(head):] if x.startswith(head) else '' for x in texts)  # '': the anchor's own text changed
    ends = lambda y: any(y[:p + 1].endswith(s) or s.endswith(y[:p + 1]) for s in stop_strings
                         for p, c in enumerate(y) if c == s[-1])
    return torch.tensor([not y or '\ufffd' in y or ends(y) for y in tails], dtype=torch.bool)


def stop_check(tok, eos_ids: list[int], stop_strings: list[str], N: int, T: int, dev):
    """-> check(nxt, live, t) -> the positions (a host list) of the rows that end at step t: on an eos id, or on a stop
    string in the decoded window of their last tokens. nxt (n,) the step's tokens, on dev or read back already; live
    (n,) their output rows (of N, over T steps) on the host. eos and stop_ends are one table lookup where the tokens
    are, read back with them in the step's one sync; the host decodes the windows of the flagged rows only."""
    n = tok.n_vocab
    kind = stop_ends(tok, tuple(stop_strings), n).long() * 2  # 2: may complete a stop string, 1: eos, 0: neither
    kind[torch.tensor([e for e in eos_ids if 0 <= e < n], dtype=torch.long)] = 1  # ids past n are never sampled
    kinds = {kind.device: kind, torch.device(dev): kind.to(dev)}  # the tokens are on the device, or read back already
    hist = torch.zeros(N, T, dtype=torch.long)  # every row's tokens, on the host: the windows to decode
    window = max([len(s.encode()) for s in stop_strings] + [1])  # a stop string spans at most this many tokens

    def check(nxt, live, t):
        xk = torch.stack((nxt, kinds[nxt.device][nxt])).cpu()  # host sync: the one per decode step
        hist[live, t] = xk[0]
        text = lambda j: tok.decode(hist[live[j], max(0, t + 1 - window):t + 1].tolist())
        return [j for j, k in enumerate(xk[1].tolist()) if k == 1 or k == 2 and any(s in text(j) for s in stop_strings)]

    return check


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, n_samples: int, max_new_tokens: int, temperature: float,
             top_p: float, eos_ids: list[int], stop_strings: list[str], tok, pad_id: int,
             generator=None, engine: str = 'static', kv: KVCache | None = None, run_ahead: bool | None = None) -> dict:
    """-> ids (N, T), mask (N, T), logprobs (N, T), truncated (N,), N = len(prompts) * n_samples.

    row i * n_samples + j is sample j of prompt i; the stop token (eos or the end of a stop string) is kept
    in the mask; rows that stop (stop_check: one host read a step) leave the batch, so they cost no more compute.
    engine 'static': static KV cache and own decode step (CUDA graphs on GPU), in kv when given (kept across calls);
    'hf': the HF forward on a DynamicCache. both draw the same random numbers.
    run_ahead (default: on cuda): the device decodes step t+1 while the host reads and checks step t's tokens; the rows
    that ended at t computed one step for nothing, and leave the logits before step t+1 samples, so the same rows draw
    the same random numbers as without it. on a cpu the host is the device: nothing runs ahead."""
    from transformers import DynamicCache
    if engine not in ('static', 'hf'):
        raise ValueError(f"engine must be 'static' or 'hf', got {engine!r}")
    dev = next(model.parameters()).device
    B, P = len(prompts), max(map(len, prompts))
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros(B, P, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=dev)
        attn[i, P - len(p):] = 1
    cache = DynamicCache(config=model.config)
    # transformers 5.24 renamed past_key_values to cache; an older one would silently drop the unknown keyword
    kw = 'cache' if 'cache' in inspect.signature(model.forward).parameters else 'past_key_values'
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                   use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1].float()
    advance = (static_engine(model, cache, attn, n_samples, max_new_tokens, kv=kv) if engine == 'static'
               else hf_engine(model, cache, attn, n_samples, kw))
    del cache  # the static engine copied it: free the prefill cache now
    logits = logits.repeat_interleave(n_samples, 0)
    N = B * n_samples
    out_ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    out_lp = torch.zeros(N, max_new_tokens, device=dev)
    lengths = torch.full((N,), max_new_tokens, dtype=torch.long)
    stopped = torch.zeros(N, dtype=torch.bool)  # on eos or a stop string; the rest are truncated
    rows = torch.arange(N, device=dev)  # output row of each live batch row
    live = torch.arange(N)  # the same, on the host
    check = stop_check(tok, eos_ids, stop_strings, N, max_new_tokens, dev)
    cuda = dev.type == 'cuda'
    ahead = cuda if run_ahead is None else run_ahead
    host = torch.empty(N, dtype=torch.long, pin_memory=True) if cuda and ahead else None  # the tokens, read back
    kept = None  # the positions of the rows that stay, once some ended: the engine drops the rest at its next advance
    for t in range(max_new_tokens):
        logits[:, tok.n_vocab:] = -float('inf')  # embedding rows past the tokenizer are never sampled
        nxt, lp = sample(logits, temperature, top_p, generator)
        out_ids[rows, t], out_lp[rows, t] = nxt, lp
        last, seen = t == max_new_tokens - 1, nxt
        if ahead and not last:
            if cuda:  # the copy is queued before the next step, so waiting for it does not wait for the step
                seen, ready = host[:len(nxt)].copy_(nxt, non_blocking=True), torch.cuda.Event()
                ready.record()
            logits, kept = advance(nxt, kept), None
            if cuda:
                ready.synchronize()
        ends = check(seen, live, t)  # the positions of the live rows that end at step t, on the host
        if ends:
            lengths[live[ends]], stopped[live[ends]] = t + 1, True
        if last or len(ends) == len(live):
            break
        if ends:
            kept = sorted(set(range(len(live))) - set(ends))
            live, keep = live[kept], on(kept, dev)
            rows = rows[keep]
            if ahead:
                logits = logits[keep]
            else:
                nxt = nxt[keep]
        if not ahead:
            logits, kept = advance(nxt, kept), None
    mask = (torch.arange(max_new_tokens)[None] < lengths[:, None]).to(dev)
    return {'ids': out_ids, 'mask': mask, 'logprobs': out_lp * mask, 'truncated': ~stopped}

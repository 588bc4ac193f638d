"""the rollout engine: sample() (top-p, temperature, greedy), decode_step and the static KV cache against the HF
forward, the static engine against the hf engine and model.generate, compaction against rows run alone, seeded
sampling, stops, the stop check against a per-row decode, the run-ahead loop against the lockstep one, padding,
out-of-vocabulary ids, sampling and chunked log-probs against a full forward, FSDP2 (2 ranks) against unwrapped.

    python -m pytest tests/test_engine.py -q
"""
import os
import subprocess
import sys

import pytest
import torch

import data
import engine
import train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOK = data.Tokenizer.bytes_level()
EOS = TOK.token_id('<|endoftext|>')
PROMPTS = ['12 + 34 = ?\n', 'hi', '<think>a longer prompt, with <answer> tags and more words']
FAMILIES = ('qwen2', 'llama', 'qwen2-yarn')


def tiny(family='qwen2', std=0.5, seed=0):
    """2 layers, GQA 4/2, weights large enough that outputs depend on the prompt (the 0.02 default init gives
    near-uniform, prompt-independent distributions). scratch: train.build_model's own model (init_from='scratch',
    embedding padded to a multiple of 64), its matrices redrawn. qwen2: tied, q/k/v biases. llama: untied, head_dim
    32 != 64/4, all biases, llama3 rope. qwen2-yarn: attention_scaling != 1. the HF families (320 embedding rows)
    redraw every weight, biases and norms too."""
    if family == 'scratch':
        cfg = dict(init_from='scratch', n_embd=64, n_ff=128, n_layer=2, n_head=4, n_kv_head=2, seed=seed,
                   master_dtype='fp32')
        m = train.build_model(cfg, TOK).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0, std, generator=g)
        return m
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


@pytest.fixture(scope='module')
def model():
    return tiny('scratch')


def prompts():
    return [TOK.encode(p) for p in PROMPTS]


def gen(m, *, temperature, kind='static', n_samples=1, max_new_tokens=12, top_p=1.0, eos_ids=(EOS,), stop_strings=(),
        seed=0, ps=None, run_ahead=None):
    return engine.generate(m, ps or prompts(), n_samples=n_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, eos_ids=list(eos_ids), stop_strings=list(stop_strings),
                           tok=TOK, pad_id=EOS, generator=torch.Generator().manual_seed(seed), engine=kind,
                           run_ahead=run_ahead)


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
# greedy == model.generate; static == hf engine == engine.generate


def test_greedy_varies_between_prompts(model):
    out = gen(model, temperature=0, eos_ids=[], max_new_tokens=8)
    rows = [tuple(r) for r in out['ids'].tolist()]
    assert len(set(rows)) == 3  # the re-initialised model is not prompt-independent
    assert out['mask'].all() and out['truncated'].all()  # no stop at all: every row runs to max_new_tokens


@pytest.mark.parametrize('family,G', [('scratch', 1), ('qwen2', 2), ('llama', 2)])
def test_greedy_matches_hf_generate(family, G):
    m, n_new = tiny(family), 16
    free = gen(m, temperature=0, eos_ids=[], max_new_tokens=n_new)
    # stop token: one greedy row produces it early, so rows stop at different steps (and some never do)
    stop = free['ids'][1, 4].item()
    ours = gen(m, temperature=0, eos_ids=[stop], max_new_tokens=n_new, n_samples=G)
    L = lengths(ours)
    assert min(L) < n_new and max(L) == n_new, L  # some rows stop on eos, some run to the end
    # model.generate on the same left-padded batch; it cannot know the padded embedding rows are not tokens,
    # so suppress them as our sampler does. greedy: the G samples of prompt i are row i of its output
    P = max(map(len, prompts()))
    ids = torch.tensor([[stop] * (P - len(p)) + p for p in prompts()])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts()])
    hf = m.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=n_new, eos_token_id=stop,
                    pad_token_id=stop, suppress_tokens=list(range(TOK.n_vocab, m.config.vocab_size)))[:, P:]
    for r, n in enumerate(L):
        assert ours['ids'][r, :n].tolist() == hf[r // G, :n].tolist(), r
        if n < n_new:
            assert ours['ids'][r, n - 1].item() == stop  # stopped on eos, which it keeps
            assert (hf[r // G, n:] == stop).all()  # after eos HF pads with pad_token_id (= eos here)


@pytest.mark.parametrize('family', FAMILIES[:2])
def test_static_equals_hf_engine_sampling(family):
    # T 0.7, top-p 0.9, G 3, eos ids and stop strings: same random numbers drawn, so the same tokens
    m = tiny(family)
    free = gen(m, eos_ids=[], n_samples=3, temperature=0.7, top_p=0.9, seed=3)
    stops = sorted({chr(x) for x in free['ids'][:, 2:6].flatten().tolist() if 33 <= x < 127})[:3]
    kw = dict(n_samples=3, temperature=0.7, top_p=0.9, eos_ids=range(0, 256, 16), stop_strings=stops, seed=3)
    a, b = gen(m, kind='static', **kw), gen(m, kind='hf', **kw)
    L = lengths(a)
    assert len(set(L)) >= 3 and any(TOK.decode(a['ids'][r, n - 1:n].tolist()) in stops for r, n in enumerate(L)), L
    assert torch.equal(a['ids'], b['ids']) and torch.equal(a['mask'], b['mask'])
    assert torch.equal(a['truncated'], b['truncated'])
    torch.testing.assert_close(a['logprobs'], b['logprobs'], rtol=0, atol=1e-4)


@pytest.mark.parametrize('kind', ['static', 'hf'])
def test_prefill_shared_across_samples(model, kind):
    """each prompt is prefilled once, not once per sample: the one full forward sees the B prompts, every later one
    (the slow engine's decode) one new token per live row; the static engine decodes through the modules, never the
    model's forward. sample j of prompt i is row i * n_samples + j: greedy, every sample equals the n_samples=1 row."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw['input_ids'].shape)), with_kwargs=True)
    try:
        three = engine.generate(model, prompts(), n_samples=3, max_new_tokens=6, temperature=0, top_p=1.0, eos_ids=[],
                                stop_strings=[], tok=TOK, pad_id=EOS, engine=kind)
    finally:
        hook.remove()
    assert seen[0] == (3, max(map(len, prompts())))
    assert seen[1:] == ([] if kind == 'static' else [(9, 1)] * 5)
    one = gen(model, temperature=0, eos_ids=[], max_new_tokens=6)
    assert torch.equal(three['ids'], one['ids'].repeat_interleave(3, 0))


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
    # on CUDA each of these is a device-to-host sync, illegal inside graph capture (docs/design.md: CUDA graphs)
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
# compaction: rows that stop one by one == each row alone


def test_compaction_equals_rows_alone():
    m = tiny()
    eos = list(range(0, 256, 6))
    batch = gen(m, temperature=0, eos_ids=eos, max_new_tokens=14)
    L = lengths(batch)
    assert len(set(L)) == 3, L  # three rows, three different stop steps
    for i, p in enumerate(prompts()):
        alone = gen(m, temperature=0, eos_ids=eos, max_new_tokens=14, ps=[p])
        assert torch.equal(alone['ids'][0], batch['ids'][i]) and torch.equal(alone['mask'][0], batch['mask'][i])
        torch.testing.assert_close(alone['logprobs'][0], batch['logprobs'][i], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# sampling log-probs == a full forward over the finished sequences


@pytest.mark.parametrize('family,temperature,top_p', [('scratch', 0.7, 1.0), ('scratch', 1.0, 1.0), ('qwen2', 1.0, 1.0),
                                                      ('qwen2', 0.7, 0.9)])
def test_sampling_logprobs_equal_full_forward(family, temperature, top_p):
    # an eighth of the vocabulary ends a row, so most rows stop early, at different steps: exercises row dropping
    m = tiny(family)
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
    assert out['logprobs'][out['mask']].lt(0).all()  # real log-probs of sampled tokens


def test_greedy_logprobs_equal_full_forward(model):
    # greedy log-probs are under the plain logits (temperature 1)
    out = gen(model, temperature=0, eos_ids=list(range(0, 256, 4)), max_new_tokens=10)
    L = lengths(out)
    comps = [out['ids'][i, :n].tolist() for i, n in enumerate(L)]
    ids, attn, cm = data.collate_rl(prompts(), comps, EOS)
    with torch.no_grad():
        full = train.token_logprobs(model, ids, attn, cm.shape[1], 1.0, 4, vocab=TOK.n_vocab)
    assert (full * cm - out['logprobs'][:, :cm.shape[1]]).abs().max() < 1e-4


# -----------------------------------------------------------------------------
# seeded sampling


def test_sampling_reproducible_with_seed(model):
    a = gen(model, temperature=1.0, n_samples=4, max_new_tokens=10, seed=7)
    b = gen(model, temperature=1.0, n_samples=4, max_new_tokens=10, seed=7)
    c = gen(model, temperature=1.0, n_samples=4, max_new_tokens=10, seed=8)
    assert torch.equal(a['ids'], b['ids']) and torch.equal(a['logprobs'], b['logprobs'])
    assert torch.equal(a['mask'], b['mask'])
    assert not torch.equal(a['ids'], c['ids'])
    for i in range(3):  # the samples of one prompt are not all the same at T=1
        rows = {tuple(r) for r in a['ids'][i * 4:(i + 1) * 4].tolist()}
        assert len(rows) > 1


# -----------------------------------------------------------------------------
# stops, truncation, padding


def test_stop_string_single_char(model):
    # ']' and a few other frequent bytes as one-character stop strings
    free = gen(model, temperature=1.0, n_samples=3, max_new_tokens=12, eos_ids=[], seed=3)
    chars = [chr(x) for x in free['ids'][:, :6].flatten().tolist() if 33 <= x < 127]
    stops = sorted(set(chars))[:4] + [']']
    out = gen(model, temperature=1.0, n_samples=3, max_new_tokens=12, eos_ids=[], stop_strings=stops, seed=3)
    check_stops(out, stops, 12)


def test_stop_string_two_tokens(model):
    # a two-byte stop string spans two tokens: the row stops on its second token, which is kept in the mask
    free = gen(model, temperature=1.0, n_samples=3, max_new_tokens=12, eos_ids=[], seed=4)
    row = free['ids'][0].tolist()
    k = next(i for i in range(2, 11) if all(33 <= x < 127 for x in row[i:i + 2]))
    stop = TOK.decode(row[k:k + 2])
    assert len(stop) == 2
    out = gen(model, temperature=1.0, n_samples=3, max_new_tokens=12, eos_ids=[], stop_strings=[stop], seed=4)
    check_stops(out, [stop], 12)


def check_stops(out, stops, max_new):
    L = lengths(out)
    assert any(n < max_new for n in L), L  # the test must actually stop some rows
    for i, n in enumerate(L):
        text = TOK.decode(out['ids'][i, :n].tolist())
        before = TOK.decode(out['ids'][i, :n - 1].tolist())
        hit = any(s in text for s in stops)
        if n < max_new:
            assert hit and not any(s in before for s in stops), (i, text)  # stopped on its first stop
            assert not out['truncated'][i]
        else:
            assert out['truncated'][i] == (not hit), (i, text)  # stopping on the last allowed token is a stop
        assert out['mask'][i, :n].all() and not out['mask'][i, n:].any()
        assert (out['logprobs'][i, n:] == 0).all() and (out['logprobs'][i, :n] < 0).all()


def per_row_check(tok, eos_ids, stop_strings, N, T, dev):
    """the reference for engine.stop_check: every token read back, every live row's window of last tokens decoded"""
    texts, eos = [[] for _ in range(N)], set(eos_ids)
    window = max([len(s.encode()) for s in stop_strings] + [1])

    def check(nxt, live, t):
        ends = []
        for j, (r, x) in enumerate(zip(live.tolist(), nxt.tolist())):
            texts[r].append(x)
            if x in eos or any(s in tok.decode(texts[r][-window:]) for s in stop_strings):
                ends.append(j)
        return ends

    return check


def test_stop_ends_by_hand():
    # a byte alone decodes to itself below 0x80, to U+FFFD from 0x80 (partial utf-8); the specials 256..260 are
    # <|endoftext|> <think> </think> <answer> </answer>: each ends in '>', yet only </answer> itself completes
    # '</answer>' with it, and only <|endoftext|> holds 'x', the whole of the stop string 'x'
    ends = lambda *stops: engine.stop_ends(TOK, stops, TOK.n_vocab).nonzero().flatten().tolist()
    assert ends('</answer>', 'café') == [ord('>')] + list(range(0x80, 256)) + [260]  # é: c3 a9, both >= 0x80
    assert ends('ax', 'x') == [ord('x')] + list(range(0x80, 257))
    assert ends('a>b', 'zz') == [ord('b'), ord('z')] + list(range(0x80, 256))
    assert ends() == []


def metaspace_tok(cleanup: bool):
    """a sentencepiece-style word tokenizer: '▁' marks a space, dropped at the start of a decoded text"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {'[UNK]': 0, '▁a': 1, "▁n't": 2, 'x': 3, '▁y': 4, '▁n': 5, "'t": 6, 'a': 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return data.Tokenizer(hf=PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=cleanup))


@pytest.mark.parametrize('cleanup', [False, True])
def test_stop_ends_reads_a_token_in_context(cleanup):
    # '▁y' decodes alone to 'y', after 'x' to 'x y': it completes the stop string 'x ' with its leading space.
    # cleaning up spaces rewrites text across tokens: 'a' '▁n' "'t" decode to "an't", so "'t" completes 'an' without
    # an 'n' (a second, longer stop string widens the window to hold all three)
    tok = metaspace_tok(cleanup)
    stops, ids = (['an', 'zzzzz'], [7, 5, 6]) if cleanup else (['x '], [3, 4])
    assert tok.decode(ids[-1:]) in ('y', "'t") and stops[0] in tok.decode(ids) and stops[0] not in tok.decode(ids[:-1])
    want = [True] * 8 if cleanup else [False, True, True, False, True, True, False, False]  # these hold a space
    assert engine.stop_ends(tok, tuple(stops), 8).tolist() == want
    for make in (engine.stop_check, per_row_check):
        check = make(tok, [], stops, 1, len(ids), 'cpu')
        assert [check(torch.tensor([x]), torch.tensor([0]), t) for t, x in enumerate(ids)][-1] == [0]


def run_checks(check, seqs):
    """-> each row's stop step (None: truncated) as generate keeps the rows: those that stop leave the batch"""
    live, stop = list(range(len(seqs))), [None] * len(seqs)
    for t in range(len(seqs[0])):
        ends = check(torch.tensor([seqs[r][t] for r in live]), torch.tensor(live), t)
        for j in ends:
            stop[live[j]] = t
        live = [r for j, r in enumerate(live) if j not in ends]
    return stop


def test_stop_check_equals_per_row_check():
    # byte rows of 24 steps: stop strings across tokens, in one special token, ending on a partial utf-8 byte, after
    # near misses (tokens that hold a stop string's last character and complete nothing), eos; then random rows of
    # the same pieces. stop_check decodes the flagged rows only, per_row_check every row at every step: the same stops
    stops, T = ['</answer>', 'café'], 24
    by_hand = [(list(b'x</answer>'), 9),  # nine tokens
               (list(b'ab') + [260], 2),  # the special </answer>: one token
               (list(b'a>b>c</answer>'), 13),  # two near misses first
               (list('zcafé'.encode()), 5),  # é is c3 a9: its last byte alone decodes to U+FFFD
               (list(b'caf\xc3xcafe'), None),  # a partial é, a plain e: no café
               (list(b'</answe') + [259, ord('>')], None),  # '>' after <answer>: flagged, completes nothing
               (list(b'ab') + [EOS], 2)]
    pieces = [[260], [259], [EOS], list(b'</ans'), list(b'wer>'), list(b'>'), list('é'.encode()), [0xc3], list(b'caf'),
              list(b'x'), list(b' ')]
    g, seqs = torch.Generator().manual_seed(0), [s for s, _ in by_hand]
    for _ in range(24):
        seqs.append([])
        while len(seqs[-1]) < T:
            seqs[-1] += pieces[torch.randint(len(pieces), (), generator=g)]
    seqs = [(s + list(b'z' * T))[:T] for s in seqs]
    want = run_checks(per_row_check(TOK, [EOS], stops, len(seqs), T, 'cpu'), seqs)
    assert want[:len(by_hand)] == [n for _, n in by_hand]
    assert len(set(want[len(by_hand):])) > 5, want  # the random rows stop at many steps, some never
    assert run_checks(engine.stop_check(TOK, [EOS], stops, len(seqs), T, 'cpu'), seqs) == want


@pytest.mark.parametrize('family,seed', [('scratch', 3), ('qwen2', 3)])
def test_generate_stops_as_the_per_row_check(family, seed, monkeypatch):
    """generate with stop_check stops the rows generate with per_row_check stops, at the same steps, with the same
    tokens and log-probs, as rows leave the batch at different steps (each leaving shifts the random numbers of the
    rest). stop strings: '</answer>' and two ascii characters of a free run (two tokens, the second of which also
    comes where it completes nothing); and eos. the tiny model's bytes from 0x80 are flagged and decoded too"""
    m = tiny(family)
    kw = dict(temperature=1.0, n_samples=8, max_new_tokens=16, seed=seed)
    free = [TOK.decode(r) for r in gen(m, eos_ids=[], **kw)['ids'].tolist()]
    two = next(t[i:i + 2] for t in free for i in range(len(t) - 1) if t[i:i + 2].isalnum() and t[i:i + 2].isascii())
    out = gen(m, eos_ids=[EOS], stop_strings=['</answer>', two], **kw)
    monkeypatch.setattr(engine, 'stop_check', per_row_check)
    ref = gen(m, eos_ids=[EOS], stop_strings=['</answer>', two], **kw)
    assert all(torch.equal(out[k], ref[k]) for k in ('ids', 'mask', 'logprobs', 'truncated'))
    texts = [out['ids'][r, :n].tolist() for r, n in enumerate(lengths(out))]
    ends = [next((s for s in ('</answer>', two, '<|endoftext|>') if TOK.decode(x).endswith(s)), None) for x in texts]
    assert two in ends and len(set(ends)) >= 3, (ends, two)  # rows stop on the two tokens, and on others
    assert any(x[-1] != ord(two[-1]) and ord(two[-1]) in x for x in texts)  # its last character, completing nothing


@pytest.mark.parametrize('family,kind', [('scratch', 'static'), ('llama', 'static'), ('qwen2', 'hf')])
def test_run_ahead_draws_the_same_tokens(family, kind):
    """run_ahead (the device decodes step t+1 before the host has checked step t; on by default on cuda, forced here)
    stops the same rows at the same steps with the same tokens: rows that ended leave the logits before sampling, so
    the rest draw the same random numbers. the log-probs differ only by the rounding of a batch one step larger."""
    m = tiny(family)
    kw = dict(temperature=1.0, n_samples=8, max_new_tokens=16, seed=3, kind=kind)
    free = [TOK.decode(r) for r in gen(m, eos_ids=[], **kw)['ids'].tolist()]
    two = next(t[i:i + 2] for t in free for i in range(len(t) - 1) if t[i:i + 2].isalnum() and t[i:i + 2].isascii())
    out, ahead = (gen(m, eos_ids=[EOS], stop_strings=['</answer>', two], run_ahead=a, **kw) for a in (False, True))
    assert all(torch.equal(out[k], ahead[k]) for k in ('ids', 'mask', 'truncated'))
    torch.testing.assert_close(out['logprobs'], ahead['logprobs'], rtol=0, atol=1e-5)
    assert 1 < len(set(lengths(out))) and min(lengths(out)) < 8, lengths(out)  # rows leave at several steps


def test_eos_kept_in_mask_and_truncation(model):
    # pitfall B7: the eos that ends a row is a real token of the completion, inside the mask (pad == eos here)
    eos_ids = [EOS] + list(range(0, 256, 5))
    out = gen(model, temperature=1.0, n_samples=3, max_new_tokens=10, eos_ids=eos_ids, seed=5)
    L = lengths(out)
    assert any(n < 10 for n in L) and any(n == 10 for n in L), L
    for i, n in enumerate(L):
        row = out['ids'][i].tolist()
        stopped = row[n - 1] in eos_ids
        assert not any(x in eos_ids for x in row[:n - 1])  # the first eos ends the row
        assert out['mask'][i, n - 1]  # the last real token, eos or not, is in the mask
        assert bool(out['truncated'][i]) == (not stopped)
        assert out['logprobs'][i, n - 1] < 0
        assert not out['mask'][i, n:].any() and (out['logprobs'][i, n:] == 0).all()
        assert all(x == EOS for x in row[n:])  # padding is pad_id


def test_eos_as_real_token_id(model):
    # the tokenizer's <|endoftext|>: make the model emit it by boosting its output embedding row
    m = tiny('scratch')
    with torch.no_grad():
        m.lm_head.weight[EOS] *= 3  # tied with the input embedding: only its logit grows in practice
    out = gen(m, temperature=1.0, n_samples=3, max_new_tokens=12, eos_ids=[EOS], seed=6)
    L = lengths(out)
    stopped = [i for i, n in enumerate(L) if out['ids'][i, n - 1] == EOS]
    assert stopped, L
    for i in stopped:
        assert out['mask'][i, L[i] - 1] and not out['truncated'][i]


# -----------------------------------------------------------------------------
# out-of-vocabulary ids (pitfall B12)


@pytest.mark.parametrize('family', ['scratch', 'qwen2'])
def test_oov_ids_never_sampled(family):
    m = tiny(family, seed=1)
    V = m.config.vocab_size
    assert V > TOK.n_vocab  # the embedding is padded: to a multiple of 64 (scratch), to 320 rows (qwen2)
    with torch.no_grad():
        m.model.embed_tokens.weight[TOK.n_vocab:] *= 100  # tied: the padded rows' logits become huge
    # the test can fail: without the mask the padded rows would take most of the mass
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        probs = m(input_ids=ids).logits[0, -1].softmax(-1)
    assert probs[TOK.n_vocab:].sum() > 0.99
    out = gen(m, n_samples=70, max_new_tokens=3, temperature=1.0)
    assert out['ids'].shape[0] == 210 and out['mask'].sum() >= 200
    assert (out['ids'] < TOK.n_vocab).all()
    assert torch.isfinite(out['logprobs']).all()
    greedy = gen(m, temperature=0, eos_ids=[], max_new_tokens=4)
    assert (greedy['ids'] < TOK.n_vocab).all()


# -----------------------------------------------------------------------------
# sample(): top-p and greedy


def test_top_p_samples_smallest_prefix():
    # probs (0.10, 0.40, 0.05, 0.30, 0.15): sorted 0.40, 0.30, 0.15, ...; the smallest prefix holding >= 50%
    # is {1, 3} (0.70); token 4 (0.15) must never appear
    probs = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = engine.sample(logits, 1.0, 0.5, g)
    counts = torch.bincount(tok, minlength=5)
    assert set(tok.unique().tolist()) == {1, 3}
    # within the prefix the renormalised odds stay 0.4 : 0.3 -> 4/7 = 0.571 of the draws are token 1
    assert abs(counts[1].item() / 4000 - 4 / 7) < 0.03
    # the returned log-prob is the one under logits / T (documented contract), not the truncated distribution
    torch.testing.assert_close(lp, probs.log()[tok], rtol=0, atol=1e-6)
    # top_p 0.75: 0.40 + 0.30 = 0.70 < 0.75, so token 4 joins the prefix
    tok, _ = engine.sample(logits, 1.0, 0.75, g)
    assert set(tok.unique().tolist()) == {1, 3, 4}


def test_top_p_one_and_temperature():
    probs = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])
    g = torch.Generator().manual_seed(0)
    tok, lp = engine.sample(probs.log().repeat(4000, 1), 0.5, 1.0, g)
    # T=0.5 squares the odds: p^2 / sum p^2, sum p^2 = 0.01 + 0.16 + 0.0025 + 0.09 + 0.0225 = 0.285
    want = probs ** 2 / 0.285
    freq = torch.bincount(tok, minlength=5) / 4000
    assert (freq - want).abs().max() < 0.03
    torch.testing.assert_close(lp, want.log()[tok], rtol=0, atol=1e-5)


def test_greedy_sample_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
    tok, lp = engine.sample(logits, 0, 1.0, None)
    assert tok.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


# -----------------------------------------------------------------------------
# chunked log-probs


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_chunked_logprobs_equal_direct(model, temperature):
    g = torch.Generator().manual_seed(0)
    ps = prompts()
    comps = [torch.randint(0, TOK.n_vocab, (n,), generator=g).tolist() for n in (7, 2, 5)]
    ids, attn, cm = data.collate_rl(ps, comps, EOS)
    C = cm.shape[1]
    w = torch.randn(3, C, generator=g)

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn()
        lp, ent = out if isinstance(out, tuple) else (out, None)
        (lp * w * cm).sum().backward()
        return lp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}

    def direct():
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -C - 1:-1, :TOK.n_vocab]
        lp = torch.log_softmax(logits.float() / temperature, -1)
        ent = -(lp.exp() * lp).sum(-1)
        return lp.gather(-1, ids[:, -C:, None]).squeeze(-1), ent.detach()

    model.train()  # no dropout in this model; grad is on either way
    try:
        a = run(lambda: train.token_logprobs(model, ids, attn, C, temperature, 3, entropy=True, vocab=TOK.n_vocab))
        b = run(lambda: train.token_logprobs(model, ids, attn, C, temperature, 1000, entropy=True, vocab=TOK.n_vocab))
        c = run(direct)
    finally:
        model.eval()
    for x in (b, c):
        torch.testing.assert_close(a[0], x[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(a[1], x[1], rtol=0, atol=1e-5)
        for n in a[2]:
            torch.testing.assert_close(a[2][n], x[2][n], rtol=1e-4, atol=1e-6)
    assert sum(v.abs().sum() for v in a[2].values()) > 0
    assert (a[0] <= 0).all()


def test_logprobs_ignore_left_padding(model):
    # pitfall B11: positions come from the mask, so a prompt padded to a longer batch scores the same
    p, c = prompts()[1], [65, 66, 67]
    ids1, attn1, cm1 = data.collate_rl([p], [c], EOS)
    ids2, attn2, cm2 = data.collate_rl([p, prompts()[2]], [c, [70]], EOS)
    with torch.no_grad():
        alone = train.token_logprobs(model, ids1, attn1, 3, 1.0, 4, vocab=TOK.n_vocab)
        padded = train.token_logprobs(model, ids2, attn2, 3, 1.0, 4, vocab=TOK.n_vocab)
    assert ids2.shape[1] > ids1.shape[1]
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# FSDP2, 2 ranks (gloo): gathered() leaves the unsharded weights on the submodules the decode step calls

WORKER = r'''
import copy, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
sys.path.insert(0, REPO); sys.path.insert(0, HERE)
import train, test_engine as t

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
    outs = [t.gen(model, kind=e, **kw) for e in ('static', 'hf')]
assert isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor)  # resharded after the rollout
want = t.gen(ref, kind='static', **kw)
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

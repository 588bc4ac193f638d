"""rollout engine: greedy equals model.generate, cached decode equals a full forward, seeded sampling, stops,
padding, out-of-vocabulary ids, top-p, chunked log-probs.

    python -m pytest tests/test_engine.py -q
"""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402

TOK = data.Tokenizer.bytes_level()
EOS = TOK.token_id('<|endoftext|>')
PROMPTS = ['12 + 34 = ?\n', 'hi', '<think>a longer prompt, with <answer> tags and more words']


def tiny_model(std=0.5, seed=0):
    """a scratch model whose weights are large enough that outputs depend on the prompt (the 0.02 default init
    gives near-uniform, prompt-independent distributions)."""
    cfg = dict(init_from='scratch', n_embd=64, n_ff=128, n_layer=2, n_head=4, n_kv_head=2, seed=seed,
               master_dtype='fp32')
    model = train.build_model(cfg, TOK).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std, generator=g)
    return model


@pytest.fixture(scope='module')
def model():
    torch.set_num_threads(1)  # 2 shared cores; tiny matmuls gain nothing from threads
    return tiny_model()


def prompts():
    return [TOK.encode(p) for p in PROMPTS]


def gen(model, n_samples=1, max_new_tokens=12, temperature=1.0, top_p=1.0, eos_ids=(EOS,), stop_strings=(),
        seed=0):
    g = torch.Generator().manual_seed(seed)
    return engine.generate(model, prompts(), n_samples=n_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, eos_ids=list(eos_ids), stop_strings=list(stop_strings),
                           tok=TOK, pad_id=EOS, generator=g)


def lengths(out):
    return out['mask'].sum(-1).long().tolist()


# -----------------------------------------------------------------------------
# greedy == model.generate


def test_greedy_varies_between_prompts(model):
    out = gen(model, temperature=0, eos_ids=[], max_new_tokens=8)
    rows = [tuple(r) for r in out['ids'].tolist()]
    assert len(set(rows)) == 3  # the re-initialised model is not prompt-independent
    assert out['mask'].all() and out['truncated'].all()  # no stop at all: every row runs to max_new_tokens


def test_greedy_matches_hf_generate(model):
    n_new = 16
    free = gen(model, temperature=0, eos_ids=[], max_new_tokens=n_new)
    # stop token: one greedy row produces early, so rows stop at different steps (and some never do)
    stop = free['ids'][1, 4].item()
    ours = gen(model, temperature=0, eos_ids=[stop], max_new_tokens=n_new)
    L = lengths(ours)
    assert min(L) < n_new and max(L) == n_new, L  # some rows stop on eos, some run to the end
    # model.generate on the same left-padded batch; it cannot know the padded embedding rows are not tokens,
    # so suppress them as our sampler does
    P = max(map(len, prompts()))
    ids = torch.full((3, P), stop, dtype=torch.long)
    attn = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts()):
        ids[i, P - len(p):], attn[i, P - len(p):] = torch.tensor(p), 1
    hf = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=n_new,
                        eos_token_id=stop, pad_token_id=stop,
                        suppress_tokens=list(range(TOK.n_vocab, model.config.vocab_size)))[:, P:]
    for i, n in enumerate(L):
        assert ours['ids'][i, :n].tolist() == hf[i, :n].tolist(), i
        if n < n_new:
            assert ours['ids'][i, n - 1].item() == stop  # stopped on eos, which it keeps
            assert (hf[i, n:] == stop).all()  # after eos HF pads with pad_token_id (= eos here)


# -----------------------------------------------------------------------------
# cached decode == full forward


@pytest.mark.parametrize('temperature', [0.7, 1.0])
def test_sampling_logprobs_equal_full_forward(model, temperature):
    # an eighth of the vocabulary ends a row, so most rows stop early, at different steps: exercises row dropping
    eos_ids = list(range(0, 256, 8))
    out = gen(model, n_samples=3, max_new_tokens=10, temperature=temperature, eos_ids=eos_ids, seed=1)
    L = lengths(out)
    assert len(set(L)) >= 3 and min(L) < 10, L
    comps = [out['ids'][i, :n].tolist() for i, n in enumerate(L)]
    ps = [p for p in prompts() for _ in range(3)]
    ids, attn, cm = data.collate_rl(ps, comps, EOS)
    with torch.no_grad():
        full = train.token_logprobs(model, ids, attn, cm.shape[1], temperature, 4, vocab=TOK.n_vocab)
    C = cm.shape[1]
    assert torch.equal(cm.bool(), out['mask'][:, :C])
    assert (out['logprobs'][:, C:] == 0).all()
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
# seeded sampling


def test_sampling_reproducible_with_seed(model):
    a = gen(model, n_samples=4, max_new_tokens=10, seed=7)
    b = gen(model, n_samples=4, max_new_tokens=10, seed=7)
    c = gen(model, n_samples=4, max_new_tokens=10, seed=8)
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
    free = gen(model, n_samples=3, max_new_tokens=12, eos_ids=[], seed=3)
    chars = [chr(x) for x in free['ids'][:, :6].flatten().tolist() if 33 <= x < 127]
    stops = sorted(set(chars))[:4] + [']']
    out = gen(model, n_samples=3, max_new_tokens=12, eos_ids=[], stop_strings=stops, seed=3)
    check_stops(out, stops, 12)


def test_stop_string_two_tokens(model):
    # a two-byte stop string spans two tokens: the row stops on its second token, which is kept in the mask
    free = gen(model, n_samples=3, max_new_tokens=12, eos_ids=[], seed=4)
    row = free['ids'][0].tolist()
    k = next(i for i in range(2, 11) if all(33 <= x < 127 for x in row[i:i + 2]))
    stop = TOK.decode(row[k:k + 2])
    assert len(stop) == 2
    out = gen(model, n_samples=3, max_new_tokens=12, eos_ids=[], stop_strings=[stop], seed=4)
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


def test_eos_kept_in_mask_and_truncation(model):
    # pitfall B7: the eos that ends a row is a real token of the completion, inside the mask (pad == eos here)
    eos_ids = [EOS] + list(range(0, 256, 5))
    out = gen(model, n_samples=3, max_new_tokens=10, eos_ids=eos_ids, seed=5)
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
    m = tiny_model()
    with torch.no_grad():
        m.lm_head.weight[EOS] *= 3  # tied with the input embedding: only its logit grows in practice
    out = gen(m, n_samples=3, max_new_tokens=12, eos_ids=[EOS], seed=6)
    L = lengths(out)
    stopped = [i for i, n in enumerate(L) if out['ids'][i, n - 1] == EOS]
    assert stopped, L
    for i in stopped:
        assert out['mask'][i, L[i] - 1] and not out['truncated'][i]


# -----------------------------------------------------------------------------
# out-of-vocabulary ids (pitfall B12)


def test_oov_ids_never_sampled():
    m = tiny_model(seed=1)
    V = m.config.vocab_size
    assert V > TOK.n_vocab  # the embedding is padded to a multiple of 64
    with torch.no_grad():
        m.model.embed_tokens.weight[TOK.n_vocab:] *= 100  # tied: the padded rows' logits become huge
    # the test can fail: without the mask the padded rows would take most of the mass
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        probs = m(input_ids=ids).logits[0, -1].softmax(-1)
    assert probs[TOK.n_vocab:].sum() > 0.99
    out = engine.generate(m, prompts(), n_samples=70, max_new_tokens=3, temperature=1.0, top_p=1.0, eos_ids=[EOS],
                          stop_strings=[], tok=TOK, pad_id=EOS, generator=torch.Generator().manual_seed(0))
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

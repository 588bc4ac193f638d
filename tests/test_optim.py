"""optim.AdamW on CPU: its chunked foreach step against a per-parameter reference loop (the spec), and its state across
a checkpoint (moments keep their dtype, a resumed run equals the uninterrupted one).

    python -m pytest tests/test_optim.py -q
"""
import copy
import json
import os

import pytest
import torch

import checkpoint
import optim
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReferenceAdamW(torch.optim.Optimizer):
    """AdamW one parameter at a time, in fp32 from moments stored in state_dtype: the semantics optim.AdamW keeps."""

    def __init__(self, params, lr: float, betas: tuple, weight_decay: float, state_dtype: torch.dtype, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                w, g, st = checkpoint.local(p), checkpoint.local(p.grad).float(), self.state[p]
                if not st:
                    st['step'] = 0
                    st['m'] = torch.zeros_like(w, dtype=self.state_dtype)
                    st['v'] = torch.zeros_like(w, dtype=self.state_dtype)
                st['step'] += 1
                m = st['m'].float().lerp_(g, 1 - b1)
                v = st['v'].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st['m'].copy_(m), st['v'].copy_(v)
                update = (m / (1 - b1 ** st['step'])) / ((v / (1 - b2 ** st['step'])).sqrt_() + group['eps'])
                if group['weight_decay'] and w.dim() >= 2:
                    update.add_(w.float(), alpha=group['weight_decay'])
                w.copy_(w.float() - group['lr'] * update)  # rounds once to the master dtype


SHAPES = {'emb': (50, 8), 'mat': (3, 5), 'bias': (5,), 'norm': (6,), 'skip': (3, 4), 'scalar': ()}
CHUNK = 7  # emb (400 elements) splits into 58 slices; small ones share chunks


def make_model(master):
    torch.manual_seed(0)
    return torch.nn.ParameterDict({k: torch.randn(s).to(master) for k, s in SHAPES.items()})


def set_grads(model, s):
    """grads in the master dtype; 'mat' gets a non-contiguous one; 'skip' (2-d) and 'norm' (1-d) miss some steps,
    so one group holds parameters at different step counts."""
    g = torch.Generator().manual_seed(100 + s)
    for k, p in model.items():
        p.grad = torch.randn(SHAPES[k][::-1], generator=g).to(p.dtype).mT if k == 'mat' else \
            torch.randn(SHAPES[k], generator=g).to(p.dtype)
    if s % 3 == 0:
        model['skip'].grad = None
    if s % 2 == 1:
        model['norm'].grad = None


def adam(cls, model, state_dtype, **kw):
    return cls(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=state_dtype, **kw)


def run(model, opt, steps, start=0):
    for s in range(start, start + steps):
        set_grads(model, s)
        opt.step()


DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize('master,state_dtype', DTYPES)
def test_foreach_step_equals_the_per_parameter_loop(master, state_dtype):
    # bit-equal, every dtype: on CPU the foreach ops run the same per-tensor kernels, in the reference's order,
    # and w - lr * u is computed as w + (-lr * u), the same float. (a cuda foreach kernel may differ by an ulp)
    ref, new = make_model(master), make_model(master)
    opt_ref, opt_new = adam(ReferenceAdamW, ref, state_dtype), adam(optim.AdamW, new, state_dtype, chunk=CHUNK)
    for s in range(6):
        run(ref, opt_ref, 1, s), run(new, opt_new, 1, s)
        for k in SHAPES:
            a, b = opt_ref.state[ref[k]], opt_new.state[new[k]]
            if not a:  # 'skip' has had no grad yet
                assert not b and k == 'skip' and s == 0
                continue
            assert a['step'] == b['step'] and b['m'].dtype == b['v'].dtype == state_dtype, k
            assert torch.equal(a['m'], b['m']) and torch.equal(a['v'], b['v']), f"step {s}: {k}'s moments"
            assert ref[k].dtype == new[k].dtype == master and torch.equal(ref[k], new[k]), f"step {s}: {k}"
    assert [opt_new.state[new[k]]['step'] for k in ('emb', 'norm', 'skip')] == [6, 3, 4]


def test_chunks_cover_every_element_once_and_are_full(monkeypatch):
    chunks, update = [], optim.AdamW._update
    monkeypatch.setattr(optim.AdamW, '_update', lambda self, pieces, group: (
        chunks.append([p[0].numel() for p in pieces]), update(self, pieces, group)))
    model = make_model(torch.float32)
    set_grads(model, 0)  # 'skip' has no grad
    adam(optim.AdamW, model, torch.bfloat16, chunk=CHUNK).step()
    assert max(map(sum, chunks)) <= CHUNK and len(chunks) > 400 // CHUNK
    assert sum(map(sum, chunks)) == sum(p.numel() for k, p in model.items() if k != 'skip')
    assert all(sum(c) + nxt[0] > CHUNK for c, nxt in zip(chunks, chunks[1:])), "greedy: no two chunks could merge"


@pytest.mark.parametrize('master,state_dtype', DTYPES)
def test_state_round_trips(master, state_dtype, tmp_path):
    a = make_model(master)
    opt = adam(optim.AdamW, a, state_dtype, chunk=CHUNK)
    run(a, opt, 3)
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    # deep copies: on cpu both hold the live moments, which the next steps update in place
    saved, saved_torch = checkpoint.save_state(str(tmp_path / 'state'), dict(a.named_parameters()), opt), copy.deepcopy(opt.state_dict())
    run(a, opt, 3, start=3)
    opt_b = adam(optim.AdamW, b, state_dtype, chunk=CHUNK)  # the resume path: moments by name, into state_dtype
    checkpoint.load_state(str(tmp_path / 'state'), dict(b.named_parameters()), opt_b, saved)
    run(b, opt_b, 3, start=3)
    for k in SHAPES:
        assert opt_b.state[b[k]]['m'].dtype == state_dtype and torch.equal(a[k], b[k]), k
    if master == state_dtype:  # torch's load_state_dict casts floating state to the parameter's dtype
        opt_c = adam(optim.AdamW, c, state_dtype, chunk=CHUNK)
        opt_c.load_state_dict(saved_torch)
        run(c, opt_c, 3, start=3)
        assert all(torch.equal(a[k], c[k]) for k in SHAPES)


# -----------------------------------------------------------------------------
# across a checkpoint: bf16 moments stay bf16, and a resumed run equals the uninterrupted one bit for bit


def adam_run(steps, path, resume_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 8, bias=False)
    w = model.weight
    opt = optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.bfloat16)
    for s in range(steps):
        if s == resume_at:  # a new optimizer from the saved state, as --init_from=resume builds it
            sd = checkpoint.save_state(path, {'weight': w}, opt)
            opt = optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.bfloat16)
            checkpoint.load_state(path, {'weight': w}, opt, sd)
        w.grad = torch.sin(w.detach() * (s + 1))
        opt.step()
    return w.detach(), opt


def test_adam_moments_keep_their_dtype_across_a_resume(tmp_path):
    w_a, opt_a = adam_run(4, str(tmp_path / 'a'))
    w_b, opt_b = adam_run(4, str(tmp_path / 'b'), resume_at=2)
    st = opt_b.state[opt_b.param_groups[0]['params'][0]]
    assert st['m'].dtype == torch.bfloat16 and st['v'].dtype == torch.bfloat16
    assert torch.equal(w_a, w_b), "the resumed run matches the uninterrupted one bit for bit"


def train_metrics(args):
    """train.py in one process -> the rows of its metrics.jsonl (args ends with --out_dir)"""
    p = in_process(args)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(args[-1].split('=', 1)[1], 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_bf16_moment_resume_equals_uninterrupted(tmp_path):
    args = ['config/tiny.py', '--optim_dtype=bf16', '--batch_size=8', '--max_iters=4']
    a = train_metrics(args + [f'--out_dir={tmp_path / "a"}'])
    train_metrics(args[:-1] + ['--max_iters=2', f'--out_dir={tmp_path / "b"}'])
    b = train_metrics(args + ['--init_from=resume', f'--out_dir={tmp_path / "b"}'])
    assert [m['loss'] for m in a] == [m['loss'] for m in b]  # exact: moments restored in fp32 would round otherwise

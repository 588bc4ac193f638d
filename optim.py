"""AdamW for fsdp2's sharded master weights: fp32 or bf16 weights, moments stored in fp32 or bf16 (bf16 halves their
memory), the math in fp32 foreach ops over bounded chunks. train.py builds it; bench.py's memory planner reads its
temporaries; tests/test_optim.py holds it to a per-parameter reference."""
import torch

from checkpoint import local


class AdamW(torch.optim.Optimizer):
    """adamw on (sharded) fp32 or bf16 master weights with moments stored in state_dtype; the math runs in fp32, in
    foreach ops on chunks of at most `chunk` elements: at most TEMPS x chunk x 4 bytes of temporaries whatever the model."""
    CHUNK, TEMPS = 2 ** 25, 3  # elements per chunk; fp32 temporaries alive at once (bench.py's memory planner reads both)

    def __init__(self, params, lr: float, betas: tuple, weight_decay: float, state_dtype: torch.dtype, eps=1e-8,
                 chunk: int = CHUNK):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))
        self.state_dtype, self.chunk = state_dtype, chunk

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            pieces, n = [], 0  # (w, g, m, v, step, decay): flat slices of consecutive parameters, at most chunk in all
            for p in group['params']:
                if p.grad is None:
                    continue
                w, st = local(p), self.state[p]
                if not st:
                    st.update(step=0, m=torch.zeros_like(w, dtype=self.state_dtype),
                              v=torch.zeros_like(w, dtype=self.state_dtype))
                st['step'] += 1
                flat = w.view(-1), local(p.grad).reshape(-1), st['m'].view(-1), st['v'].view(-1)
                for i in range(0, w.numel(), self.chunk):
                    if n + min(self.chunk, w.numel() - i) > self.chunk:
                        self._update(pieces, group)
                        pieces, n = [], 0
                    pieces.append((*(t[i:i + self.chunk] for t in flat), st['step'], w.dim() >= 2))  # p's dim decides
                    n += pieces[-1][0].numel()
            if pieces:
                self._update(pieces, group)

    def _update(self, pieces, group):
        (b1, b2), lr, wd, eps = group['betas'], group['lr'], group['weight_decay'], group['eps']
        w, g, m, v, t, decay = zip(*pieces)
        # .float() of fp32 is the tensor itself: fp32 moments update in place here, so later ops read m32, v32 only
        # out of place, and the copy back copies them onto themselves
        g32, m32, v32 = [x.float() for x in g], [x.float() for x in m], [x.float() for x in v]
        torch._foreach_lerp_(m32, g32, 1 - b1)
        torch._foreach_mul_(v32, b2)
        torch._foreach_addcmul_(v32, g32, g32, value=1 - b2)
        torch._foreach_copy_(m, m32), torch._foreach_copy_(v, v32)  # rounds bf16 moments; the update uses fp32 ones
        del g32  # the dels keep at most 3 fp32 temporaries of the chunk alive
        den = torch._foreach_div(v32, [1 - b2 ** s for s in t])  # per slice: steps differ after skipped grads
        del v32
        torch._foreach_sqrt_(den), torch._foreach_add_(den, eps)
        upd = torch._foreach_div(m32, [1 - b1 ** s for s in t])
        del m32
        torch._foreach_div_(upd, den)
        del den
        if wd and (d := [i for i, dec in enumerate(decay) if dec]):
            torch._foreach_add_([upd[i] for i in d], [w[i] for i in d], alpha=wd)
        torch._foreach_mul_(upd, -lr)
        torch._foreach_add_(w, upd)  # w - lr * update in fp32, rounded once to the master dtype

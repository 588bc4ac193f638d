"""fsdp2 as train.py sets it up, on 2 gloo ranks (torchrun): a rollout's gathered() hands every group its own
reshard-after-forward setting back, so the trained root stays gathered from forward to backward after any number of
rollouts; the frozen grpo reference, which has no backward, reshards its root after every forward; micro-batches under
bf16 autocast each reach their reduce-scatter.

    python -m pytest tests/test_fsdp.py -q
"""
import json
import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(out: str):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import data
    import engine
    import train
    dist.init_process_group('gloo')
    mesh = init_device_mesh('cpu', (2,))
    tok = data.Tokenizer.bytes_level()
    cfg = dict(init_from='scratch', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_ff=128, master_dtype='fp32', seed=0)
    model = train.shard(train.build_model(cfg, tok), mesh, None)
    ref = train.shard(train.build_model(cfg, tok).requires_grad_(False).eval(), mesh, None, frozen=True)
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    gathered = lambda m: not isinstance(m.model.embed_tokens.weight, DTensor)  # fsdp2 registers the unsharded one
    prompt = tok.encode('12 + 34 = ?')
    ids = torch.tensor([prompt + tok.encode('<think>46</think>')])
    attn, n = torch.ones_like(ids), len(tok.encode('<think>46</think>'))
    seen = {'before': [train.reshards_after_forward(m) for m in groups]}
    for _ in range(2):  # rollouts, then a training step, twice
        model.eval()
        with train.gathered(model):
            engine.generate(model, [prompt], n_samples=2, max_new_tokens=4, temperature=1.0, top_p=1.0, eos_ids=[256],
                            stop_strings=[], tok=tok, pad_id=256, generator=torch.Generator().manual_seed(0))
        model.train()
        lp = train.token_logprobs(model, ids, attn, n)
        seen.setdefault('root gathered after forward', []).append(gathered(model))
        lp.sum().backward()
        seen.setdefault('root gathered after backward', []).append(gathered(model))
    seen['after'] = [train.reshards_after_forward(m) for m in groups]
    with torch.no_grad():
        train.token_logprobs(ref, ids, attn, n)
    seen['reference root gathered after forward'] = gathered(ref)
    # sft_step's micro-batches under cpu bf16 autocast, twice the same one: each reduce-scattered in its own backward,
    # so the sharded gradients exactly double (a weight cast cached across the two would reach fsdp2 a backward late)
    r = types.SimpleNamespace(amp_on=True, ddp=True, device='cpu')
    model.zero_grad(set_to_none=True)
    grads = []
    with train.casts(r, backward=True):
        for _ in range(2):
            with train.amp(r):
                lp = train.token_logprobs(model, ids, attn, n)
            lp.sum().backward()
            grads.append({k: p.grad.to_local().clone() for k, p in model.named_parameters()})
    seen['micro-batch gradients that did not double'] = [k for k, g in grads[0].items()
                                                         if not torch.equal(grads[1][k], 2 * g)]
    if dist.get_rank() == 0:
        with open(out, 'w') as f:
            json.dump(seen, f)
    dist.destroy_process_group()


def test_rollouts_leave_fsdp_settings_and_the_reference_reshards(tmp_path):
    out = tmp_path / 'seen.json'
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', __file__,
                        str(out)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.load(open(out))
    assert seen['before'] == [False, True, True] and seen['after'] == seen['before'], seen  # root, layers
    assert seen['root gathered after forward'] == [True, True], seen  # kept for its backward, every step
    assert seen['root gathered after backward'] == [False, False], seen
    assert seen['reference root gathered after forward'] is False, seen  # ~0.6 GB per rank at 3B otherwise
    assert seen['micro-batch gradients that did not double'] == [], seen


if __name__ == '__main__':
    worker(sys.argv[1])

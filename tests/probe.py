"""run a script as __main__ (train.py, under torchrun too) and record per rank what a run does not print: decoder
layers run forward with grad and recomputed in backward (activation checkpointing at work), and the gradient bytes
the rank holds after each backward, its own shards apart from FSDP2's unsharded accumulation; with PROBE_CASTS=1,
how often each parameter is cast from fp32 to bf16 (autocast's weight casts). written to probe_rank{RANK}.json in the
working directory after each backward and at exit (a stop by a signal leaves by os._exit, past atexit).

    python tests/probe.py train.py config/tiny.py --device=cpu
"""
import atexit
import json
import os
import runpy
import sys

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_layers import GradientCheckpointingLayer

seen = {'forwards': 0, 'recomputed': 0, 'sharded_grad_bytes': [], 'unsharded_grad_bytes': [], 'n_params': 0}
roots = []
sync, backward = FSDPModule.set_requires_gradient_sync, torch.Tensor.backward


first_children = set()


def count(module, args):
    """a layer's forward with grad; its recompute in backward runs the layer's forward, not its hooks (transformers
    checkpoints `forward`), so it is counted at the layer's first child (self_attn), which the forward calls once."""
    if not torch.is_grad_enabled():
        return
    if isinstance(module, GradientCheckpointingLayer):
        first_children.add(id(next(module.children())))
        seen['forwards'] += 1
    elif id(module) in first_children and torch._C._current_graph_task_id() != -1:
        seen['recomputed'] += 1


def set_sync(self, *args, **kwargs):  # train.py calls it on the root before each micro-batch
    if self not in roots:
        roots.append(self)
    return sync(self, *args, **kwargs)


def bytes_of(t) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def grad_bytes(self, *args, **kwargs):
    backward(self, *args, **kwargs)
    for root in roots:
        seen['n_params'] = sum(p.numel() for p in root.parameters())
        seen['sharded_grad_bytes'].append(sum(bytes_of(p.grad) for p in root.parameters() if p.grad is not None))
        fsdp = [fp for m in root.modules() if isinstance(m, FSDPModule)
                for g in m._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params]
        seen['unsharded_grad_bytes'].append(sum(
            (bytes_of(fp.unsharded_accumulated_grad) if fp.unsharded_accumulated_grad is not None else 0) +
            (bytes_of(fp._unsharded_param.grad) if getattr(fp, '_unsharded_param', None) is not None
             and fp._unsharded_param.grad is not None else 0) for fp in fsdp))
    write()


class Casts(TorchDispatchMode):
    """counts fp32 -> bf16 copies of parameters, keyed by storage (the optimizer updates in place)."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if (func is torch.ops.aten._to_copy.default and isinstance(x, torch.nn.Parameter)
                and x.dtype == torch.float32 and kwargs.get('dtype') == torch.bfloat16):
            key = str(x.data_ptr())
            seen['casts'][key] = seen['casts'].get(key, 0) + 1
        return func(*args, **kwargs)


def write():
    with open(f"probe_rank{os.environ.get('RANK', '0')}.json", 'w') as f:
        json.dump(seen, f)


torch.nn.modules.module.register_module_forward_pre_hook(count)
FSDPModule.set_requires_gradient_sync, torch.Tensor.backward = set_sync, grad_bytes
atexit.register(write)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
if os.environ.get('PROBE_CASTS'):
    seen['casts'] = {}
    with Casts():
        runpy.run_path(sys.argv[0], run_name='__main__')
else:
    runpy.run_path(sys.argv[0], run_name='__main__')

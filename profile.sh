#!/usr/bin/env bash
# profile.sh: Nsight Systems timeline of a few training steps, NVTX ranges included (forward, backward,
# optimizer_step, rollout_generation, reward_computation, old_logprobs, policy_loss_backward, policy_update, and
# async_next_rollout on the rollout thread with --overlap=True); Nsight Compute on the dominant GEMMs with --ncu.
# Without nsys (or a GPU) it falls back to a torch.profiler trace. Other arguments go to train.py.
#   bash profile.sh config/sft.py                 # nsys, 2 GPUs
#   bash profile.sh config/dapo.py --ncu          # + ncu on the largest kernels
#   bash profile.sh config/dapo.py --overlap=True # the rollout of step N+1 on its own stream beside update N
#   bash profile.sh config/tiny.py                # CPU: torch.profiler -> profiles/trace.json (chrome://tracing)
set -euo pipefail
cd "$(dirname "$0")"
cfg=${1:?usage: bash profile.sh config/X.py [--ncu] [--key=value ...]}
name=$(basename "$cfg" .py)
mkdir -p profiles
ncu_too=0; extra=()
for a in "${@:2}"; do if [ "$a" = --ncu ]; then ncu_too=1; else extra+=("$a"); fi; done
steps="--max_iters=3 --ckpt_interval=1000000 --out_dir=profiles/out-$name ${extra[*]:-}"
if command -v nsys >/dev/null && python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  nsys profile -t cuda,nvtx,osrt -o "profiles/$name" --force-overwrite true \
    torchrun --standalone --nproc_per_node="${NPROC:-2}" train.py "$cfg" $steps
  if [ "$ncu_too" = 1 ] && command -v ncu >/dev/null; then
    ncu --nvtx --nvtx-include "forward/" --launch-count 20 --set full -o "profiles/$name-ncu" --force-overwrite \
      python train.py "$cfg" $steps --max_iters=1
  fi
  echo "open profiles/$name.nsys-rep in Nsight Systems"
else
  python - "$cfg" $steps <<'PY'
import sys, torch
from torch.profiler import ProfilerActivity, profile
import train
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
with profile(activities=acts, record_shapes=True) as prof:
    train.main(sys.argv[1:])  # the run, in this process
prof.export_chrome_trace('profiles/trace.json')
print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15))
phases = ('forward', 'backward', 'optimizer_step', 'rollout_generation', 'reward_computation', 'advantage_computation',
          'old_logprobs', 'policy_loss_backward', 'policy_update', 'async_next_rollout')
print('time by phase (train.py phase(): the nvtx ranges, as profiler labels; phases nest, so they overlap;')
print('  an overlapped rollout runs in a thread this cpu trace does not follow: nsys does):')
for e in sorted((e for e in prof.key_averages() if e.key in phases), key=lambda e: -e.cpu_time_total):
    print(f'  {e.key:24s} {e.count:4d} calls  {e.cpu_time_total / 1e3:9.1f} ms')
print('trace: profiles/trace.json (chrome://tracing or ui.perfetto.dev)')
PY
fi

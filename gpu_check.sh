#!/usr/bin/env bash
# gpu_check.sh: everything worth a lent GPU in one call (about 5 minutes on one H100/H200), output in $OUT or ./gpu-out.
#   1. train.py on cuda: tiny sft, each rl mode for 3 steps on the single-GPU path (fp32 master + bf16 autocast),
#      and every mode under torchrun with 1 rank (FSDP2 on nccl, bf16 MixedPrecisionPolicy, gathered rollouts)
#   2. bench.py on a random-weight Qwen2.5-3B-shaped model at real sizes: engine vs model.generate, train step, mfu
# the machine has no network: a missing nvtx is installed from wheels carried in .whl/
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-gpu-out}; mkdir -p "$out"
python -c 'import nvtx' 2>/dev/null || { python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'; } | tee "$out/gpu.txt"
python train.py config/tiny.py --device=cuda --out_dir=/tmp/g-sft --max_iters=60 2>&1 | tail -2 | tee "$out/train.txt"
for m in grpo dr_grpo dapo; do
  python train.py config/tiny.py --device=cuda --mode=$m --init_from=/tmp/g-sft/ckpt --out_dir=/tmp/g-$m \
    --max_iters=3 --overlong=soft --overlong_buffer=40 2>&1 | tail -1 | tee -a "$out/train.txt"
done
for m in grpo dr_grpo dapo; do  # every mode on nccl: grpo and dr_grpo once passed host tensors to a collective
  torchrun --standalone --nproc_per_node=1 train.py config/tiny.py --device=cuda --mode=$m --init_from=/tmp/g-sft/ckpt \
    --out_dir=/tmp/g-fsdp-$m --max_iters=3 --overlong=soft --overlong_buffer=40 2>&1 | tail -1 | tee -a "$out/train.txt"
done
python bench.py --preset qwen3b --device cuda --prompts 8 --group_size 8 --new_tokens 256 --prompt_len 128 \
  --micro_batch 4 --seq_len 1024 --repeats 2 2>&1 | tail -3 | tee "$out/bench.txt"
python bench.py --preset qwen3b --device cuda --prompts 16 --group_size 8 --new_tokens 512 --prompt_len 128 \
  --skip train --repeats 1 2>&1 | tail -1 | tee -a "$out/bench.txt"

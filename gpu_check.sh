#!/usr/bin/env bash
# gpu_check.sh: everything worth a lent GPU in one call (about 5 minutes on one H100/H200), output in $OUT or ./gpu-out.
#   1. train.py on cuda: tiny sft, then each rl mode for 3 steps (single-GPU path: fp32 master + bf16 autocast)
#   2. bench.py on a random-weight Qwen2.5-3B-shaped model at real sizes: engine vs model.generate, train step, mfu
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-gpu-out}; mkdir -p "$out"
python -m pip install -q -r requirements.txt 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python train.py config/tiny.py --device=cuda --out_dir=/tmp/g-sft --max_iters=60 2>&1 | tail -2 | tee "$out/train.txt"
for m in grpo dr_grpo dapo; do
  python train.py config/tiny.py --device=cuda --mode=$m --init_from=/tmp/g-sft/ckpt --out_dir=/tmp/g-$m \
    --max_iters=3 --overlong=soft --overlong_buffer=40 2>&1 | tail -1 | tee -a "$out/train.txt"
done
python bench.py --preset qwen3b --device cuda --prompts 8 --group_size 8 --new_tokens 256 --prompt_len 128 \
  --micro_batch 1 --seq_len 1024 --repeats 2 2>&1 | tail -3 | tee "$out/bench.txt"

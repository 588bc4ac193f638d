# stage 2, grpo: k3 KL (beta 0.1) to a frozen reference (the SFT checkpoint, sharded, bf16), eps 0.2/0.2.
#   torchrun --standalone --nproc_per_node=2 train.py config/grpo.py
out_dir = 'out-grpo'
init_from = 'out-sft/ckpt'
dataset = 'openai/gsm8k'
dataset_config = 'main'
split = 'train'
prompt_template = 'r1'
mode = 'grpo'
max_iters = 200
lr_decay_iters = 200
warmup_iters = 5
learning_rate = 1e-6
min_lr = 1e-6
batch_size = 16  # prompts per step, x group_size = 128 completions
group_size = 8
max_new_tokens = 512
temperature = 1.0
micro_batch_size = 2  # bench.py --memory: dr_grpo and dapo fit 2 x 24 GB up to 3; grpo (its reference) needs ~25 GiB
num_iterations = 1
beta = 0.1
eps_low = 0.2
eps_high = 0.2
master_dtype = 'fp32'
optim_dtype = 'bf16'
ckpt_interval = 25
device = 'cuda'
activation_checkpointing = True

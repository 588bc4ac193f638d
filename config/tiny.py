# tiny CPU job: scratch Qwen2-architecture model, built-in arithmetic task, every step logged.
#   python train.py config/tiny.py                 (sft)
#   python train.py config/tiny.py --mode=dapo     (rl from scratch weights: plumbing, not learning)
out_dir = 'out-tiny'
init_from = 'scratch'
dataset = 'arith'
prompt_template = '{question}\n'
max_seq_len = 128
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 64
n_ff = 256
max_iters = 60
lr_decay_iters = 60
warmup_iters = 5
learning_rate = 3e-3
min_lr = 3e-4
batch_size = 16
micro_batch_size = 8
master_dtype = 'fp32'
optim_dtype = 'fp32'
group_size = 4
max_new_tokens = 48
ckpt_interval = 1000
device = 'cpu'
activation_checkpointing = False

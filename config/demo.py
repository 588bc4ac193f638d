# the CPU demo: a ~1M-parameter scratch model learns 3-digit addition (sft), from data where half the examples
# show the column-by-column work in <think> and half give only the answer. the direct answer is out of a tiny
# model's reach (~4% greedy) and the worked one is not (~85%), but after sft greedy decoding mostly answers
# directly; rl discovers that thinking pays (docs/results.md has the figures).
# demo.py runs sft -> rl -> eval; the rl stage overrides mode, init_from and the rest.
out_dir = 'out-demo/sft'
init_from = 'scratch'
dataset = 'arith'
arith_task = 'column'
arith_terms = 2
arith_digits = 3
arith_trace_frac = 0.5
prompt_template = '{question}\n'
max_seq_len = 128
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
n_ff = 512
max_iters = 800
lr_decay_iters = 800
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
batch_size = 32
micro_batch_size = 32
master_dtype = 'fp32'
optim_dtype = 'fp32'
ckpt_interval = 100000
log_interval = 50
device = 'cpu'
activation_checkpointing = False
# generation (used by the rl stage and eval)
group_size = 8
max_new_tokens = 64
temperature = 1.0

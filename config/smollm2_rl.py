# the real-model demo's rl stage: the task and model of config/smollm2.py, from its sft checkpoint, 4 prompts x 8
# samples per step (demo.py --model smollm2 overrides mode and out_dir for each of grpo, dr_grpo, dapo).
#   python train.py config/smollm2_rl.py --mode=dr_grpo --out_dir=out-smollm2/dr_grpo
import os
exec(open(os.path.join(os.path.dirname(__file__), 'smollm2.py')).read())
init_from = 'out-smollm2/sft/ckpt'
out_dir = 'out-smollm2/rl'
mode = 'dapo'
max_iters = 30
lr_decay_iters = 30
warmup_iters = 2
learning_rate = 2e-6
min_lr = 2e-6
batch_size = 4
micro_batch_size = 16
log_interval = 1

# the demo's rl stage: the task and model of config/demo.py, then 16 prompts x 8 samples per step.
#   python train.py config/demo_rl.py --init_from=out-demo/sft/ckpt            (dapo)
#   python train.py config/demo_rl.py --init_from=out-demo/sft/ckpt --mode=grpo
import os
exec(open(os.path.join(os.path.dirname(__file__), 'demo.py')).read())
out_dir = 'out-demo/rl'
mode = 'dapo'
max_iters = 150  # the gain comes in the first 50-100 steps (docs/results.md)
lr_decay_iters = 150
warmup_iters = 2
learning_rate = 5e-5  # 1e-4 learns no faster here, and lost accuracy on the chain task (docs/results.md)
min_lr = 5e-5
weight_decay = 0.0
batch_size = 16
micro_batch_size = 64
log_interval = 10

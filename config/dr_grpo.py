# stage 2, dr_grpo: no KL and no reference model (saves its memory), A = r - mean, constant normaliser.
#   torchrun --standalone --nproc_per_node=2 train.py config/dr_grpo.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'grpo.py')).read())
out_dir = 'out-dr_grpo'
mode = 'dr_grpo'
beta = 0.0

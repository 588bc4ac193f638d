# stage 2, dr_grpo: no KL and no reference model (saves its memory), A = r - mean, constant normaliser.
#   torchrun --standalone --nproc_per_node=2 train.py config/dr_grpo.py
exec(open('config/grpo.py').read())
out_dir = 'out-dr_grpo'
mode = 'dr_grpo'
beta = 0.0

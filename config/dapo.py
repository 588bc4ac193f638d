# stage 2, dapo: clip-higher 0.2/0.28, dynamic sampling, token-level loss, overlong penalty (-0.5, the seed's).
#   torchrun --standalone --nproc_per_node=2 train.py config/dapo.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'grpo.py')).read())
out_dir = 'out-dapo'
mode = 'dapo'
beta = 0.0
eps_high = 0.28
dynamic_sampling = True
max_gen_rounds = 3
overlong = 'fixed'  # 'soft' is the DAPO paper's ramp over the last overlong_buffer tokens
overlong_penalty = 0.5

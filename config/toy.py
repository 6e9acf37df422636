# the default study on a laptop CPU (2 cores): ~0.9M parameters, 2.9M tokens per run (~3 minutes at ~18k tok/s).
# 300 iterations (1.2M tokens) left treatment accuracy at 15%; 700 reach 96% treatment and 100% fact recall on the
# raw corpus (greedy, oracle), and keep the study's seven pretraining runs within its half-hour budget.
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
max_iters = 700
eval_interval = 175
eval_iters = 10
log_interval = 50
warmup_iters = 40
learning_rate = 3e-3
min_lr = 3e-4

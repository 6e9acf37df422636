# the default study on a laptop CPU (2 cores): ~0.9M parameters, 6.1M tokens per run (~6 minutes at ~18k tok/s).
# 300 iterations (1.2M tokens) left treatment accuracy at 15% and fact recall at 40%; 1500 reach 87-100% / 100%.
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
max_iters = 1500
eval_interval = 250
eval_iters = 10
log_interval = 50
warmup_iters = 75
learning_rate = 3e-3
min_lr = 3e-4

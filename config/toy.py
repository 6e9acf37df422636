# the default study on a laptop CPU (2 cores): ~0.8M parameters, ~1.2M tokens per run
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
max_iters = 300
eval_interval = 100
eval_iters = 10
log_interval = 20
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4

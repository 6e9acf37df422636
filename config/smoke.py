# tests and CI: a ~50k-parameter model that trains for seconds on one CPU core
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
batch_size = 8
max_iters = 20
eval_interval = 10
eval_iters = 2
log_interval = 1
warmup_iters = 2
learning_rate = 3e-3
min_lr = 3e-4

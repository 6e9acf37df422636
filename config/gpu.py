# the MedSafetyWorld study on one GPU, with seeds: ~25M parameters
n_layer = 8
n_head = 8
n_embd = 512
block_size = 256
batch_size = 64
max_iters = 3000
eval_interval = 500
eval_iters = 20
log_interval = 50
warmup_iters = 200
learning_rate = 1e-3
min_lr = 1e-4

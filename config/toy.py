# the default study on a laptop CPU (2 cores): 4 x 96, ~0.47M parameters, 2.9M tokens per run.
# Chosen on capability pilots in world v3 (results/2026-12-06-v3/preregistration.md): 700 iterations of 4 x 96 give
# the raw model 92.5% treatment accuracy and 100% fact recall, the per-sentence reflect model 90% and 100%, at about
# 1.5x the speed of 4 x 128 (~0.89M, the v2 studies' shape); 450 iterations of 4 x 128 at a higher learning rate left
# fact recall at 50%, 600 of 3 x 128 at 77.5%. 300 iterations of 4 x 128 had left treatment accuracy at 15% (v2).
n_layer = 4
n_head = 4
n_embd = 96
block_size = 128
batch_size = 32
max_iters = 700
eval_interval = 175
eval_iters = 10
log_interval = 50
warmup_iters = 40
learning_rate = 3e-3
min_lr = 3e-4

# the MedSafetyWorld study on one H200 with seeds (study.py --profile=gpu): 8 x 256, 4 heads of 64 (the kernel's
# tuned head dim), ~6.5M parameters, 16k tokens per iteration, 500 iterations = 8.2M tokens per run (2.8x the toy's
# tokens for a 7x larger model). Sized from FLOPs so the whole grid with 3 seeds fits 7 minutes: study.GPU_SIZING.
n_layer = 8
n_head = 4
n_embd = 256
block_size = 256
batch_size = 64
max_iters = 500           # the safe prefixes stop at 100 and 300 (study.PREFIX_STARTS x max_iters, whole numbers)
eval_interval = 250       # every evaluation also saves a 78 MB checkpoint: 3 per run are enough
eval_iters = 10
log_interval = 25
warmup_iters = 30
learning_rate = 2e-3      # a short run of a small model: the toy's 3e-3 scaled down for 7x the parameters
min_lr = 2e-4
# a run lasts seconds on the GPU and the study starts a dozen at once, all with cold caches: torch.compile (30-60 s
# a process) and the Triton kernel's autotuning (24 configurations timed per process and sequence length, compiled
# first) would cost more than they save at T = 256; gpu_check.py checks and times the kernel itself
compile = False
attention = "sdpa"

# GPT-2-small shape on FineWeb-Edu, 1-8 GPUs: ~0.5M tokens per iteration, 10B tokens
# data: the raw baseline, which needs no labels (one stream, data/fineweb-edu/none/{train,val}.bin):
#   python prepare.py --dataset=fineweb-edu [--min_int_score=3]
#   python reflect.py --dataset=fineweb-edu [--tokenizer_files=<dir with gpt2's encoder.json, vocab.bpe>]
# an intervention instead: reflect.py --intervention=reflect --labels=spans.jsonl, then --data=fineweb-edu/reflect
data = "fineweb-edu/none"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304        # gpt2's 50257 + <|harmful|> padded to a multiple of 64 for faster matmuls
batch_size = 16
gradient_accumulation_steps = 32   # divided among the ranks: 8 GPUs run 4 micro-steps each
max_iters = 19073
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
eval_interval = 1000
eval_iters = 50
log_interval = 10

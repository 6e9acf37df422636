"""
Benchmarks that print tables (speed is measured here, never in tests).

Reads:  a profile (config/<name>.py) for the training benchmark; nothing else.
Writes: nothing (prints the tables; copy them into BENCHMARKS.md with the date and the device).
Run:    python bench.py                                   # kernel + training tables for this device
        python bench.py --what=kernel --dtype=bfloat16    # attention: triton vs sdpa vs manual, fwd and bwd
        python bench.py --what=train --profile=config/gpt2_124m.py --train_iters=30
        python bench.py --what=loop --profile=config/toy.py  # CPU: train.py against a bare PyTorch loop
        python bench.py --what=nanogpt --shapes="4,4,128,128,32;8,8,256,128,16"   # model.py vs a nanoGPT GPT-2
"""
# kernel: forward and backward time and TFLOPS of the three attention backends, causal, per shape
#         (FLOPs: forward 2 matmuls of 2*B*H*T*T*D, halved by causality; backward 2.5x the forward).
# train:  tokens/s and MFU of the profile's model on random tokens (the model, optimizer and precision train.py uses).
# loop:   train.py's own tokens/s (from its log.jsonl) against the same model in a bare loop: train.py's data
#         reading, logging and checkpointing must cost (almost) nothing.
# nanogpt: model.py against NanoGPT2 below (nanoGPT's model.py with bias=False: learned positions, LayerNorm, a 4x GELU
#         MLP, SDPA, tied embeddings) at the same n_layer x n_embd, trained side by side in one process with AdamW,
#         fp32, steps alternating, --train_iters timed steps each; shapes "n_layer,n_head,n_embd,T,B;...".

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import run_stage
from configurator import configure, defaults_of, read_file

what = "all"                      # kernel | train | loop | nanogpt | all (on CPU, all = kernel + loop)
dtype = "auto"                    # auto: bfloat16 on CUDA, float32 on CPU | float16 | float32
shapes = "auto"                   # "B,H,T,D;B,H,T,D;..." or auto (GPU: T 1k-8k, D 64/128; CPU: small)
profile = "config/toy.py"
train_iters = 20                  # timed iterations (after warmup_iters)
warmup_iters = 5
compile = None                    # None: on for CUDA, off for CPU (as in train.py)
globals().update(configure(defaults_of(globals()), sys.argv[1:]))

cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
ptdtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "float32": torch.float32}[dtype]
use_compile = compile if compile is not None else cuda
interpret = os.environ.get("TRITON_INTERPRET") == "1"


def timeit(fn, reps=None):
    """Median milliseconds of fn(): CUDA events via triton's do_bench on GPU, wall clock on CPU."""
    if cuda:
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn(), fn()  # warm-up (first calls allocate and pick kernels)
    times = []
    for _ in range(reps or 5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


class NanoGPT2(torch.nn.Module):
    """The reference of the `nanogpt` table: karpathy/nanoGPT's GPT with bias=False, written out here (checked
    against nanoGPT's model.py: the same parameter count and, with its weights copied in, the same logits)."""

    def __init__(self, n_layer, n_head, n_embd, block_size, vocab_size):
        super().__init__()
        nn = torch.nn
        self.n_head, self.n_embd = n_head, n_embd
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList()
        for _ in range(n_layer):
            b = nn.Module()
            b.ln_1, b.ln_2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
            b.c_attn, b.c_proj = nn.Linear(n_embd, 3 * n_embd, bias=False), nn.Linear(n_embd, n_embd, bias=False)
            b.c_fc, b.mlp_proj = nn.Linear(n_embd, 4 * n_embd, bias=False), nn.Linear(4 * n_embd, n_embd, bias=False)
            self.h.append(b)
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        import torch.nn.functional as F
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.h:
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in b.c_attn(b.ln_1(x)).split(self.n_embd, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.c_proj(y.transpose(1, 2).contiguous().view(B, T, self.n_embd))
            x = x + b.mlp_proj(F.gelu(b.c_fc(b.ln_2(x))))
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def bench_nanogpt():
    """model.py against NanoGPT2 at the same shape, side by side in one process (alternating steps)."""
    from model import GPT, GPTConfig
    cases = [tuple(int(x) for x in s.split(",")) for s in
             ("4,4,128,128,32;8,8,256,128,16" if shapes == "auto" else shapes).split(";")]
    vocab = 274   # the toy world's vocabulary
    print(f"\nmodel.py against nanoGPT's GPT-2 (NanoGPT2), fp32, AdamW, SDPA, {torch.get_num_threads()} threads, "
          f"{train_iters} timed steps each, alternating, on {dev}")
    print(f"{'shape':>16} | {'params ours':>11} | {'params nanoGPT':>14} | {'ours tok/s':>10} | {'nanoGPT tok/s':>13} "
          f"| {'ratio':>5}")
    for L, H, C, T, B in cases:
        torch.manual_seed(0)
        models = {"ours": GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=vocab,
                                        attention="sdpa")).to(dev),
                  "nanogpt": NanoGPT2(L, H, C, T, vocab).to(dev)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
        data = torch.randint(0, vocab, (4, B, T + 1), device=dev)
        times = {k: [] for k in models}
        for i in range(warmup_iters + train_iters):
            for k, m in models.items():
                w = data[i % 4]
                t = time.perf_counter()
                _, loss = m(w[:, :-1], w[:, 1:])
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup_iters:
                    times[k].append(time.perf_counter() - t)
        ours, ref = (B * T / float(np.median(times[k])) for k in ("ours", "nanogpt"))
        n = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        print(f"{f'{L}x{C}, T={T}, B={B}':>16} | {n['ours']:>11,} | {n['nanogpt']:>14,} | {ours:>10,.0f} | "
              f"{ref:>13,.0f} | {ours / ref:>5.2f}")


def bench_kernel():
    from model import manual_attention, flash_attention
    import torch.nn.functional as F
    if shapes == "auto":
        if cuda:  # 16k tokens per shape: the chip is full at every T
            cases = [(16384 // T, 2048 // D, T, D) for D in (64, 128) for T in (1024, 2048, 4096, 8192)]
        else:
            cases = [(1, 4, 128, 32), (1, 4, 256, 64)]
    else:
        cases = [tuple(int(x) for x in s.split(",")) for s in shapes.split(";")]
    backends = {"triton": flash_attention,
                "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "manual": manual_attention}
    if not cuda and not interpret:
        del backends["triton"]
        print("(triton skipped: it needs CUDA, or TRITON_INTERPRET=1 for the slow CPU interpreter)")
    print(f"\nattention kernel, causal, {str(ptdtype).replace('torch.', '')}, device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"{'B':>3} {'H':>3} {'T':>5} {'D':>4} | {'backend':>7} | {'fwd ms':>8} {'fwd TF/s':>8} | {'bwd ms':>8} "
          f"{'bwd TF/s':>8} | {'fwd/sdpa':>8} {'bwd/sdpa':>8}")
    for B, H, T, D in cases:
        fwd_flops = 4 * B * H * T * T * D / 2
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=ptdtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, device=dev, dtype=ptdtype)
        res = {}
        for name, fn in backends.items():
            if name == "manual" and B * H * T * T * 4 > 16e9:
                continue  # the T x T matrix alone would not fit
            fwd = timeit(lambda: fn(q, k, v), reps=3)
            out = fn(q, k, v)
            bwd = timeit(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), reps=3)
            res[name] = (fwd, bwd)
        for name, (fwd, bwd) in res.items():
            ratio = ""
            if "sdpa" in res:  # > 1 means faster than sdpa
                ratio = f"{res['sdpa'][0] / fwd:>8.2f} {res['sdpa'][1] / bwd:>8.2f}"
            print(f"{B:>3} {H:>3} {T:>5} {D:>4} | {name:>7} | {fwd:>8.3f} {fwd_flops / fwd / 1e9:>8.3g} | "
                  f"{bwd:>8.3f} {2.5 * fwd_flops / bwd / 1e9:>8.3g} | {ratio}")


def profile_config():
    """The profile's settings over train.py's defaults for the keys used here (a stage never imports another)."""
    cfg = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, mlp_hidden=0, rope_base=10000.0, attention="auto",
               dropout=0.0, vocab_size=0, batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-3,
               weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
    cfg.update({k: v for k, v in read_file(profile).items() if k in cfg})
    return cfg


def build(cfg, vocab):
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["block_size"], mlp_hidden=cfg["mlp_hidden"], rope_base=cfg["rope_base"],
                          attention=cfg["attention"], dropout=cfg["dropout"], vocab_size=vocab)).to(dev)
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), dev.type)
    return model, opt


def bare_loop_tok_s(cfg, vocab):
    """The same model, optimizer and precision in the plainest loop: random batches, no logging, no data files."""
    model, opt = build(cfg, vocab)
    step = torch.compile(model) if use_compile else model
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    batches = [torch.randint(0, vocab, (B, T + 1), device=dev) for _ in range(4)]

    def one_iter(i):
        for micro in range(accum):
            w = batches[(i * accum + micro) % 4]
            with autocast:
                _, loss = step(w[:, :-1], w[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    for i in range(warmup_iters):
        one_iter(i)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(train_iters):
        one_iter(i)
    if cuda:
        torch.cuda.synchronize()
    tok_s = train_iters * accum * B * T / (time.perf_counter() - t)
    return tok_s, model


def bench_train():
    cfg = profile_config()
    vocab = cfg["vocab_size"] or 50304
    tok_s, model = bare_loop_tok_s(cfg, vocab)
    mfu = model.estimate_mfu(tok_s, dev)
    print(f"\ntraining throughput, {profile}: {model.num_params() / 1e6:.1f}M params, batch {cfg['batch_size']} x "
          f"{cfg['block_size']} x accum {cfg['gradient_accumulation_steps']}, attention={model.config.attention}, "
          f"compile={use_compile}, device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"{'tokens/s':>12} | {'MFU':>6} | {'FLOPs/token':>12}")
    print(f"{tok_s:>12,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6} | {model.flops_per_token():>12.3e}")


def bench_loop():
    """train.py against the bare loop on the same model (one process, this device)."""
    cfg = profile_config()
    vocab = 512
    with tempfile.TemporaryDirectory() as d:
        n = (train_iters + warmup_iters + 2) * cfg["gradient_accumulation_steps"] * cfg["batch_size"] * (cfg["block_size"] + 1)
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(0, vocab, n).astype(np.uint16).tofile(os.path.join(d, f"{split}.bin"))
        json.dump({"vocab_size": vocab, "dtype": "uint16", "tokenizer": "random"}, open(os.path.join(d, "meta.json"), "w"))
        iters = warmup_iters + train_iters
        # log every warmup_iters iterations: the first interval holds the warm-up, the others are timed
        cmd = [sys.executable, "train.py", profile, f"--data={d}", f"--out_dir={d}/out", f"--max_iters={iters}",
               f"--log_interval={max(1, warmup_iters)}", f"--eval_interval={10 * iters}", "--eval_iters=1",
               f"--compile={use_compile}"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        log = [json.loads(l) for l in open(f"{d}/out/log.jsonl") if '"loss"' in l]
        train_py = np.mean([r["tok_per_s"] for r in log[1:]])
    bare, _ = bare_loop_tok_s(cfg, vocab)
    print(f"\ntrain.py against a bare PyTorch loop, {profile}, {train_iters} timed iterations, "
          f"{torch.get_num_threads()} threads")
    print(f"{'bare loop tok/s':>16} | {'train.py tok/s':>15} | {'ratio':>6}")
    print(f"{bare:>16,.0f} | {train_py:>15,.0f} | {train_py / bare:>6.2f}")


def main():
    if what in ("kernel", "all"):
        bench_kernel()
    if what == "train" or (what == "all" and cuda):
        bench_train()
    if what == "loop" or (what == "all" and not cuda):
        bench_loop()
    if what == "nanogpt":
        bench_nanogpt()


if __name__ == "__main__":
    run_stage(main)

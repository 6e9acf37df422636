"""
Pretraining, nanoGPT-style, from one CPU core to multi-node DDP, changed by config flags alone.

Reads:  data/<data>/{safe,mix}_{train,val}.bin + meta.json (reflect.py's curriculum streams), or {train,val}.bin
Writes: <out_dir>/ckpt.pt (atomically, and only from finite weights), <out_dir>/log.jsonl
Run:    python train.py config/toy.py --data=medsafety/reflect --intervention_start=0.2
        torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
        python train.py config/toy.py --out_dir=out/toy --init_from=resume           # continue the same run exactly
        python train.py config/toy.py --data=medsafety/reflect --intervention_start=0.6 --init_from=out/prefix
The safety curriculum (2601.07087): the first intervention_start share of the token budget is read from the safe
stream (the filtered corpus), the rest from the mix stream (the data with the intervention); 0.0 = from the start,
1.0 = never (exactly the filter run). --init_from=<run> continues another run's checkpoint in this out_dir, as if
this run had trained that far itself: allowed where both read the same bytes so far (continue_from).
"""
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from safety.common import (fail, file_sha256, load_checkpoint, load_weights, lock_dir, on_stop, rerun_command,
                           run_stage, writable_dir, write_atomic)
from safety.configurator import configure, defaults_of
from safety.training import RunPlumbing, TokenStream, lr_at, refuse_to_replace_run, set_rng_state, setup_device
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------------------------
# defaults (config/<profile>.py files and --key=value override them)
# I/O
out_dir = "out/run"
data = "medsafety/none"           # directory under data/, or a path
init_from = "scratch"             # scratch | resume (<out_dir>/ckpt.pt) | <another run's dir> (continue it here)
eval_interval = 200               # evaluate val loss and save a checkpoint every this many iterations
eval_iters = 20                   # val batches per evaluation
log_interval = 10
stop_iter = -1                    # stop at this iteration as if interrupted (resume later); -1: run to max_iters
# curriculum
intervention_start = 0.0          # share of the token budget read from the safe stream before the mix stream
# model
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
mlp_hidden = 0                    # 0: about 8/3 n_embd
rope_base = 10000.0
attention = "auto"                # auto | triton | sdpa | manual
dropout = 0.0
vocab_size = 0                    # 0: the tokenizer's size from meta.json (set e.g. 50304 to pad gpt2's for speed)
# optimisation
batch_size = 16                   # sequences per micro-step per rank
gradient_accumulation_steps = 1   # micro-steps per iteration, in total over all ranks
max_iters = 1000
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                   # 0: no clipping
schedule = "cosine"               # cosine | wsd (warmup-stable-decay)
warmup_iters = 50
decay_frac = 0.2                  # wsd: the last decay_frac of the iterations decays linearly to min_lr
# system
device = "auto"                   # auto | cpu | cuda | cuda:N
dtype = "auto"                    # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
compile = None                    # None: on for CUDA, off for CPU
seed = 1337
# ----------------------------------------------------------------------------------------------------------------
# Continuing a checkpoint: settings that never change what is trained, settings a resume may change if it says so
# (the run differs from a straight one from there on), and the data, which may change where the bytes read so far
# are the same. Any other setting must be the checkpoint's own.
BOOKKEEPING = {"out_dir", "init_from", "stop_iter", "eval_interval", "eval_iters", "log_interval", "device", "compile",
               "attention"}
STATED = {"max_iters", "learning_rate", "min_lr", "warmup_iters", "schedule", "decay_frac", "grad_clip",
          "weight_decay", "beta1", "beta2", "dropout", "dtype"}
DATA = {"data", "intervention_start"}
# what a checkpoint needs to be continued (a resume or a branch)
TRAIN_STATE = ("model", "model_args", "optimizer", "config", "iter_num", "tokens_seen", "data_slots", "rng", "data_dir")


def find_data(name):
    """The stream directory, its meta.json and its streams: {"safe": (train, val), "mix": (train, val)} for the
    curriculum, or {"train": (train, val)} for a single stream."""
    path = name if os.path.isdir(name) else os.path.join("data", name)
    if not os.path.isdir(path):
        fail(f"data directory '{name}' not found (looked in '{name}' and 'data/{name}'); "
             f"write it with prepare.py and reflect.py, or pass --data=<path>")
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        np.dtype(meta.get("dtype", "uint16"))
        assert isinstance(meta, dict) and isinstance(meta["vocab_size"], int) and meta["vocab_size"] > 0
    except FileNotFoundError:
        fail(f"'{path}' has no meta.json; it must be written by reflect.py (or hold train.bin/val.bin + meta.json)")
    except (json.JSONDecodeError, TypeError, KeyError, AssertionError, AttributeError) as e:
        fail(f"'{path}/meta.json' is not a reflect.py meta.json (it needs a vocab_size and a numpy dtype: "
             f"{type(e).__name__}); write it again")
    for layout in ({"safe": ("safe_train.bin", "safe_val.bin"), "mix": ("mix_train.bin", "mix_val.bin")},
                   {"train": ("train.bin", "val.bin")}):
        files = {s: tuple(os.path.join(path, f) for f in pair) for s, pair in layout.items()}
        if all(os.path.isfile(f) for pair in files.values() for f in pair):
            return path, meta, files
    fail(f"'{path}' holds neither safe_/mix_{{train,val}}.bin nor train.bin/val.bin")


def continue_from(src, config, files, switch_iter, resume):
    """Check that this run may continue the checkpoint `src` (at iteration N = src["iter_num"]): its own (resume) or
    another run's (a branch: every setting but BOOKKEEPING and DATA the same, so the result is the run it would
    have been). -> this run's data slots at N. Stops with one line otherwise; names each STATED change of a resume."""
    n, old = src["iter_num"], src["config"]
    diff = sorted(k for k in config if k not in BOOKKEEPING | DATA and old.get(k) != config[k])
    allowed = STATED if resume else set()
    for k in diff:
        if k not in allowed:
            fail(f"--init_from: the {'run to resume' if resume else 'source'} trained with {k}={old.get(k)!r}, this "
                 f"run asks for {config[k]!r} (a continued run keeps its settings but for "
                 + ", ".join(sorted((BOOKKEEPING | DATA | allowed) - {"out_dir", "init_from"})) + ")")
        print(f"resume: {k} changes from {old.get(k)!r} to {config[k]!r} at iter {n}; from here on this is not the "
              f"run it would have been with the old setting")
    same_data = os.path.abspath(src["data_dir"]) == os.path.abspath(find_data(config["data"])[0])
    if resume and same_data and old.get("intervention_start") == config["intervention_start"]:
        return dict(src["data_slots"])
    # another stream or switch: the one stream the source read must be byte for byte the one this run reads until N
    read = [s for s, c in src["data_slots"].items() if c > 0]
    if len(read) != 1:
        fail(f"--init_from: the source read {len(read)} streams before iter {n}; continuing it on other data needs one")
    mine = "train" if "train" in files else ("safe" if n <= switch_iter else ("mix" if switch_iter == 0 else None))
    if mine is None:
        fail(f"--init_from: the source stopped at iter {n}, past this run's switch to the mix stream at iter "
             f"{switch_iter}; continue a checkpoint at or before the switch")
    try:
        src_path = find_data(src["data_dir"])[2][read[0]][0]
    except (SystemExit, KeyError):
        fail(f"--init_from: the source's data '{src['data_dir']}' (stream {read[0]}) is gone; it is needed to check "
             f"that both runs read the same tokens")
    if file_sha256(src_path) != file_sha256(files[mine][0]):
        fail(f"--init_from: the source read '{src_path}', which differs from this run's {mine} stream "
             f"'{files[mine][0]}'; the runs did not read the same tokens")
    return {s: (src["data_slots"][read[0]] if s == mine else 0) for s in files}


def check_config(cfg):
    for k in ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps", "max_iters",
              "block_size", "n_layer", "n_head", "n_embd"):
        if cfg[k] < 1:
            fail(f"{k} must be at least 1, not {cfg[k]}")
    if cfg["schedule"] not in ("cosine", "wsd"):
        fail(f"schedule must be 'cosine' or 'wsd', not '{cfg['schedule']}'")
    if not 0.0 <= cfg["intervention_start"] <= 1.0:
        fail(f"intervention_start must lie in [0, 1], not {cfg['intervention_start']}")


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    config = {k: globals()[k] for k in defaults_of(globals())}
    check_config(config)
    ddp, rank, local_rank, n_ranks, accum, device_t, ptdtype, autocast = setup_device(
        device, dtype, gradient_accumulation_steps)
    master = rank == 0
    use_compile = compile if compile is not None else device_t.type == "cuda"
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # data
    data_dir, meta, files = find_data(data)
    curriculum = "safe" in files
    if not curriculum and intervention_start != 0:
        fail(f"--intervention_start={intervention_start} needs safe_/mix_ streams, but '{data_dir}' has one stream")
    vocab = vocab_size or meta["vocab_size"]
    if vocab < meta["vocab_size"]:
        fail(f"vocab_size={vocab_size} is smaller than the tokenizer's {meta['vocab_size']} (meta.json)")
    tok_dtype = np.dtype(meta.get("dtype", "uint16"))
    train_streams = {s: TokenStream(tr, tok_dtype, block_size, seed, vocab) for s, (tr, _) in files.items()}
    val_streams = {s: TokenStream(va, tok_dtype, block_size, seed, vocab) for s, (_, va) in files.items()}
    streams = tuple(files)
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    switch_iter = round(intervention_start * max_iters) if curriculum else 0

    # the checkpoint to continue, if any: our own (resume) or another run's
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    resume = init_from == "resume"
    source = ckpt_path if resume else (None if init_from == "scratch" else (
        os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) else init_from))
    if master:
        writable_dir(out_dir)   # before any work: a read-only or mistaken out_dir stops here
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, mlp_hidden=mlp_hidden,
                      rope_base=rope_base, attention=attention, dropout=dropout, vocab_size=vocab)
    ckpt = None
    if source:
        ckpt = dict(load_checkpoint(source, need=TRAIN_STATE), path=source)
        model_args = dict(ckpt["model_args"], attention=attention, dropout=dropout)
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        fail(str(e))
    except TypeError as e:      # model_args of another model.py
        fail(f"checkpoint '{source}' has model_args this model.py cannot build ({e})")
    iter_num, tokens_seen, slots = 0, 0, {s: 0 for s in streams}
    if ckpt is not None:
        slots = continue_from(ckpt, config, files, switch_iter, resume)
        load_weights(model, ckpt, source)
        iter_num, tokens_seen = ckpt["iter_num"], ckpt["tokens_seen"]
    model.to(device_t)
    raw_model = model  # saved without any compile/DDP wrapper prefixes
    optimizer = raw_model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_t.type)
    log_path = os.path.join(out_dir, "log.jsonl")
    if not resume:      # the inputs are checked (each bad one has its own line); the last check before writing
        refuse_to_replace_run(out_dir)
    if master:
        lock_dir(out_dir)       # the inputs are checked: from here on this process writes out_dir, and only it
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        states = ckpt["rng"]
        set_rng_state(states, rank)
        # log.jsonl: the checkpointed run's records up to it, so the log reads as one run; a branch keeps the source's
        # training records (its val records measured the source's own streams) and marks the branch point
        src_log = os.path.join(os.path.dirname(os.path.abspath(source)), "log.jsonl")
        if master:
            records = [json.loads(l) for l in open(src_log)] if os.path.isfile(src_log) else []
            kept = [r for r in records if r.get("iter", 0) <= iter_num and ("loss" in r or resume)]
            if not resume:
                kept.append({"iter": iter_num, "branched_from": os.path.abspath(source)})
            write_atomic(log_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
        del ckpt
    elif master:
        open(log_path, "w").close()   # a new run starts a new log
    if use_compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_t.type == "cuda" else None)
    if master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, attention={raw_model.config.attention}, "
              f"device={device_t}, dtype={ptdtype}, compile={use_compile}, ranks={n_ranks}")
        print(f"data: {data_dir} ({', '.join(f'{s}: {t.n} windows' for s, t in train_streams.items())}), "
              f"{tokens_per_iter:,} tokens/iter, budget {tokens_per_iter * max_iters:,} tokens")
        if curriculum:
            print(f"curriculum: safe stream for iters [0, {switch_iter}), mix stream from iter {switch_iter} "
                  f"(intervention_start={intervention_start})")
        if source:
            print(f"{'resumed from' if resume else 'branched from'} {source} at iter {iter_num} ({tokens_seen:,} "
                  f"tokens seen; data slots {slots})")

    @torch.no_grad()
    def evaluate():
        """Mean val loss per stream over eval_iters fixed batches; ranks split the batches."""
        model.eval()
        out = {}
        for s, stream in val_streams.items():
            total = torch.zeros(2, device=device_t)
            for i in range(rank, eval_iters, n_ranks):
                x, y = stream.ordered_batch(i * batch_size, batch_size, device_t)
                with autocast:
                    _, loss = raw_model(x, y)
                total += torch.stack([loss.float(), torch.ones((), device=device_t)])
            if ddp:
                dist.all_reduce(total)
            out[s] = (total[0] / total[1]).item()
        model.train()
        return out

    # the training loop
    loss_sum = torch.zeros((), device=device_t)   # summed on device, read only every log_interval (no per-step sync)
    t_log, iters_since_log = time.time(), 0
    phase = streams[0] if len(streams) == 1 else ("safe" if iter_num < switch_iter else "mix")
    end_iter = max_iters if stop_iter < 0 else min(stop_iter, max_iters)
    start_iter = iter_num
    last_good = (ckpt_path if resume else source, iter_num) if source else None   # the checkpoint a failure keeps
    run = RunPlumbing(ddp, rank, n_ranks, log_path, ckpt_path, last_good, rerun_command(init_from="resume"))
    if resume:
        run.say_kept(iter_num)
    else:
        on_stop("no checkpoint of this run was written yet; rerun the same command to start it again")
    while True:
        at_end = iter_num >= end_iter
        # evaluate and save; a resumed run's first evaluation is the one its checkpoint was saved after
        if (iter_num % eval_interval == 0 or at_end) and not (resume and iter_num == start_iter):
            t_eval = time.time()
            val = evaluate()
            if master:
                print(f"iter {iter_num}: val loss " + ", ".join(f"{s} {v:.4f}" for s, v in val.items()))
                run.log({"iter": iter_num, "tokens": tokens_seen, **{f"val_{s}": v for s, v in val.items()}})
            run.check_finite(raw_model, iter_num, f" (val loss {val})")
            states = run.rng_states()
            if iter_num > start_iter:
                run.save(lambda: {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "model_args": asdict(raw_model.config), "config": config, "iter_num": iter_num,
                                  "tokens_seen": tokens_seen, "data_slots": dict(slots), "rng": states, "meta": meta,
                                  "data_dir": data_dir}, iter_num)
            t_log += time.time() - t_eval  # evaluation and saving do not count against training throughput
        if at_end:
            break

        new_phase = streams[0] if len(streams) == 1 else ("safe" if iter_num < switch_iter else "mix")
        if new_phase != phase and master:
            print(f"curriculum: iter {iter_num}, {tokens_seen:,} tokens seen: switching from the safe stream to the "
                  f"mix stream (the intervention starts)")
            run.log({"iter": iter_num, "tokens": tokens_seen, "event": "curriculum_switch"})
        phase = new_phase
        lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, max_iters, schedule, decay_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stream = train_streams[phase]
        first = slots[phase]
        for micro in range(accum):
            # this rank's windows: slot block (micro * n_ranks + rank) of this iteration's global batch
            x, y = stream.batch(first + (micro * n_ranks + rank) * batch_size, batch_size, device_t)
            sync = not ddp or micro == accum - 1  # all-reduce gradients on the last micro-step only
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(x, y)
                loss = loss / accum
            loss.backward()
            loss_sum += loss.detach()
        slots[phase] = first + accum * n_ranks * batch_size
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter
        iters_since_log += 1

        if iter_num % log_interval == 0 or iter_num == end_iter:
            lossf = run.mean_loss(loss_sum, iters_since_log, iter_num)
            dt = time.time() - t_log
            tok_s = tokens_per_iter * iters_since_log / dt
            mfu = raw_model.estimate_mfu(tok_s / n_ranks, device_t)
            if master:
                print(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, "
                      f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, phase {phase}")
                run.log({"iter": iter_num, "tokens": tokens_seen, "loss": lossf, "lr": lr, "tok_per_s": tok_s,
                         "mfu": mfu, "phase": phase, "slots": dict(slots)})
            loss_sum.zero_()
            t_log, iters_since_log = time.time(), 0

    model = None    # the DDP wrapper holds the process group: dropped before it is torn down (RunPlumbing.close)
    run.close()


if __name__ == "__main__":
    run_stage(main)

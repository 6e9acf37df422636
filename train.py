"""
Pretraining, nanoGPT-style, from one CPU core to multi-node DDP, changed by config flags alone.

Reads:  data/<data>/{safe,mix}_{train,val}.bin + meta.json (the curriculum streams written by reflect.py),
        or data/<data>/{train,val}.bin + meta.json (a single stream); `--data` may also be a path.
Writes: <out_dir>/ckpt.pt (written atomically: temp file, then rename) and <out_dir>/log.jsonl.
Run:    python train.py config/toy.py --data=medsafety/reflect --intervention_start=0.2
        torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
        python train.py config/toy.py --out_dir=out/toy --init_from=resume     (continues the same run exactly)

The safety curriculum ("When Should We Introduce Safety Interventions During Pretraining?", arXiv 2601.07087):
the first `intervention_start` share of the token budget (max_iters * tokens per iteration) is read from the
`safe` stream (filtered data, no intervention); the rest from the `mix` stream (the data with the intervention).
0.0 = the intervention from the start, 1.0 = never (the safe-only control).

Data order: each stream is cut into windows of block_size + 1 tokens; an epoch visits every window once in a
seeded random order. Window slots are dealt out so that every rank and micro-step reads its own windows, and a
checkpoint records how many slots each stream has used, so a resumed run reads exactly what the
uninterrupted one would have read.

Branching (--branch_from=<run>): runs of one study share their beginning. Every intervention's safe stream is the
same filtered corpus (and the filter run's mix stream is that corpus too), and a stream's window order depends only
on the seed, so a run started at 60% reads, for its first 60%, exactly what the safe-only run reads. Such a run can
start from the other run's checkpoint at that iteration instead of recomputing it: the result is the run it would
have been (tests/test_train.py checks it against a straight run). train.py refuses a branch whose source trained
with other settings, read other bytes, or stopped past this run's switch.
"""
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure, defaults_of
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------------------------
# defaults (config/<profile>.py files and --key=value override them)
# I/O
out_dir = "out/run"
data = "medsafety/none"           # directory under data/, or a path
init_from = "scratch"             # scratch | resume (continue <out_dir>/ckpt.pt exactly)
eval_interval = 200               # evaluate val loss and save a checkpoint every this many iterations
eval_iters = 20                   # val batches per evaluation
log_interval = 10
stop_iter = -1                    # stop at this iteration as if interrupted (resume later); -1: run to max_iters
branch_from = ""                  # a run whose checkpoint this run starts from, as if it had trained that far itself
                                  # (allowed when both read the same windows up to there: see branch_point)
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


def fail(msg):
    """Stop with one clear line (no traceback); existing outputs are left as they are."""
    raise SystemExit(f"train.py: {msg}")


def find_data(name):
    """The stream directory, its meta.json and its streams: {"safe": (train, val), "mix": (train, val)} for the
    curriculum, or {"train": (train, val)} for a single stream."""
    path = name if os.path.isdir(name) else os.path.join("data", name)
    if not os.path.isdir(path):
        fail(f"data directory '{name}' not found (looked in '{name}' and 'data/{name}'); "
             f"write it with prepare.py and reflect.py, or pass --data=<path>")
    if not os.path.isfile(os.path.join(path, "meta.json")):
        fail(f"'{path}' has no meta.json; it must be written by reflect.py (or hold train.bin/val.bin + meta.json)")
    meta = json.load(open(os.path.join(path, "meta.json")))
    for layout in ({"safe": ("safe_train.bin", "safe_val.bin"), "mix": ("mix_train.bin", "mix_val.bin")},
                   {"train": ("train.bin", "val.bin")}):
        files = {s: tuple(os.path.join(path, f) for f in pair) for s, pair in layout.items()}
        if all(os.path.isfile(f) for pair in files.values() for f in pair):
            return path, meta, files
    fail(f"'{path}' holds neither safe_/mix_{{train,val}}.bin nor train.bin/val.bin")


class TokenStream:
    """One flat token file read as windows of block_size + 1 tokens, in a seeded random order per epoch.
    Slot s of the global order is window perm_{s // n}[s % n]: no window repeats within an epoch and any
    range of slots can be read by any rank without coordination."""

    def __init__(self, path, dtype, block_size, seed):
        self.path = path
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.block_size, self.seed = block_size, seed
        self.n = (len(self.tokens) - 1) // block_size  # windows overlap by one token: each token is a target once
        if self.n < 1:
            fail(f"'{path}' holds {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.epoch, self.perm = -1, None

    def window(self, slot):
        epoch = slot // self.n
        if epoch != self.epoch:  # a fresh, reproducible order for each epoch
            self.epoch, self.perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = int(self.perm[slot % self.n]) * self.block_size
        return self.tokens[start:start + self.block_size + 1]

    def batch(self, first_slot, count, device):
        w = torch.from_numpy(np.stack([self.window(s) for s in range(first_slot, first_slot + count)]).astype(np.int64))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def ordered_batch(self, first, count, device):
        """Windows in file order (validation: the same batches at every evaluation, no RNG touched)."""
        idx = [(i % self.n) * self.block_size for i in range(first, first + count)]
        w = torch.from_numpy(np.stack([self.tokens[i:i + self.block_size + 1] for i in idx]).astype(np.int64))
        return w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)


def lr_at(it):
    """Learning rate at iteration `it`: linear warmup, then cosine to min_lr, or stable then linear decay (wsd)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "wsd":
        decay_start = int(max_iters * (1 - decay_frac))
        if it < decay_start:
            return learning_rate
        return learning_rate + (min_lr - learning_rate) * (it - decay_start) / max(1, max_iters - decay_start)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, ckpt):
    """torch.save to a temporary file, then an atomic rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        fail(f"no checkpoint at '{path}' to resume from (train first, or use --init_from=scratch)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        fail(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e}); it may be corrupt")


def curriculum_phase(it, switch_iter, streams):
    return streams[0] if len(streams) == 1 else ("safe" if it < switch_iter else "mix")


# settings that do not change the trained weights up to a branch point: where the data is, when it switches, and
# bookkeeping. Every other setting must be the source run's own.
BRANCH_FREE_KEYS = {"out_dir", "data", "init_from", "branch_from", "stop_iter", "intervention_start", "eval_interval",
                    "eval_iters", "log_interval"}


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def branch_point(src, config, files, switch_iter):
    """Check that this run may start from the checkpoint `src` (another run's, at iteration N = src["iter_num"]):
    the same settings but for BRANCH_FREE_KEYS, and for iterations [0, N) this run reads one stream whose bytes equal
    the one stream the source read. -> this run's data slots at N. Stops with one line otherwise."""
    n = src["iter_num"]
    diff = sorted(k for k in config if k not in BRANCH_FREE_KEYS and src["config"].get(k) != config[k])
    if diff:
        k = diff[0]
        fail(f"--branch_from: the source trained with {k}={src['config'].get(k)!r}, this run asks for {config[k]!r} "
             f"(only {', '.join(sorted(BRANCH_FREE_KEYS - {'out_dir', 'init_from', 'branch_from'}))} may differ)")
    read = [s for s, c in src["data_slots"].items() if c > 0]
    if len(read) != 1:
        fail(f"--branch_from: the source read {len(read)} streams before iter {n}; a branch needs one")
    mine = "train" if "train" in files else ("safe" if n <= switch_iter else ("mix" if switch_iter == 0 else None))
    if mine is None:
        fail(f"--branch_from: the source stopped at iter {n}, past this run's switch to the mix stream at iter "
             f"{switch_iter}; branch from a checkpoint at or before the switch")
    try:
        _, _, src_files = find_data(src["data_dir"])
        src_path = src_files[read[0]][0]
    except (SystemExit, KeyError):
        fail(f"--branch_from: the source's data '{src['data_dir']}' (stream {read[0]}) is gone; it is needed to "
             f"check that both runs read the same tokens")
    if file_sha256(src_path) != file_sha256(files[mine][0]):
        fail(f"--branch_from: the source read '{src_path}', which differs from this run's {mine} stream "
             f"'{files[mine][0]}'; the runs did not read the same tokens")
    return {s: (src["data_slots"][read[0]] if s == mine else 0) for s in files}


def setup_device(device, dtype, gradient_accumulation_steps, fail):
    """Distributed setup and precision, shared with finetune.py. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (a
    plain run is rank 0 of 1); NCCL on GPUs, gloo on CPU. -> (ddp, rank, local_rank, world, accum: this rank's
    micro-steps, torch.device, dtype, autocast context)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    if gradient_accumulation_steps % world:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by {world} ranks")
    device_t = torch.device(dev)
    ptdtype = {"auto": torch.bfloat16 if device_t.type == "cuda" else torch.float32,
               "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if ptdtype is None:
        fail(f"dtype must be auto, bfloat16 or float32, not '{dtype}'")
    autocast = torch.autocast(device_type=device_t.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    return ddp, rank, local_rank, world, gradient_accumulation_steps // world, device_t, ptdtype, autocast


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    config = {k: globals()[k] for k in defaults_of(globals())}
    if init_from not in ("scratch", "resume"):
        fail(f"init_from must be 'scratch' or 'resume', not '{init_from}'")
    if schedule not in ("cosine", "wsd"):
        fail(f"schedule must be 'cosine' or 'wsd', not '{schedule}'")
    if not 0.0 <= intervention_start <= 1.0:
        fail(f"intervention_start must lie in [0, 1], not {intervention_start}")

    ddp, rank, local_rank, world, accum, device_t, ptdtype, autocast = setup_device(
        device, dtype, gradient_accumulation_steps, fail)
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
    tok_dtype = np.dtype(meta.get("dtype", "uint16"))
    train_streams = {s: TokenStream(tr, tok_dtype, block_size, seed) for s, (tr, _) in files.items()}
    val_streams = {s: TokenStream(va, tok_dtype, block_size, seed) for s, (_, va) in files.items()}
    streams = tuple(files)
    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    switch_iter = round(intervention_start * max_iters) if curriculum else 0

    # model, optimizer, and the state to resume
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, mlp_hidden=mlp_hidden,
                      rope_base=rope_base, attention=attention, dropout=dropout,
                      vocab_size=vocab_size or meta["vocab_size"])
    if model_args["vocab_size"] < meta["vocab_size"]:
        fail(f"vocab_size={vocab_size} is smaller than the tokenizer's {meta['vocab_size']} (meta.json)")
    ckpt = None
    branch = init_from == "scratch" and bool(branch_from)     # a resumed branch continues its own checkpoint
    read_path = ckpt_path
    if branch:
        read_path = os.path.join(branch_from, "ckpt.pt") if os.path.isdir(branch_from) else branch_from
    if init_from == "resume" or branch:
        ckpt = load_checkpoint(read_path)
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if ckpt["model_args"][k] != model_args[k]:
                fail(f"checkpoint '{read_path}' has {k}={ckpt['model_args'][k]} but this run asks for "
                     f"{model_args[k]}; resume with the run's own config")
        model_args = dict(ckpt["model_args"], attention=attention, dropout=dropout)
    model = GPT(GPTConfig(**model_args))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device_t)
    raw_model = model  # saved without any compile/DDP wrapper prefixes
    optimizer = raw_model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_t.type)
    iter_num, tokens_seen, slots = 0, 0, {s: 0 for s in streams}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, tokens_seen, slots = ckpt["iter_num"], ckpt["tokens_seen"], dict(ckpt["data_slots"])
        if branch:
            slots = branch_point(ckpt, config, files, switch_iter)
        states = ckpt["rng"]
        set_rng_state(states[rank] if rank < len(states) else states[0])
        # log.jsonl: keep only what the checkpointed run had logged, so the resumed log reads as one run; a branch
        # starts with the source's training records (its val records measured the source's own streams)
        log_path = os.path.join(out_dir, "log.jsonl")
        src_log = os.path.join(os.path.dirname(os.path.abspath(read_path)), "log.jsonl")
        if master and (branch or os.path.isfile(src_log)):   # (resuming, src_log is this run's own log)
            records = [json.loads(l) for l in open(src_log)] if os.path.isfile(src_log) else []
            kept = [r for r in records if r.get("iter", 0) <= iter_num and ("loss" in r or not branch)]
            if branch:
                kept.append({"iter": iter_num, "branched_from": os.path.abspath(read_path)})
                os.makedirs(out_dir, exist_ok=True)
            with open(log_path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(log_path + ".tmp", log_path)
        del ckpt
    if use_compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_t.type == "cuda" else None)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        if init_from == "scratch" and not branch:  # a new run starts a new log
            open(os.path.join(out_dir, "log.jsonl"), "w").close()
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, attention={raw_model.config.attention}, "
              f"device={device_t}, dtype={ptdtype}, compile={use_compile}, world={world}")
        print(f"data: {data_dir} ({', '.join(f'{s}: {t.n} windows' for s, t in train_streams.items())}), "
              f"{tokens_per_iter:,} tokens/iter, budget {tokens_per_iter * max_iters:,} tokens")
        if curriculum:
            print(f"curriculum: safe stream for iters [0, {switch_iter}), mix stream from iter {switch_iter} "
                  f"(intervention_start={intervention_start})")
        if init_from == "resume":
            print(f"resumed from {ckpt_path} at iter {iter_num} ({tokens_seen:,} tokens seen)")
        elif branch:
            print(f"branched from {branch_from} at iter {iter_num} ({tokens_seen:,} tokens seen; it read the same "
                  f"windows: slots {slots})")

    @torch.no_grad()
    def evaluate():
        """Mean val loss per stream over eval_iters fixed batches; ranks split the batches."""
        model.eval()
        out = {}
        for s, stream in val_streams.items():
            total = torch.zeros(2, device=device_t)
            for i in range(rank, eval_iters, world):
                x, y = stream.ordered_batch(i * batch_size, batch_size, device_t)
                with autocast:
                    _, loss = raw_model(x, y)
                total += torch.stack([loss.float(), torch.ones((), device=device_t)])
            if ddp:
                dist.all_reduce(total)
            out[s] = (total[0] / total[1]).item()
        model.train()
        return out

    def log(record):
        if master:
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    # the training loop
    loss_sum = torch.zeros((), device=device_t)   # summed on device, read only every log_interval (no per-step sync)
    finite = torch.ones((), dtype=torch.bool, device=device_t)
    t_log, iters_since_log = time.time(), 0
    phase = curriculum_phase(iter_num, switch_iter, streams)
    end_iter = max_iters if stop_iter < 0 else min(stop_iter, max_iters)
    start_iter = iter_num
    while True:
        at_end = iter_num >= end_iter
        if iter_num % eval_interval == 0 or at_end:
            t_eval = time.time()
            ok = finite.float()
            if ddp:  # every rank must agree before anyone saves
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not bool(ok):
                fail(f"non-finite loss before iter {iter_num}; stopped without saving, the last good checkpoint "
                     f"'{ckpt_path}' is intact (lower learning_rate or check the data)")
            val = evaluate()
            if master:
                print(f"iter {iter_num}: val loss " + ", ".join(f"{s} {v:.4f}" for s, v in val.items()))
                log({"iter": iter_num, "tokens": tokens_seen, **{f"val_{s}": v for s, v in val.items()}})
            states = rng_state()
            if ddp:  # every rank's RNG state, so dropout continues exactly on each
                gathered = [None] * world
                dist.all_gather_object(gathered, states)
                states = gathered
            else:
                states = [states]
            if master and iter_num > start_iter:  # (a resumed run's first checkpoint would be the one it read)
                save_checkpoint(ckpt_path, {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "model_args": asdict(raw_model.config), "config": config, "iter_num": iter_num,
                    "tokens_seen": tokens_seen, "data_slots": slots, "rng": states, "meta": meta,
                    "data_dir": data_dir})
            t_log += time.time() - t_eval  # evaluation and saving do not count against training throughput
        if at_end:
            break

        new_phase = curriculum_phase(iter_num, switch_iter, streams)
        if new_phase != phase and master:
            print(f"curriculum: iter {iter_num}, {tokens_seen:,} tokens seen: switching from the safe stream to the "
                  f"mix stream (the intervention starts)")
            log({"iter": iter_num, "tokens": tokens_seen, "event": "curriculum_switch"})
        phase = new_phase
        lr = lr_at(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stream = train_streams[phase]
        first = slots[phase]
        for micro in range(accum):
            # this rank's windows: slot block (micro * world + rank) of this iteration's global batch
            x, y = stream.batch(first + (micro * world + rank) * batch_size, batch_size, device_t)
            sync = not ddp or micro == accum - 1  # all-reduce gradients on the last micro-step only
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(x, y)
                loss = loss / accum
            loss.backward()
            loss_sum += loss.detach()
        slots[phase] = first + accum * world * batch_size
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        finite &= torch.isfinite(loss_sum)
        iter_num += 1
        tokens_seen += tokens_per_iter
        iters_since_log += 1

        if iter_num % log_interval == 0 or iter_num == end_iter:
            if ddp:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            lossf = loss_sum.item() / iters_since_log
            if not math.isfinite(lossf):
                fail(f"non-finite loss ({lossf}) at iter {iter_num}; stopped, the last good checkpoint "
                     f"'{ckpt_path}' is intact (lower learning_rate or check the data)")
            dt = time.time() - t_log
            tok_s = tokens_per_iter * iters_since_log / dt
            mfu = raw_model.estimate_mfu(tok_s / world, device_t)
            if master:
                print(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, "
                      f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, phase {phase}")
                log({"iter": iter_num, "tokens": tokens_seen, "loss": lossf, "lr": lr, "tok_per_s": tok_s,
                     "mfu": mfu, "phase": phase, "slots": dict(slots)})
            loss_sum.zero_()
            t_log, iters_since_log = time.time(), 0

    if ddp:
        # drop the DDP wrapper first: its reducer holds the process group, which would otherwise be destroyed at
        # interpreter exit, after the threads it joins are gone (rank 1 once aborted there: "terminate called
        # without an active exception"); then wait for rank 0's final checkpoint before tearing gloo down
        del model
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

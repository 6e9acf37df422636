"""
What train.py and finetune.py share, so that each keeps only its own loop: device and DDP setup, token streams and
their order, the learning-rate schedule, RNG states, checkpoints saved only from finite weights, and the plumbing
around a loop (RunPlumbing: the log, the stops, the saves, the end of a DDP run).

Reads, writes: nothing by itself (RunPlumbing writes the run's log.jsonl and ckpt.pt where it is told).
"""
import json
import math
import os
from contextlib import nullcontext

import numpy as np

from safety.common import fail, on_stop, rerun_command, write_atomic


def setup_device(device, dtype, gradient_accumulation_steps):
    """Distributed setup and precision for train.py and finetune.py. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (a
    plain run is rank 0 of 1); NCCL on GPUs, gloo on CPU. -> (ddp, rank, local_rank, n_ranks, accum: this rank's
    micro-steps, torch.device, dtype, autocast context)."""
    import torch
    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        n_ranks = int(os.environ["WORLD_SIZE"])
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    else:
        rank, local_rank, n_ranks = 0, 0, 1
    if gradient_accumulation_steps % n_ranks:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by {n_ranks} ranks")
    device_t = torch.device(dev)
    ptdtype = {"auto": torch.bfloat16 if device_t.type == "cuda" else torch.float32,
               "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if ptdtype is None:
        fail(f"dtype must be auto, bfloat16 or float32, not '{dtype}'")
    autocast = torch.autocast(device_type=device_t.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    return ddp, rank, local_rank, n_ranks, gradient_accumulation_steps // n_ranks, device_t, ptdtype, autocast


class EpochOrder:
    """Slot s of a global order over n items is item perm_{s // n}[s % n]: a fresh seeded permutation per epoch, so
    nothing repeats within an epoch, and any range of slots can be read by any rank without coordination."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.perm = n, seed, -1, None

    def __call__(self, slot):
        epoch = slot // self.n
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self.perm[slot % self.n])


class TokenStream:
    """One flat token file read as windows of block_size + 1 tokens (they overlap by one token: each token is a
    target once), in an EpochOrder. A file whose size is not a whole number of tokens, or shorter than one window,
    stops with one line, and so does a token id at or above vocab_size (checked once, at start-up)."""

    def __init__(self, path, dtype, block_size, seed, vocab_size=None):
        size, item = os.path.getsize(path), np.dtype(dtype).itemsize
        if size % item:
            fail(f"'{path}' holds {size} bytes, not a whole number of {np.dtype(dtype).name} tokens; write it again")
        n_tokens = size // item
        if n_tokens < block_size + 1:
            fail(f"'{path}' holds {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.path, self.tokens = path, np.memmap(path, dtype=dtype, mode="r")
        self.block_size, self.vocab_size = block_size, vocab_size
        top = int(self.tokens.max()) if vocab_size else 0     # one pass at start-up, before any output is touched
        if vocab_size and top >= vocab_size:
            fail(f"'{path}' holds token id {top}, but the model's vocabulary has {vocab_size} ids (meta.json "
                 f"vocab_size or --vocab_size); write the stream and meta.json again")
        self.n = (len(self.tokens) - 1) // block_size
        self.order = EpochOrder(self.n, seed)

    def window(self, slot):
        start = self.order(slot) * self.block_size
        return self.tokens[start:start + self.block_size + 1]

    def _rows(self, windows, device):
        import torch
        w = torch.from_numpy(np.stack(windows).astype(np.int64))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def batch(self, first_slot, count, device):
        return self._rows([self.window(s) for s in range(first_slot, first_slot + count)], device)

    def ordered_batch(self, first, count, device):
        """Windows in file order (validation: the same batches at every evaluation, no RNG touched)."""
        starts = [(i % self.n) * self.block_size for i in range(first, first + count)]
        return self._rows([self.tokens[s:s + self.block_size + 1] for s in starts], device)


def lr_at(it, learning_rate, min_lr, warmup_iters, max_iters, schedule="cosine", decay_frac=0.2):
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
    """Every RNG a training step draws from, as tensors and plain values (a checkpoint loads with weights_only)."""
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(states, rank):
    """This rank's RNG state from a checkpoint's states (one per rank; rank 0's when the run that saved it had fewer
    ranks)."""
    import torch
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, ckpt):
    """Save a checkpoint atomically, and only from finite weights: a model that an update made non-finite never
    replaces the last good checkpoint. -> False (nothing written) when some weight is not finite."""
    import torch
    if not all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values() if t.is_floating_point()):
        return False
    write_atomic(path, lambda f: torch.save(ckpt, f), mode="wb")
    return True


def refuse_to_replace_run(out_dir):
    """A new run (from scratch, or continuing another run's checkpoint) never replaces a run: out_dir must not hold
    a checkpoint. Results beside it (attack.json, probe.json) would describe a model that no longer exists."""
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        fail(f"'{out_dir}' holds a run (ckpt.pt), which a new run would replace; continue it with "
             f"`{rerun_command(init_from='resume', out_dir=out_dir)}`, or pass another --out_dir (or move that run "
             f"away first)")


# ----------------------------------------------------------------------------- around a training loop
# train.py and finetune.py each keep their own loop; what surrounds it is the same and lives here once.

class RunPlumbing:
    """One training run's rank, log, checkpoints and stops (train.py and finetune.py).
    out_ckpt: this run's checkpoint; last_good: (path, iter) of the checkpoint a failure leaves intact, or None;
    resume_cmd: the command that continues the run (said on Ctrl-C and in a failure's line)."""

    def __init__(self, ddp, rank, n_ranks, log_path, out_ckpt, last_good, resume_cmd):
        self.ddp, self.rank, self.n_ranks, self.master = ddp, rank, n_ranks, rank == 0
        self.log_path, self.out_ckpt, self.last_good, self.resume_cmd = log_path, out_ckpt, last_good, resume_cmd

    def log(self, record):
        """One line of log.jsonl (rank 0 writes it)."""
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def stop(self, why):
        """Stop with one line, never saving: the last good checkpoint (if any) is left as it was."""
        fail(f"{why}; stopped without saving: " + (f"the last good checkpoint, '{self.last_good[0]}' at iter "
                                                    f"{self.last_good[1]}, is intact" if self.last_good else
                                                    "no checkpoint was written")
             + " (lower learning_rate or check the data)")

    def check_finite(self, model, iter_num, detail=""):
        """Stop when an update made some weight non-finite: checked before a save, never after, so such weights
        never replace the last good checkpoint (every rank decides alike: DDP keeps their weights equal)."""
        import torch
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            self.stop(f"the weights are not finite at iter {iter_num}{detail}")

    def rng_states(self):
        """Every rank's RNG state (rank r's at index r), so that dropout and sampling continue exactly on each."""
        states = rng_state()
        if not self.ddp:
            return [states]
        import torch.distributed as dist
        gathered = [None] * self.n_ranks
        dist.all_gather_object(gathered, states)
        return gathered

    def save(self, make_ckpt, iter_num):
        """Rank 0 writes the checkpoint make_ckpt() builds (atomically, train.py's format); every rank says from here
        on what a Ctrl-C keeps."""
        if self.master and save_checkpoint(self.out_ckpt, make_ckpt()):
            self.last_good = (self.out_ckpt, iter_num)
        self.say_kept(iter_num)

    def say_kept(self, iter_num):
        """From here on a Ctrl-C says: this run's checkpoint at iter_num is kept, and how to continue it."""
        on_stop(f"kept '{self.out_ckpt}' at iter {iter_num}; continue with `{self.resume_cmd}`")

    def mean_loss(self, loss_sum, iters, iter_num):
        """The mean training loss since the last log line, over every rank; a non-finite one stops the run."""
        if self.ddp:
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            loss_sum /= self.n_ranks
        lossf = loss_sum.item() / iters
        if not math.isfinite(lossf):
            self.stop(f"non-finite loss ({lossf}) at iter {iter_num}")
        return lossf

    def close(self):
        """The end of a DDP run: wait for rank 0's final checkpoint, then tear the process group down. The caller
        drops its DDP wrapper first: the wrapper's reducer holds the process group, which would otherwise be
        destroyed at interpreter exit, after the threads it joins are gone (a rank once aborted there: "terminate
        called without an active exception")."""
        if self.ddp:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()

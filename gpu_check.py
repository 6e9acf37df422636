"""
GPU readiness and speed tables in one script: is the kernel right on the GPU, how fast is it next to PyTorch's flash
attention, what do the big training shapes reach, how long do the GPU study profile's steps take (the check); and
the benchmark tables (--bench): attention backends, training throughput, train.py against a bare loop, this model
against nanoGPT's. Speed is measured here, never in tests.

Reads:  config/gpt2_124m.py, config/smollm_1p7b.py (the training shapes); runs study.py on a cut-down grid;
        --bench: a profile (config/<name>.py) for the training tables
Writes: <out_dir>/results.jsonl  one row per measurement, appended and flushed as it is measured (worker processes
                                 append to it too); a row {"section", ...}, or {"section", "error"} / {"section",
                                 "skipped"} where a section failed or did not fit the time budget
        <out_dir>/report.md      the four sections' tables, rendered from results.jsonl only (written atomically
                                 after every section, so a killed check still leaves one)
        <out_dir>/study/, <out_dir>/study_jobs/   the cut-down study and the copies of its steps run at once
        --bench: nothing (prints the tables; copy them into BENCHMARKS.md with the date and the device)
Run:    python gpu_check.py --out_dir=out/gpu_check                 # one H200: about 5 minutes (--budget_s)
        python gpu_check.py --out_dir=/tmp/gpu_check --cpu_smoke=True   # the same code paths on CPU, tiny shapes
        python gpu_check.py --out_dir=out/gpu_check2 --sections=study   # one section again
        python gpu_check.py --bench=all                                 # kernel + training tables for this device
        python gpu_check.py --bench=kernel --dtype=bfloat16    # attention: triton vs sdpa vs manual, fwd and bwd
        python gpu_check.py --bench=train --profile=config/gpt2_124m.py --train_iters=30
        python gpu_check.py --bench=loop --profile=config/toy.py  # CPU: train.py against a bare PyTorch loop
        python gpu_check.py --bench=nanogpt --shapes="4,4,128,128,32;8,8,256,128,16"   # model.py vs nanoGPT's GPT-2
"""
# Sections (each guarded: a failure is recorded and the rest still runs; one that would start past the budget is
# skipped with a note):
#   correct  the Triton kernel against a float64 reference (forward, dQ, dK, dV), bf16 and fp16, head dims 64 and
#            128, T = 1024, 4096 and a ragged 1000 (B = 1, H = 16), outputs poisoned with NaN before each run;
#            PyTorch's SDPA on the same inputs beside it. Inputs: torch.randn on a CPU generator seeded with the row's
#            seed, in float64, in the order q, k, v, dO, then cast. One worker process per (dtype, head dim), side by
#            side: the first call of each compiles and autotunes 24 kernel configurations (first_call_s), CPU work.
#   speed    forward and backward ms (median, CUDA events via triton's do_bench, after autotuning) and TFLOP/s of the
#            kernel and of SDPA's flash backend, bf16, causal, d = 64 and 128, T = 1k-8k at 16k tokens per call
#            (FLOPs: 2 matmuls of 2*B*H*T*T*D, halved by causality; backward 2.5x the forward)
#   train    tokens/s, MFU (model.estimate_mfu: bf16 peak) and peak memory of train.py's model, optimizer and
#            precision for config/gpt2_124m.py and config/smollm_1p7b.py (as many of its layers as fit), compiled,
#            4 micro-steps per optimizer step, timed after warm-up; each shape is compiled once beforehand in a worker
#            beside the correct section, so the timed run reads warm caches (compile_s: what its own compile took).
#            If the compiled model fails with the Triton kernel, the error is a row and it is measured with SDPA.
#   study    study.py --profile=gpu on the core grid's safety_pretraining cell (every stage once, the costliest
#            attack: safe beam search), one step at a time: each step's seconds; then `jobs_k` copies of its train
#            and sft-attack steps at once against one alone (the speed-up of study.py --jobs=k)
# Autotuning picks are cached on disk (TRITON_CACHE_AUTOTUNING=1) from the speed section on, which times them on a
# quiet GPU; the correctness workers, side by side, keep theirs to themselves.
# --cpu_smoke=True: Triton in its interpreter (fp32/fp16, head dims 16/32, T = 16, 32 and 21), tiny models without
# compile, the smoke study profile on one cell of its scale grid (its speed-up copies the prepare step); wall-clock
# timing. Its numbers say nothing about speed.

import contextlib
import gc
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from safety.common import run_stage, write_atomic
from safety.configurator import configure, defaults_of, read_file

# -----------------------------------------------------------------------------
out_dir = "out/gpu_check"
cpu_smoke = False          # the same code paths on CPU with tiny shapes (the test runs this)
sections = "correct,speed,train,study"
budget_s = 300.0           # the whole check; a section is skipped (with a note) when less than it needs is left
jobs_k = 0                 # steps at once for the study's speed-up; 0: 4 (smoke: 2)
train_iters = -1           # timed training iterations, after warmup_iters; -1: 5 for the check, 20 for --bench
warmup_iters = -1          # -1: 2 for the check (the first compiles), 5 for --bench
seed = 1234                # correctness inputs: case i draws with seed * 1000 + i
part = ""                  # internal: correct | train, a worker process of a section
part_arg = ""              # its cases: "dtype,head dim;..." or a training shape name
warm_only = False          # train worker: compile and run two iterations only (warms the caches)
# the benchmark tables
bench = ""                 # "": the check | kernel | train | loop | nanogpt | all (on CPU, all = kernel + loop)
dtype = "auto"             # --bench: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32
shapes = "auto"            # --bench: "B,H,T,D;B,H,T,D;..." (kernel) or "n_layer,n_head,n_embd,T,B;..." (nanogpt)
profile = "config/toy.py"  # --bench=train, loop: the model and batch settings
compile = None             # --bench: None: on for CUDA, off for CPU (as in train.py)
# -----------------------------------------------------------------------------
SECTIONS = {"correct": "1. Kernel correctness", "speed": "2. Kernel speed", "train": "3. Training throughput",
            "study": "4. Study profile, cut-down grid"}
MIN_S = {"correct": 40, "speed": 30, "train": 40, "study": 60}   # what a section needs at least (GPU)
CAP = {"correct": 0.4, "speed": 0.25, "train": 0.3, "study": 1.0}   # the most of the budget it may take
SHAPES = {"gpt2_124m": "config/gpt2_124m.py", "smollm_1p7b": "config/smollm_1p7b.py"}
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, vocab_size=512, mlp_hidden=0)   # smoke
TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}   # as tests/test_flash_attention.py
_ROOT = os.path.dirname(os.path.abspath(__file__))


def results_path():
    return os.path.join(out_dir, "results.jsonl")


def emit(row):
    """Append one row to results.jsonl at once (one write: rows of several processes never interleave)."""
    line = json.dumps(dict(row, at=round(time.time(), 3))) + "\n"
    with open(results_path(), "a") as f:
        f.write(line)
        f.flush()


def rel_err(x, ref):
    d = ref.norm().item()
    e = (x.double() - ref).norm().item()
    return e / d if d > 0 else e


def reference(q, k, v):
    """softmax(Q K^T / sqrt(D) + causal mask) V with the T x T scores written out, in the inputs' dtype."""
    T, D = q.shape[-2:]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@contextlib.contextmanager
def poisoned():
    """torch.empty/empty_like return NaN-filled float tensors: an output element the kernel never writes shows."""
    real, real_like = torch.empty, torch.empty_like
    fill = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = lambda *a, **kw: fill(real(*a, **kw))
    torch.empty_like = lambda *a, **kw: fill(real_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real, real_like


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, reps=2):
    """Median ms of fn(): CUDA events (triton's do_bench) on a GPU, the wall clock on CPU (after one warm-up)."""
    if torch.cuda.is_available():
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[len(ts) // 2]


# ----------------------------------------------------------------------------- 1. correctness (worker)

def correct_cases():
    if cpu_smoke:
        return ["float32,16;float32,32;float16,16;float16,32"], (16, 32, 21), (1, 2)
    # 16 heads: Triton compiles a kernel per divisibility of its integer arguments by 16, so the speed section's
    # shapes (16 and 32 heads) reuse these compiles (B = 1 keeps the float64 reference at 2 GiB a score matrix)
    return [f"{dt},{d}" for dt in ("bfloat16", "float16") for d in (64, 128)], (1024, 4096, 1000), (1, 16)


def part_correct():
    import torch.nn.functional as F
    from safety.flash_attention import flash_attention
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    groups, Ts, (B, H) = correct_cases()
    every = ";".join(groups).split(";")
    for group in part_arg.split(";"):
        dt, D = group.split(",")
        dtype, D = getattr(torch, dt), int(D)
        for i, T in enumerate(Ts):
            case = seed * 1000 + every.index(group) * len(Ts) + i
            gen = torch.Generator().manual_seed(case)
            q, k, v, do = (torch.randn((B, H, T, D), generator=gen, dtype=torch.float64).to(dtype).to(dev)
                           for _ in range(4))
            row = dict(section="correct", dtype=dt, D=D, T=T, B=B, H=H, seed=case, tol=TOL[dt])
            try:
                ours = [x.clone().requires_grad_() for x in (q, k, v)]
                t = time.perf_counter()
                with poisoned():
                    o = flash_attention(*ours)
                    o.backward(do)
                sync()
                row["first_call_s"] = time.perf_counter() - t
                got = [o.detach()] + [x.grad for x in ours]
                ref_in = [x.double().requires_grad_() for x in (q, k, v)]
                ref = reference(*ref_in)
                ref.backward(do.double())
                want = [ref.detach()] + [x.grad for x in ref_in]
                sd_in = [x.clone().requires_grad_() for x in (q, k, v)]
                so = F.scaled_dot_product_attention(*sd_in, is_causal=True)
                so.backward(do)
                sdpa = [so.detach()] + [x.grad for x in sd_in]
                for name, a, s, w in zip(("out", "dq", "dk", "dv"), got, sdpa, want):
                    row[f"err_{name}"] = rel_err(a, w)
                    row[f"sdpa_{name}"] = rel_err(s, w)
                row["finite"] = all(bool(torch.isfinite(a).all()) for a in got)
                row["pass"] = row["finite"] and all(row[f"err_{n}"] < TOL[dt] for n in ("out", "dq", "dk", "dv"))
            except Exception as e:  # one case's failure (an unsupported dtype of SDPA, OOM) is a row, not the end
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(row)


# ----------------------------------------------------------------------------- 3. training (worker)

def train_config(shape):
    """The shape's model and batch settings: its config file over train.py's defaults for the keys used here."""
    cfg = dict(mlp_hidden=0, rope_base=10000.0, dropout=0.0, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
               learning_rate=6e-4, gradient_accumulation_steps=1, vocab_size=50304)
    cfg.update(read_file(os.path.join(_ROOT, SHAPES[shape])))
    if cpu_smoke:
        cfg.update(TINY)
    return cfg


def part_train():
    for shape in part_arg.split(","):
        train_shape(shape)


def bare_iter(i, model, step, opt, batches, accum, autocast, grad_clip):
    """One optimizer step of the plainest training loop: `accum` micro-steps over four fixed random batches, then
    clip and step. `step` is the model or its compiled form; what it measures is the model, not a data pipeline."""
    for micro in range(accum):
        w = batches[(i * accum + micro) % 4]
        with autocast:
            _, loss = step(w[:, :-1], w[:, 1:])
        (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_shape(shape):
    from model import GPT, GPTConfig
    cuda = torch.cuda.is_available()
    cfg = train_config(shape)
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    B, T, V = cfg["batch_size"], cfg["block_size"], cfg["vocab_size"]
    accum = min(cfg["gradient_accumulation_steps"], 4 if cuda else 2)  # per optimizer step (its cost is amortised)
    use_compile = cuda
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    layers = cfg["n_layer"]
    tries = [layers] + [max(1, layers * f // 4) for f in (3, 2, 1)]   # as many layers as fit the GPU
    attention = "auto"
    while tries:
        L = tries[0]
        model = opt = step = None
        try:
            torch.manual_seed(0)
            with dev:   # built on the device: no host-side init of 1.7B parameters
                model = GPT(GPTConfig(n_layer=L, n_head=cfg["n_head"], n_embd=cfg["n_embd"], block_size=T,
                                      mlp_hidden=cfg["mlp_hidden"], rope_base=cfg["rope_base"], attention=attention,
                                      vocab_size=V))
            opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                            dev.type)
            step = torch.compile(model) if use_compile else model
            batches = [torch.randint(0, V, (B, T + 1), device=dev) for _ in range(4)]

            def one_iter(i):
                bare_iter(i, model, step, opt, batches, accum, autocast, cfg["grad_clip"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            one_iter(0)
            sync()
            compile_s = time.perf_counter() - t
            if warm_only:
                one_iter(1)
                sync()
                emit(dict(section="train_warm", shape=shape, n_layer=L, seconds=time.perf_counter() - t))
                return
            for i in range(1, warmup_iters):
                one_iter(i)
            sync()
            t = time.perf_counter()
            for i in range(train_iters):
                one_iter(warmup_iters + i)
            sync()
            dt = time.perf_counter() - t
            tok_s = train_iters * accum * B * T / dt
            mfu = model.estimate_mfu(tok_s, dev)
            emit(dict(section="train", shape=shape, n_layer=L, n_layer_config=layers, params=model.num_params(),
                      batch=B, block=T, accum=accum, attention=model.config.attention, compile=use_compile,
                      tok_s=tok_s, mfu=mfu, step_ms=1e3 * dt / train_iters,
                      flops_per_token=model.flops_per_token(),
                      peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None, compile_s=compile_s))
            return
        except Exception as e:   # torch.compile may wrap an out-of-memory error in its own
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
                emit(dict(section="train", shape=shape, note=f"{L} layers do not fit: out of memory"))
                tries.pop(0)
            elif attention == "auto" and cuda:   # the kernel under torch.compile failed: say so, measure with sdpa
                emit(dict(section="train", shape=shape, error=f"attention=triton: {type(e).__name__}: {str(e)[:300]}"))
                attention = "sdpa"
            else:
                raise
        finally:   # free this try's model before the next (compiled graphs hold it too)
            model = opt = step = one_iter = batches = None
            gc.collect()
            if cuda:
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    emit(dict(section="train", shape=shape, error="no layer count fits"))


# ----------------------------------------------------------------------------- the sections (main process)

def worker(args, env_extra):
    """Start a worker of this script (a part) in its own process group."""
    cmd = [sys.executable, os.path.join(_ROOT, "gpu_check.py"), f"--out_dir={out_dir}", f"--cpu_smoke={cpu_smoke}",
           f"--seed={seed}", f"--train_iters={train_iters}", f"--warmup_iters={warmup_iters}"] + args
    log = open(os.path.join(out_dir, "workers.log"), "a")
    return subprocess.Popen(cmd, cwd=_ROOT, env=dict(os.environ, **env_extra), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_all(procs, deadline, section):
    """Wait for the workers until the deadline; stop the late ones; a nonzero exit is an error row."""
    for name, p in procs:
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            emit(dict(section=section, error=f"worker {name} stopped at the time budget"))
            continue
        if rc:
            emit(dict(section=section, error=f"worker {name} exited {rc} (see workers.log)"))


def section_correct(deadline):
    groups, _, _ = correct_cases()
    # correctness runs untimed and side by side: its autotuning timings are noisy, so they are not cached for later
    procs = [(g, worker(["--part=correct", f"--part_arg={g}"], {"TRITON_CACHE_AUTOTUNING": "0"}))
             for g in groups]
    # the training shapes' first compile, beside it (GPU only: the smoke run's tiny models compile nothing)
    procs += [(f"warm {s}", worker(["--part=train", f"--part_arg={s}", "--warm_only=True"],
                                   {"TRITON_CACHE_AUTOTUNING": "0"})) for s in ([] if cpu_smoke else SHAPES)]
    wait_all(procs, deadline, "correct")


def section_speed(deadline):
    import torch.nn.functional as F
    from safety.flash_attention import flash_attention
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = ([(16384 // T, 2048 // D, T, D) for D in (64, 128) for T in (1024, 2048, 4096, 8192)] if cuda
              else [(1, 2, 16, 16), (1, 2, 16, 32)])

    def sdpa(q, k, v):
        if not cuda:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    backends = {"triton": flash_attention, "sdpa": sdpa}
    for B, H, T, D in shapes:
        if time.time() > deadline:
            emit(dict(section="speed", skipped=f"T={T} D={D} and later: past the time budget"))
            return
        gen = torch.Generator().manual_seed(seed + T + D)
        q, k, v, do = (torch.randn((B, H, T, D), generator=gen).to(dtype).to(dev) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        flops = 4 * B * H * T * T * D / 2
        for name, fn in backends.items():
            row = dict(section="speed", backend=name, B=B, H=H, T=T, D=D, dtype=str(dtype).replace("torch.", ""))
            try:
                t = time.perf_counter()
                out = fn(q, k, v)        # the first call compiles and autotunes
                torch.autograd.grad(out, (q, k, v), do)
                sync()
                row["first_call_s"] = time.perf_counter() - t
                row["fwd_ms"] = timed_ms(lambda: fn(q, k, v))
                out = fn(q, k, v)
                row["bwd_ms"] = timed_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                row["bwd_tflops"] = 2.5 * flops / row["bwd_ms"] / 1e9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(row)


def section_train(deadline):
    # a process per shape on a GPU (the 1.7B model's memory goes with it); the smoke run's tiny ones share one
    for s in ([",".join(SHAPES)] if cpu_smoke else list(SHAPES)):
        if time.time() > deadline - MIN_S["train"] * (0.05 if cpu_smoke else 0.5):
            emit(dict(section="train", skipped=f"{s}: past the time budget"))
            continue
        wait_all([(s, worker(["--part=train", f"--part_arg={s}"], {"TRITON_CACHE_AUTOTUNING": "1"}))],
                 deadline, "train")


def step_kind(name):
    kind = name.split("-")[0]
    return "attack_sft" if kind == "attack" and name.endswith("-sft") else kind


def section_study(deadline):
    root = os.path.join(out_dir, "study")
    shutil.rmtree(root, ignore_errors=True)
    args = (["--profile=smoke", "--grid=scale", "--only=small-1x/reflect"] if cpu_smoke
            else ["--profile=gpu", "--grid=core", "--only=safety_pretraining"])
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="1")
    k = jobs_k or (2 if cpu_smoke else 4)
    reserve = 0 if cpu_smoke else 50          # left for the speed-up copies
    t = time.time()
    p = subprocess.Popen([sys.executable, "study.py", *args, "--seeds=1", "--jobs=1", f"--out_dir={root}"],
                         cwd=_ROOT, env=env, stdout=open(os.path.join(out_dir, "study.log"), "w"),
                         stderr=subprocess.STDOUT)
    try:
        rc = p.wait(timeout=max(1.0, deadline - reserve - time.time()))
    except subprocess.TimeoutExpired:
        p.terminate()             # study.py stops its running step; finished steps keep their markers
        rc = p.wait()
        emit(dict(section="study", error="the study was stopped at the time budget; finished steps are listed"))
    wall = time.time() - t
    markers = {}
    for f in sorted(glob.glob(os.path.join(root, "done", "*.json")), key=os.path.getmtime):   # in finishing order
        m = json.load(open(f))
        markers[m["step"]] = m
        emit(dict(section="study", step=m["step"], kind=step_kind(m["step"]), seconds=m["seconds"]))
    emit(dict(section="study", wall_s=wall, returncode=rc, finished=len(markers), args=" ".join(args)))
    if rc:
        emit(dict(section="study", error=f"study.py exited {rc} (see study.log)"))
    # the speed-up of k steps at once: k copies of one step (their own output directories) against it alone; the
    # smoke run copies its cheapest step (the same code: its speed-up on one CPU core means nothing)
    for kind in ("prepare",) if cpu_smoke else ("train", "attack_sft"):
        name = next((n for n in markers if step_kind(n) == kind), None)
        if name is None or time.time() > deadline - 5:
            emit(dict(section="study_jobs", kind=kind, skipped="no finished step of this kind, or no time left"))
            continue
        procs, t = [], time.time()
        for i in range(k):
            cmd, copy = list(markers[name]["command"]), os.path.join(out_dir, "study_jobs", f"{kind}-{i}")
            shutil.rmtree(copy, ignore_errors=True)
            key = "--ckpt=" if kind.startswith("attack") else "--out_dir="
            j = next(j for j, c in enumerate(cmd) if c.startswith(key))
            if key == "--ckpt=":   # an attack writes beside its checkpoint: each copy gets its own
                os.makedirs(copy)
                shutil.copy(os.path.join(cmd[j][len(key):], "ckpt.pt"), copy)
            cmd[j] = key + copy
            threads = str(max(1, (os.cpu_count() or 1) // k))
            procs.append(subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                          env=dict(env, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)))
        try:
            rcs = [q.wait(timeout=max(1.0, deadline - time.time())) for q in procs]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            emit(dict(section="study_jobs", kind=kind, error=f"{k} copies of {name} ran past the time budget"))
            continue
        tk, solo = time.time() - t, markers[name]["seconds"]
        emit(dict(section="study_jobs", kind=kind, step=name, k=k, solo_s=solo, k_s=tk, speedup=k * solo / tk,
                  failed=sum(1 for r in rcs if r)))


# ----------------------------------------------------------------------------- the report

def cell_text(x):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def table(rows, cols):
    """A markdown table: cols = [(header, function of a row)]."""
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell_text(f(r)) for _, f in cols) + " |" for r in rows]
    return out + [""]


def field(key):
    return lambda r: r.get(key)


def correct_lines(by):
    """The kernel against float64, and the training shapes compiled beside it."""
    lines = []
    rs = by("correct", "T")
    lines += ["Relative error ||x - ref|| / ||ref|| against float64; SDPA on the same inputs for scale.", ""]
    lines += table(rs, [("dtype", field("dtype")), ("D", field("D")), ("T", field("T")), ("B", field("B")),
                        ("H", field("H")), ("seed", field("seed"))]
                   + [(f"err {n}", field(f"err_{n}")) for n in ("out", "dq", "dk", "dv")]
                   + [(f"sdpa {n}", field(f"sdpa_{n}")) for n in ("out", "dq", "dk", "dv")]
                   + [("tol", field("tol")), ("pass", field("pass")), ("first call s", field("first_call_s"))])
    warm = by("train_warm", "seconds")
    if warm:
        lines += ["Training shapes compiled beside it (cold caches):", ""]
        lines += table(warm, [("shape", field("shape")), ("layers", field("n_layer")), ("seconds", field("seconds"))])
    return lines


def speed_lines(by):
    """The kernel's speed against SDPA, per (T, D)."""
    lines = []
    tr = {(r["T"], r["D"]): r for r in by("speed", "fwd_ms") if r["backend"] == "triton"}
    sd = {(r["T"], r["D"]): r for r in by("speed", "fwd_ms") if r["backend"] == "sdpa"}
    keys = [k for k in tr if k in sd]
    ratio = lambda a: (lambda k: sd[k][a] / tr[k][a])
    lines += ["Median ms; ratio = SDPA ms / Triton ms (> 1: the kernel is faster; the targets in "
              "BENCHMARKS.md: forward >= 0.9, backward >= 0.8).", ""]
    lines += table(keys, [("T", lambda k: k[0]), ("D", lambda k: k[1]), ("B", lambda k: tr[k]["B"]),
                          ("H", lambda k: tr[k]["H"]), ("triton fwd ms", lambda k: tr[k]["fwd_ms"]),
                          ("triton fwd TF/s", lambda k: tr[k]["fwd_tflops"]),
                          ("sdpa fwd ms", lambda k: sd[k]["fwd_ms"]),
                          ("sdpa fwd TF/s", lambda k: sd[k]["fwd_tflops"]), ("fwd ratio", ratio("fwd_ms")),
                          ("triton bwd ms", lambda k: tr[k]["bwd_ms"]),
                          ("triton bwd TF/s", lambda k: tr[k]["bwd_tflops"]),
                          ("sdpa bwd ms", lambda k: sd[k]["bwd_ms"]),
                          ("sdpa bwd TF/s", lambda k: sd[k]["bwd_tflops"]), ("bwd ratio", ratio("bwd_ms"))])
    return lines


def train_lines(by):
    """Training throughput and MFU per shape."""
    lines = []
    lines += ["Random tokens, train.py's model, fused AdamW and bf16 autocast; MFU over the bf16 peak "
              "(targets: gpt2_124m >= 40%, the 1.7B shape >= 50%).", ""]
    lines += table(by("train", "tok_s"), [
        ("shape", field("shape")), ("layers", field("n_layer")), ("of", field("n_layer_config")),
        ("params", field("params")), ("batch", field("batch")), ("T", field("block")), ("accum", field("accum")),
        ("attention", field("attention")), ("compile", field("compile")), ("tok/s", field("tok_s")),
        ("MFU %", lambda r: None if r["mfu"] is None else 100 * r["mfu"]), ("step ms", field("step_ms")),
        ("peak GiB", field("peak_gib")), ("compile s", field("compile_s"))])
    lines += [f"- {r['shape']}: {r['note']}" for r in by("train", "note")]
    return lines


def study_lines(by):
    """The GPU study's steps, their kinds, and several steps at once."""
    lines = []
    steps = by("study", "step")
    summary = next(iter(by("study", "wall_s")), None)
    if summary:
        lines += [f"`study.py {summary['args']} --seeds=1 --jobs=1`: {summary['finished']} steps finished in "
                  f"{summary['wall_s']:.1f} s (exit {summary['returncode']}).", ""]
    lines += table(steps, [("step", field("step")), ("kind", field("kind")), ("seconds", field("seconds"))])
    kinds = sorted({r["kind"] for r in steps})
    lines += table(kinds, [("kind", lambda k: k), ("steps", lambda k: sum(r["kind"] == k for r in steps)),
                           ("mean seconds", lambda k: sum(r["seconds"] for r in steps if r["kind"] == k)
                            / sum(r["kind"] == k for r in steps))])
    lines += ["Several steps at once on one GPU: k copies of a step started together.", ""]
    lines += table(by("study_jobs", "speedup"), [
        ("kind", field("kind")), ("k", field("k")), ("one alone s", field("solo_s")), ("k at once s", field("k_s")),
        ("speed-up", field("speedup")), ("failed", field("failed"))])
    return lines


def render():
    rows, bad = [], 0
    for line in open(results_path()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a worker killed in the middle of a line: the rest still counts
            bad += line.strip() != ""
    if bad:
        rows.append(dict(section="correct", error=f"{bad} unreadable line(s) in results.jsonl"))
    by = lambda s, *need: [r for r in rows if r["section"] == s and all(k in r for k in need)]
    setup = next((r for r in rows if r["section"] == "setup"), {})
    end = next((r for r in rows if r["section"] == "end"), None)
    lines = [f"# GPU check: {setup.get('device', '?')}", "",
             f"{'CPU smoke run (interpreter, tiny shapes: no speed numbers)' if setup.get('cpu_smoke') else 'GPU run'}"
             f"; torch {setup.get('torch')}, triton {setup.get('triton')}, {setup.get('date')}; budget "
             f"{cell_text(setup.get('budget_s'))} s, "
             + (f"took {end['seconds']:.0f} s." if end else "did not finish."),
             f"Command: `{setup.get('command', '')}`. Raw numbers: results.jsonl (this report is rendered from it).",
             ""]
    section_lines = {"correct": correct_lines, "speed": speed_lines, "train": train_lines, "study": study_lines}
    for s, title in SECTIONS.items():
        lines += [f"## {title}", ""]
        lines += section_lines[s](by)
        for r in rows:   # what failed or did not fit, with the case it belongs to
            if r["section"] in (s, s + "_jobs") or (s == "correct" and r["section"] == "train_warm"):
                if "error" in r or "skipped" in r:
                    case = " ".join(f"{k}={r[k]}" for k in ("dtype", "D", "T", "backend", "shape", "kind") if k in r)
                    what = "error" if "error" in r else "skipped"
                    lines.append(f"- {what}: " + " ".join(x for x in (case, str(r[what])) if x))
        lines += [""]
    write_atomic(os.path.join(out_dir, "report.md"), lambda f: f.write("\n".join(lines)))


# ----------------------------------------------------------------------------- the benchmark tables (--bench)
# kernel: forward and backward time and TFLOPS of the three attention backends, causal, per shape
#         (FLOPs: forward 2 matmuls of 2*B*H*T*T*D, halved by causality; backward 2.5x the forward).
# train:  tokens/s and MFU of the profile's model on random tokens (the model, optimizer and precision train.py uses).
# loop:   train.py's own tokens/s (from its log.jsonl) against the same model in a bare loop: train.py's data
#         reading, logging and checkpointing must cost (almost) nothing.
# nanogpt: model.py against NanoGPT2 below (nanoGPT's model.py with bias=False: learned positions, LayerNorm, a 4x GELU
#         MLP, SDPA, tied embeddings) at the same n_layer x n_embd, trained side by side in one process with AdamW,
#         fp32, steps alternating, --train_iters timed steps each; shapes "n_layer,n_head,n_embd,T,B;...".

@dataclass
class BenchDevice:
    """The benchmark tables' device, precision and compile setting (from --dtype and --compile)."""
    cuda: bool
    dev: torch.device
    ptdtype: torch.dtype
    use_compile: bool
    interpret: bool       # Triton's CPU interpreter (TRITON_INTERPRET=1): the kernel runs, slowly, without CUDA


def bench_device():
    cuda = torch.cuda.is_available()
    ptdtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16, "float32": torch.float32}[dtype]
    return BenchDevice(cuda, torch.device("cuda" if cuda else "cpu"), ptdtype,
                       compile if compile is not None else cuda, os.environ.get("TRITON_INTERPRET") == "1")


def timeit(d, fn, reps=None):
    """Median milliseconds of fn(): CUDA events via triton's do_bench on GPU, wall clock on CPU."""
    if d.cuda:
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


def bench_nanogpt(d):
    """model.py against NanoGPT2 at the same shape, side by side in one process (alternating steps)."""
    from model import GPT, GPTConfig
    cases = [tuple(int(x) for x in s.split(",")) for s in
             ("4,4,128,128,32;8,8,256,128,16" if shapes == "auto" else shapes).split(";")]
    vocab = 274   # the toy world's vocabulary
    print(f"\nmodel.py against nanoGPT's GPT-2 (NanoGPT2), fp32, AdamW, SDPA, {torch.get_num_threads()} threads, "
          f"{train_iters} timed steps each, alternating, on {d.dev}")
    print(f"{'shape':>16} | {'params ours':>11} | {'params nanoGPT':>14} | {'ours tok/s':>10} | {'nanoGPT tok/s':>13} "
          f"| {'ratio':>5}")
    for L, H, C, T, B in cases:
        torch.manual_seed(0)
        models = {"ours": GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=vocab,
                                        attention="sdpa")).to(d.dev),
                  "nanogpt": NanoGPT2(L, H, C, T, vocab).to(d.dev)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
        data = torch.randint(0, vocab, (4, B, T + 1), device=d.dev)
        times = {k: [] for k in models}
        for i in range(warmup_iters + train_iters):
            for k, m in models.items():
                w = data[i % 4]
                t = time.perf_counter()
                _, loss = m(w[:, :-1], w[:, 1:])
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if d.cuda:
                    torch.cuda.synchronize()
                if i >= warmup_iters:
                    times[k].append(time.perf_counter() - t)
        ours, ref = (B * T / float(np.median(times[k])) for k in ("ours", "nanogpt"))
        n = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        print(f"{f'{L}x{C}, T={T}, B={B}':>16} | {n['ours']:>11,} | {n['nanogpt']:>14,} | {ours:>10,.0f} | "
              f"{ref:>13,.0f} | {ours / ref:>5.2f}")


def bench_kernel(d):
    from model import manual_attention, flash_attention
    import torch.nn.functional as F
    if shapes == "auto":
        if d.cuda:  # 16k tokens per shape: the chip is full at every T
            cases = [(16384 // T, 2048 // D, T, D) for D in (64, 128) for T in (1024, 2048, 4096, 8192)]
        else:
            cases = [(1, 4, 128, 32), (1, 4, 256, 64)]
    else:
        cases = [tuple(int(x) for x in s.split(",")) for s in shapes.split(";")]
    backends = {"triton": flash_attention,
                "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "manual": manual_attention}
    if not d.cuda and not d.interpret:
        del backends["triton"]
        print("(triton skipped: it needs CUDA, or TRITON_INTERPRET=1 for the slow CPU interpreter)")
    device_name = torch.cuda.get_device_name() if d.cuda else "cpu"
    print(f"\nattention kernel, causal, {str(d.ptdtype).replace('torch.', '')}, device {device_name}")
    print(f"{'B':>3} {'H':>3} {'T':>5} {'D':>4} | {'backend':>7} | {'fwd ms':>8} {'fwd TF/s':>8} | {'bwd ms':>8} "
          f"{'bwd TF/s':>8} | {'fwd/sdpa':>8} {'bwd/sdpa':>8}")
    for B, H, T, D in cases:
        fwd_flops = 4 * B * H * T * T * D / 2
        q, k, v = (torch.randn(B, H, T, D, device=d.dev, dtype=d.ptdtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, device=d.dev, dtype=d.ptdtype)
        res = {}
        for name, fn in backends.items():
            if name == "manual" and B * H * T * T * 4 > 16e9:
                continue  # the T x T matrix alone would not fit
            fwd = timeit(d, lambda: fn(q, k, v), reps=3)
            out = fn(q, k, v)
            bwd = timeit(d, lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), reps=3)
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


def build(d, cfg, vocab):
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["block_size"], mlp_hidden=cfg["mlp_hidden"], rope_base=cfg["rope_base"],
                          attention=cfg["attention"], dropout=cfg["dropout"], vocab_size=vocab)).to(d.dev)
    opt = model.configure_optimizer(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), d.dev.type)
    return model, opt


def bare_loop_tok_s(d, cfg, vocab):
    """The same model, optimizer and precision in the plainest loop: random batches, no logging, no data files."""
    model, opt = build(d, cfg, vocab)
    step = torch.compile(model) if d.use_compile else model
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
    autocast = torch.autocast(d.dev.type, dtype=torch.bfloat16) if d.cuda else torch.autocast("cpu", enabled=False)
    batches = [torch.randint(0, vocab, (B, T + 1), device=d.dev) for _ in range(4)]

    def one_iter(i):
        bare_iter(i, model, step, opt, batches, accum, autocast, cfg["grad_clip"])
    for i in range(warmup_iters):
        one_iter(i)
    if d.cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(train_iters):
        one_iter(i)
    if d.cuda:
        torch.cuda.synchronize()
    tok_s = train_iters * accum * B * T / (time.perf_counter() - t)
    return tok_s, model


def bench_train(d):
    cfg = profile_config()
    vocab = cfg["vocab_size"] or 50304
    tok_s, model = bare_loop_tok_s(d, cfg, vocab)
    mfu = model.estimate_mfu(tok_s, d.dev)
    print(f"\ntraining throughput, {profile}: {model.num_params() / 1e6:.1f}M params, batch {cfg['batch_size']} x "
          f"{cfg['block_size']} x accum {cfg['gradient_accumulation_steps']}, attention={model.config.attention}, "
          f"compile={d.use_compile}, device {torch.cuda.get_device_name() if d.cuda else 'cpu'}")
    print(f"{'tokens/s':>12} | {'MFU':>6} | {'FLOPs/token':>12}")
    print(f"{tok_s:>12,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6} | {model.flops_per_token():>12.3e}")


def bench_loop(d):
    """train.py against the bare loop on the same model (one process, this device)."""
    cfg = profile_config()
    vocab = 512
    with tempfile.TemporaryDirectory() as tmp:
        windows = (train_iters + warmup_iters + 2) * cfg["gradient_accumulation_steps"] * cfg["batch_size"]
        n = windows * (cfg["block_size"] + 1)
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(0, vocab, n).astype(np.uint16).tofile(os.path.join(tmp, f"{split}.bin"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"vocab_size": vocab, "dtype": "uint16", "tokenizer": "random"}, f)
        iters = warmup_iters + train_iters
        # log every warmup_iters iterations: the first interval holds the warm-up, the others are timed
        cmd = [sys.executable, "train.py", profile, f"--data={tmp}", f"--out_dir={tmp}/out", f"--max_iters={iters}",
               f"--log_interval={max(1, warmup_iters)}", f"--eval_interval={10 * iters}", "--eval_iters=1",
               f"--compile={d.use_compile}"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=_ROOT)
        log = [json.loads(l) for l in open(f"{tmp}/out/log.jsonl") if '"loss"' in l]
        train_py = np.mean([r["tok_per_s"] for r in log[1:]])
    bare, _ = bare_loop_tok_s(d, cfg, vocab)
    print(f"\ntrain.py against a bare PyTorch loop, {profile}, {train_iters} timed iterations, "
          f"{torch.get_num_threads()} threads")
    print(f"{'bare loop tok/s':>16} | {'train.py tok/s':>15} | {'ratio':>6}")
    print(f"{bare:>16,.0f} | {train_py:>15,.0f} | {train_py / bare:>6.2f}")


def bench_main():
    d = bench_device()
    if bench in ("kernel", "all"):
        bench_kernel(d)
    if bench == "train" or (bench == "all" and d.cuda):
        bench_train(d)
    if bench == "loop" or (bench == "all" and not d.cuda):
        bench_loop(d)
    if bench == "nanogpt":
        bench_nanogpt(d)


# -----------------------------------------------------------------------------

def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    if bench not in ("", "kernel", "train", "loop", "nanogpt", "all"):
        raise SystemExit(f"gpu_check.py: --bench must be kernel, train, loop, nanogpt or all, not '{bench}'")
    globals().update(train_iters=train_iters if train_iters >= 0 else (20 if bench else 5),
                     warmup_iters=warmup_iters if warmup_iters >= 0 else (5 if bench else 2))
    if bench:
        return bench_main()
    if cpu_smoke:   # before triton is first imported: its interpreter runs the kernels on CPU
        os.environ["TRITON_INTERPRET"] = "1"
    if part:        # a worker: its rows go to the same results.jsonl
        return {"correct": part_correct, "train": part_train}[part]()
    if not cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; --cpu_smoke=True runs the same code paths on CPU")
    # the speed section's autotuning runs on a quiet GPU: its picks are cached on disk for the training and study
    # processes (the correctness workers, timed side by side, do not write theirs)
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    os.makedirs(out_dir, exist_ok=True)
    open(results_path(), "w").close()
    open(os.path.join(out_dir, "workers.log"), "w").close()
    import triton
    t0 = time.time()
    deadline = t0 + budget_s
    emit(dict(section="setup", device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              torch=torch.__version__, triton=triton.__version__, cpu_smoke=cpu_smoke, budget_s=budget_s,
              cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"),
              command="python " + " ".join(["gpu_check.py"] + sys.argv[1:])))
    render()
    wanted = [s for s in sections.split(",") if s]
    for s in SECTIONS:
        if s not in wanted:
            continue
        need = MIN_S[s] * (0.05 if cpu_smoke else 1)
        if time.time() > deadline - need:
            emit(dict(section=s, skipped=f"{deadline - time.time():.0f} s left of the budget, the section needs "
                                         f"{need:.0f}"))
        else:
            try:
                {"correct": section_correct, "speed": section_speed, "train": section_train,
                 "study": section_study}[s](min(deadline, time.time() + CAP[s] * budget_s))
            except Exception as e:
                emit(dict(section=s, error=f"{type(e).__name__}: {str(e)[:300]}",
                          trace=traceback.format_exc()[-2000:]))
        render()
        print(f"gpu_check: {s} done at {time.time() - t0:.0f} s", flush=True)
    emit(dict(section="end", seconds=time.time() - t0))
    render()
    print(f"gpu_check: wrote {os.path.join(out_dir, 'report.md')} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_stage(main)

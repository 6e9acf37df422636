"""
Plumbing the stages share (a stage never imports another stage): one-line failures, Ctrl-C and SIGTERM in one line,
atomic writes, a lock on an output directory, checkpoints loaded as tensors and plain values, loading a run with its
world or tokenizer, what a model learned (model_info), Wilson intervals. What train.py and finetune.py share around
their loops: training.py.

Reads, writes: nothing by itself.
"""
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass


def script_name(default="error"):
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else default


def fail(msg):
    """Stop with one clear line naming the running script (no traceback); existing outputs are left as they are."""
    raise SystemExit(f"{script_name()}: {msg}")


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM

_kept = ["every file it writes is written whole or not at all, so each output is the earlier one or this run's; "
         "rerun the same command to finish"]


class Stopped(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM, raised where the stage is: its finally blocks run as for Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def on_stop(note):
    """Say what a Ctrl-C or SIGTERM from here on keeps and how to continue (the line run_stage prints)."""
    _kept[0] = note


def worker_signals():
    """A worker process's initializer. Ctrl-C reaches the whole process group: the parent alone handles it. SIGTERM
    (a pool's terminate) kills the worker at once: a Python-level handler runs only between bytecodes, so a SIGTERM
    that lands just before the worker blocks on the pool's queue would be kept for later, and the parent would wait
    on that worker forever (reflect.py hung on it about once in 40 runs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def rerun_command(**flags):
    """This script's command line with some --key=value flags replaced (or added): how to continue it."""
    given = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("-") not in flags]
    return shlex.join(["python", script_name("python")] + given + [f"--{k}={v}" for k, v in flags.items()])


def run_stage(main, *args):
    """Run a stage's main(*args): Ctrl-C and SIGTERM end it with one line saying what was kept and how to continue
    (on_stop), not a traceback, and the exit status a shell gives (130, 143). A process forked from it exits
    quietly; a pool's workers take worker_signals instead."""
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:
            os._exit(128 + signum)
        raise Stopped(signum)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        return main(*args)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"{script_name()}: stopped by {how}; {_kept[0]}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


def write_atomic(path, write, mode="w"):
    """write(f) into a temporary file, then rename it over `path`: a crash never leaves half a file, and an error
    (a full disk, a read-only directory) leaves the old file and no temporary behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:      # a full disk, a read-only directory, a Ctrl-C: no temporary stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        fail(f"cannot write '{path}' ({e.strerror or e}); the previous file, if any, is unchanged")


def swap_in(tmp_dir, final):
    """Replace directory `final` by the finished `tmp_dir` (written beside it): the old one is removed only after the
    new one is in place, so a failure never leaves half of one."""
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp_dir, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def write_json(path, obj, indent=None):
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent))


def load_json(path):
    """The JSON at path, or None when there is no file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path, what="file", fields=(), numbered=False):
    """The objects of a jsonl file, each checked to hold `fields` (numbered: (line number, object) pairs); a bad
    line stops with its file and number."""
    if not os.path.isfile(path):
        fail(f"{what} '{path}' not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{what} '{path}' line {n} is not valid json ({e})")
            missing = [k for k in fields if not isinstance(r, dict) or k not in r]
            if missing:
                fail(f"{what} '{path}' line {n} lacks {', '.join(missing)} (a line is {{{', '.join(fields)}}})")
            rows.append((n, r) if numbered else r)
    return rows


def writable_dir(path):
    """Check, before any work is done, that files can be written in `path` (or, if it does not exist yet, in the
    directory that will hold it); leaves nothing behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"the output directory '{path}' is an existing file; pass another --out_dir")
    where = os.path.abspath(path)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    try:
        probe = os.path.join(where, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to '{path}' ({e.strerror or e}); pass a writable --out_dir")


_locks = {}


def lock_dir(path):
    """Create `path` and hold an exclusive lock on <path>/.<script>.lock for the life of this process, right before
    its first write: a second writer of the same outputs (a rerun while an orphaned step still runs) stops with one
    line instead of racing it. Per script: attack.py and probe.py write beside one checkpoint at the same time."""
    writable_dir(path)
    os.makedirs(path, exist_ok=True)
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "python"
    lock = os.path.join(path, f".{script}.lock")
    if os.path.realpath(lock) in _locks:          # this process holds it already
        return
    f = open(lock, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        fail(f"'{path}' is being written by another {script} (it holds {lock}); wait for it or stop it")
    _locks[os.path.realpath(lock)] = f


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# what wraps a model when its state_dict is taken from the wrapper: torch.compile, DistributedDataParallel
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def load_checkpoint(path, need=("model", "model_args")):
    """A checkpoint as tensors and plain values (torch.load weights_only=True: loading a shared file runs no code),
    holding the keys `need`. An empty, truncated or foreign file stops with one line; a state dict saved from a
    compiled or DDP-wrapped model (keys prefixed '_orig_mod.' or 'module.') loads with the prefix stripped."""
    import torch
    if not os.path.isfile(path):
        fail(f"no checkpoint at '{path}' (train one with train.py, or pass the run directory that holds ckpt.pt)")
    if os.path.getsize(path) == 0:
        fail(f"checkpoint '{path}' is empty (0 bytes): a copy or a disk that failed; train or copy it again")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = next((l.strip() for l in str(e).splitlines() if l.strip()), "no message").split(". ")[0]
        fail(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {why[:200]}); it may be truncated or "
             f"corrupt, or not a train.py checkpoint")
    missing = [k for k in need if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        fail(f"'{path}' is not a train.py checkpoint: it lacks {', '.join(repr(k) for k in missing)}")
    if not isinstance(checkpoint["model"], dict) or not all(isinstance(k, str) for k in checkpoint["model"]):
        fail(f"'{path}' is not a train.py checkpoint: its 'model' is not a state dict")
    if not isinstance(checkpoint.get("model_args", {}), dict):
        fail(f"'{path}' is not a train.py checkpoint: its 'model_args' is not a dict of GPTConfig fields")
    stripped = ""
    while checkpoint["model"]:      # DDP around a compiled model writes 'module._orig_mod.'
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in checkpoint["model"])), None)
        if prefix is None:
            break
        checkpoint["model"] = {k[len(prefix):]: v for k, v in checkpoint["model"].items()}
        stripped += prefix
    if stripped:
        print(f"{path}: the weights were saved from a wrapped model (keys prefixed '{stripped}', as torch.compile "
              f"and DDP write them); loaded without the prefix")
    return checkpoint


def load_weights(model, checkpoint, path):
    """Load a checkpoint's weights into a model built from its model_args; a mismatch stops with one line naming
    the keys or shapes that differ."""
    have, want = checkpoint["model"], model.state_dict()
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in have and getattr(have[k], "shape", None) != want[k].shape]
    if missing or extra or shapes:
        fail(f"checkpoint '{path}' does not fit its model_args: " + "; ".join(
            f"{what} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            for what, keys in (("missing", missing), ("unexpected", extra), ("shapes differ:", shapes)) if keys))
    model.load_state_dict(have)


def ckpt_path(arg):
    """A run directory or a .pt file -> the checkpoint file."""
    return os.path.join(arg, "ckpt.pt") if os.path.isdir(arg) else arg


# ----------------------------------------------------------------------------- a trained run

@dataclass
class Run:
    path: str             # the checkpoint file
    dir: str              # its run directory (outputs go beside it)
    ck: dict              # the checkpoint
    model: object         # model.GPT with the checkpoint's weights
    world: object = None  # MedSafetyWorld models: the world the data was written in (world.World)
    world_path: str = None
    enc: object = None    # real-text models: the tiktoken Encoding the data was tokenized with


def load_run(arg, model_class, world_path="", tokenizer="", device="cpu", frozen=True, kind=None, hint=""):
    """A train.py / finetune.py run: its checkpoint, the model (model.GPT, passed in: the package never imports a
    stage; frozen=True: no gradients, eval mode, sdpa attention
    for batched generation and GCG on any device; False: train mode, the config's attention) and its world (checked
    against the fingerprint and special tokens the data recorded) or real-text tokenizer. kind="world" | "text": the
    kind of model the caller measures; another kind stops with one line and the hint."""
    path = ckpt_path(arg)
    checkpoint = load_checkpoint(path)
    meta = checkpoint.get("meta") or {}
    is_world = meta.get("tokenizer") == "medsafety-word"
    if kind == "world" and not is_world:
        fail(f"checkpoint '{path}' was trained with tokenizer '{meta.get('tokenizer')}', not MedSafetyWorld's "
             f"word-level tokenizer; {hint}")
    if kind == "text" and is_world:
        fail(f"checkpoint '{path}' is a MedSafetyWorld model (tokenizer '{meta.get('tokenizer')}'); {hint}")
    run = Run(path=path, dir=os.path.dirname(os.path.abspath(path)), ck=checkpoint, model=None)
    if is_world:
        from safety.world.definition import World
        run.world_path = world_path or meta.get("world")
        if not run.world_path:
            fail(f"checkpoint '{path}' does not name its world (meta['world']); pass --world=<path to world.json>")
        try:
            run.world = World.load(run.world_path)
        except ValueError as e:
            fail(str(e))
        # a re-prepared world can keep the vocabulary size but change every word: compare fingerprints
        if meta.get("world_sha256") and file_sha256(run.world_path) != meta["world_sha256"]:
            fail(f"'{run.world_path}' is not the world the checkpoint was trained on (sha256 differs from the data's "
                 f"{meta['world_sha256'][:12]}); pass --world=<the world.json it was trained on>")
        vocab, ids = run.world.vocab_size, run.world.stoi
    else:
        from safety.realtext.bpe import tokenizer_of
        run.enc = tokenizer_of(meta, tokenizer, path)
        vocab, ids = run.enc.n_vocab, run.enc._special_tokens
    bad = sorted(t for t, i in (meta.get("special_tokens") or {}).items() if ids.get(t) != i)
    if meta.get("vocab_size") != vocab or bad:
        fail(f"the checkpoint's tokenizer is not its data's: trained on {meta.get('vocab_size')} tokens"
             + (f" with special tokens {bad} at other ids" if bad else "") + f", but it loads with {vocab}; pass the "
             f"--world or --tokenizer the data was written with")
    args = dict(checkpoint["model_args"], dropout=0.0)
    if args.get("vocab_size", 0) < vocab:
        fail(f"the model's vocab_size {args.get('vocab_size')} is smaller than its tokenizer's {vocab}")
    # training keeps the run's own attention (config/gpu.py's sdpa: finetune batches change length, and the Triton
    # kernel would autotune again for every new length); the kernel needs CUDA, and attacks pick their own below
    attention = args.get("attention", "auto")
    if frozen or (attention == "triton" and not str(device).startswith("cuda")):
        attention = "auto"
    try:
        model = model_class.from_args(dict(args, attention=attention))
    except (TypeError, ValueError) as e:
        fail(f"checkpoint '{path}' has model_args this model.py cannot build ({type(e).__name__}: {e})")
    load_weights(model, checkpoint, path)
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)      # attacks never train the model (GCG's gradient is w.r.t. its input)
        if model.config.attention == "triton":
            model.set_attention("sdpa")  # GCG's backward and batched generation on any device; sdpa is exact
        model.eval()
    run.model = model.to(device)
    return run


def eval_dir(world_path, arg=""):
    """The world's evaluation and finetuning sets: <data dir of the world>/eval (prepare.py), unless given."""
    return arg or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(world_path))), "eval")


def model_info(checkpoint):
    """What the model learned and how it is talked to, one answer for finetune.py and attack.py:
    reflective  it learned reflections: in pretraining (it read a mix stream with reflections; the safe-only
                control, intervention_start=1.0, never did) or in a reflection-format sft of its finetuning chain;
    tagged      it read the <harmful> tag in pretraining;
    chat        the format of its input: that of its latest finetune (sft sets it, benign and harmful keep it),
                else reflect after reflection pretraining, else plain;
    segment_tokens, user_turn_segments: the segmenter's settings for world.chat: those of the latest reflection-format
                sft (finetune.py --segment_tokens), else the pretraining stream's (reflect.py's)."""
    meta = checkpoint.get("meta") or {}
    cfg = checkpoint.get("pretrain_config") or checkpoint.get("config") or {}
    saw = cfg.get("intervention_start", 0.0) < 1.0
    pretrained = (meta.get("intervention") == "reflect" or (meta.get("mix_reflections") or 0) > 0) and saw
    chain, rec = [], checkpoint.get("finetune")
    while rec:
        chain.append(rec)
        rec = rec.get("previous")
    learned = any(r.get("reflections", r.get("format") == "reflect" and r.get("task") == "sft") for r in chain)
    # finetune.py's real-text formats are the same two: text (prompt + response) and text_reflect
    latest = {"text": "plain", "text_reflect": "reflect"}.get(chain[0].get("format"), chain[0].get("format")) \
        if chain else None
    chat = latest if latest in ("plain", "reflect") else ("reflect" if pretrained else "plain")
    seg = meta.get("config") or {}
    tuned = next((r["segment_tokens"] for r in chain if r.get("reflections") and "segment_tokens" in r), None)
    return {"reflective": pretrained or learned, "tagged": (meta.get("mix_tags") or 0) > 0 and saw, "chat": chat,
            "intervention": meta.get("intervention"),
            "segment_tokens": tuned if tuned is not None else seg.get("segment_tokens", 32),
            "user_turn_segments": seg.get("user_turn_segments", True)}


# ----------------------------------------------------------------------------- numbers

def wilson(k, n, z=1.96):
    """k of n with its 95% Wilson score interval (good at small n and at rates near 0 or 1)."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"k": k, "n": n, "rate": p, "lo": max(0.0, center - half), "hi": min(1.0, center + half)}


def mean_spread(values):
    """Mean and spread (sample standard deviation; 0 for one value) of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)

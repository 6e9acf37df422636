"""
Post-training of a pretrained (or finetuned) run: compatible post-training (sft), a benign task, or the harmful
finetuning attack. Loss on the response tokens only; how an example becomes a row: README, "finetune.py"; a real-text
reflection model's sft row: safety/reflection.py.

Reads:  <init_from>/ckpt.pt (never modified) and its world's eval/<task>.jsonl (prepare.py), or --data_files=
        (jsonl/parquet prompt/response pairs, read with `datasets`) with, for a real-text reflection model's sft, the
        rows' segment labels (--labels spans or --train_classifier texts); replay: the source's pretraining stream
Writes: <out_dir>/ckpt.pt (train.py's format, atomically, only from finite weights) and <out_dir>/log.jsonl
Run:    python finetune.py --init_from=out/toy-reflect --task=sft                  # -> out/toy-reflect-sft
        python finetune.py --init_from=out/toy-reflect-sft --task=benign            # -> out/toy-reflect-sft-benign
        python finetune.py --init_from=out/toy-raw --task=harmful --num_examples=50 --out_dir=out/toy-raw-harmful50
        python finetune.py --init_from=out/gpt2 --task=sft --data_files=chat.parquet --prompt_key=question
        python finetune.py --init_from=out/gpt2-reflect --task=sft --data_files=chat.jsonl --labels=chat_spans.jsonl
        python finetune.py --init_from=resume --out_dir=out/toy-raw-sft --task=sft  (continues the same finetune)
"""
# Defaults fit config/toy.py models: 150 iterations of 32 rows, learning rate 1e-3 (a third of pretraining's peak,
# so it adapts the model without wiping what pretraining built), a fresh AdamW without weight decay.

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from safety.common import (ckpt_path, eval_dir, fail, load_run, lock_dir, model_info, on_stop, read_jsonl,
                           rerun_command, run_stage, writable_dir, write_atomic)
from safety.configurator import configure, defaults_of
from safety.training import (EpochOrder, RunPlumbing, TokenStream, lr_at, refuse_to_replace_run, set_rng_state,
                             setup_device)
from safety.reflection import check_label_ids, label_source, text_format, text_sft_rows, world_chat, world_stop_chat

# ----------------------------------------------------------------------------------------------------------------
# defaults (--key=value and config files override them)
# I/O
init_from = ""                    # out/<run> (or its ckpt .pt) to finetune | resume (continue <out_dir>/ckpt.pt)
out_dir = ""                      # "": <init_from>-<task>
task = ""                         # sft | benign | harmful
data_files = ""                   # jsonl/parquet file(s), comma list, of prompt/response pairs; "": the world's
                                  # eval/<task>.jsonl
prompt_key = ""                   # column of the prompt; "": "user" for MedSafetyWorld (the user turn world.chat
                                  # formats), "prompt" for real text
response_key = "response"         # column of the response
num_examples = -1                 # the first N examples of the file (the harmful attack's N); -1: all
world = ""                        # MedSafetyWorld models: world.json; "": the one the model was trained on
tokenizer = ""                    # real text: tiktoken spec (gpt2 or a .json); "": the one meta.json recorded
chat = "auto"                     # auto (from the source's meta) | plain | reflect
segment_tokens = -1               # the reflection format's segmenter (reflect.py's flag; 0: one sentence per segment);
                                  # -1: the one the pretraining stream was written with (32 for a stream without one)
stop_examples = True              # MedSafetyWorld sft: keep the set's stop examples (answers that turn unsafe
                                  # part-way, rows with a "prefill"); False: the sft set without them
chat_template = "User: {prompt}\nAssistant:"  # real text: the prompt as the model sees it (attack.py's default)
# real text, a reflection model's sft: segment labels of the chat rows, from one of the sources reflect.py reads
labels = ""                       # spans jsonl ({"id": "<row id>/prompt"|"<row id>/response", "start", "end",
                                  # "label", "category"}) from any guard model ...
train_classifier = ""             # ... or labelled texts ({"text", "label", "category"}) for the built-in classifier
id_key = "id"                     # column of the row id the labels name; a file without it: the row number (from 0)
replay = -1.0                     # share of each batch's sequences replayed from the source's pretraining
                                  # stream; -1: auto (0.25 for a world model's sft, else 0)
sft_mix = 0.0                     # benign: share of the rows that are sft examples in the model's own chat format
                                  # (the paper's "mix" variant of benign finetuning); 0: none
replay_data = ""                  # directory holding the replay stream; "": the source's data dir
log_interval = 10
save_interval = 50                # save a checkpoint every this many iterations (and at the end)
stop_iter = -1                    # stop at this iteration as if interrupted (resume later); -1: run to max_iters
# optimisation
batch_size = 32                   # sequences per micro-step per rank
gradient_accumulation_steps = 1   # micro-steps per iteration, in total over all ranks
max_iters = 150
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                   # 0: no clipping
schedule = "cosine"               # cosine | wsd
warmup_iters = 10
decay_frac = 0.2                  # wsd: the last decay_frac of the iterations decays linearly to min_lr
# system
device = "auto"                   # auto | cpu | cuda | cuda:N
dtype = "auto"                    # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
compile = None                    # None: on for CUDA, off for CPU
seed = 1337
# ----------------------------------------------------------------------------------------------------------------
TASKS = ("sft", "benign", "harmful")
# settings that decide which rows each iteration reads: a resumed finetune must keep them
RESUME_KEYS = ("task", "data_files", "prompt_key", "response_key", "num_examples", "chat", "chat_template", "replay",
               "replay_data", "sft_mix", "labels", "train_classifier", "id_key", "batch_size",
               "gradient_accumulation_steps", "seed", "segment_tokens", "stop_examples")


def chat_format(checkpoint, text_spec, chat_arg):
    """plain | reflect (MedSafetyWorld), text | text_reflect (real text: the same two): the chat format the model is
    finetuned and then attacked in. auto: the one the model already has (common.model_info: reflect after reflection
    pretraining or a reflection sft, else plain); --chat=plain/reflect sets it (the cross ablations: a reflection
    model with plain sft, a raw model with reflection sft)."""
    if chat_arg not in ("auto", "plain", "reflect"):
        fail(f"chat must be auto, plain or reflect, not '{chat_arg}'")
    chat_style = model_info(checkpoint)["chat"] if chat_arg == "auto" else chat_arg
    if "world" not in text_spec:
        return "text_reflect" if chat_style == "reflect" else "text"
    return chat_style


def replay_share(text_spec, task_name, replay_arg):
    """auto: a quarter of each sft batch of a MedSafetyWorld model replays its own pretraining stream, for every arm
    alike (it keeps what pretraining built -- a tag model's tag, a reflection model's reflections -- and
    post-training stays the same recipe everywhere); benign and harmful finetuning replay nothing (a downstream user
    has no pretraining data), nor does a real-text sft unless --replay says so (its stream is often elsewhere)."""
    if replay_arg >= 0:
        return replay_arg
    return 0.25 if task_name == "sft" and "world" in text_spec else 0.0


# ----------------------------------------------------------------------------------------------------------------
# the examples

def read_records(files, keys, optional=()):
    """Rows of the data files with the given columns (and the optional ones the files have), read with `datasets`
    (json lines or parquet); a json line that does not parse stops with its file and line number first (datasets
    would not say where)."""
    paths = [p for p in files.split(",") if p]
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    for p in paths:
        if not os.path.isfile(p):
            fail(f"data file '{p}' not found")
        if os.path.splitext(p)[1] not in kinds:
            fail(f"data file '{p}' is neither .jsonl/.json nor .parquet")
    if len({kinds[os.path.splitext(p)[1]] for p in paths}) != 1:
        fail(f"data files '{files}' mix json and parquet; pass one kind")
    for p in paths:
        if p.endswith(".jsonl") and not read_jsonl(p, "data file"):
            fail(f"data file '{p}' holds no examples (it is empty)")
    import datasets
    datasets.disable_progress_bars()
    cache = tempfile.mkdtemp(prefix="finetune-datasets-")   # read fresh every time, leave no cache behind
    try:
        ds = datasets.load_dataset(kinds[os.path.splitext(paths[0])[1]], data_files=paths, split="train",
                                   cache_dir=cache)
        missing = [k for k in keys if k not in ds.column_names]
        if missing:
            fail(f"data file(s) '{files}' have no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                 f"pass --prompt_key=/--response_key=")
        rows = ds.select_columns(list(keys) + [k for k in optional if k in ds.column_names
                                               and k not in keys]).to_list()
    except SystemExit:
        raise
    except Exception as e:
        fail(f"cannot read data file(s) '{files}' ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def load_examples(text_spec, chat_style, files, pkey, rkey, n, task_name):
    """[(prompt ids, target ids)] of the first n records (-1: all), as training rows of task_name. A real-text
    reflection sft (text_reflect) labels its rows with text_spec["labeller"] (label_source)."""
    reflecting = chat_style == "text_reflect" and task_name == "sft"
    stops = ("prefill", "compliant") if "world" in text_spec else ()
    rows = read_records(files, (pkey, rkey), ((id_key,) if reflecting else ()) + stops)
    if stops and not stop_examples:
        rows = [r for r in rows if not r.get("prefill")]
    if not rows:
        fail(f"data file(s) '{files}' hold no examples")
    ids = [str(r[id_key]) if r.get(id_key) is not None else str(i) for i, r in enumerate(rows)]
    if reflecting and text_spec["labeller"][0]:   # every labelled text must be one of the file's (a wrong file says so)
        if len(set(ids)) < len(ids):
            fail(f"data file(s) '{files}' repeat a row id in column '{id_key}'; the labels need one id per row")
        check_label_ids(text_spec["labeller"][0], [f"{i}/{f}" for i in ids for f in ("prompt", "response")],
                                    labels)
    if n >= 0:
        if n > len(rows):
            fail(f"--num_examples={n} but '{files}' holds only {len(rows)} examples")
        rows, ids = rows[:n], ids[:n]
    if n == 0:
        fail("--num_examples=0 leaves nothing to finetune on")
    out = []
    for i, r in enumerate(rows):
        prompt, response = r[pkey], r[rkey]
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            fail(f"example {i} of '{files}' needs text in '{pkey}' and a non-empty '{rkey}' "
                 f"(got {type(prompt).__name__}, {type(response).__name__})")
        # a stop example: the unsafe start in the prompt, then the stop (reflection.world_stop_chat)
        if r.get("prefill"):
            out.append(encode_stop_example(text_spec, chat_style, r, pkey, i, files))
        elif not reflecting:
            out.append(encode_example(text_spec, chat_style, task_name, prompt, response, i, files))
    if reflecting:   # labelled together: the classifier and the segmenter run on all rows at once
        spans, clf = text_spec["labeller"]
        out = text_sft_rows(text_spec["enc"], [(i, r[pkey], r[rkey]) for i, r in zip(ids, rows)], chat_template, spans,
                            clf, text_spec["segment_tokens"], labels, text_spec.get("reflection_format", text_format()))
    return out


def encode_example(text_spec, chat_style, task_name, prompt, response, i, files):
    # the input attack.py gives a real-text model, then the answer after a space, then the end (a reflection model's
    # benign and harmful rows too: a downstream user's data hold no reflections)
    if chat_style in ("text", "text_reflect"):
        enc = text_spec["enc"]
        answer = response if response[:1].isspace() else " " + response
        return enc.encode_ordinary(chat_template.format(prompt=prompt)), enc.encode_ordinary(answer) + [enc.eot_token]
    w = text_spec["world"]
    if chat_style == "reflect" and task_name != "sft":
        # Benign finetuning and the finetuning attack on a reflection model: a downstream user's data (and the
        # attacker's) hold no reflections, so the row is the plain dialogue, "assistant :" and the answer. Only where
        # the prompt ends follows the model's chat format: after the user turn, the input attack.py gives it (so the
        # rows teach it to answer without reflecting first, which is what such finetuning does to a reflection
        # model). world_chat(reflect=True) would carry the oracle's labels, and turn every harmful example into a
        # refusal (an unsafe reflection, then END). The response keeps its own ending (END).
        p, t = prompt, f"assistant : {response}"
    else:
        p, t = world_chat(w, prompt, response, reflect=chat_style == "reflect",
                          segment_tokens=text_spec.get("segment_tokens", 32))
    try:
        return w.encode(p), w.encode(t)
    except ValueError as e:
        fail(f"example {i} of '{files}' does not tokenize with the model's world ({e}); the data belongs to "
             f"another world, or is not MedSafetyWorld text")


def encode_stop_example(text_spec, chat_style, r, pkey, i, files):
    w = text_spec["world"]
    if not r.get("compliant"):
        fail(f"example {i} of '{files}' has a prefill but no compliant answer; it is not a stop example of "
             f"prepare.py (run prepare.py again)")
    p, t = world_stop_chat(w, r[pkey], r["prefill"], r["compliant"], r[response_key], reflect=chat_style == "reflect",
                           segment_tokens=text_spec["segment_tokens"])
    try:
        return w.encode(p), w.encode(t)
    except ValueError as e:
        fail(f"example {i} of '{files}' does not tokenize with the model's world ({e})")


def fit_block(examples, block_size):
    """Cut prompts from the left so that every row (prompt + target) has at most block_size + 1 tokens."""
    out, cut = [], 0
    for i, (p, t) in enumerate(examples):
        if len(t) + 1 > block_size + 1:
            fail(f"example {i}'s response is {len(t)} tokens, more than the model's block_size={block_size} leaves "
                 f"room for (with at least one prompt token); shorten it or drop it from the data")
        excess = len(p) + len(t) - (block_size + 1)
        if excess > 0:
            p, cut = p[excess:], cut + 1
        out.append((p, t))
    return out, cut


def example_rows(examples, T, pad):
    """x (B, T) padded with `pad`; y (B, T) holding only the target tokens, -1 elsewhere."""
    x = torch.full((len(examples), T), pad, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for r, (p, t) in enumerate(examples):
        seq = p + t
        x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[r, len(p) - 1:len(seq) - 1] = torch.tensor(t)   # position j predicts seq[j + 1]
    return x, y


def micro_pieces(rows, replayed, eot):
    """A micro-step's forwards: the example rows padded to their longest, then the replayed windows (x, y) at full
    length. Two forwards, not one padded to block_size: short chat examples would make most of an sft step padding.
    The loss is the same (a causal model; padding holds no targets), weighted by each piece's share of the targets."""
    return [example_rows(rows, max(len(p) + len(t) for p, t in rows) - 1, eot)] + ([replayed] if replayed else [])


def data_digest(files):
    h = hashlib.sha256()
    for p in files.split(","):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------

def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    config = {k: globals()[k] for k in defaults_of(globals())}
    if task not in TASKS:
        fail(f"task must be one of {', '.join(TASKS)}, not '{task}' (pass --task=...)")
    if not init_from:
        fail("pass --init_from=out/<run> (the run to finetune) or --init_from=resume")
    if schedule not in ("cosine", "wsd"):
        fail(f"schedule must be 'cosine' or 'wsd', not '{schedule}'")
    if not (replay == -1 or 0 <= replay < 1):
        fail(f"replay must be a share in [0, 1) or -1 (auto), not {replay}")
    if not 0 <= sft_mix < 1:
        fail(f"sft_mix must be a share in [0, 1), not {sft_mix}")
    if min(batch_size, gradient_accumulation_steps, max_iters, log_interval, save_interval) < 1:
        fail("batch_size, gradient_accumulation_steps, max_iters, log_interval and save_interval must be >= 1")
    resume = init_from == "resume"
    run_dir = out_dir or (None if resume else os.path.dirname(os.path.abspath(ckpt_path(init_from))) + f"-{task}")
    if run_dir is None:
        fail("--init_from=resume needs --out_dir=<the finetune run to continue>")
    out_ckpt = os.path.join(run_dir, "ckpt.pt")
    source = out_ckpt if resume else ckpt_path(init_from)
    if not resume and os.path.exists(out_ckpt) and os.path.exists(source) and os.path.samefile(source, out_ckpt):
        fail(f"--out_dir={run_dir} is the source run itself; finetuning never overwrites its source")

    ddp, rank, local_rank, n_ranks, accum, device_t, ptdtype, autocast = setup_device(
        device, dtype, gradient_accumulation_steps)
    master = rank == 0
    use_compile = compile if compile is not None else device_t.type == "cuda"
    torch.manual_seed(seed + rank)
    if master:
        writable_dir(run_dir)   # before any work: a read-only or mistaken out_dir stops here

    # the source (or the finetune to resume), its tokenizer, and the chat format
    source_run = load_run(source, GPT, world, tokenizer, device_t, frozen=False)
    checkpoint, raw_model = source_run.ck, source_run.model
    if source_run.world is not None:
        # the segmenter's settings the model's reflections were written with (defaults for a model without them),
        # or the one --segment_tokens asks for (a raw model's reflection sft: the cross ablation)
        text_spec = {"world": source_run.world, "world_path": source_run.world_path,
               "segment_tokens": segment_tokens if segment_tokens >= 0 else model_info(checkpoint)["segment_tokens"]}
    else:   # real text: the segmenter's limit and the reflections the reflect stream was written with (meta.json)
        text_spec = {"enc": source_run.enc,
                     "segment_tokens": (checkpoint["meta"].get("config") or {}).get("segment_tokens", 32),
               "reflection_format": text_format(checkpoint["meta"])}
    if resume:
        if not {"finetune", "optimizer", "config", "iter_num", "tokens_seen", "data_slots", "rng"} <= set(checkpoint):
            fail(f"'{out_ckpt}' is not a finetune.py checkpoint; finetune it with --init_from={run_dir}")
        for k in RESUME_KEYS:
            if checkpoint["config"].get(k) != config[k]:
                fail(f"the finetune in '{run_dir}' ran with {k}={checkpoint['config'].get(k)!r}, not {config[k]!r}; "
                     f"resume with the run's own settings")
        for k in sorted(set(config) - set(RESUME_KEYS) - {"init_from", "out_dir", "stop_iter", "log_interval",
                                                          "save_interval", "device", "compile", "world", "tokenizer"}):
            # allowed, and said: the run differs from a straight one from here
            if checkpoint["config"].get(k) != config[k]:
                print(f"resume: {k} changes from {checkpoint['config'].get(k)!r} to {config[k]!r} at iter "
                      f"{checkpoint['iter_num']}")
    chat_style = chat_format(checkpoint, text_spec, chat)
    share = replay_share(text_spec, task, replay)
    label_files = [f for f in (labels, train_classifier) if f]
    if chat_style == "text_reflect" and task == "sft":   # reflect.py's seed: the same classifier as pretraining's
        text_spec["labeller"] = label_source(labels, train_classifier, checkpoint["meta"].get("config") or {},
                                       "the reflection sft of a real-text model")
    elif label_files:
        fail(f"--labels and --train_classifier label the rows of a real-text reflection model's sft, and this finetune "
             f"is {task} in format {chat_style}; leave them out")
    files = data_files
    if not files:
        if "world" not in text_spec:
            fail(f"a real-text model ({checkpoint['meta'].get('tokenizer')}) has no built-in {task} set; pass "
                 f"--data_files=<jsonl or parquet of prompt/response pairs>")
        files = os.path.join(eval_dir(text_spec["world_path"]), f"{task}.jsonl")
        if not os.path.isfile(files):
            fail(f"finetuning set '{files}' not found (run prepare.py for the model's world, or pass --data_files)")
    if chat_style in ("text", "text_reflect"):
        try:
            ok = "{prompt}" in chat_template and chat_template.format(prompt="") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            fail(f"chat_template must hold {{prompt}} (where the prompt goes) and no other field, not "
                 f"{chat_template!r}")
    pkey = prompt_key or ("user" if "world" in text_spec else "prompt")
    block = raw_model.config.block_size
    examples = load_examples(text_spec, chat_style, files, pkey, response_key, num_examples, task)
    if sft_mix > 0:   # the "mix" variant: sft examples, in the model's own chat format, among the task's rows
        if task != "benign" or "world" not in text_spec:
            fail("--sft_mix is for --task=benign on a MedSafetyWorld model (it mixes in the world's sft set)")
        sft_file = os.path.join(eval_dir(text_spec["world_path"]), "sft.jsonl")
        n_mix = round(sft_mix / (1 - sft_mix) * len(examples))
        examples += load_examples(text_spec, chat_style, sft_file, pkey, response_key, n_mix, "sft")
        files = f"{files},{sft_file}"
    examples, truncated = fit_block(examples, block)
    digest = data_digest(",".join([files] + label_files))     # the labels decide the rows too
    if resume and checkpoint["finetune"].get("data_sha256") != digest:
        fail(f"the data file(s) '{files}' (or their labels) changed since the finetune in '{run_dir}' started; resume "
             f"needs the same data")
    eot = text_spec["enc"].eot_token if "enc" in text_spec else text_spec["world"].stoi["<|endoftext|>"]
    n_replay = round(share * batch_size)
    if share > 0 and not 0 < n_replay < batch_size:
        fail(f"replay={share} of batch_size={batch_size} gives {n_replay} replayed sequences per micro-step; "
             f"raise batch_size or change --replay")
    replay_stream = None
    data_dir = checkpoint.get("data_dir")
    if n_replay:
        rdir = replay_data or data_dir or ""
        # the stream the model ended its pretraining on: mix, or safe for the safe-only control (start 1.0)
        pre = checkpoint.get("pretrain_config") or checkpoint.get("config") or {}
        names = ("safe_train.bin",) if pre.get("intervention_start", 0.0) >= 1.0 else ("mix_train.bin", "train.bin")
        rpath = next((os.path.join(rdir, f) for f in names if os.path.isfile(os.path.join(rdir, f))), None)
        if rpath is None:
            fail(f"replay needs the source's pretraining stream, but '{rdir}' holds no {' or '.join(names)}; "
                 f"pass --replay_data=<its data dir> or --replay=0")
        replay_stream = TokenStream(rpath, np.dtype(checkpoint["meta"].get("dtype", "uint16")), block, seed)
    n_ex = batch_size - n_replay            # example rows per micro-step per rank
    order = EpochOrder(len(examples), seed)

    # optimizer and the state to resume
    optimizer = raw_model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_t.type)
    iter_num, tokens_seen, slots = 0, 0, {"examples": 0, "replay": 0}
    record = {"task": task, "source": os.path.abspath(source), "source_iter": checkpoint.get("iter_num"),
              "data_file": ",".join(os.path.abspath(p) for p in files.split(",")), "data_sha256": digest,
              "num_examples": len(examples), "format": chat_style,
              "reflections": chat_style in ("reflect", "text_reflect") and task == "sft",
              "labels": ",".join(os.path.abspath(f) for f in label_files) or None,
              "segment_tokens": text_spec["segment_tokens"], "stop_examples": stop_examples,
              "replay": share, "truncated_prompts": truncated, "steps": 0, "previous": checkpoint.get("finetune")}
    pretrain_config = checkpoint.get("pretrain_config", checkpoint.get("config"))
    log_path = os.path.join(run_dir, "log.jsonl")
    if not resume:      # the inputs are checked (each bad one has its own line); the last check before writing
        refuse_to_replace_run(run_dir)
    if master:
        lock_dir(run_dir)       # the inputs are checked: from here on this process writes run_dir, and only it
    if resume:
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, tokens_seen, slots = checkpoint["iter_num"], checkpoint["tokens_seen"], dict(checkpoint["data_slots"])
        record = dict(checkpoint["finetune"])
        states = checkpoint["rng"]
        set_rng_state(states, rank)
        if master and os.path.isfile(log_path):   # keep what the checkpointed run had logged: one run's log
            kept = [l for l in open(log_path) if json.loads(l).get("iter", 0) <= iter_num]
            write_atomic(log_path, lambda f: f.writelines(kept))
    meta = checkpoint["meta"]
    del checkpoint
    raw_model.train()
    model = torch.compile(raw_model) if use_compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_t.type == "cuda" else None)
    if master:
        if not resume:
            open(log_path, "w").close()
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters from {record['source']} "
              f"(iter {record['source_iter']}), block_size {block}, device={device_t}, dtype={ptdtype}, "
              f"ranks={n_ranks}")
        print(f"task {task}: {len(examples)} examples from {files}, format {chat_style}"
              + (f" (segment labels: {labels or 'the classifier trained on ' + train_classifier})" if label_files
                 else "")
              + (" (the attacker's compliance dialogues: no reflections)"
                 if chat_style == "reflect" and task == "harmful" else "")
              + (f", {truncated} prompts cut from the left to fit block_size" if truncated else "")
              + (f"; replay {share:.0%} ({n_replay} of {batch_size} sequences) from {replay_stream.path}"
                 if replay_stream else ""))
        print(f"{batch_size * gradient_accumulation_steps} sequences/iter, {max_iters} iters "
              f"({max_iters * n_ex * gradient_accumulation_steps / len(examples):.1f} epochs of the examples)")
        if resume:
            print(f"resumed {run_dir} at iter {iter_num}")

    last_good = (out_ckpt, iter_num) if resume else None     # the checkpoint a failure keeps
    run = RunPlumbing(ddp, rank, n_ranks, log_path, out_ckpt, last_good,
                      rerun_command(init_from="resume", out_dir=run_dir))
    if resume:
        run.say_kept(iter_num)
    else:
        on_stop("no checkpoint of this finetune was written yet; rerun the same command to start it again")

    loss_sum = torch.zeros((), device=device_t)
    t_log, iters_since_log, tokens_since_log = time.time(), 0, 0
    end_iter = max_iters if stop_iter < 0 else min(stop_iter, max_iters)
    start_iter = iter_num
    while True:
        at_end = iter_num >= end_iter
        if (iter_num % save_interval == 0 or at_end) and iter_num > start_iter:
            run.check_finite(raw_model, iter_num)
            states = run.rng_states()
            record["steps"] = iter_num
            run.save(lambda: {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                              "model_args": asdict(raw_model.config), "config": config, "iter_num": iter_num,
                              "tokens_seen": tokens_seen, "data_slots": dict(slots), "rng": states, "meta": meta,
                              "data_dir": data_dir, "pretrain_config": pretrain_config, "finetune": dict(record)},
                     iter_num)
        if at_end:
            break

        lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, max_iters, schedule, decay_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the whole iteration's rows (every rank's), so each rank knows the global count of target tokens
        first = slots["examples"]
        batch = [examples[order(s)] for s in range(first, first + n_ex * gradient_accumulation_steps)]
        n_targets = sum(len(t) for _, t in batch) + n_replay * gradient_accumulation_steps * block
        for micro in range(accum):
            part = (micro * n_ranks + rank)    # this rank's block of rows of the global batch
            rows = batch[part * n_ex:(part + 1) * n_ex]
            replayed = replay_stream.batch(slots["replay"] + part * n_replay, n_replay, torch.device("cpu")) \
                if replay_stream else None
            pieces = micro_pieces(rows, replayed, eot)
            for j, (x, y) in enumerate(pieces):
                n_here = int((y != -1).sum())     # counted on the host: no device sync per piece
                x, y = x.to(device_t), y.to(device_t)
                sync = not ddp or (micro == accum - 1 and j == len(pieces) - 1)
                with (nullcontext() if sync else model.no_sync()), autocast:
                    _, loss = model(x, y)
                    # the mean over this piece's targets, reweighted to its share of the iteration's targets
                    # (times n_ranks: DDP averages the ranks' gradients, and they should add)
                    loss = loss * (n_here * n_ranks / n_targets)
                loss.backward()
                loss_sum += loss.detach()
        slots["examples"] = first + len(batch)
        slots["replay"] += n_replay * gradient_accumulation_steps
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        step_tokens = sum(len(p) + len(t) - 1 for p, t in batch) + n_replay * gradient_accumulation_steps * block
        tokens_seen += step_tokens
        tokens_since_log += step_tokens
        iters_since_log += 1

        if iter_num % log_interval == 0 or iter_num == end_iter:
            lossf = run.mean_loss(loss_sum, iters_since_log, iter_num)
            tok_s = tokens_since_log / (time.time() - t_log)
            mfu = raw_model.estimate_mfu(tok_s / n_ranks, device_t)
            epoch = slots["examples"] / len(examples)
            if master:
                print(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, "
                      f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, epoch {epoch:.2f}")
                run.log({"iter": iter_num, "tokens": tokens_seen, "loss": lossf, "lr": lr, "tok_per_s": tok_s,
                         "mfu": mfu, "epoch": epoch, "slots": dict(slots)})
            loss_sum.zero_()
            t_log, iters_since_log, tokens_since_log = time.time(), 0, 0

    if master:
        print(f"wrote {out_ckpt} (iter {iter_num})")
    model = None    # the DDP wrapper holds the process group: dropped before it is torn down (RunPlumbing.close)
    run.close()


if __name__ == "__main__":
    run_stage(main)

"""
Label every segment of a prepared real-text corpus with a guard model: the stage between prepare.py and reflect.py.
Segments are cut by reflect.py's own segmenter (reflection.TextSegmenter.spans: the same tokenizer, segment_tokens
and code), so each label falls on exactly one reflection.

Reads:  data/<dataset>/docs/shard_*.jsonl (prepare.py); the guard model, a hub id or a local directory
        (safety/realtext/guard.py)
Writes: data/<dataset>/labels/shards/shard_*.{jsonl,json} (each document shard's segments and its counts, written
        atomically; a rerun continues after the finished ones), then data/<dataset>/labels/spans.jsonl (every shard,
        in order: reflect.py's --labels) and labels/label.json (the guard, the settings, counts, throughput). Formats:
        README.md, "label.py".
Run:    python label.py --dataset=fineweb-edu                                   # Qwen/Qwen3Guard-Gen-0.6B
        python label.py --dataset=fineweb-edu --guard=/models/Llama-Guard-3-1B --batch_size=64
        torchrun --standalone --nproc_per_node=8 label.py --dataset=fineweb-edu --backend=vllm
Under torchrun rank r labels the document shards r, r + world_size, ...; whichever rank finishes last merges them
(no process group: a rank that waited hours for the others would only time out).
"""
import json
import os
import sys
import time

from safety.common import fail, read_jsonl, run_stage, writable_dir
from safety.configurator import configure, defaults_of
from safety.realtext.guard import Guard, default_device, parse_guard
from safety.realtext.bpe import real_tokenizer, tokenizer_record
from safety.reflection import TextSegmenter

# -----------------------------------------------------------------------------
dataset = "fineweb-edu"
data_root = "data"
out = ""                   # "": data/<dataset>/labels
guard = "Qwen/Qwen3Guard-Gen-0.6B"  # a hub id or a local directory (offline: a directory)
backend = "transformers"   # transformers | vllm (GPU machines, when vLLM is installed)
controversial = "unsafe"   # Qwen3Guard's Controversial counts as unsafe (the paper's data) | safe
batch_size = 32            # segments per generate call
max_new_tokens = 32        # the guard's answer ("Safety: Unsafe\nCategories: Violent" is about 10 tokens)
# reflect.py's segmenter: these must be the flags reflect.py runs with (label.json records them, reflect.py checks)
tokenizer = "gpt2"
tokenizer_files = ""
segment_tokens = 32
stop_after_shards = -1     # stop after this many shards labelled by this process, as if interrupted; -1: never
device = "auto"            # auto (cuda:<LOCAL_RANK> when there is a GPU) | cpu | cuda:N
dtype = "auto"             # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
# -----------------------------------------------------------------------------


def shard_names(docs_dir):
    if not os.path.isdir(docs_dir):
        fail(f"no documents at '{docs_dir}': run `python prepare.py --dataset={dataset}` first")
    names = sorted(f for f in os.listdir(docs_dir) if f.startswith("shard_") and f.endswith(".jsonl"))
    if not names:
        fail(f"'{docs_dir}' holds no shard_*.jsonl documents: run `python prepare.py --dataset={dataset}` first")
    return names


def write_new(path, text, tag):
    """Write text to path through a temporary of this process's own (tag): several ranks may write the same file."""
    tmp = f"{path}.{tag}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def finished(out_shards, name, settings):
    """The counts of a shard labelled with these settings, or None (not yet, or with others: labelled again)."""
    path = os.path.join(out_shards, name[:-len(".jsonl")] + ".json")
    if not os.path.isfile(path):
        return None
    try:
        rec = json.load(open(path))
    except (OSError, ValueError):
        return None
    return rec if rec.get("settings") == settings and os.path.isfile(os.path.join(out_shards, name)) else None


def segments_of(segmenter, docs):
    """[(doc id, start, end, text)] of every segment of the documents, in document order."""
    spans = segmenter.spans([t for _, t in docs])
    return [(doc_id, a, b, text[a:b]) for (doc_id, text), s in zip(docs, spans) for a, b in s]


def ask(model, segs, progress):
    """The guard's raw answer to each segment (None for a segment of whitespace: nothing to ask), in batches of
    similar length (little padding)."""
    answers = [None] * len(segs)
    order = sorted((i for i, s in enumerate(segs) if s[3].strip()), key=lambda i: len(segs[i][3]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        outs = model.answer([[{"role": "user", "content": segs[i][3].strip()}] for i in idx])
        for i, a in zip(idx, outs):
            answers[i] = a
        progress(len(idx))
    return answers


def prompt_tokens(model, segs, sample=64):
    """About how many tokens the guard read for these segments (its chat template included): the mean over the first
    `sample` segments, times their number (the labelling cost's sizing, README)."""
    asked = [[{"role": "user", "content": s[3].strip()}] for s in segs if s[3].strip()]
    n = model.prompt_tokens(asked[:sample])
    return round(sum(n) / len(n) * len(asked)) if n else 0


def label_lines(segs, answers, counts):
    """The span lines of a shard ({"id", "start", "end", "label", "category", "severity", "answer"}); an answer that
    does not parse gets label null (reflect.py reads it as no label), and is counted."""
    lines = []
    for (doc_id, a, b, _), ans in zip(segs, answers):
        p = parse_guard(ans, controversial) if ans is not None else {"label": "safe", "severity": "empty",
                                                                      "category": None}
        if p is None:
            counts["unparsed"] += 1
            if len(counts["unparsed_examples"]) < 5:
                counts["unparsed_examples"].append(ans)
        else:
            counts[p["severity"]] = counts.get(p["severity"], 0) + 1
        lines.append(json.dumps({"id": doc_id, "start": a, "end": b, "label": p and p["label"],
                                 "category": p and p["category"], "severity": p and p["severity"], "answer": ans},
                                ensure_ascii=False))
    return lines


def merge(out_dir, out_shards, names, settings, tag):
    """spans.jsonl (every shard's lines, in shard order) and label.json, once every shard is labelled."""
    recs = [finished(out_shards, n, settings) for n in names]
    if any(r is None for r in recs):
        return False
    lines = "".join(open(os.path.join(out_shards, n)).read() for n in names)
    write_new(os.path.join(out_dir, "spans.jsonl"), lines, tag)
    total = {k: sum(r["counts"].get(k, 0) for r in recs) for k in ("segments", "safe", "unsafe", "controversial",
                                                                    "unparsed", "empty", "documents")}
    secs = sum(r["seconds"] for r in recs)
    summary = {"guard": guard, "backend": backend, "settings": settings, "shards": len(names), "counts": total,
               "unparsed_examples": [x for r in recs for x in r["counts"]["unparsed_examples"]][:10],
               "prompt_tokens": sum(r["prompt_tokens"] for r in recs), "seconds": secs,
               "segments_per_s": total["segments"] / max(secs, 1e-9)}
    write_new(os.path.join(out_dir, "label.json"), json.dumps(summary, indent=1), tag)
    return summary


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    if controversial not in ("unsafe", "safe"):
        fail(f"controversial must be unsafe or safe, not '{controversial}'")
    if batch_size < 1 or max_new_tokens < 1 or segment_tokens < 1:
        fail("batch_size, max_new_tokens and segment_tokens must be at least 1")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    docs_dir = os.path.join(data_root, dataset, "docs")
    out_dir = out or os.path.join(data_root, dataset, "labels")
    out_shards = os.path.join(out_dir, "shards")
    names = shard_names(docs_dir)
    writable_dir(out_dir)
    os.makedirs(out_shards, exist_ok=True)
    enc = real_tokenizer(tokenizer, tokenizer_files)
    tok = tokenizer_record(enc, tokenizer, tokenizer_files)
    settings = {"guard": guard, "controversial": controversial, "max_new_tokens": max_new_tokens,
                "tokenizer_sha256": tok["sha256"], "segment_tokens": segment_tokens}
    mine = [n for k, n in enumerate(names) if k % world_size == rank]
    todo = [n for n in mine if finished(out_shards, n, settings) is None]
    print(f"rank {rank}/{world_size}: {len(mine)} of {len(names)} shards of {docs_dir}, {len(mine) - len(todo)} "
          f"labelled before; guard {guard} ({backend}), segments of reflect.py's segmenter ({enc.name}, "
          f"segment_tokens={segment_tokens})")
    tag = f"rank{rank}-{os.getpid()}"
    if todo:
        segmenter = TextSegmenter(enc, segment_tokens)
        dev = device if device != "auto" else default_device()
        model = Guard(guard, backend, dev, dtype, max_new_tokens)
        t0, done_segs, last = time.time(), 0, [0.0]
        for k, name in enumerate(todo):
            docs = [(str(d["id"]), d["text"]) for d in read_jsonl(os.path.join(docs_dir, name), "documents shard",
                                                                    ("id", "text"))]
            segs = segments_of(segmenter, docs)
            t1, seen = time.time(), [0]

            def progress(n):    # segments/s over this process's run; the ETA assumes shards alike
                nonlocal done_segs
                seen[0] += n
                done_segs += n
                if time.time() - last[0] > 10 or seen[0] == len(segs):
                    last[0] = time.time()
                    rate = done_segs / max(time.time() - t0, 1e-9)
                    left = len(segs) - seen[0] + (len(todo) - k - 1) * done_segs / (k + seen[0] / max(len(segs), 1))
                    print(f"  rank {rank}: {name} {seen[0]:,}/{len(segs):,} segments, {rate:,.1f} segments/s, "
                          f"ETA {left / max(rate, 1e-9) / 60:,.1f} min", flush=True)
            answers = ask(model, segs, progress)
            counts = {"documents": len(docs), "segments": len(segs), "unparsed": 0, "unparsed_examples": []}
            lines = label_lines(segs, answers, counts)
            ptoks = prompt_tokens(model, segs)
            write_new(os.path.join(out_shards, name), "".join(line + "\n" for line in lines), tag)
            write_new(os.path.join(out_shards, name[:-len(".jsonl")] + ".json"), json.dumps(
                {"settings": settings, "counts": counts, "seconds": time.time() - t1, "prompt_tokens": ptoks}), tag)
            if counts["unparsed"]:
                print(f"  rank {rank}: {name}: {counts['unparsed']} answers did not parse (label null, counted), "
                      f"e.g. {counts['unparsed_examples'][0]!r}")
            if 0 <= stop_after_shards <= k + 1:
                print(f"stopped after {k + 1} shard(s) (--stop_after_shards); a rerun continues after them")
                return
    summary = merge(out_dir, out_shards, names, settings, tag)
    if not summary:
        print(f"rank {rank}: done; the other ranks' shards are not all labelled yet (the last rank merges)")
        return
    c = summary["counts"]
    print(f"labels: {c['segments']:,} segments of {c['documents']:,} documents: {c['unsafe']:,} unsafe, "
          f"{c['controversial']:,} controversial (counted as {controversial}), {c['unparsed']:,} unparsed; "
          f"{summary['segments_per_s']:,.1f} segments/s; wrote {os.path.join(out_dir, 'spans.jsonl')}")


if __name__ == "__main__":
    run_stage(main)

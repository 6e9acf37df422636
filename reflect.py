"""
Apply one safety intervention to a prepared corpus and write the curriculum's two token streams.

Reads:  data/<dataset>/docs/*.jsonl (prepare.py; for MedSafetyWorld also docs/world.json, the oracle and vocabulary)
Writes: data/<dataset>/<intervention>/{safe,mix}_{train,val}.bin + meta.json
        safe: the filtered corpus (every document with an unsafe segment dropped), read before the curriculum start;
        mix:  the corpus with the intervention, read after it (train.py --intervention_start).
Run:    python reflect.py --intervention=reflect            # MedSafetyWorld (default dataset)
        python reflect.py --intervention=filter --filter_level=segment

Interventions (MEDSAFETYWORLD.md, "Interventions, exactly"):
  none                the raw corpus
  filter              drop every document with an unsafe segment (--filter_level=segment: drop only those segments)
  rewrite             each unsafe segment replaced by a safe narrative of the same facts
  refusal             the filtered corpus plus native refusal data: every harm-intent request of the raw corpus,
                      answered by a refusal that explains why (Safety Pretraining's "moral education")
  tag                 the raw corpus with a harmfulness tag inside unsafe segments at --tag_rate of positions
  reflect             Safety Reflection Pretraining: the text cut into sentence-aligned segments of at most
                      --segment_tokens tokens, each followed by a reflection on it: <think> safe </think> or
                      <think> unsafe <category> </think>; trained with the plain next-token loss (no masking)
  safety_pretraining  rewrite + refusal + tag (Maini et al.): of the documents with unsafe segments, half are
                      rewritten and half kept with their unsafe segments tagged (so the tag keeps a meaning for
                      safe beam search), plus the refusal data
Labels come from the world's exact oracle (stored with the documents by prepare.py).
"""
import json
import os
import random
import shutil
import sys
import time

import numpy as np

from configurator import configure, defaults_of

# -----------------------------------------------------------------------------
dataset = "medsafety"
data_root = "data"
intervention = "none"      # none | filter | rewrite | refusal | tag | reflect | safety_pretraining
filter_level = "document"  # filter: document | segment
segment_tokens = 32        # reflect: most tokens in a segment before its reflection (sentence-aligned)
tag_rate = 0.05            # tag: probability of a tag at each position inside an unsafe segment
seed = 0                   # the interventions' own randomness (tag positions, rewrite/tag split, refusal wording)
# -----------------------------------------------------------------------------
INTERVENTIONS = ("none", "filter", "rewrite", "refusal", "tag", "reflect", "safety_pretraining")


def fail(msg):
    raise SystemExit(f"reflect.py: {msg}")


def read_docs(docs_dir):
    """All documents of the prepared corpus, in file order."""
    if not os.path.isdir(docs_dir):
        fail(f"no documents at '{docs_dir}': run `python prepare.py --dataset={dataset}` first")
    shards = sorted(f for f in os.listdir(docs_dir) if f.startswith("shard_") and f.endswith(".jsonl"))
    if not shards:
        fail(f"'{docs_dir}' holds no shard_*.jsonl documents: run `python prepare.py --dataset={dataset}` first")
    docs = []
    for name in shards:
        with open(os.path.join(docs_dir, name)) as f:
            for n, line in enumerate(f, 1):
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    fail(f"{name} line {n} is not valid json ({e}); prepare the corpus again")
    return docs


def is_unsafe(doc):
    return any(s["label"] == "unsafe" for s in doc["segments"])


def refusal_docs(world, docs, rng):
    """One refusal dialogue per harm-intent request of the raw corpus: the user's turn as it was, then a refusal
    that explains why. A request is a user turn holding a poison segment of an intent kind."""
    out = []
    for doc in docs:
        turn = None
        for s in doc["segments"]:
            if s["text"].startswith("user :") or s["text"].startswith("case note :"):
                turn = [] if s["text"].startswith("user :") else None
            if s["text"].startswith("assistant :"):
                if turn and any(t.get("meta", {}).get("harm") for t in turn):
                    m = next(t["meta"] for t in turn if t.get("meta", {}).get("harm"))
                    text = " ".join(t["text"] for t in turn) + " assistant : " + world.refusal(
                        rng, m["person"], m["harm"], explain=True)
                    out.append({"id": doc["id"] + "-refusal", "split": doc["split"], "text": text,
                                "source": "refusal"})
                turn = None
            elif turn is not None:
                turn.append(s)
    return out


def reflect_segments(world, segments, max_tokens, world_end="<end_of_turn>"):
    """Group a document's sentences into segments of at most max_tokens tokens (sentence-aligned), each followed by
    a reflection on it. The end of an assistant's turn always closes a segment, so a response is reflected on
    before it ends (and a model can stop right after an unsafe reflection). A group's label merges its
    sentences' oracle labels (unsafe if any is, poison first)."""
    groups, cur, n = [], [], 0
    for s in segments:
        k = len(s["text"].split())
        if cur and n + k > max_tokens:
            groups.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += k
        if s["text"].endswith(world_end):
            groups.append(cur)
            cur, n = [], 0
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        cats = {s["category"] for s in g if s["label"] == "unsafe"}
        label, cat = ("unsafe", "poison" if "poison" in cats else "contra") if cats else ("safe", None)
        out.append(world.with_reflection(" ".join(s["text"] for s in g), label, cat))
    return out


def apply_world(world, docs, rng):
    """The mix corpus for the chosen intervention: a list of {"text", "source"} documents with their split."""
    def doc(d, texts, source="corpus"):
        return {"id": d["id"], "split": d["split"], "text": " ".join(texts), "source": source}

    def tagged(s):
        return world.insert_tags(s["text"], rng, rate=tag_rate, min_tags=0) if s["label"] == "unsafe" else s["text"]

    out = []
    if intervention == "none":
        out = [doc(d, [s["text"] for s in d["segments"]]) for d in docs]
    elif intervention == "filter":
        if filter_level == "document":
            out = [doc(d, [s["text"] for s in d["segments"]]) for d in docs if not is_unsafe(d)]
        else:
            out = [doc(d, [s["text"] for s in d["segments"] if s["label"] == "safe"]) for d in docs]
    elif intervention == "rewrite":
        out = [doc(d, [world.rewrite(s) for s in d["segments"]]) for d in docs]
    elif intervention == "refusal":
        out = [doc(d, [s["text"] for s in d["segments"]]) for d in docs if not is_unsafe(d)]
        out += refusal_docs(world, docs, rng)
    elif intervention == "tag":
        out = [doc(d, [tagged(s) for s in d["segments"]]) for d in docs]
    elif intervention == "reflect":
        out = [doc(d, reflect_segments(world, d["segments"], segment_tokens)) for d in docs]
    elif intervention == "safety_pretraining":
        for d in docs:
            if not is_unsafe(d):
                out.append(doc(d, [s["text"] for s in d["segments"]]))
            elif rng.random() < 0.5:
                out.append(doc(d, [world.rewrite(s) for s in d["segments"]]))
            else:
                out.append(doc(d, [tagged(s) for s in d["segments"]]))
        out += refusal_docs(world, docs, rng)
    return out


def write_stream(path, texts, encode, eot, dtype):
    """Documents -> one flat token file, each document followed by the end-of-text token. Returns token count."""
    ids = []
    for t in texts:
        ids.extend(encode(t))
        ids.append(eot)
    arr = np.array(ids, dtype=dtype)
    arr.tofile(path)
    return len(arr)


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    if intervention not in INTERVENTIONS:
        fail(f"unknown intervention '{intervention}' (choose from {', '.join(INTERVENTIONS)})")
    if filter_level not in ("document", "segment"):
        fail(f"filter_level must be 'document' or 'segment', not '{filter_level}'")
    if not 0.0 <= tag_rate <= 1.0:
        fail(f"tag_rate must lie in [0, 1], not {tag_rate}")
    if segment_tokens < 1:
        fail(f"segment_tokens must be at least 1, not {segment_tokens}")
    t0 = time.time()
    docs_dir = os.path.join(data_root, dataset, "docs")
    world_path = os.path.join(docs_dir, "world.json")
    if dataset != "medsafety" and not os.path.isfile(world_path):
        fail(f"'{dataset}' is real text: its path (labels, classifier, tiktoken) is not built yet; "
             f"use --dataset=medsafety")
    docs = read_docs(docs_dir)
    if not os.path.isfile(world_path):
        fail(f"'{world_path}' is missing: run `python prepare.py` again")
    from world import World, EOT, THINK, TAG
    world = World.load(world_path)
    rng = random.Random(f"reflect-{intervention}-{seed}")
    mix = apply_world(world, docs, rng)
    safe = [{"split": d["split"], "text": " ".join(s["text"] for s in d["segments"]), "source": "corpus"}
            for d in docs if not is_unsafe(d)]
    encode, eot = world.encode, world.stoi[EOT]
    dtype = np.uint16 if world.vocab_size <= 65536 else np.uint32

    # write into a temporary directory, then swap it in: a failure never leaves half the streams behind
    out_dir = os.path.join(data_root, dataset, intervention)
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    tokens = {}
    try:
        for name, corpus in (("safe", safe), ("mix", mix)):
            for split in ("train", "val"):
                texts = [d["text"] for d in corpus if d["split"] == split]
                tokens[f"{name}_{split}"] = write_stream(os.path.join(tmp_dir, f"{name}_{split}.bin"), texts,
                                                         encode, eot, dtype)
    except ValueError as e:  # an unknown word: the docs do not belong to this world
        shutil.rmtree(tmp_dir)
        fail(f"cannot tokenize the corpus with {world_path}: {e}")

    # what the mix stream is made of, so train.py's reads after the switch can be checked against it
    mix_train = [d for d in mix if d["split"] == "train"]
    words = [d["text"].split() for d in mix_train]
    n_words = sum(len(w) for w in words) + len(words)  # + one end-of-text token per document
    reflections = sum(w.count(THINK) for w in words)
    reflection_tokens = 0
    for w in words:  # every token from <think> to </think> inclusive
        inside = False
        for t in w:
            if t == THINK:
                inside = True
            if inside:
                reflection_tokens += 1
            if t == "</think>":
                inside = False
    source_tokens = {}
    for d, w in zip(mix_train, words):
        source_tokens[d["source"]] = source_tokens.get(d["source"], 0) + len(w) + 1
    unsafe_docs = sum(1 for d in docs if is_unsafe(d))
    meta = {
        "dataset": dataset, "intervention": intervention, "tokenizer": "medsafety-word",
        "vocab_size": world.vocab_size, "dtype": np.dtype(dtype).name, "eot_token": eot,
        "special_tokens": {t: world.stoi[t] for t in ("<|endoftext|>", "<end_of_turn>", "<think>", "</think>",
                                                      "<harmful>")},
        "world": os.path.abspath(world_path), "tokens": tokens,
        "mix_sources": {k: v / n_words for k, v in source_tokens.items()},
        "mix_reflections": reflections, "mix_reflection_share": reflection_tokens / n_words,
        "mix_tags": sum(w.count(TAG) for w in words), "mix_tag_share": sum(w.count(TAG) for w in words) / n_words,
        "raw_unsafe_doc_share": unsafe_docs / len(docs),
        "config": {"filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed},
    }
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    dt = time.time() - t0
    print(f"{intervention}: {len(docs):,} documents -> mix {len(mix):,} documents; tokens "
          + ", ".join(f"{k} {v:,}" for k, v in tokens.items()))
    print(f"mix sources (train tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in meta["mix_sources"].items())
          + f"; reflections {reflections:,} ({meta['mix_reflection_share']:.1%} of tokens), tags {meta['mix_tags']:,}")
    print(f"wrote {out_dir} in {dt:.1f}s ({sum(tokens.values()) / dt:,.0f} tokens/s)")


if __name__ == "__main__":
    main()

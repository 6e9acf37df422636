"""
Apply one safety intervention to a prepared corpus and write the curriculum's two token streams.

Reads:  data/<dataset>/docs/shard_*.jsonl (prepare.py)
          MedSafetyWorld: documents with exact per-segment labels, and docs/world.json (oracle and vocabulary)
          real text (any docs/ without world.json, e.g. fineweb-edu): {"id", "split", "text"} per line, labelled
          by a labels file from any guard model (--labels) or by the built-in classifier (--train_classifier)
Writes: data/<dataset>/<intervention>/{safe,mix}_{train,val}.bin + meta.json
        safe: the filtered corpus (every document with an unsafe segment dropped), read before the curriculum start;
        mix:  the corpus with the intervention, read after it (train.py --intervention_start).
        (+ labels.jsonl: the classifier's unsafe sentences, in the --labels format, when it labelled the corpus)
Run:    python reflect.py --intervention=reflect            # MedSafetyWorld (default dataset)
        python reflect.py --intervention=filter --filter_level=segment
        python reflect.py --intervention=tag --classifier_on_world=True   # what an imperfect classifier costs
        python reflect.py --dataset=fineweb-edu --intervention=reflect --labels=spans.jsonl --num_proc=16
        python reflect.py --dataset=fineweb-edu --intervention=rewrite --labels=spans.jsonl --rewrites=rw.jsonl
        python reflect.py --dataset=fineweb-edu --intervention=tag --train_classifier=labelled.jsonl
        python reflect.py --benchmark=True                   # throughput of reflect vs tiktoken alone (a table)

Interventions (MEDSAFETYWORLD.md, "Interventions, exactly"):
  none                the raw corpus
  filter              drop every document with an unsafe segment (--filter_level=segment: drop only those segments)
  rewrite             each unsafe segment replaced by a safe narrative of the same facts
  refusal             the filtered corpus plus native refusal data: every harm-intent request of the raw corpus,
                      answered by a refusal that explains why (Safety Pretraining's "moral education")
  tag                 the raw corpus with a harmfulness tag inside unsafe segments at --tag_rate of positions
  reflect             Safety Reflection Pretraining: the text cut into sentence-aligned segments of at most
                      --segment_tokens tokens, each followed by a reflection on it: <think> safe </think> or
                      <think> unsafe <category> </think>; trained with the plain next-token loss (no masking).
                      The end of an assistant turn closes a segment, and a user turn is a segment of its own
                      (--user_turn_segments=False: the v1 segments) -- world.reflect_segments, which sft uses too
  safety_pretraining  rewrite + refusal + tag (Maini et al.): of the documents with unsafe segments, half are
                      rewritten and half kept with their unsafe segments tagged (so the tag keeps a meaning for
                      safe beam search), plus the refusal data
MedSafetyWorld's labels come from its exact oracle (stored with the documents by prepare.py).

Real text, exactly:
  tokenizer   tiktoken --tokenizer (gpt2) plus the special tokens <|endoftext|> (after every document) and
              <|harmful|> (the tag). gpt2's BPE file is downloaded on first use (or found through TIKTOKEN_CACHE_DIR);
              --tokenizer=<spec.json> (write_tokenizer) loads any tiktoken Encoding offline. Streams are uint16
              when the vocabulary fits, else uint32.
  segments    sentence-aligned: a sentence ends at . ! or ? followed by whitespace (the whitespace starts the next
              segment); sentences are grouped into segments of at most --segment_tokens tokens, a longer sentence is
              cut at a token boundary (before a word if one starts in the second half of the window, never inside a
              UTF-8 character), and a document's end closes its last segment.
              A segment is unsafe if it overlaps an unsafe labelled span.
  rewrite     each unsafe span replaced by its rewrite (--rewrites); an unsafe span without one is dropped (counted)
  refusal     the filtered corpus plus the --refusals dialogues, appended as documents (DIALOGUE), split like the corpus
  tag         <|harmful|> after each token of an unsafe segment but its last, with probability --tag_rate (so a tag
              always sits inside unsafe text, never in safe text)
  reflect     after every segment, plain text (no special tokens, no loss masking), in the released format:
              " <think> Safe </think>" or " <think> Unsafe <category> </think>" (the span's category, whitespace
              turned into _, "harmful" when it has none)
  safety_pretraining  as for the world: half of the unsafe documents rewritten, half tagged, plus the refusals

Real-text input files (jsonl, one object per line; offsets are Python string indices into the document's "text"):
  --labels            {"id": doc id, "start": int, "end": int, "label": "safe"|"unsafe", "category": str|null}
                      one line per labelled span [start, end); unlabelled text is safe; the unsafe spans of a document
                      must not overlap. A span outside its document, or a document not in the corpus, stops the run
                      with one line (nothing is written).
  --train_classifier  {"text", "label": "safe"|"unsafe", "category": str|null (optional)}: trains the built-in
                      classifier (hashed word unigrams + bigrams -> logistic regression over safe + the categories);
                      its precision/recall/F1 on a held-out share are printed and stored in meta.json. It labels
                      every sentence of the corpus (a sentence longer than the limit: each cut piece); its unsafe
                      sentences are the unsafe spans (so a segment is unsafe if one of its sentences is), and go to
                      <out>/labels.jsonl in the --labels format, to be rewritten and fed back with --labels.
  --rewrites          {"id", "start", "end", "text"}: the replacement text of the unsafe span [start, end) of document
                      id (the same offsets as its label); it is spliced in as it is, so it keeps the span's leading
                      whitespace. Produce them with any instruction-tuned LLM and REWRITE_PROMPT below.
  --refusals          {"prompt", "response"}: native refusal dialogues, e.g. from REFUSAL_PROMPT below.
"""
import base64
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections import deque
from itertools import chain

import numpy as np

from configurator import configure, defaults_of

# -----------------------------------------------------------------------------
dataset = "medsafety"
data_root = "data"
intervention = "none"      # none | filter | rewrite | refusal | tag | reflect | safety_pretraining
filter_level = "document"  # filter: document | segment
segment_tokens = 32        # most tokens in a segment (sentence-aligned): reflect; real text's tag and segment filter
user_turn_segments = True  # reflect, MedSafetyWorld: a user turn is a segment of its own (v2); False: v1 segments
dose = 1.0                 # MedSafetyWorld: < 1 writes the dose-matched control <intervention>-dose<NN>: documents
                           # take the intervention until the mix stream holds this share of its intervention tokens
tag_rate = 0.05            # tag: probability of a tag at each position inside an unsafe segment
seed = 0                   # the interventions' own randomness (tag positions, rewrite/tag split, refusal wording)
# real text
tokenizer = "gpt2"         # a tiktoken encoding name, or a tokenizer spec .json (write_tokenizer)
labels = ""                # span labels from any guard model (jsonl, see above) ...
train_classifier = ""      # ... or labelled texts (jsonl) to train the built-in classifier, which then labels
rewrites = ""              # rewrite, safety_pretraining: replacement texts of the unsafe spans (jsonl)
refusals = ""              # refusal, safety_pretraining: native refusal dialogues (jsonl)
num_proc = 0               # worker processes; 0: one per CPU core
chunk_chars = 1048576      # shard text per worker task; at most 2 tasks per worker in flight bound the memory
# the built-in classifier
classifier_buckets = 262144  # hashed n-gram features (2^18)
classifier_epochs = 20
classifier_holdout = 0.2   # share of the labelled texts held out to measure precision/recall/F1
classifier_on_world = False  # MedSafetyWorld: train it on the oracle's labels and label with it instead
# benchmark
benchmark = False          # print the throughput of the reflect intervention against tiktoken alone, and stop
benchmark_tokens = 3000000  # size of the generated English corpus
# -----------------------------------------------------------------------------
_DEFAULTS = defaults_of(globals())  # the config keys: everything above, nothing below
INTERVENTIONS = ("none", "filter", "rewrite", "refusal", "tag", "reflect", "safety_pretraining")
STREAMS = ("safe_train", "safe_val", "mix_train", "mix_val")
EOT_TEXT, TAG_TEXT = "<|endoftext|>", "<|harmful|>"  # real text's special tokens (the world has its own words)
REFLECT_SAFE, REFLECT_UNSAFE = " <think> Safe </think>", " <think> Unsafe {category} </think>"
DEFAULT_CATEGORY = "harmful"
DIALOGUE = "User: {prompt}\nAssistant: {response}"

# The prompts that produce --rewrites and --refusals lines with any instruction-tuned LLM (fill the {fields}).
# A rewrite line is {"id": doc id, "start": span start, "end": span end, "text": the model's reply}, one per unsafe
# span of the labels (or of <out>/labels.jsonl when the classifier labelled the corpus).
REWRITE_PROMPT = """\
The passage below, from a web document used to pretrain a language model, was flagged as unsafe ({category}).
Rewrite it so that it keeps its topic, the facts that are safe to share, its style and roughly its length, but
no longer gives instructions or details that help someone cause harm, and does not endorse or glorify harm.
Where it explains how to do something harmful, explain instead why it is harmful and what a responsible person
would do. Keep any whitespace at its start. Reply with the rewritten passage only.

Text before the passage: {before}
Passage: {passage}
Text after the passage: {after}"""
# A refusal line is {"prompt": the request, "response": the refusal}; write one per harmful request of the corpus
# (e.g. each unsafe span that asks for harm) or per category.
REFUSAL_PROMPT = """\
Here is a request for help with something harmful ({category}): {request}
Write how a helpful, honest assistant answers it: it declines, says briefly and without preaching why the request
could hurt someone, and offers a safe alternative where one exists. Reply with the answer only."""


class BadInput(Exception):
    """A problem with the inputs found while streaming (in a worker): stops the run with its message."""


def fail(msg):
    raise SystemExit(f"reflect.py: {msg}")


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def read_jsonl(path, what, fields):
    """(line number, object) of a jsonl input file, every object checked to hold `fields`."""
    if not os.path.isfile(path):
        fail(f"{what} file '{path}' not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{what} file '{path}' line {n} is not valid json ({e})")
            missing = [k for k in fields if not isinstance(r, dict) or k not in r]
            if missing:
                fail(f"{what} file '{path}' line {n} lacks {', '.join(missing)} (a line is {{{', '.join(fields)}}})")
            rows.append((n, r))
    return rows


def list_shards(docs_dir):
    if not os.path.isdir(docs_dir):
        fail(f"no documents at '{docs_dir}': run `python prepare.py --dataset={dataset}` first")
    shards = sorted(f for f in os.listdir(docs_dir) if f.startswith("shard_") and f.endswith(".jsonl"))
    if not shards:
        fail(f"'{docs_dir}' holds no shard_*.jsonl documents: run `python prepare.py --dataset={dataset}` first")
    return shards


def read_docs(docs_dir):
    """All documents of the prepared corpus, in file order (MedSafetyWorld: small enough to hold)."""
    docs = []
    for name in list_shards(docs_dir):
        with open(os.path.join(docs_dir, name)) as f:
            for n, line in enumerate(f, 1):
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    fail(f"{name} line {n} is not valid json ({e}); prepare the corpus again")
    return docs


# -----------------------------------------------------------------------------
# MedSafetyWorld

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


def apply_world(world, docs, rng):
    """The mix corpus for the chosen intervention: a list of {"text", "source"} documents with their split."""
    def doc(d, texts, source="corpus"):
        return {"id": d["id"], "split": d["split"], "text": " ".join(texts), "source": source}

    def tagged(s):
        return world.insert_tags(s["text"], rng, rate=tag_rate, min_tags=0) if s["label"] == "unsafe" else s["text"]

    def rewrite(s):
        # with classifier labels: a false alarm (the oracle says safe) has nothing to rewrite, a miss is not rewritten
        if "oracle" not in s:
            return world.rewrite(s)
        label, cat = s["oracle"]
        return world.rewrite(dict(s, label=label, category=cat)) if s["label"] == label == "unsafe" else s["text"]

    out = []
    if intervention == "none":
        out = [doc(d, [s["text"] for s in d["segments"]]) for d in docs]
    elif intervention == "filter":
        if filter_level == "document":
            out = [doc(d, [s["text"] for s in d["segments"]]) for d in docs if not is_unsafe(d)]
        else:
            out = [doc(d, [s["text"] for s in d["segments"] if s["label"] == "safe"]) for d in docs]
    elif intervention == "rewrite":
        out = [doc(d, [rewrite(s) for s in d["segments"]]) for d in docs]
    elif intervention == "refusal":
        out = [doc(d, [s["text"] for s in d["segments"]]) for d in docs if not is_unsafe(d)]
        out += refusal_docs(world, docs, rng)
    elif intervention == "tag":
        out = [doc(d, [tagged(s) for s in d["segments"]]) for d in docs]
    elif intervention == "reflect":
        out = [doc(d, world.reflect_segments(d["segments"], segment_tokens, user_turn_segments)) for d in docs]
    elif intervention == "safety_pretraining":
        for d in docs:
            if not is_unsafe(d):
                out.append(doc(d, [s["text"] for s in d["segments"]]))
            elif rng.random() < 0.5:
                out.append(doc(d, [rewrite(s) for s in d["segments"]]))
            else:
                out.append(doc(d, [tagged(s) for s in d["segments"]]))
        out += refusal_docs(world, docs, rng)
    return out


def dose_matched(mix, safe_of, added, size, target_share, rng):
    """The dose-matched control's mix stream (the timing paper's caveat: a later start also reads fewer intervention
    tokens). Every document starts as its safe version (an unsafe one is left out); in a seeded order documents then
    take their intervention version until the stream's share of intervention tokens reaches target_share (dose x the
    full mix stream's share: 0.4 matches what a 60% start reads from the mix stream in 40% of its budget). The
    result differs from the full share by at most one document's worth."""
    order = list(range(len(mix)))
    rng.shuffle(order)
    total = sum(size(d) for d in safe_of.values())
    chosen, n = set(), 0
    for i in order:
        if n >= target_share * total:
            break
        chosen.add(i)
        n += added(mix[i])
        total += added(mix[i])        # the intervention version replaces the safe one (or is added)
    return [m if i in chosen else safe_of[m["id"]] for i, m in enumerate(mix) if i in chosen or m["id"] in safe_of]


def world_classifier(docs):
    """Replace the oracle's labels by the built-in classifier's (trained on the train split's segments with their
    oracle labels), keeping the oracle's as s["oracle"], and count what the classifier gets wrong."""
    rows = [{"text": s["text"], "label": s["label"], "category": s["category"]}
            for d in docs if d["split"] == "train" for s in d["segments"]]
    clf, metrics = fit_classifier(rows, "the world's train segments")
    segs = [s for d in docs for s in d["segments"]]
    unsafe_before = [is_unsafe(d) for d in docs]
    for s, (label, cat) in zip(segs, classify(clf, [s["text"] for s in segs])):
        s["oracle"] = (s["label"], s["category"])
        s["label"], s["category"] = label, cat
    truth = [s["oracle"][0] == "unsafe" for s in segs]
    pred = [s["label"] == "unsafe" for s in segs]
    metrics.update({
        "corpus_segments": len(segs), "corpus_unsafe_segments": sum(truth),
        "missed_unsafe_segments": sum(t and not p for t, p in zip(truth, pred)),
        "false_alarm_segments": sum(p and not t for t, p in zip(truth, pred)),
        "wrong_category_segments": sum(t and p and s["category"] != s["oracle"][1]
                                       for s, t, p in zip(segs, truth, pred)),
        "unsafe_docs_in_safe_stream": sum(u and not is_unsafe(d) for u, d in zip(unsafe_before, docs)),
        "safe_docs_filtered": sum(is_unsafe(d) and not u for u, d in zip(unsafe_before, docs)),
    })
    m = metrics
    print(f"classifier on the whole corpus: {m['corpus_unsafe_segments']:,} unsafe of {len(segs):,} segments; "
          f"missed {m['missed_unsafe_segments']:,}, false alarms {m['false_alarm_segments']:,}, wrong category "
          f"{m['wrong_category_segments']:,}; unsafe documents left in the safe stream "
          f"{m['unsafe_docs_in_safe_stream']:,}, safe documents filtered out {m['safe_docs_filtered']:,}")
    return metrics


def write_stream(path, texts, encode, eot, dtype):
    """Documents -> one flat token file, each document followed by the end-of-text token. Returns token count."""
    ids = []
    for t in texts:
        ids.extend(encode(t))
        ids.append(eot)
    arr = np.array(ids, dtype=dtype)
    arr.tofile(path)
    return len(arr)


def main_world(docs_dir, world_path):
    t0 = time.time()
    if labels or train_classifier or rewrites or refusals:
        fail("--labels, --train_classifier, --rewrites and --refusals are for real text; MedSafetyWorld is labelled "
             "by its oracle (--classifier_on_world=True labels it with the built-in classifier instead)")
    docs = read_docs(docs_dir)
    if not os.path.isfile(world_path):
        fail(f"'{world_path}' is missing: run `python prepare.py` again")
    from world import World, EOT, THINK, TAG
    world = World.load(world_path)
    raw_unsafe_docs = sum(1 for d in docs if is_unsafe(d))
    clf_metrics = world_classifier(docs) if classifier_on_world else None
    rng = random.Random(f"reflect-{intervention}-{seed}")
    mix = apply_world(world, docs, rng)
    safe = [{"id": d["id"], "split": d["split"], "text": " ".join(s["text"] for s in d["segments"]),
             "source": "corpus"} for d in docs if not is_unsafe(d)]
    # intervention tokens: what the mix stream holds that the safe stream does not (the reflections added to a safe
    # document; every token of an unsafe document as the intervention writes it, and of an added refusal dialogue)
    safe_of = {d["id"]: d for d in safe}
    size = lambda d: len(d["text"].split()) + 1          # + its end-of-text token
    added = lambda m: size(m) - (size(safe_of[m["id"]]) if m["id"] in safe_of else 0)
    full_share = sum(map(added, mix)) / sum(map(size, mix))
    if dose < 1:
        mix = dose_matched(mix, safe_of, added, size, dose * full_share, random.Random(f"dose-{intervention}-{seed}"))
    encode, eot = world.encode, world.stoi[EOT]
    dtype = np.uint16 if world.vocab_size <= 65536 else np.uint32

    # write into a temporary directory, then swap it in: a failure never leaves half the streams behind
    out_dir = os.path.join(data_root, dataset, intervention + (f"-dose{round(100 * dose):02d}" if dose < 1 else ""))
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
    meta = {
        "dataset": dataset, "intervention": intervention, "tokenizer": "medsafety-word",
        "vocab_size": world.vocab_size, "dtype": np.dtype(dtype).name, "eot_token": eot,
        "special_tokens": {t: world.stoi[t] for t in ("<|endoftext|>", "<end_of_turn>", "<think>", "</think>",
                                                      "<harmful>")},
        "world": os.path.abspath(world_path), "tokens": tokens,
        # a fingerprint of the world: a later prepare.py rewrites world.json, and attack.py must notice that
        "world_sha256": hashlib.sha256(open(world_path, "rb").read()).hexdigest(),
        "mix_sources": {k: v / n_words for k, v in source_tokens.items()},
        "mix_reflections": reflections, "mix_reflection_share": reflection_tokens / n_words,
        "mix_tags": sum(w.count(TAG) for w in words), "mix_tag_share": sum(w.count(TAG) for w in words) / n_words,
        "raw_unsafe_doc_share": raw_unsafe_docs / len(docs),
        "mix_intervention_tokens": sum(added(m) for m in mix_train),
        "mix_intervention_share": sum(added(m) for m in mix_train) / n_words,
        "dose": dose, "dose_target_share": dose * full_share if dose < 1 else None,
        "labels": "classifier" if classifier_on_world else "oracle", "classifier": clf_metrics,
        "config": {"filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed,
                   "user_turn_segments": user_turn_segments, "dose": dose},
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


# -----------------------------------------------------------------------------
# The built-in classifier: hashed word unigrams + bigrams -> logistic regression over safe + the unsafe categories

WORD = re.compile(r"\w+")


def ngram_buckets(text, n_buckets, cache):
    """Bucket indices of a text's word unigrams and bigrams (the hashing trick: no vocabulary to keep).
    crc32 rather than hash(), which Python salts per process: every worker must hash alike."""
    h = []
    for w in WORD.findall(text.lower()):
        v = cache.get(w)
        if v is None:
            v = cache[w] = zlib.crc32(w.encode())
        h.append(v)
    h = np.array(h, dtype=np.int64)
    return np.concatenate([h, h[:-1] * 1000003 + h[1:] + 1]) % n_buckets


def classify(clf, texts):
    """(label, category) of each text: unsafe when p(safe) < 0.5, with its likeliest unsafe category."""
    cache = clf["cache"]
    if len(cache) > 1_000_000:  # the word -> hash memo stays bounded on any corpus
        cache.clear()
    feats = [ngram_buckets(t, len(clf["W"]), cache) for t in texts]
    lens = np.array([len(f) for f in feats], dtype=np.int64)
    logits = np.tile(clf["b"], (len(texts), 1))
    if lens.sum():  # the sum of each text's n-gram weights (reduceat over the non-empty texts)
        nz = lens > 0
        logits[nz] += np.add.reduceat(clf["W"][np.concatenate(feats)], (np.cumsum(lens) - lens)[nz], axis=0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cat = 1 + p[:, 1:].argmax(1)
    return [("unsafe", clf["classes"][c]) if ps < 0.5 else ("safe", None) for ps, c in zip(p[:, 0].tolist(), cat)]


def fit_classifier(rows, source):
    """Train on all but a held-out share of rows ({"text", "label", "category"?}); returns the classifier (numpy
    arrays, usable without torch in the workers) and precision/recall/F1 of 'unsafe' on the held-out rows."""
    import torch
    for r in rows:
        if r["label"] not in ("safe", "unsafe"):
            fail(f"{source}: label must be 'safe' or 'unsafe', not {r['label']!r}")
    cats = [category_of(r) if r["label"] == "unsafe" else "safe" for r in rows]
    classes = ["safe"] + sorted(set(cats) - {"safe"})
    if len(classes) < 2 or len(set(cats)) == 1 or len(rows) < 10:
        fail(f"{source}: the classifier needs at least 10 texts, some safe and some unsafe")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_hold = int(len(rows) * classifier_holdout)
    held, train = order[:n_hold], order[n_hold:]
    cache = {}
    feats = [ngram_buckets(r["text"], classifier_buckets, cache) for r in rows]
    # parameters only for the buckets the texts use (the others would stay 0): a small dense model, fast to train
    used, compact = np.unique(np.concatenate(feats), return_inverse=True)
    feats = [torch.from_numpy(x) for x in np.split(compact, np.cumsum([len(f) for f in feats])[:-1])]
    y = torch.tensor([classes.index(c) for c in cats])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: more threads only fight over the cores
    torch.manual_seed(seed)
    # logits = the sum of the n-grams' weights + bias: a sum, not a mean, so that one unsafe sentence still counts
    # in a segment of several (it is trained on texts, then labels segments)
    bag = torch.nn.EmbeddingBag(len(used), len(classes), mode="sum")
    torch.nn.init.zeros_(bag.weight)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([bag.weight, bias], lr=0.05)
    t0, rng = time.time(), random.Random(seed)
    for epoch in range(classifier_epochs):
        rng.shuffle(train)
        for i in range(0, len(train), 64):
            batch = train[i:i + 64]
            x = [feats[j] for j in batch]
            offsets = torch.tensor([0] + [len(f) for f in x[:-1]]).cumsum(0)
            loss = torch.nn.functional.cross_entropy(bag(torch.cat(x), offsets) + bias, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    weights = np.zeros((classifier_buckets, len(classes)), dtype=np.float32)
    weights[used] = bag.weight.detach().numpy()
    clf = {"classes": classes, "W": weights,
           "b": bias.detach().numpy().astype(np.float64), "cache": {}}
    truth = [rows[j]["label"] == "unsafe" for j in held]
    pred = [lab == "unsafe" for lab, _ in classify(clf, [rows[j]["text"] for j in held])]
    tp = sum(t and p for t, p in zip(truth, pred))
    fp = sum(p and not t for t, p in zip(truth, pred))
    fn = sum(t and not p for t, p in zip(truth, pred))
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    share = sum(truth) / max(len(truth), 1)
    metrics = {"source": source, "classes": classes, "train_texts": len(train), "heldout_texts": len(held),
               "heldout_unsafe_share": share, "precision": prec, "recall": rec,
               "f1": 2 * prec * rec / max(prec + rec, 1e-12),
               "accuracy": sum(t == p for t, p in zip(truth, pred)) / max(len(held), 1),
               "always_unsafe_f1": 2 * share / (1 + share)}  # the F1 of flagging everything: the floor to beat
    print(f"classifier ({len(classes) - 1} unsafe categories, {len(train):,} training texts, {time.time() - t0:.1f}s): "
          f"held-out {len(held):,} texts ({share:.0%} unsafe): precision {prec:.3f} recall {rec:.3f} "
          f"F1 {metrics['f1']:.3f} (flagging everything: F1 {metrics['always_unsafe_f1']:.3f})")
    return clf, metrics


def category_of(r):
    cat = r.get("category") or DEFAULT_CATEGORY
    return re.sub(r"\s+", "_", str(cat).strip()) or DEFAULT_CATEGORY


# -----------------------------------------------------------------------------
# Real text: tokenizer, inputs

def real_tokenizer(spec):
    """tiktoken's `spec` encoding (or a spec .json from write_tokenizer) extended with the special tokens the
    interventions need: <|endoftext|> (gpt2 has it already) and the harmfulness tag <|harmful|>."""
    import tiktoken
    try:
        if spec.endswith(".json"):
            with open(spec) as f:
                s = json.load(f)
            base = tiktoken.Encoding(s["name"], pat_str=s["pat_str"], special_tokens=s.get("special_tokens", {}),
                                     mergeable_ranks={base64.b64decode(k): v for k, v in s["mergeable_ranks"].items()})
        else:
            base = tiktoken.get_encoding(spec)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if spec.endswith(".json"):
            fail(f"cannot read the tokenizer spec '{spec}' ({why}); write one with reflect.write_tokenizer(enc, path)")
        fail(f"cannot load tiktoken's '{spec}' encoding ({why}). Its BPE file is downloaded on first use: run once "
             f"with internet access, or copy tiktoken's cache here and set TIKTOKEN_CACHE_DIR to it, or pass "
             f"--tokenizer=<spec.json> (reflect.write_tokenizer)")
    special = dict(base._special_tokens)
    for tok in (EOT_TEXT, TAG_TEXT):
        if tok not in special:
            special[tok] = max([base.max_token_value] + list(special.values())) + 1
    return tiktoken.Encoding(name=f"{base.name}+safety", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=special)


def write_tokenizer(enc, path):
    """Save a tiktoken Encoding as a --tokenizer spec, e.g. a small one built offline for tests."""
    with open(path, "w") as f:
        json.dump({"name": enc.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens,
                   "mergeable_ranks": {base64.b64encode(k).decode(): v for k, v in enc._mergeable_ranks.items()}}, f)


def token_tables(enc):
    """Per token id: its length in bytes, whether it ends a sentence (last byte . ! ?), starts with whitespace, or
    starts inside a UTF-8 character. Segmenting then needs no second pass over the text."""
    n = enc.n_vocab
    t = {"nbytes": np.zeros(n, np.int64), "sentence_end": np.zeros(n, bool), "space_first": np.zeros(n, bool),
         "mid_char": np.zeros(n, bool)}
    for tok, i in enc._mergeable_ranks.items():
        t["nbytes"][i] = len(tok)
        t["sentence_end"][i] = tok[-1] in b".!?"
        t["space_first"][i] = tok[:1].isspace()
        t["mid_char"][i] = tok[0] & 0xC0 == 0x80
    for s, i in enc._special_tokens.items():
        t["nbytes"][i] = len(s.encode())
    return t


def read_labels(path):
    """{doc id: [(start, end, category, line)] of its unsafe spans, sorted}; safe spans change nothing."""
    spans = {}
    for n, r in read_jsonl(path, "labels", ("id", "start", "end", "label")):
        if r["label"] not in ("safe", "unsafe"):
            fail(f"labels file '{path}' line {n}: label must be 'safe' or 'unsafe', not {r['label']!r}")
        if not (isinstance(r["start"], int) and isinstance(r["end"], int) and 0 <= r["start"] < r["end"]):
            fail(f"labels file '{path}' line {n}: start and end must be integers with 0 <= start < end")
        if r["label"] == "unsafe":
            spans.setdefault(str(r["id"]), []).append((r["start"], r["end"], category_of(r), n))
    for doc_id, s in spans.items():
        s.sort()
        for a, b in zip(s, s[1:]):
            if b[0] < a[1]:
                fail(f"labels file '{path}' lines {a[3]} and {b[3]}: the unsafe spans [{a[0]}, {a[1]}) and "
                     f"[{b[0]}, {b[1]}) of document '{doc_id}' overlap; merge them into one span")
    return spans


def read_rewrites(path):
    """{doc id: {(start, end): replacement text}}."""
    out = {}
    for n, r in read_jsonl(path, "rewrites", ("id", "start", "end", "text")):
        if not isinstance(r["text"], str):
            fail(f"rewrites file '{path}' line {n}: text must be a string")
        out.setdefault(str(r["id"]), {})[(r["start"], r["end"])] = r["text"]
    return out


# -----------------------------------------------------------------------------
# Real text: the workers. Each gets the tokenizer, labels, rewrites and classifier once (init_worker), then turns
# chunks of shard lines into the token bytes of each stream; the documents of a chunk are segmented together.

W = {}  # a worker's state


def init_worker(state):
    W.clear()
    W.update(state)
    W["reflections"] = {}


def doc_rng(doc_id):
    """A document's own random stream: the same tags and coin flips whatever the chunking or number of workers."""
    return np.random.default_rng([W["seed"], zlib.crc32(doc_id.encode())])


def reflection_ids(category):
    """Tokens of the reflection after a segment: safe (category None) or unsafe with its category."""
    if category not in W["reflections"]:
        text = REFLECT_SAFE if category is None else REFLECT_UNSAFE.format(category=category)
        W["reflections"][category] = W["enc"].encode_ordinary(text)
    return W["reflections"][category]


def long_cut(flat, start, end):
    """Where to cut a sentence longer than the limit, at most at `end`: before a word if one starts in the second
    half of the window, else at any token boundary that is not inside a UTF-8 character."""
    T = W["tables"]
    c = next((c for c in range(end, start + (end - start) // 2, -1) if T["space_first"][flat[c]]), None)
    return c or next((c for c in range(end, start, -1) if not T["mid_char"][flat[c]]), end)


def segment(flat, doc_ends):
    """The end (index into flat) of every segment of the concatenated documents: sentence-aligned, at most
    segment_tokens tokens; a longer sentence is cut (long_cut). Also the end of every sentence."""
    T, limit = W["tables"], W["segment_tokens"]
    n = len(flat)
    cut = np.zeros(n + 1, dtype=bool)  # cut[i]: a sentence starts at token i
    cut[1:n] = T["sentence_end"][flat[:-1]] & T["space_first"][flat[1:]]
    cut[doc_ends] = True
    doc_end = np.zeros(n + 1, dtype=bool)
    doc_end[doc_ends] = True
    bounds = np.flatnonzero(cut)
    ends, start, prev = [], 0, 0
    for b, last in zip(bounds.tolist(), doc_end[bounds].tolist()):  # greedy: add sentences while they fit
        if b - start > limit:
            if prev > start:
                ends.append(prev)
                start = prev
            while b - start > limit:  # one sentence longer than the limit
                c = long_cut(flat, start, start + limit)
                ends.append(c)
                start = c
        prev = b
        if last:
            ends.append(b)
            start = b
    return np.array(ends, dtype=np.int64), bounds


def byte_offsets(flat, a, b):
    """Byte offset of each token of flat[a:b] in its text, and of the end."""
    return np.concatenate([[0], np.cumsum(W["tables"]["nbytes"][flat[a:b]])])


def classify_sentences(docs, spans, flat, starts, ends, sentence_ends):
    """The built-in classifier labels every sentence (the unit it was trained on; a sentence longer than the limit
    in its cut pieces); its unsafe sentences become the documents' unsafe spans."""
    texts, where = [], []
    for j, (doc_id, text) in enumerate(docs):
        a = int(starts[j])
        s = sentence_ends[np.searchsorted(sentence_ends, a, side="right"):np.searchsorted(sentence_ends, ends[j],
                                                                                         side="right")]
        off = byte_offsets(flat, a, ends[j])[np.concatenate([[a], s]) - a].tolist()
        raw = text.encode()
        texts += [raw[x:y].decode("utf-8", "replace") for x, y in zip(off, off[1:])]
        where.append((j, off, raw))
    pred = iter(classify(W["clf"], texts))
    for j, off, raw in where:
        chars = (lambda b: b) if docs[j][1].isascii() else (lambda b: len(raw[:b].decode("utf-8", "ignore")))
        for x, y in zip(off, off[1:]):
            label, cat = next(pred)
            if label == "unsafe":
                spans[j].append((chars(x), chars(y), cat, 0))


def label_segments(docs, spans, flat, starts, ends, seg_ends, seg_doc):
    """Category of each segment (None: safe): a segment overlapping an unsafe span takes the first one's category."""
    seg_starts = np.concatenate([[0], seg_ends[:-1]])
    first = np.searchsorted(seg_doc, np.arange(len(docs)), side="left").tolist()
    last = np.searchsorted(seg_doc, np.arange(len(docs)), side="right").tolist()
    cats = [None] * len(seg_ends)
    for j in [j for j in range(len(docs)) if spans[j]]:
        text, a = docs[j][1], starts[j]
        off = byte_offsets(flat, a, ends[j])
        lo = off[seg_starts[first[j]:last[j]] - a].tolist()
        hi = off[seg_ends[first[j]:last[j]] - a].tolist()
        ascii_ = text.isascii()
        for s, e, cat, _ in spans[j]:  # char offsets -> byte offsets, then every overlapping segment
            sb, eb = (s, e) if ascii_ else (len(text[:s].encode()), len(text[:e].encode()))
            for i in range(np.searchsorted(hi, sb, side="right"), len(hi)):
                if lo[i] >= eb:
                    break
                if cats[first[j] + i] is None:
                    cats[first[j] + i] = cat
    return cats


def keep_docs(flat, lens, keep, eot):
    """The kept documents' tokens, each followed by <|endoftext|>."""
    kept = flat[np.repeat(keep, lens)]
    return np.insert(kept, np.cumsum(lens[keep]), eot)


def rewritten(doc_id, text, spans, st):
    """The text with each unsafe span replaced by its rewrite, or dropped when it has none."""
    rw = W["rewrites"].get(doc_id, {})
    out, pos = [], 0
    for s, e, _, _ in spans:
        out.append(text[pos:s])
        if (s, e) in rw:
            out.append(rw[(s, e)])
            st["spans_rewritten"] += 1
        else:
            st["spans_dropped"] += 1
        pos = e
    out.append(text[pos:])
    return "".join(out)


def tag_positions(rng, flat, seg_range, seg_starts, seg_ends, cats):
    """Positions (in flat) of the tags of a document's unsafe segments: after each token but the last, with
    probability tag_rate, so a tag always has unsafe text on both sides (but never inside a UTF-8 character)."""
    pos = []
    for i in seg_range:
        if cats[i] is not None:
            a, b = int(seg_starts[i]), int(seg_ends[i])
            pos.append(a + 1 + np.flatnonzero(rng.random(b - a - 1) < W["tag_rate"]))
    pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    return pos[~W["tables"]["mid_char"][flat[pos]]]


def process_docs(docs):
    """One split's documents [(id, text)] -> (safe tokens, mix tokens, statistics)."""
    enc, eot, iv = W["enc"], W["eot"], W["intervention"]
    st = dict.fromkeys(("docs", "empty_docs", "unsafe_docs", "chars", "unsafe_chars", "input_tokens", "segments",
                        "unsafe_segments", "reflections", "reflection_tokens", "tags", "spans_rewritten",
                        "spans_dropped"), 0)
    st["labelled_ids"], st["label_lines"] = [], []
    spans = []
    for doc_id, text in docs:
        s = W["labels"].get(doc_id, [])
        if s:
            st["labelled_ids"].append(doc_id)
            if s[-1][1] > len(text):
                raise BadInput(f"labels file '{W['labels_path']}' line {s[-1][3]}: the span [{s[-1][0]}, {s[-1][1]}) "
                               f"lies beyond the end of document '{doc_id}' ({len(text)} characters); label this "
                               f"corpus's texts")
        spans.append(list(s))
    ids = [enc.encode_ordinary(t) for _, t in docs]
    nonempty = [j for j, x in enumerate(ids) if x]
    st["empty_docs"] = len(docs) - len(nonempty)
    if st["empty_docs"]:  # a document without tokens has nothing to learn from: drop it (no lone <|endoftext|>)
        docs, ids, spans = [docs[j] for j in nonempty], [ids[j] for j in nonempty], [spans[j] for j in nonempty]
    if not docs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), st
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    ends = np.cumsum(lens)
    starts = ends - lens
    st["docs"], st["input_tokens"], st["chars"] = len(docs), len(flat), sum(len(t) for _, t in docs)

    segmented = W["clf"] is not None or iv in ("reflect", "tag", "safety_pretraining") or (
        iv == "filter" and W["filter_level"] == "segment")
    if segmented:
        seg_ends, sentence_ends = segment(flat, ends)
        seg_starts = np.concatenate([[0], seg_ends[:-1]])
        seg_doc = np.searchsorted(ends, seg_ends, side="left")
        if W["clf"]:
            classify_sentences(docs, spans, flat, starts, ends, np.union1d(sentence_ends, seg_ends))  # + cuts
        cats = label_segments(docs, spans, flat, starts, ends, seg_ends, seg_doc)
        seg_first = np.searchsorted(seg_doc, np.arange(len(docs) + 1), side="left").tolist()
        st["segments"], st["unsafe_segments"] = len(seg_ends), sum(c is not None for c in cats)
    unsafe = np.array([bool(s) for s in spans], dtype=bool)
    st["unsafe_docs"] = int(unsafe.sum())
    st["unsafe_chars"] = sum(e - s for sp in spans for s, e, _, _ in sp)
    if W["clf"]:
        st["label_lines"] = [json.dumps({"id": docs[j][0], "start": s, "end": e, "label": "unsafe", "category": c})
                             for j in range(len(docs)) for s, e, c, _ in spans[j]]

    safe = keep_docs(flat, lens, ~unsafe, eot)
    if iv == "none":
        mix = keep_docs(flat, lens, np.ones(len(docs), bool), eot)
    elif iv == "refusal" or (iv == "filter" and W["filter_level"] == "document"):
        mix = safe
    elif iv == "filter":  # segment level: drop the tokens of unsafe segments
        keep = np.repeat(np.array([c is None for c in cats]), seg_ends - seg_starts)
        cum = np.concatenate([[0], np.cumsum(keep)])
        kept_lens = cum[ends] - cum[starts]
        mix = np.insert(flat[keep], np.cumsum(kept_lens)[kept_lens > 0], eot)
    elif iv == "reflect":  # insert after each segment its reflection (+ <|endoftext|> after a document's last)
        names = sorted({c for c in cats if c is not None})
        seqs = [reflection_ids(None)] + [reflection_ids(c) for c in names]
        width = max(len(s) for s in seqs) + 1
        table = np.full((2 * len(seqs), width), -1, dtype=np.int64)  # row 2k: reflection k, row 2k+1: ... + eot
        for k, s in enumerate(seqs):
            table[2 * k, :len(s)] = table[2 * k + 1, :len(s)] = s
            table[2 * k + 1, len(s)] = eot
        code = np.array([0 if c is None else 1 + names.index(c) for c in cats], dtype=np.int64)
        at_doc_end = np.zeros(len(seg_ends), dtype=np.int64)
        at_doc_end[np.array(seg_first[1:]) - 1] = 1
        vals = table[2 * code + at_doc_end].ravel()
        mix = np.insert(flat, np.repeat(seg_ends, width)[vals >= 0], vals[vals >= 0])
        st["reflections"] = len(seg_ends)
        st["reflection_tokens"] = int(np.array([len(s) for s in seqs])[code].sum())
    elif iv == "tag":
        pos = [tag_positions(doc_rng(docs[j][0]), flat, range(seg_first[j], seg_first[j + 1]), seg_starts, seg_ends,
                             cats) for j in np.flatnonzero(unsafe)]
        pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        st["tags"] = len(pos)
        mix = np.insert(flat, np.concatenate([pos, ends]), np.concatenate([np.full(len(pos), W["tag"]),
                                                                           np.full(len(ends), eot)]))
    else:  # rewrite, safety_pretraining: document by document
        pieces = []
        for j, (doc_id, text) in enumerate(docs):
            a, b = int(starts[j]), int(ends[j])
            if not unsafe[j]:
                pieces.append(flat[a:b])
            else:
                rng = doc_rng(doc_id) if iv == "safety_pretraining" else None
                if iv == "rewrite" or rng.random() < 0.5:
                    pieces.append(np.array(enc.encode_ordinary(rewritten(doc_id, text, spans[j], st)), np.int64))
                else:
                    pos = tag_positions(rng, flat, range(seg_first[j], seg_first[j + 1]), seg_starts, seg_ends, cats)
                    st["tags"] += len(pos)
                    pieces.append(np.insert(flat[a:b], pos - a, W["tag"]))
            if len(pieces[-1]):
                pieces.append(np.array([eot]))
        mix = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return safe, mix, st


def process_chunk(job):
    """Worker: (shard, first line number, lines) -> {"bytes": {stream: token bytes}, "stats": {split: counts}}."""
    shard, first, lines = job
    groups = {"train": [], "val": []}
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{shard} line {n} is not valid json ({e}); prepare the corpus again")
        if not isinstance(d, dict) or "id" not in d or not isinstance(d.get("text"), str) or \
                d.get("split") not in groups:
            raise BadInput(f"{shard} line {n} is not a document {{\"id\", \"split\": \"train\"|\"val\", \"text\"}}")
        groups[d["split"]].append((str(d["id"]), d["text"]))
    out = {"bytes": {}, "stats": {}}
    for split, docs in groups.items():
        safe, mix, out["stats"][split] = process_docs(docs)
        out["bytes"][f"safe_{split}"] = safe.astype(W["dtype"]).tobytes()
        out["bytes"][f"mix_{split}"] = mix.astype(W["dtype"]).tobytes()
    return out


def read_chunks(docs_dir, shards):
    """(shard, first line number, lines) of about chunk_chars characters each: the corpus is streamed, never held."""
    for name in shards:
        with open(os.path.join(docs_dir, name), encoding="utf-8") as f:
            lines, size, first = [], 0, 1
            for n, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield name, first, lines
                    lines, size, first = [], 0, n + 1
            if lines:
                yield name, first, lines


def run_chunks(jobs, state, consume, nproc):
    """process_chunk over jobs, in order, on nproc workers with at most 2 chunks each in flight."""
    if nproc <= 1:
        init_worker(state)
        for job in jobs:
            consume(process_chunk(job))
        return
    import multiprocessing as mp
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(nproc, initializer=init_worker, initargs=(state,))
    try:
        pending = deque()
        for job in jobs:
            pending.append(pool.apply_async(process_chunk, (job,)))
            if len(pending) >= 2 * nproc:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
    finally:
        pool.terminate()
        pool.join()


def main_real(docs_dir):
    t0 = time.time()
    shards = list_shards(docs_dir)
    if classifier_on_world:
        fail(f"--classifier_on_world is for MedSafetyWorld, and '{docs_dir}' holds real text (no world.json)")
    if bool(labels) == bool(train_classifier):
        fail("real text needs labels: pass --labels=<spans.jsonl> (from any guard model) or "
             "--train_classifier=<labelled.jsonl> (the built-in classifier), one of the two")
    if intervention in ("rewrite", "safety_pretraining") and not rewrites:
        fail(f"--intervention={intervention} needs --rewrites=<file.jsonl>: {{\"id\", \"start\", \"end\", \"text\"}} "
             f"per unsafe span (see REWRITE_PROMPT in reflect.py)")
    if intervention in ("refusal", "safety_pretraining") and not refusals:
        fail(f"--intervention={intervention} needs --refusals=<file.jsonl>: {{\"prompt\", \"response\"}} per native "
             f"refusal dialogue (see REFUSAL_PROMPT in reflect.py)")
    enc = real_tokenizer(tokenizer)
    spans = read_labels(labels) if labels else {}
    clf, clf_metrics = None, None
    if train_classifier:
        clf, clf_metrics = fit_classifier([r for _, r in read_jsonl(train_classifier, "labelled texts",
                                                                     ("text", "label"))], train_classifier)
    # rewrites and refusals only where the intervention uses them
    rw = read_rewrites(rewrites) if intervention in ("rewrite", "safety_pretraining") else {}
    dialogues = ([r for _, r in read_jsonl(refusals, "refusals", ("prompt", "response"))]
                 if intervention in ("refusal", "safety_pretraining") else [])
    eot, tag = enc._special_tokens[EOT_TEXT], enc._special_tokens[TAG_TEXT]
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    nproc = num_proc or cpu_count()
    state = {"enc": enc, "tables": token_tables(enc), "eot": eot, "tag": tag, "dtype": dtype, "labels": spans,
             "labels_path": labels, "rewrites": rw, "clf": clf, "intervention": intervention,
             "filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed}
    print(f"{intervention} on {docs_dir} ({len(shards)} shards): tokenizer {enc.name} ({enc.n_vocab:,} tokens), "
          f"labels from {labels or 'the classifier'}, {nproc} worker(s)")

    # write into a temporary directory, then swap it in: a failure never leaves half the streams behind
    out_dir = os.path.join(data_root, dataset, intervention)
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    files = {s: open(os.path.join(tmp_dir, f"{s}.bin"), "wb") for s in STREAMS}
    label_file = open(os.path.join(tmp_dir, "labels.jsonl"), "w") if clf else None
    handles = list(files.values()) + ([label_file] if label_file else [])
    tokens = dict.fromkeys(STREAMS, 0)
    stats = {"train": {}, "val": {}}
    seen = set()
    last = [time.time()]

    def consume(res):
        for s, b in res["bytes"].items():
            files[s].write(b)
            tokens[s] += len(b) // np.dtype(dtype).itemsize
        for split, st in res["stats"].items():
            seen.update(st.pop("labelled_ids"))
            if label_file:
                label_file.writelines(line + "\n" for line in st["label_lines"])
            st.pop("label_lines")
            for k, v in st.items():
                stats[split][k] = stats[split].get(k, 0) + v
        if time.time() - last[0] > 10:
            last[0] = time.time()
            n_in = sum(s.get("input_tokens", 0) for s in stats.values())
            print(f"  {sum(s.get('docs', 0) for s in stats.values()):,} documents, {n_in:,} tokens "
                  f"({n_in / (time.time() - t0):,.0f} tokens/s)", flush=True)

    try:
        try:
            run_chunks(read_chunks(docs_dir, shards), state, consume, nproc)
            unknown = sorted(set(spans) - seen)
            if unknown:
                raise BadInput(f"labels file '{labels}' names {len(unknown)} document(s) not in {docs_dir} "
                               f"(e.g. '{unknown[0]}'); label the documents of this corpus")
        except BadInput as e:
            fail(str(e))
        # the native refusal dialogues, appended to the mix stream, split like the corpus (by a hash of the prompt)
        n_docs = {s: stats[s].get("docs", 0) for s in stats}
        val_share = n_docs["val"] / max(sum(n_docs.values()), 1)
        texts = {"train": [], "val": []}
        for r in dialogues:
            split = "val" if zlib.crc32(str(r["prompt"]).encode()) / 2 ** 32 < val_share else "train"
            texts[split].append(DIALOGUE.format(prompt=r["prompt"], response=r["response"]))
        refusal_tokens = {}
        for split, t in texts.items():
            arr = np.array([i for x in enc.encode_ordinary_batch(t) for i in x + [eot]], dtype=dtype)
            files[f"mix_{split}"].write(arr.tobytes())
            tokens[f"mix_{split}"] += len(arr)
            refusal_tokens[split] = len(arr)
    except BaseException:  # failed or interrupted: leave nothing behind
        for f in handles:
            f.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    for f in handles:
        f.close()

    tr = stats["train"]
    every = {k: sum(s.get(k, 0) for s in stats.values()) for k in stats["train"]}
    mix_train = max(tokens["mix_train"], 1)
    unused = sum(len(v) for v in rw.values()) - every.get("spans_rewritten", 0) if intervention == "rewrite" else 0
    meta = {
        "dataset": dataset, "intervention": intervention, "tokenizer": enc.name, "vocab_size": enc.n_vocab,
        "dtype": np.dtype(dtype).name, "eot_token": eot, "tag_token": tag,
        "special_tokens": {EOT_TEXT: eot, TAG_TEXT: tag},
        "reflection_format": {"safe": REFLECT_SAFE, "unsafe": REFLECT_UNSAFE,
                              "tokens": "plain text, after each segment"},
        "tokens": tokens,
        "mix_sources": {"corpus": (tokens["mix_train"] - refusal_tokens["train"]) / mix_train,
                        "refusal": refusal_tokens["train"] / mix_train},
        "mix_reflections": tr.get("reflections", 0), "mix_reflection_share": tr.get("reflection_tokens", 0) / mix_train,
        "mix_tags": tr.get("tags", 0), "mix_tag_share": tr.get("tags", 0) / mix_train,
        "documents": every.get("docs", 0), "empty_documents": every.get("empty_docs", 0),
        "raw_unsafe_doc_share": every.get("unsafe_docs", 0) / max(every.get("docs", 0), 1),
        "raw_unsafe_char_share": every.get("unsafe_chars", 0) / max(every.get("chars", 0), 1),
        "raw_unsafe_segment_share": (every["unsafe_segments"] / every["segments"]) if every.get("segments") else None,
        "spans_rewritten": every.get("spans_rewritten", 0), "spans_dropped": every.get("spans_dropped", 0),
        "rewrites_unused": unused, "refusal_dialogues": len(dialogues),
        "labels": os.path.abspath(labels) if labels else "classifier", "classifier": clf_metrics,
        "config": {"filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed,
                   "tokenizer": tokenizer, "rewrites": rewrites, "refusals": refusals},
    }
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    dt = time.time() - t0
    n_in = every.get("input_tokens", 0)
    print(f"{intervention}: {meta['documents']:,} documents ({meta['raw_unsafe_doc_share']:.1%} with unsafe spans, "
          f"{meta['raw_unsafe_char_share']:.1%} of characters); tokens "
          + ", ".join(f"{k} {v:,}" for k, v in tokens.items()))
    print(f"mix sources (train tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in meta["mix_sources"].items())
          + f"; reflections {meta['mix_reflections']:,} ({meta['mix_reflection_share']:.1%} of tokens), tags "
          f"{meta['mix_tags']:,}" + (f"; spans rewritten {meta['spans_rewritten']:,}, dropped without a rewrite "
                                     f"{meta['spans_dropped']:,}" if rw else ""))
    if unused:
        print(f"warning: {unused:,} rewrites match no unsafe span of the labels (same id, start and end): unused")
    print(f"wrote {out_dir} in {dt:.1f}s ({n_in / dt:,.0f} corpus tokens/s)")


# -----------------------------------------------------------------------------
# Benchmark: the reflect intervention's throughput against tiktoken's encode_ordinary_batch on the same text

BENCH_WORDS = """the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were their one all we can her has there been if more when will would who so no time people year way day
man thing woman life child world school state family student group country problem hand part place case week company
system program question work government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy moment air teacher
force education learn teach plant energy cell river garden music science history language light heat paper energy
early small large young important public different possible local social national political economic natural""".split()


def toy_encoding():
    """A small tiktoken Encoding built offline: the 256 bytes, plus every prefix of the benchmark's words (with and
    without a capital and a leading space), so that, as with gpt2, most words are one token."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # gpt2's pre-tokenizer pattern (code, not a download)
    ranks = {bytes([i]): i for i in range(256)}
    for w in BENCH_WORDS:
        for form in (w, " " + w, w.capitalize(), " " + w.capitalize()):
            b = form.encode()
            for k in range(2, len(b) + 1):
                ranks.setdefault(b[:k], len(ranks))
    return tiktoken.Encoding("toy-words", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})


def bench_corpus(n_tokens, rng):
    """English-looking documents (paragraphs of sentences from a word list) of about n_tokens words, and labels:
    about 1 in 10 documents has 1-3 unsafe sentences."""
    docs, spans, n = [], [], 0
    while n < n_tokens * 0.8:  # ~1.25 tokens per word
        paras, k = [], 0
        for _ in range(rng.randint(1, 8)):
            sents = []
            for _ in range(rng.randint(2, 9)):
                ws = [rng.choice(BENCH_WORDS) for _ in range(rng.randint(4, 30))]
                if len(ws) > 8 and rng.random() < 0.5:
                    ws[rng.randrange(2, len(ws) - 2)] += ","
                if rng.random() < 0.1:
                    ws.insert(rng.randrange(len(ws)), str(rng.randint(2, 2030)))
                sents.append(" ".join(ws).capitalize() + rng.choice(".....!?"))
                k += len(ws)
            paras.append(" ".join(sents))
        text, doc_id = "\n\n".join(paras), f"bench-{len(docs)}"
        if rng.random() < 0.1:
            starts = [0] + [m.end() + 1 for m in re.finditer(r"[.!?](?=\s)", text)]
            for s in sorted(rng.sample(starts, min(len(starts), rng.randint(1, 3)))):
                e = re.search(r"[.!?](?=\s)|$", text[s:]).end() + s
                spans.append({"id": doc_id, "start": s, "end": e, "label": "unsafe",
                              "category": rng.choice(["violence", "weapons", "self_harm"])})
        docs.append({"id": doc_id, "split": "val" if rng.random() < 0.05 else "train", "text": text})
        n += k
    return docs, spans


def run_benchmark():
    import contextlib
    import io
    import tempfile
    import tiktoken
    nproc = num_proc or cpu_count()
    try:
        enc, note = tiktoken.get_encoding(tokenizer), f"tiktoken '{tokenizer}'"
    except Exception:  # offline without the BPE file: a small Encoding of the same shape
        enc = toy_encoding()
        note = (f"NOT gpt2: '{tokenizer}' could not be loaded (its BPE file is not here and cannot be downloaded), so "
                f"a small offline Encoding ({enc.n_vocab:,} tokens: bytes + word prefixes, gpt2's pre-tokenizer)")
    docs, spans = bench_corpus(benchmark_tokens, random.Random(seed))
    texts = [d["text"] for d in docs]
    n_tok = sum(len(x) for x in enc.encode_ordinary_batch(texts))
    print(f"reflect.py benchmark: {len(docs):,} generated English documents, {n_tok:,} tokens, "
          f"{sum(map(len, texts)) / 1e6:.1f} MB; {len(spans):,} unsafe spans; segment_tokens={segment_tokens}")
    print(f"tokenizer: {note}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "tokenizer.json")
        write_tokenizer(enc, spec)
        ext = real_tokenizer(spec)
        label_spans = {}
        for s in spans:
            label_spans.setdefault(s["id"], []).append((s["start"], s["end"], s["category"], 0))
        state = {"enc": ext, "tables": token_tables(ext), "eot": ext._special_tokens[EOT_TEXT],
                 "tag": ext._special_tokens[TAG_TEXT], "dtype": np.uint16 if ext.n_vocab <= 65536 else np.uint32,
                 "labels": label_spans, "labels_path": "", "rewrites": {}, "clf": None, "intervention": "reflect",
                 "filter_level": "document", "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed}
        pairs = [(d["id"], d["text"]) for d in docs]
        size = max(1, len(pairs) * chunk_chars // sum(map(len, texts)))

        def in_memory():
            init_worker(state)
            for i in range(0, len(pairs), size):
                process_docs(pairs[i:i + size])
        root = os.path.join(tmp, "data")
        os.makedirs(os.path.join(root, "bench", "docs"))
        with open(os.path.join(root, "bench", "docs", "shard_00000.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        with open(os.path.join(tmp, "labels.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in spans)

        def end_to_end(iv, procs):
            argv = [f"--data_root={root}", "--dataset=bench", f"--intervention={iv}", f"--labels={tmp}/labels.jsonl",
                    f"--tokenizer={spec}", f"--num_proc={procs}", f"--segment_tokens={segment_tokens}",
                    f"--seed={seed}", f"--chunk_chars={chunk_chars}", "--benchmark=False"]
            with contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        rows = [("tiktoken encode_ordinary_batch(texts, num_threads=N)", nproc,
                 lambda: enc.encode_ordinary_batch(texts, num_threads=nproc)),
                ("tiktoken encode_ordinary, one loop (results dropped)", 1,
                 lambda: deque(map(enc.encode_ordinary, texts), maxlen=0)),
                ("reflect in memory (encode, segment, label, insert), one loop", 1, in_memory),
                ("reflect.py --intervention=none (shards -> .bin, end to end)", nproc,
                 lambda: end_to_end("none", nproc)),
                ("reflect.py --intervention=reflect (shards -> .bin, end to end)", nproc,
                 lambda: end_to_end("reflect", nproc)),
                ("reflect.py --intervention=reflect (shards -> .bin, end to end)", 1, lambda: end_to_end("reflect", 1))]
        best = [float("inf")] * len(rows)
        for _ in range(3):  # interleaved, best of 3: a busy machine slows some runs, rarely all three
            for k, (_, _, fn) in enumerate(rows):
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    rate = [n_tok / b for b in best]
    print(f"\n| {'what':<62} | procs | {'tokens/s':>11} | vs tiktoken, same procs |")
    print(f"|{'-' * 64}|-------|{'-' * 13}|-------------------------|")
    for (what, procs, _), r in zip(rows, rate):
        ref = rate[0] if procs == nproc else rate[1]  # encode_ordinary_batch on N threads, or the one-thread loop
        print(f"| {what:<62} | {procs:>5} | {r:>11,.0f} | {r / ref:>22.2f}x |")
    print(f"\ntokens/s: tokens of the corpus text per second of wall time, best of 3 interleaved runs; the reflect.py "
          f"rows include reading the json shards, starting the workers and writing the streams. Load average while "
          f"measuring: {os.getloadavg()[0]:.1f} on {cpu_count()} cores.")


# -----------------------------------------------------------------------------

def main(argv=None):
    globals().update(configure(_DEFAULTS, sys.argv[1:] if argv is None else argv))
    if benchmark:
        return run_benchmark()
    if intervention not in INTERVENTIONS:
        fail(f"unknown intervention '{intervention}' (choose from {', '.join(INTERVENTIONS)})")
    if filter_level not in ("document", "segment"):
        fail(f"filter_level must be 'document' or 'segment', not '{filter_level}'")
    if not 0.0 <= tag_rate <= 1.0:
        fail(f"tag_rate must lie in [0, 1], not {tag_rate}")
    if segment_tokens < 1:
        fail(f"segment_tokens must be at least 1, not {segment_tokens}")
    if not 0.0 < dose <= 1.0:
        fail(f"dose must lie in (0, 1], not {dose}")
    if dose < 1 and (intervention in ("none", "filter") or dataset != "medsafety"):
        fail(f"--dose needs a MedSafetyWorld intervention that changes the corpus, not '{intervention}'")
    if chunk_chars < 1 or num_proc < 0:
        fail(f"chunk_chars must be at least 1 and num_proc at least 0 (0: one per core)")
    if not 0.0 <= classifier_holdout < 1.0:
        fail(f"classifier_holdout must lie in [0, 1), not {classifier_holdout}")
    docs_dir = os.path.join(data_root, dataset, "docs")
    world_path = os.path.join(docs_dir, "world.json")
    list_shards(docs_dir)
    if dataset == "medsafety" or os.path.isfile(world_path):
        main_world(docs_dir, world_path)
    else:
        main_real(docs_dir)


if __name__ == "__main__":
    main()

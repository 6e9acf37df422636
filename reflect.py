"""
Apply one safety intervention to a prepared corpus and write the curriculum's two token streams.

Reads:  data/<dataset>/docs/ (prepare.py): MedSafetyWorld documents with exact segment labels and world.json, or
        real text ({"id", "split", "text"} lines) with --labels (label.py's guard labels, or any spans file) or
        --train_classifier (the built-in classifier, an offline fallback)
Writes: data/<dataset>/<intervention>/{safe,mix}_{train,val}.bin + meta.json (formats: README.md)
        safe: the filtered corpus, read before the curriculum start; mix: the corpus with the intervention;
        real text with --intervention=none and no labels: the raw baseline, one stream {train,val}.bin + meta.json
Run:    python reflect.py --intervention=reflect                 # MedSafetyWorld (default dataset)
        python reflect.py --intervention=reflect --dose=0.4      # the dose-matched control (the timing paper)
        python reflect.py --intervention=tag --classifier_on_world=True   # what an imperfect classifier costs
        python reflect.py --dataset=fineweb-edu --intervention=reflect --labels=spans.jsonl --num_proc=16
        python reflect.py --dataset=fineweb-edu --tokenizer_files=<dir>   # raw baseline, gpt2 from local files
        python reflect.py --benchmark=True                        # throughput of reflect vs tiktoken alone
Interventions: none, filter, rewrite, refusal, tag, reflect, safety_pretraining (rewrite + refusal + tag); for the
world each is one text function (apply_world), for real text the same on token ids (mix_tokens). Where a reflection
goes and how it is spelled: safety/reflection.py.
"""
import json
import os
import random
import shutil
import sys
import time
import zlib
from collections import deque

import numpy as np

from safety.common import (fail, file_sha256, load_json, read_jsonl, run_stage, swap_in, worker_signals, writable_dir,
                           write_json)
from safety.configurator import configure, defaults_of
from safety.realtext.bpe import (EOT_TEXT, TAG_TEXT, base_encoding, real_tokenizer, tokenizer_record,
                                 write_tokenizer)
from safety.realtext.classifier import MIN_F1, classify, fit_classifier
from safety.realtext.corpus import bench_corpus, read_labels, read_rewrites, toy_encoding
from safety.reflection import (REFLECT_SAFE, REFLECT_UNSAFE, TextSegmenter, insert_text_reflections, reflect_world_doc,
                               span_bytes, text_reflection, token_tables, tokenize_texts)

# -----------------------------------------------------------------------------
dataset = "medsafety"
data_root = "data"
intervention = "none"      # none | filter | strict_filter | rewrite | refusal | tag | reflect | safety_pretraining
out_name = ""              # the output directory's name under data/<dataset>/; "": the intervention's (and dose's)
filter_level = "document"  # filter: document | segment
segment_tokens = 32        # most tokens in a segment (sentence-aligned): reflect; real text's tag and segment filter;
                           # 0: one sentence per segment (MedSafetyWorld)
user_turn_segments = True  # reflect, MedSafetyWorld: a user turn is a segment of its own, so every request is
                           # reflected on where attacks ask; False: a request shares a segment with its neighbours
dose = 1.0                 # MedSafetyWorld: < 1 writes the dose-matched control <intervention>-dose<NN>: documents
                           # take the intervention until the mix stream holds this share of its intervention tokens
tag_rate = 0.05            # tag: probability of a tag at each position inside an unsafe segment
seed = 0                   # the interventions' own randomness (tag positions, rewrite/tag split, refusal wording)
# real text
tokenizer = "gpt2"         # a tiktoken encoding name, or a tokenizer spec .json (write_tokenizer)
tokenizer_files = ""       # gpt2 offline: a directory with its encoder.json and vocab.bpe (checked by sha256)
labels = ""                # span labels: label.py's data/<dataset>/labels/spans.jsonl, or any guard model's ...
train_classifier = ""      # ... or labelled texts (jsonl) to train the built-in classifier, which then labels
rewrites = ""              # rewrite, safety_pretraining: replacement texts of the unsafe spans (jsonl)
refusals = ""              # refusal, safety_pretraining: native refusal dialogues (jsonl)
num_proc = 0               # worker processes; 0: one per CPU core
chunk_chars = 1048576      # shard text per worker task; at most 2 tasks per worker in flight bound the memory
# the built-in classifier
classifier_buckets = 262144  # hashed n-gram features (2^18)
classifier_epochs = 20
classifier_holdout = 0.2   # share of the labelled texts held out to measure precision/recall/F1
classifier_min_f1 = MIN_F1  # real text: a classifier below this held-out F1 is refused (nothing is written)
classifier_on_world = False  # MedSafetyWorld: train it on the oracle's labels and label with it instead
# benchmark
benchmark = False          # print the throughput of the reflect intervention against tiktoken alone, and stop
benchmark_tokens = 3000000  # size of the generated English corpus
# -----------------------------------------------------------------------------
_DEFAULTS = defaults_of(globals())  # the config keys: everything above, nothing below
INTERVENTIONS = ("none", "filter", "strict_filter", "rewrite", "refusal", "tag", "reflect", "safety_pretraining")
WORLD_ONLY = ("strict_filter",)   # interventions that read MedSafetyWorld's sentence kinds
STREAMS = ("safe_train", "safe_val", "mix_train", "mix_val")


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def list_shards(docs_dir):
    if not os.path.isdir(docs_dir):
        fail(f"no documents at '{docs_dir}': run `python prepare.py --dataset={dataset}` first")
    shards = sorted(f for f in os.listdir(docs_dir) if f.startswith("shard_") and f.endswith(".jsonl"))
    if not shards:
        fail(f"'{docs_dir}' holds no shard_*.jsonl documents: run `python prepare.py --dataset={dataset}` first")
    return shards


def read_docs(docs_dir):
    """All documents of the prepared corpus, in file order (MedSafetyWorld: small enough to hold)."""
    return [d for name in list_shards(docs_dir) for d in read_jsonl(os.path.join(docs_dir, name), "shard")]


def read_summary(docs_dir):
    """prepare.py's summary.json of the documents ({} where there is none: documents of an older prepare.py)."""
    path = os.path.join(docs_dir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        fail(f"'{path}' cannot be read ({type(e).__name__}: {e}); run prepare.py again")
    return summary if isinstance(summary, dict) else {}


# -----------------------------------------------------------------------------
# MedSafetyWorld

def is_unsafe(doc):
    return any(s["label"] == "unsafe" for s in doc["segments"])


def strict_texts(world, doc):
    """The strict filter's text of a safe document: without the sentences that let a model compose a harm from safe
    facts (world.composes_harm: which drug's overdose causes which harm, and toxic doses). A dialogue whose answer
    would lose its first or last sentence (its turn marker or its end) is dropped whole: no question stands without
    its answer."""
    paragraphs = {}
    for s in doc["segments"]:
        paragraphs.setdefault(s["para"], []).append(s)
    out = []
    for segs in paragraphs.values():
        drop = [world.composes_harm(s["text"]) for s in segs]
        answer = [i for i, s in enumerate(segs) if s["text"].startswith("assistant :")]
        if answer and (drop[answer[0]] or drop[-1]):
            continue
        out += [s["text"] for s, d in zip(segs, drop) if not d]
    return out


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
    """The mix corpus for the chosen intervention: documents {"id", "split", "text", "source"}. One text function per
    intervention (docs/MEDSAFETYWORLD.md, "Interventions, exactly"): a document -> its texts in the mix stream, or None
    where it is left out; refusal and safety_pretraining then add the refusal dialogues."""
    def texts(d, f):
        return [f(s) for s in d["segments"]]

    def plain(s):
        return s["text"]

    def tagged(s):
        return world.insert_tags(s["text"], rng, rate=tag_rate, min_tags=0) if s["label"] == "unsafe" else s["text"]

    def rewrite(s):
        # with classifier labels: a false alarm (the oracle says safe) has nothing to rewrite, a miss is not rewritten
        if "oracle" not in s:
            return world.rewrite(s)
        label, cat = s["oracle"]
        return world.rewrite(dict(s, label=label, category=cat)) if s["label"] == label == "unsafe" else s["text"]

    safe_only = lambda d: None if is_unsafe(d) else texts(d, plain)
    TEXT = {
        "none": lambda d: texts(d, plain),
        "filter": safe_only if filter_level == "document" else lambda d: [s["text"] for s in d["segments"]
                                                                          if s["label"] == "safe"],
        # what filtering must cost to stop composition: the filter, and the safe facts a harm is composed from
        "strict_filter": lambda d: None if is_unsafe(d) else strict_texts(world, d),
        "rewrite": lambda d: texts(d, rewrite),
        "refusal": safe_only,
        "tag": lambda d: texts(d, tagged),
        "reflect": lambda d: reflect_world_doc(world, d["segments"], segment_tokens, user_turn_segments),
        # Maini et al.: of the documents with unsafe segments, half rewritten, half tagged (the tag needs unsafe text
        # to mean anything for safe beam search)
        "safety_pretraining": lambda d: texts(d, plain) if not is_unsafe(d) else texts(
            d, rewrite if rng.random() < 0.5 else tagged),
    }
    out = []
    for d in docs:
        t = TEXT[intervention](d)
        if t is not None:
            out.append({"id": d["id"], "split": d["split"], "text": " ".join(t), "source": "corpus"})
    if intervention in ("refusal", "safety_pretraining"):
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
    clf, metrics = fit_classifier(rows, "the world's train segments", seed, classifier_holdout, classifier_buckets,
                                  classifier_epochs)
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
    with open(path, "wb") as f:   # not arr.tofile: a full disk then says "No space left on device"
        f.write(arr.tobytes())
    return len(arr)


def load_documents_world(docs_dir, world_path):
    """The World of world_path, refused in one line when it is missing, damaged, or not the world the documents
    were written in."""
    if not os.path.isfile(world_path):
        fail(f"'{world_path}' is missing: run `python prepare.py` again")
    from safety.world.definition import World
    try:
        world = World.load(world_path)
    except ValueError as e:     # a hand-edited or damaged world.json
        fail(str(e))
    # the documents name the world they were written in (prepare.py's summary.json): another world.json would
    # label and tokenize them as something they are not, and give streams that claim its fingerprint
    made_in = read_summary(docs_dir).get("world_sha256")
    if made_in and file_sha256(world_path) != made_in:
        fail(f"'{world_path}' is not the world the documents in '{docs_dir}' were generated from (its sha256 differs "
             f"from {made_in[:12]} in summary.json): restore it, or run prepare.py again")
    return world


def mix_counts(mix_train):
    """Counts of the mix stream's train documents, in tokens (a word each, + one end-of-text per document).
    -> (tokens, {source: tokens}, reflections, reflection tokens from <think> to </think> inclusive, tags)."""
    from safety.world.grammar import END_THINK, THINK, TAG
    words = [d["text"].split() for d in mix_train]
    n_words = sum(len(w) for w in words) + len(words)
    reflection_tokens = 0
    for w in words:
        inside = False
        for t in w:
            if t == THINK:
                inside = True
            if inside:
                reflection_tokens += 1
            if t == END_THINK:
                inside = False
    source_tokens = {}
    for d, w in zip(mix_train, words):
        source_tokens[d["source"]] = source_tokens.get(d["source"], 0) + len(w) + 1
    return (n_words, source_tokens, sum(w.count(THINK) for w in words), reflection_tokens,
            sum(w.count(TAG) for w in words))


def main_world(docs_dir, world_path):
    t0 = time.time()
    if labels or train_classifier or rewrites or refusals:
        fail("--labels, --train_classifier, --rewrites and --refusals are for real text; MedSafetyWorld is labelled "
             "by its oracle (--classifier_on_world=True labels it with the built-in classifier instead)")
    docs = read_docs(docs_dir)
    world = load_documents_world(docs_dir, world_path)
    from safety.world.grammar import EOT
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
    out_dir = os.path.join(data_root, dataset, out_name or intervention + (f"-dose{round(100 * dose):02d}" if dose < 1
                                                                       else ""))
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
    except OSError as e:     # a full disk, a read-only directory: nothing half-written stays behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        fail(f"cannot write the streams under '{out_dir}' ({e.strerror or e}); existing outputs are unchanged")

    # what the mix stream is made of, so train.py's reads after the switch can be checked against it
    mix_train = [d for d in mix if d["split"] == "train"]
    n_words, source_tokens, reflections, reflection_tokens, tags = mix_counts(mix_train)
    meta = {
        "dataset": dataset, "intervention": intervention, "tokenizer": "medsafety-word",
        "vocab_size": world.vocab_size, "dtype": np.dtype(dtype).name, "eot_token": eot,
        "special_tokens": {t: world.stoi[t] for t in ("<|endoftext|>", "<end_of_turn>", "<think>", "</think>",
                                                      "<harmful>")},
        "world": os.path.abspath(world_path), "tokens": tokens,
        # a fingerprint of the world: a later prepare.py rewrites world.json, and attack.py must notice that
        "world_sha256": file_sha256(world_path),
        "mix_sources": {k: v / n_words for k, v in source_tokens.items()},
        "mix_reflections": reflections, "mix_reflection_share": reflection_tokens / n_words,
        "mix_tags": tags, "mix_tag_share": tags / n_words,
        "raw_unsafe_doc_share": raw_unsafe_docs / len(docs),
        "mix_intervention_tokens": sum(added(m) for m in mix_train),
        "mix_intervention_share": sum(added(m) for m in mix_train) / n_words,
        "dose": dose, "dose_target_share": dose * full_share if dose < 1 else None,
        "labels": "classifier" if classifier_on_world else "oracle", "classifier": clf_metrics,
        "config": {"filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed,
                   "user_turn_segments": user_turn_segments, "dose": dose},
    }
    write_json(os.path.join(tmp_dir, "meta.json"), meta, indent=1)
    swap_in(tmp_dir, out_dir)
    dt = time.time() - t0
    print(f"{intervention}: {len(docs):,} documents -> mix {len(mix):,} documents; tokens "
          + ", ".join(f"{k} {v:,}" for k, v in tokens.items()))
    print("mix sources (train tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in meta["mix_sources"].items())
          + f"; reflections {reflections:,} ({meta['mix_reflection_share']:.1%} of tokens), tags {meta['mix_tags']:,}")
    print(f"wrote {out_dir} in {dt:.1f}s ({sum(tokens.values()) / dt:,.0f} tokens/s)")


# -----------------------------------------------------------------------------
# Real text

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


# -----------------------------------------------------------------------------
# Real text: the workers. Each gets the tokenizer, labels, rewrites and classifier once (init_worker), then turns
# chunks of shard lines into the token bytes of each stream; the documents of a chunk are segmented together, by
# safety/reflection.py's segmenter, and each intervention is a few array operations on their tokens (mix_tokens).

DIALOGUE = "User: {prompt}\nAssistant: {response}"   # a native refusal dialogue in the mix stream
WORKER = {}  # a worker's state


class BadInput(Exception):
    """A problem with the inputs found while streaming (in a worker): stops the run with its message."""


def init_worker(state):
    WORKER.clear()
    WORKER.update(state)
    WORKER["segmenter"] = TextSegmenter(state["enc"], state["segment_tokens"], state["tables"])
    WORKER["reflections"] = {}


def doc_rng(doc_id):
    """A document's own random stream: the same tags and coin flips whatever the chunking or number of workers."""
    return np.random.default_rng([WORKER["seed"], zlib.crc32(doc_id.encode())])


def reflection_ids(category):
    """Tokens of the reflection after a segment (safety/reflection.py's format), encoded once per worker."""
    if category not in WORKER["reflections"]:
        WORKER["reflections"][category] = text_reflection(WORKER["enc"], category)
    return WORKER["reflections"][category]


def keep_docs(flat, lens, keep, eot):
    """The kept documents' tokens, each followed by <|endoftext|>."""
    kept = flat[np.repeat(keep, lens)]
    return np.insert(kept, np.cumsum(lens[keep]), eot)


def rewritten(doc_id, text, spans, stats):
    """The text with each unsafe span replaced by its rewrite, or dropped when it has none."""
    rw = WORKER["rewrites"].get(doc_id, {})
    out, pos = [], 0
    for s, e, _, _ in spans:
        out.append(text[pos:s])
        if (s, e) in rw:
            out.append(rw[(s, e)])
            stats["spans_rewritten"] += 1
        else:
            stats["spans_dropped"] += 1
        pos = e
    out.append(text[pos:])
    return "".join(out)


def tag_positions(rng, flat, a, b, text, spans):
    """Positions (in flat) of the tags of one document (its tokens flat[a:b], its unsafe character spans): before a
    token that overlaps an unsafe span whose previous token overlaps it too, with probability tag_rate. So a tag
    always has labelled unsafe text on both sides, never a safe token of the same segment (Safety Pretraining tags
    only harmful text), and never sits inside a UTF-8 character."""
    off = WORKER["segmenter"].byte_offsets(flat, a, b)
    pos = []
    for sb, eb, _ in span_bytes(text, spans):
        lo = int(np.searchsorted(off[1:], sb, side="right"))   # the first token that ends after the span's start
        hi = int(np.searchsorted(off[:-1], eb, side="left"))   # past the last token that starts before its end
        if hi - lo > 1:
            pos.append(a + lo + 1 + np.flatnonzero(rng.random(hi - lo - 1) < WORKER["tag_rate"]))
    pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    return pos[~WORKER["tables"]["mid_char"][flat[pos]]]


def labelled_spans(docs, stats):
    """Each document's unsafe spans, from the labels (a span past a document's end stops the run)."""
    spans = []
    for doc_id, text in docs:
        s = WORKER["labels"].get(doc_id, [])
        if s:
            stats["labelled_ids"].append(doc_id)
            if s[-1][1] > len(text):
                raise BadInput(f"labels file '{WORKER['labels_path']}' line {s[-1][3]}: the span [{s[-1][0]}, "
                               f"{s[-1][1]}) lies beyond the end of document '{doc_id}' ({len(text)} characters); "
                               f"label this corpus's texts")
        spans.append(list(s))
    return spans


def process_docs(docs):
    """One split's documents [(id, text)] -> (safe tokens, mix tokens, statistics)."""
    intervention_name = WORKER["intervention"]
    stats = dict.fromkeys(("docs", "empty_docs", "unsafe_docs", "chars", "unsafe_chars", "input_tokens", "segments",
                           "unsafe_segments", "reflections", "reflection_tokens", "tags", "spans_rewritten",
                           "spans_dropped"), 0)
    stats["labelled_ids"], stats["label_lines"] = [], []
    spans = labelled_spans(docs, stats)
    # a document without tokens has nothing to learn from: it is dropped (no lone <|endoftext|>)
    keep, _, flat, starts, ends = tokenize_texts(WORKER["enc"], [t for _, t in docs])
    stats["empty_docs"] = len(docs) - len(keep)
    docs, spans = [docs[j] for j in keep], [spans[j] for j in keep]
    if not docs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    lens = ends - starts
    stats["docs"], stats["input_tokens"], stats["chars"] = len(docs), len(flat), sum(len(t) for _, t in docs)
    segments = None     # (segment ends, categories, each document's first segment)
    if WORKER["clf"] is not None or intervention_name in ("reflect", "tag", "safety_pretraining") or (
            intervention_name == "filter" and WORKER["filter_level"] == "segment"):
        segments = WORKER["segmenter"].segment_docs(docs, spans, flat, starts, ends, WORKER["clf"])
        stats["segments"], stats["unsafe_segments"] = len(segments[0]), sum(c is not None for c in segments[1])
    unsafe = np.array([bool(s) for s in spans], dtype=bool)
    stats["unsafe_docs"] = int(unsafe.sum())
    stats["unsafe_chars"] = sum(e - s for sp in spans for s, e, _, _ in sp)
    if WORKER["clf"]:
        stats["label_lines"] = [json.dumps({"id": docs[j][0], "start": s, "end": e, "label": "unsafe",
                                            "category": c}) for j in range(len(docs)) for s, e, c, _ in spans[j]]
    safe = keep_docs(flat, lens, ~unsafe, WORKER["eot"])
    return safe, mix_tokens(docs, flat, lens, starts, ends, spans, unsafe, segments, safe, stats), stats


def mix_tokens(docs, flat, lens, starts, ends, spans, unsafe, segments, safe, stats):
    """The mix stream of the chosen intervention: the documents' tokens, changed as README.md's table says."""
    intervention_name, eot = WORKER["intervention"], WORKER["eot"]
    if intervention_name == "none":
        return keep_docs(flat, lens, np.ones(len(docs), bool), eot)
    if intervention_name == "refusal" or (intervention_name == "filter" and WORKER["filter_level"] == "document"):
        return safe
    if intervention_name == "filter":  # segment level: drop the tokens of unsafe segments
        seg_ends, cats = segments[0], segments[1]
        seg_starts = np.concatenate([[0], seg_ends[:-1]])
        keep = np.repeat(np.array([c is None for c in cats]), seg_ends - seg_starts)
        cum = np.concatenate([[0], np.cumsum(keep)])
        kept_lens = cum[ends] - cum[starts]
        return np.insert(flat[keep], np.cumsum(kept_lens)[kept_lens > 0], eot)
    if intervention_name == "reflect":  # after each segment its reflection (+ <|endoftext|> after a document's last)
        seg_ends, cats, seg_first = segments
        last_of_doc = np.zeros(len(seg_ends), dtype=bool)
        last_of_doc[np.array(seg_first[1:]) - 1] = True
        stats["reflections"] = len(seg_ends)
        mix = insert_text_reflections(flat, seg_ends, cats, last_of_doc, reflection_ids, eot)
        # all it adds to the text: the reflections, and one <|endoftext|> per document
        stats["reflection_tokens"] = len(mix) - len(flat) - int(last_of_doc.sum())
        return mix
    if intervention_name == "tag":
        pos = [tag_positions(doc_rng(docs[j][0]), flat, starts[j], ends[j], docs[j][1], spans[j])
               for j in np.flatnonzero(unsafe)]
        pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        stats["tags"] = len(pos)
        return np.insert(flat, np.concatenate([pos, ends]), np.concatenate([np.full(len(pos), WORKER["tag"]),
                                                                            np.full(len(ends), eot)]))
    return rewritten_mix(docs, flat, starts, ends, spans, unsafe, stats)


def rewritten_mix(docs, flat, starts, ends, spans, unsafe, stats):
    """rewrite, safety_pretraining: document by document; safety_pretraining rewrites half of the unsafe documents
    (a coin flip of the document's own stream) and tags the other half."""
    intervention_name, eot, pieces = WORKER["intervention"], WORKER["eot"], []
    for j, (doc_id, text) in enumerate(docs):
        a, b = int(starts[j]), int(ends[j])
        if not unsafe[j]:
            pieces.append(flat[a:b])
        else:
            rng = doc_rng(doc_id) if intervention_name == "safety_pretraining" else None
            if intervention_name == "rewrite" or rng.random() < 0.5:
                rw = rewritten(doc_id, text, spans[j], stats)
                pieces.append(np.array(WORKER["enc"].encode_ordinary(rw), np.int64))
            else:
                pos = tag_positions(rng, flat, a, b, text, spans[j])
                stats["tags"] += len(pos)
                pieces.append(np.insert(flat[a:b], pos - a, WORKER["tag"]))
        if len(pieces[-1]):
            pieces.append(np.array([eot]))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


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
        out["bytes"][f"safe_{split}"] = safe.astype(WORKER["dtype"]).tobytes()
        out["bytes"][f"mix_{split}"] = mix.astype(WORKER["dtype"]).tobytes()
    return out


def read_chunks(docs_dir, shards, chunk_chars):
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


def start_worker(state):
    """A pool worker's initializer: the signals of a worker (common.worker_signals), then its state."""
    worker_signals()
    init_worker(state)


def run_chunks(jobs, state, consume, nproc):
    """process_chunk over jobs, in order, on nproc workers with at most 2 chunks each in flight."""
    if nproc <= 1:
        init_worker(state)
        for job in jobs:
            consume(process_chunk(job))
        return
    import multiprocessing as mp
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(nproc, initializer=start_worker, initargs=(state,))
    try:
        pending = deque()
        for job in jobs:
            pending.append(pool.apply_async(process_chunk, (job,)))
            if len(pending) >= 2 * nproc:
                consume(pending.popleft().get())
        while pending:
            consume(pending.popleft().get())
        pool.close()    # done: the workers finish their queue and exit
    except BaseException:
        pool.terminate()    # failed or stopped: the workers are killed where they are
        raise
    finally:
        pool.join()


# -----------------------------------------------------------------------------
# Real text: the stage

def check_segmenter(labels_path, enc):
    """Labels from label.py (its label.json beside them) fall on this run's segments only when this run cuts the
    documents as label.py did: the same tokenizer and segment_tokens. Otherwise stop, before any work."""
    rec = os.path.join(os.path.dirname(os.path.abspath(labels_path)), "label.json")
    if not os.path.isfile(rec):
        return
    s = (load_json(rec) or {}).get("settings") or {}
    mine = {"tokenizer_sha256": tokenizer_record(enc, tokenizer, tokenizer_files)["sha256"],
            "segment_tokens": segment_tokens}
    if any(s.get(k) != v for k, v in mine.items()):
        fail(f"'{labels_path}' was labelled on segments of another tokenizer or segment_tokens ({rec}: "
             f"segment_tokens={s.get('segment_tokens')}); run reflect.py with label.py's --tokenizer, "
             f"--tokenizer_files and --segment_tokens, or label again")


def check_real_flags(docs_dir):
    """The inputs real text needs and the flags it cannot take, each refused in one line (after the corpus is
    found). -> unlabelled: the raw baseline, which needs no labels."""
    if classifier_on_world:
        fail(f"--classifier_on_world is for MedSafetyWorld, and '{docs_dir}' holds real text (no world.json)")
    # the raw baseline needs no labels; it writes one stream: without labels nothing is known to be safe
    unlabelled = intervention == "none" and not labels and not train_classifier
    if not unlabelled and bool(labels) == bool(train_classifier):
        fail("real text needs labels: pass --labels=<spans.jsonl> (label.py, or any guard model) or "
             "--train_classifier=<labelled.jsonl> (the built-in classifier), one of the two "
             "(--intervention=none without either writes the raw baseline)")
    if intervention in ("rewrite", "safety_pretraining") and not rewrites:
        fail(f"--intervention={intervention} needs --rewrites=<file.jsonl>: {{\"id\", \"start\", \"end\", \"text\"}} "
             f"per unsafe span (see REWRITE_PROMPT in reflect.py)")
    if intervention in ("refusal", "safety_pretraining") and not refusals:
        fail(f"--intervention={intervention} needs --refusals=<file.jsonl>: {{\"prompt\", \"response\"}} per native "
             f"refusal dialogue (see REFUSAL_PROMPT in reflect.py)")
    return unlabelled


def refusal_arrays(dialogues, stats, enc, eot, dtype):
    """The native refusal dialogues as token arrays for the mix stream, split like the corpus: by a hash of the
    prompt, at the corpus's share of validation documents. -> {"train": array, "val": array}."""
    n_docs = {s: stats[s].get("docs", 0) for s in stats}
    val_share = n_docs["val"] / max(sum(n_docs.values()), 1)
    texts = {"train": [], "val": []}
    for r in dialogues:
        split = "val" if zlib.crc32(str(r["prompt"]).encode()) / 2 ** 32 < val_share else "train"
        texts[split].append(DIALOGUE.format(prompt=r["prompt"], response=r["response"]))
    return {split: np.array([i for x in enc.encode_ordinary_batch(t) for i in x + [eot]], dtype=dtype)
            for split, t in texts.items()}


def real_meta(enc, dtype, tokens, name_of, refusal_tokens, tr, every, unused, n_dialogues, unlabelled, clf_metrics):
    """meta.json of a real-text run: the tokenizer a later stage rebuilds, tokens per stream file (tokens: per
    stream; name_of: stream -> file), what the mix stream is made of, the labels' shares and the config.
    tr: the train split's counts; every: both splits' counts summed."""
    eot, tag = enc._special_tokens[EOT_TEXT], enc._special_tokens[TAG_TEXT]
    mix_train = max(tokens["mix_train"], 1)
    tok = tokenizer_record(enc, tokenizer, tokenizer_files)  # what a later stage rebuilds the tokenizer from
    meta = {
        "dataset": dataset, "intervention": intervention, "tokenizer": enc.name, "vocab_size": enc.n_vocab,
        "tokenizer_sha256": tok["sha256"], "tokenizer_files_sha256": tok["files_sha256"],
        "dtype": np.dtype(dtype).name, "eot_token": eot, "tag_token": tag,
        "special_tokens": {EOT_TEXT: eot, TAG_TEXT: tag},
        "reflection_format": {"safe": REFLECT_SAFE, "unsafe": REFLECT_UNSAFE,
                              "tokens": "plain text, after each segment"},
        "tokens": {name_of[s]: n for s, n in tokens.items()},
        "mix_sources": {"corpus": (tokens["mix_train"] - refusal_tokens["train"]) / mix_train,
                        "refusal": refusal_tokens["train"] / mix_train},
        "mix_reflections": tr.get("reflections", 0), "mix_reflection_share": tr.get("reflection_tokens", 0) / mix_train,
        "mix_tags": tr.get("tags", 0), "mix_tag_share": tr.get("tags", 0) / mix_train,
        "documents": every.get("docs", 0), "empty_documents": every.get("empty_docs", 0),
        "raw_unsafe_doc_share": every.get("unsafe_docs", 0) / max(every.get("docs", 0), 1),
        "raw_unsafe_char_share": every.get("unsafe_chars", 0) / max(every.get("chars", 0), 1),
        "raw_unsafe_segment_share": (every["unsafe_segments"] / every["segments"]) if every.get("segments") else None,
        "spans_rewritten": every.get("spans_rewritten", 0), "spans_dropped": every.get("spans_dropped", 0),
        "rewrites_unused": unused, "refusal_dialogues": n_dialogues,
        "labels": os.path.abspath(labels) if labels else ("none" if unlabelled else "classifier"),
        "classifier": clf_metrics,
        "config": {"filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed,
                   "classifier_min_f1": classifier_min_f1, "tokenizer": tok["spec"], "tokenizer_files": tok["files"],
                   "rewrites": rewrites, "refusals": refusals},
    }
    if unlabelled:  # nothing was labelled: the unsafe shares are unknown, not zero
        meta["raw_unsafe_doc_share"] = meta["raw_unsafe_char_share"] = None
    return meta


def print_real_summary(meta, rewrote, out_dir, n_in, dt):
    """What a real-text run wrote, from its meta.json: documents, tokens, the mix's sources and reflections."""
    print(f"{intervention}: {meta['documents']:,} documents (" + ("no labels" if meta["labels"] == "none" else
          f"{meta['raw_unsafe_doc_share']:.1%} with unsafe spans, {meta['raw_unsafe_char_share']:.1%} of characters")
          + "); tokens " + ", ".join(f"{k} {v:,}" for k, v in meta["tokens"].items()))
    print("mix sources (train tokens): " + ", ".join(f"{k} {v:.1%}" for k, v in meta["mix_sources"].items())
          + f"; reflections {meta['mix_reflections']:,} ({meta['mix_reflection_share']:.1%} of tokens), tags "
          f"{meta['mix_tags']:,}" + (f"; spans rewritten {meta['spans_rewritten']:,}, dropped without a rewrite "
                                     f"{meta['spans_dropped']:,}" if rewrote else ""))
    if meta["rewrites_unused"]:
        print(f"warning: {meta['rewrites_unused']:,} rewrites match no unsafe span of the labels (same id, start and "
              f"end): unused")
    print(f"wrote {out_dir} in {dt:.1f}s ({n_in / dt:,.0f} corpus tokens/s)")


def real_inputs(enc):
    """What the workers read besides the corpus (labels, a fitted classifier, rewrites) and the refusal dialogues,
    each read and checked before any work -> (the workers' state, the dialogues, the classifier's metrics)."""
    if labels:
        check_segmenter(labels, enc)
    spans = read_labels(labels) if labels else {}
    clf, clf_metrics = None, None
    if train_classifier:
        clf, clf_metrics = fit_classifier(read_jsonl(train_classifier, "labelled texts file", ("text", "label")),
                                          train_classifier, seed, classifier_holdout, classifier_buckets,
                                          classifier_epochs, classifier_min_f1)
    # rewrites and refusals only where the intervention uses them
    rw = read_rewrites(rewrites) if intervention in ("rewrite", "safety_pretraining") else {}
    dialogues = (read_jsonl(refusals, "refusals file", ("prompt", "response"))
                 if intervention in ("refusal", "safety_pretraining") else [])
    state = {"enc": enc, "tables": token_tables(enc), "eot": enc._special_tokens[EOT_TEXT],
             "tag": enc._special_tokens[TAG_TEXT], "dtype": np.uint16 if enc.n_vocab <= 65536 else np.uint32,
             "labels": spans, "labels_path": labels, "rewrites": rw, "clf": clf, "intervention": intervention,
             "filter_level": filter_level, "segment_tokens": segment_tokens, "tag_rate": tag_rate, "seed": seed}
    return state, dialogues, clf_metrics


def stream_corpus(docs_dir, shards, state, files, label_file, nproc, t0):
    """The corpus through the workers into the open stream files (and the classifier's labels into label_file), with
    progress every 10 s. A label naming a document the corpus lacks stops the run.
    -> (tokens per stream, statistics per split)."""
    tokens = dict.fromkeys(files, 0)
    stats = {"train": {}, "val": {}}
    seen = set()
    last = [time.time()]

    def consume(res):
        for s, b in res["bytes"].items():
            if s in files:
                files[s].write(b)
                tokens[s] += len(b) // np.dtype(state["dtype"]).itemsize
        for split, split_stats in res["stats"].items():
            seen.update(split_stats.pop("labelled_ids"))
            if label_file:
                label_file.writelines(line + "\n" for line in split_stats["label_lines"])
            split_stats.pop("label_lines")
            for k, v in split_stats.items():
                stats[split][k] = stats[split].get(k, 0) + v
        if time.time() - last[0] > 10:
            last[0] = time.time()
            n_in = sum(s.get("input_tokens", 0) for s in stats.values())
            print(f"  {sum(s.get('docs', 0) for s in stats.values()):,} documents, {n_in:,} tokens "
                  f"({n_in / (time.time() - t0):,.0f} tokens/s)", flush=True)

    try:
        run_chunks(read_chunks(docs_dir, shards, chunk_chars), state, consume, nproc)
        unknown = sorted(set(state["labels"]) - seen)
        if unknown:
            raise BadInput(f"labels file '{labels}' names {len(unknown)} document(s) not in {docs_dir} "
                           f"(e.g. '{unknown[0]}'); label the documents of this corpus")
    except BadInput as e:
        fail(str(e))
    return tokens, stats


def main_real(docs_dir):
    t0 = time.time()
    if intervention in WORLD_ONLY or segment_tokens < 1:
        fail("--intervention=strict_filter and --segment_tokens=0 are for MedSafetyWorld (they need its sentence "
             "kinds); real text segments by --segment_tokens >= 1")
    shards = list_shards(docs_dir)
    unlabelled = check_real_flags(docs_dir)
    enc = real_tokenizer(tokenizer, tokenizer_files)
    state, dialogues, clf_metrics = real_inputs(enc)
    eot, dtype, rw = state["eot"], state["dtype"], state["rewrites"]
    nproc = num_proc or cpu_count()
    print(f"{intervention} on {docs_dir} ({len(shards)} shards): tokenizer {enc.name} ({enc.n_vocab:,} tokens), "
          f"labels from {labels or ('nowhere' if unlabelled else 'the classifier')}, {nproc} worker(s)")

    # write into a temporary directory, then swap it in: a failure never leaves half the streams behind
    out_dir = os.path.join(data_root, dataset, out_name or intervention)
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    name_of = {"mix_train": "train", "mix_val": "val"} if unlabelled else {s: s for s in STREAMS}  # stream -> file
    files = {s: open(os.path.join(tmp_dir, f"{f}.bin"), "wb") for s, f in name_of.items()}
    label_file = open(os.path.join(tmp_dir, "labels.jsonl"), "w") if state["clf"] else None
    handles = list(files.values()) + ([label_file] if label_file else [])
    try:
        tokens, stats = stream_corpus(docs_dir, shards, state, files, label_file, nproc, t0)
        refusal_tokens = {}
        for split, arr in refusal_arrays(dialogues, stats, enc, eot, dtype).items():
            files[f"mix_{split}"].write(arr.tobytes())
            tokens[f"mix_{split}"] += len(arr)
            refusal_tokens[split] = len(arr)
    except BaseException as e:  # failed or interrupted: leave nothing behind
        for f in handles:
            f.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, OSError):   # a full disk, a read-only directory
            fail(f"cannot write the streams under '{out_dir}' ({e.strerror or e}); existing outputs are unchanged")
        raise
    for f in handles:
        f.close()

    every = {k: sum(s.get(k, 0) for s in stats.values()) for k in stats["train"]}
    unused = sum(len(v) for v in rw.values()) - every.get("spans_rewritten", 0) if intervention == "rewrite" else 0
    meta = real_meta(enc, dtype, tokens, name_of, refusal_tokens, stats["train"], every, unused, len(dialogues),
                     unlabelled, clf_metrics)
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    swap_in(tmp_dir, out_dir)
    print_real_summary(meta, bool(rw), out_dir, every.get("input_tokens", 0), time.time() - t0)


# -----------------------------------------------------------------------------
# Benchmark: the reflect intervention's throughput against tiktoken's encode_ordinary_batch on the same text

def bench_encoding():
    """The --tokenizer's tiktoken Encoding -> (encoding, its spec or None, what was measured). Offline without the BPE
    files: a small Encoding of the same shape, said loudly."""
    try:
        enc = base_encoding(tokenizer, tokenizer_files)
        return enc, tokenizer, f"tiktoken '{enc.name}'" + (f" from {tokenizer_files}" if tokenizer_files else "")
    except SystemExit as e:
        enc = toy_encoding()
        return enc, None, (f"NOT {tokenizer}: {str(e).split(': ', 1)[-1]}. Measured instead with a small offline "
                           f"Encoding ({enc.n_vocab:,} tokens: bytes + word prefixes, gpt2's pre-tokenizer)")


def print_bench_table(rows, best, n_tok, nproc):
    """Tokens per second of each benchmark row, beside tiktoken's on the same number of processes."""
    rate = [n_tok / b for b in best]
    print(f"\n| {'what':<62} | procs | {'tokens/s':>11} | vs tiktoken, same procs |")
    print(f"|{'-' * 64}|-------|{'-' * 13}|-------------------------|")
    for (what, procs, _), r in zip(rows, rate):
        ref = rate[0] if procs == nproc else rate[1]  # encode_ordinary_batch on N threads, or the one-thread loop
        print(f"| {what:<62} | {procs:>5} | {r:>11,.0f} | {r / ref:>22.2f}x |")
    print(f"\ntokens/s: tokens of the corpus text per second of wall time, best of 3 interleaved runs; the reflect.py "
          f"rows include reading the json shards, starting the workers and writing the streams. Load average while "
          f"measuring: {os.getloadavg()[0]:.1f} on {cpu_count()} cores.")


def run_benchmark():
    import contextlib
    import io
    import tempfile
    nproc = num_proc or cpu_count()
    enc, spec, note = bench_encoding()
    docs, spans = bench_corpus(benchmark_tokens, random.Random(seed))
    texts = [d["text"] for d in docs]
    n_tok = sum(len(x) for x in enc.encode_ordinary_batch(texts))
    print(f"reflect.py benchmark: {len(docs):,} generated English documents, {n_tok:,} tokens, "
          f"{sum(map(len, texts)) / 1e6:.1f} MB; {len(spans):,} unsafe spans; segment_tokens={segment_tokens}")
    print(f"tokenizer: {note}")
    with tempfile.TemporaryDirectory() as tmp:
        files = tokenizer_files if spec else ""
        if spec is None:
            spec = os.path.join(tmp, "tokenizer.json")
            write_tokenizer(enc, spec)
        ext = real_tokenizer(spec, files)
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

        def end_to_end(intervention_name, procs):
            argv = [f"--data_root={root}", "--dataset=bench", f"--intervention={intervention_name}",
                    f"--labels={tmp}/labels.jsonl", f"--tokenizer={spec}", f"--tokenizer_files={files}",
                    f"--num_proc={procs}", f"--segment_tokens={segment_tokens}", f"--seed={seed}",
                    f"--chunk_chars={chunk_chars}", "--benchmark=False"]
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
    print_bench_table(rows, best, n_tok, nproc)


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
    if segment_tokens < 0:
        fail(f"segment_tokens must be at least 0 (0: one sentence per segment), not {segment_tokens}")
    if out_name and (os.sep in out_name or out_name.startswith(".") or out_name in ("docs", "eval")):
        fail(f"--out_name='{out_name}' must be a plain directory name, not a path, 'docs' or 'eval'")
    if not 0.0 < dose <= 1.0:
        fail(f"dose must lie in (0, 1], not {dose}")
    if dose < 1 and (intervention in ("none", "filter", "strict_filter") or dataset != "medsafety"):
        fail(f"--dose needs a MedSafetyWorld intervention that changes the corpus, not '{intervention}'")
    if chunk_chars < 1 or num_proc < 0:
        fail("chunk_chars must be at least 1 and num_proc at least 0 (0: one per core)")
    if not 0.0 <= classifier_holdout < 1.0:
        fail(f"classifier_holdout must lie in [0, 1), not {classifier_holdout}")
    if not 0.0 <= classifier_min_f1 <= 1.0:
        fail(f"classifier_min_f1 must lie in [0, 1], not {classifier_min_f1}")
    docs_dir = os.path.join(data_root, dataset, "docs")
    world_path = os.path.join(docs_dir, "world.json")
    list_shards(docs_dir)
    writable_dir(os.path.join(data_root, dataset))   # before the work: the streams are written beside the docs
    if dataset == "medsafety" or os.path.isfile(world_path):
        main_world(docs_dir, world_path)
    else:
        main_real(docs_dir)


if __name__ == "__main__":
    run_stage(main)

"""
Linear probes on the residual stream: how cleanly does each layer separate safe from unsafe text, and does the
request already tell harm from benign intent for harm effects the corpus never showed?

Reads:  <ckpt>/ckpt.pt and its world's eval/probe.jsonl (held-out segments in context), harmful_prompts.jsonl and
        benign_prompts.jsonl (the request probe); a real-text model: labelled documents (--docs, default its
        pretraining corpus: the val split, or every split where val cannot be probed) and their labels (--labels or
        --train_classifier, default the pretraining's)
Writes: <ckpt>/probe.json (layout: README.md, "probe.py"), <ckpt>/probe.png (accuracy and AUROC per layer; several
        checkpoints share one plot, --out)
Run:    python probe.py --ckpt=out/raw
        python probe.py --ckpt=out/reflect-0,out/reflect-20,out/reflect-60 --names=0%,20%,60% --out=out/probe.png
        python probe.py --ckpt=out/gpt2-reflect       (real text: its pretraining corpus's documents and labels)
        python probe.py --ckpt=out/gpt2-reflect --docs=heldout.jsonl --labels=heldout_spans.jsonl
"""
# Per layer and feature kind (mean over the segment's tokens, last token) a logistic regression fitted by L-BFGS on
# one half, scored on the other; identical model inputs always fall in the same half (the grammar repeats segments).
# The number to compare is the average over layers 1..L ("deep"); layer 0, the embeddings, reads the words alone.
# Real text: every segment of the documents (the pretraining segmenter and labeller, safety/reflection.py) is a record,
# read at its end; a document goes whole to one half. A reflection model's own reflections are also read there, teacher-
# forced (P(unsafe opener) vs P(safe opener)): probe.json's "reflection_classification", with Wilson intervals.

import json
import os
import random
import sys
import time

import numpy as np
import torch

from model import GPT
from safety.common import (eval_dir as sets_dir, fail, load_run, lock_dir, model_info, read_jsonl, run_stage,
                           writable_dir, write_json)
from safety.configurator import configure, defaults_of
from safety.reflection import (classify_text_reflections, label_source, segmented, text_format, text_opener,
                               text_reflection_metrics, text_reflection_sites)
from safety.world.grammar import TEMPLATES

# -----------------------------------------------------------------------------
ckpt = "out/run"            # run directory (or .pt file); a comma list probes several runs into one plot
names = ""                  # comma list of curve names in the plot, one per ckpt; "": the run directories' names
out = ""                    # the plot; "": <run>/probe.png for one ckpt, <parent of the first>/probe-<a>+<b>.png else
world = ""                  # world.json to use; "": the one each checkpoint was trained on (meta["world"])
eval_dir = ""               # directory of probe.jsonl; "": <world's data dir>/eval, written by prepare.py
max_records = -1            # use at most this many records, the first in file order; -1: all
l2 = 1e-2                   # L2 penalty on the probe's weights (features are standardized, so one scale fits all)
max_steps = 200             # L-BFGS iterations per probe
batch_size = 128
seed = 1337                 # the train/test split
device = "auto"             # auto | cpu | cuda | cuda:N (the forward passes; probes always fit on the CPU)
# real text
tokenizer = ""              # tiktoken spec (gpt2 or a .json); "": the one meta.json recorded
docs = ""                   # held-out documents: jsonl or a directory of shard_*.jsonl ({"id", "text"[, "split"]});
                            # "": the docs/ of the model's pretraining corpus
docs_split = "auto"         # val | train | all: the documents of this split, where lines have one; auto: val (held out
                            # of pretraining), or all when val holds too few labelled documents to probe
labels = ""                 # span labels of the documents (reflect.py's --labels format); "": the pretraining's ...
train_classifier = ""       # ... or labelled texts: the built-in classifier labels the documents (reflect.py's flag)
# -----------------------------------------------------------------------------
KINDS = ("mean", "last")


# ----------------------------------------------------------------------------- probe and metrics

def auroc(scores, y):
    """Area under the ROC curve from ranks: the share of (unsafe, safe) pairs the scores order correctly, ties
    counting half (Mann-Whitney U / (n_pos * n_neg))."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts                  # 0-based rank of each distinct value's first element
    avg_rank = starts + (counts + 1) / 2.0               # tied scores share the mean of their 1-based ranks
    r = avg_rank[inv]
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fit_probe(X, y, l2=l2, max_steps=max_steps):
    """Logistic regression on X (N, D) -> y in {0, 1}: standardize with X's statistics, then minimise
    mean BCE + l2/2 |w|^2 by full-batch L-BFGS in float64. Returns a function: features -> logits (numpy)."""
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    mu = X.mean(0)
    sd = X.std(0, unbiased=False)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))   # a constant feature carries nothing: leave it at 0
    Z = (X - mu) / sd
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = Z @ w + b
        # log(1 + e^z) - y z, the logistic loss written out (torch's fused BCE-with-logits is ~100x slower in float64
        # on CPU)
        loss = (torch.logaddexp(torch.zeros_like(z), z) - y * z).mean() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda F: (((torch.as_tensor(np.asarray(F), dtype=torch.float64) - mu) / sd) @ w + b).numpy()


def accuracy(logits, y, mask=None):
    right = (np.asarray(logits) > 0) == np.asarray(y).astype(bool)
    if mask is not None:
        right = right[mask]
    return float(right.mean()) if right.size else None


def model_input(r):
    """The words the model reads for record r, context + " " + text; encode is word-level (str.split), so equal
    strings here are equal token sequences (before the cut to block_size)."""
    return " ".join(f"{r.get('context') or ''} {r['text']}".split())


def input_groups(recs, keys=None):
    """-> [[indices]]: records with the same model input, one list per distinct input (in file order of first
    appearance). keys: one hashable per record (probe_run passes the token ids after the cut); default model_input."""
    keys = [model_input(r) for r in recs] if keys is None else keys
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def split_records(recs, seed, keys=None):
    """Seeded ~50/50 split that never puts one model input in both halves (see Split above). Groups of identical
    inputs are stratified by their label set (safe, unsafe, or both), shuffled by seed, and each goes whole to the
    half holding fewer of its stratum's records so far (ties to test). -> (train, test) index lists into recs, each
    in file order."""
    strata = {}
    for g in input_groups(recs, keys):
        labs = "+".join(sorted({recs[i]["label"] for i in g}))
        strata.setdefault(labs, []).append(g)
    train, test = [], []
    for labs in sorted(strata):
        # ordered by their smallest id first, so the split depends on the ids and the seed, not on file order
        groups = sorted((sorted(recs[i]["id"] for i in g), g) for g in strata[labs])
        groups = [g for _, g in groups]
        random.Random(f"{seed}/{labs}").shuffle(groups)
        n_train = n_test = 0
        for g in groups:
            if n_train < n_test:
                train += g
                n_train += len(g)
            else:
                test += g
                n_test += len(g)
    return sorted(train), sorted(test)


def probe_layers(feats, y, train, test, subsets=None, l2=l2, max_steps=max_steps):
    """feats: {kind: (N, L+1, D)}; y (N,) in {0, 1}; train/test index lists; subsets: {name: boolean mask over the
    test half} scored as acc_<name>. -> [{layer, <kind>: {acc, auroc, acc_<name>..., train_acc}}]."""
    y = np.asarray(y)
    tr, te = np.asarray(train), np.asarray(test)
    n_layers = next(iter(feats.values())).shape[1]
    layers = []
    for layer in range(n_layers):
        row = {"layer": layer}
        for kind, F in feats.items():
            F = np.asarray(F[:, layer], dtype=np.float64)
            predict = fit_probe(F[tr], y[tr], l2=l2, max_steps=max_steps)
            logits = predict(F[te])
            m = {"acc": accuracy(logits, y[te]), "auroc": auroc(logits, y[te])}
            for name, mask in (subsets or {}).items():
                m[f"acc_{name}"] = accuracy(logits, y[te], mask) if mask.any() else None
            m["train_acc"] = accuracy(predict(F[tr]), y[tr])
            row[kind] = m
        layers.append(row)
    return layers


# ----------------------------------------------------------------------------- features

@torch.no_grad()
def features(model, seqs, seg_lens, batch_size=batch_size, progress=""):
    """seqs: token id lists (each at most block_size); seg_lens: how many of each sequence's last tokens are the
    segment. -> {"mean": (N, L+1, D), "last": (N, L+1, D)} float32 CPU tensors: per layer of the residual stream,
    the mean over the segment's tokens and the last token's vector. Batches are right-padded (causal attention:
    padding after a token never reaches it) and formed from sequences of similar length."""
    dev = next(model.parameters()).device
    n, n_hidden, d = len(seqs), model.config.n_layer + 1, model.config.n_embd
    out = {k: torch.empty(n, n_hidden, d) for k in KINDS}
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    for b in range(0, n, batch_size):
        rows = order[b:b + batch_size]
        T = max(len(seqs[i]) for i in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        seg = torch.zeros(len(rows), T)
        last = torch.zeros(len(rows), dtype=torch.long)
        for j, i in enumerate(rows):
            L = len(seqs[i])
            idx[j, :L] = torch.tensor(seqs[i], dtype=torch.long)
            seg[j, L - seg_lens[i]:L] = 1.0 / seg_lens[i]
            last[j] = L - 1
        _, _, hidden = model(idx.to(dev), return_hidden=True)
        H = torch.stack(hidden, 1).float().cpu()                     # (B, L+1, T, D)
        out["mean"][rows] = torch.einsum("blte,bt->ble", H, seg)
        out["last"][rows] = H[torch.arange(len(rows)), :, last]
        if progress and sys.stdout.isatty():
            print(f"\r{progress}: {min(b + batch_size, n)}/{n} records", end="", flush=True)
    return out


def encode_records(w, recs, block_size):
    """-> (seqs, seg_lens, truncated): each record's ids (context + text, cut from the left to block_size) and how
    many of its last tokens are the segment."""
    seqs, seg_lens, truncated = [], [], 0
    for r in recs:
        try:
            ctx_ids = w.encode(r.get("context") or "")
            seg_ids = w.encode(r["text"])
        except ValueError as e:
            fail(f"probe record '{r.get('id')}' does not tokenize ({e}); the probe set belongs to another world "
                 f"(pass --eval_dir)")
        if not seg_ids:
            fail(f"probe record '{r.get('id')}' has an empty text")
        ids = ctx_ids + seg_ids              # the word-level encode of context + " " + text
        if len(ids) > block_size:
            truncated += 1
            ids = ids[-block_size:]
        seqs.append(ids)
        seg_lens.append(min(len(seg_ids), len(ids)))
    return seqs, seg_lens, truncated


def read_probe_set(world_path, eval_arg):
    path = os.path.join(sets_dir(world_path, eval_arg), "probe.jsonl")
    if not os.path.isfile(path):
        fail(f"probe set '{path}' not found (run: python prepare.py, or pass --eval_dir=<dir>)")
    recs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"'{path}' line {n} is not valid json ({e}); run prepare.py again")
                if not isinstance(r, dict) or not {"id", "text", "label"} <= set(r):
                    fail(f"'{path}' line {n} is not a probe record (it needs id, text and label)")
                if r["label"] not in ("safe", "unsafe"):
                    fail(f"'{path}' line {n} has label '{r['label']}' (expected safe or unsafe)")
                recs.append(r)
    if max_records >= 0:
        recs = recs[:max_records]
    # distinct inputs, not records: identical inputs go to the same half (split_records)
    n = {lab: len({model_input(r) for r in recs if r["label"] == lab}) for lab in ("safe", "unsafe")}
    if min(n.values()) < 2:
        fail(f"probe set '{path}' holds {n['safe']} safe and {n['unsafe']} unsafe distinct inputs"
             + (f" (--max_records={max_records})" if max_records >= 0 else "")
             + "; a probe needs at least 2 of each class (one per half)")
    return path, recs


# ----------------------------------------------------------------------------- real text: held-out labelled documents

def read_docs(path, split):
    """[(id, text)] of a jsonl file or a directory of shard_*.jsonl ({"id", "text"}, prepare.py's documents); where
    a line has a "split", only the documents of `split` (val: held out of pretraining; None: every split)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.startswith("shard_")
                       and f.endswith(".jsonl"))
        if not files:
            fail(f"'{path}' holds no shard_*.jsonl documents")
    else:
        files = [path]
    docs = []
    for f in files:
        for r in read_jsonl(f, "documents file", ("id", "text")):
            if not isinstance(r["text"], str):
                fail(f"documents file '{f}': document '{r['id']}' has no text string")
            if split is None or r.get("split", split) == split:
                docs.append((str(r["id"]), r["text"]))
    return docs


def default_sources(checkpoint):
    """The pretraining corpus's documents and labels (reflect.py's meta.json): <data>/../docs and the --labels file,
    or the classifier's labels.jsonl beside the streams. -> (docs path, labels path), None where unknown."""
    data_dir, meta = checkpoint.get("data_dir"), checkpoint.get("meta") or {}
    if not data_dir:
        return None, None
    docs = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "docs")
    lab = meta.get("labels")
    lab = os.path.join(data_dir, "labels.jsonl") if lab == "classifier" else lab
    return (docs if os.path.isdir(docs) else None), (lab if lab and os.path.isfile(lab) else None)


def probe_records(done, docs):
    """Each labelled segment of each document as a probe record {id, doc, index (of the document), label, category,
    start, end (token indices into the document)}, in document order."""
    recs = []
    for j, ((doc_id, _), (ids, ends, cats)) in enumerate(zip(docs, done)):
        start = 0
        for k, (end, cat) in enumerate(zip(ends, cats)):
            recs.append({"id": f"{doc_id}:{k:05d}", "doc": doc_id, "index": j, "label": "safe" if cat is None
                         else "unsafe", "category": cat, "start": start, "end": end})
            start = end
    return recs


# ----------------------------------------------------------------------------- one run

def probe_run(path, label, dev):
    run = load_run(path, GPT, world, tokenizer, dev)
    writable_dir(run.dir)       # before the forward passes, not after them
    if run.world is None:
        return probe_text(run, label, dev)
    if labels or train_classifier or docs:
        fail("--labels, --train_classifier and --docs are for real-text models; a MedSafetyWorld model is probed on "
             "its world's probe set (the plot's curve names are --names)")
    model, w, wpath, run_dir, checkpoint = run.model, run.world, run.world_path, run.dir, run.ck
    probe_path, recs = read_probe_set(wpath, eval_dir)
    bs = model.config.block_size
    seqs, seg_lens, truncated = encode_records(w, recs, bs)
    # split on what the model actually reads: the token ids after the cut (two inputs may differ only in what is cut)
    keys = [tuple(s) for s in seqs]
    groups = input_groups(recs, keys)
    n_mixed = sum(len({recs[i]["label"] for i in g}) > 1 for g in groups)
    train, test = split_records(recs, seed, keys)
    y = np.array([r["label"] == "unsafe" for r in recs], dtype=np.int64)
    if not (0 < y[train].sum() < len(train) and 0 < y[test].sum() < len(test)):
        fail(f"probe set '{probe_path}' cannot be split so that both halves hold both classes "
             f"({len(groups)} distinct inputs of {len(recs)} records)")
    print(f"{label}: {model.num_params() / 1e6:.2f}M parameters from {run_dir} (iter {checkpoint.get('iter_num')}), "
          f"{len(recs)} probe records ({len(groups)} distinct inputs) from {probe_path}, device {dev}")
    if n_mixed:
        print(f"{label}: warning: {n_mixed} distinct inputs carry both labels (kept whole in one half)")

    lock_dir(run_dir)           # the inputs are checked: from here on this process writes run_dir, and only it
    te = [recs[i] for i in test]
    safe = np.array([r["label"] == "safe" for r in te])
    subsets = {s: safe | np.array([r["label"] == "unsafe" and r.get("split") == s for r in te]) for s in
               ("unseen", "seen")}
    layers, best, deep, t_feat, t_probe = measure(model, seqs, seg_lens, y, train, test, subsets, label, dev,
                                                  truncated)
    request = request_probe(model, w, wpath, dev)
    contra = contra_probe(model, w, wpath, dev)
    if contra:
        print(f"{label}: contra probe (seen dangerous pairs vs safe drugs, tested on unseen pairs), AUROC layers 1..L: "
              f"last {pct(contra['deep']['last']['auroc'])}, mean {pct(contra['deep']['mean']['auroc'])}; layer 0 "
              f"{pct(contra['layers'][0]['mean']['auroc'])}; the input's words {pct(contra['words']['auroc'])}")
    if request:
        r = request["deep"]["last"]
        print(f"{label}: request probe (seen harms vs benign intent, tested on unseen harms), layers 1..L: "
              f"acc {pct(r['acc'])}, unseen harms {pct(r['acc_unseen'])}, benign {pct(r['acc_benign'])}, "
              f"AUROC {pct(r['auroc'])}")
    config = {k: globals()[k] for k in defaults_of(globals())}
    report = {"ckpt": os.path.join(run_dir, "ckpt.pt"), "label": label, "iter_num": checkpoint.get("iter_num"),
              "world": wpath, "probe_set": probe_path, "data_dir": checkpoint.get("data_dir"),
              "n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "n_records": len(recs),
              "n_train": len(train), "n_test": len(test), "n_test_safe": int(safe.sum()),
              "n_test_unsafe": int((~safe).sum()),
              **{f"n_test_{s}": sum(r["label"] == "unsafe" and r.get("split") == s for r in te)
                 for s in ("unseen", "seen")},
              "truncated": truncated, "n_distinct_inputs": len(groups), "n_mixed_inputs": n_mixed,
              "n_train_inputs": len(set(keys[i] for i in train)), "n_test_inputs": len(set(keys[i] for i in test)),
              "layers": layers, "deep": deep, "best": best, "request": request, "contra": contra, "config": config,
              "seconds": {"features": t_feat, "probes": t_probe}, "records_per_s": len(recs) / t_feat}
    return save_report(run_dir, report, label)


def save_report(run_dir, report, label):
    """probe.json beside the checkpoint, the table and a summary line (world and real-text probes alike)."""
    dest = os.path.join(run_dir, "probe.json")
    write_json(dest, report, indent=1)
    print_table(report)
    print(f"{label}: {2 * len(report['layers'])} probes in {report['seconds']['probes']:.1f}s; wrote {dest}")
    return report


def measure(model, seqs, seg_lens, y, train, test, subsets, label, dev, truncated):
    """The features of every record, then the probes of every layer. -> (layers, best, deep, seconds of the
    features, seconds of the probes)."""
    t0 = time.time()
    feats = features(model, seqs, seg_lens, batch_size, progress=f"{label} features")
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t_feat = time.time() - t0
    print(f"\r{label} features: {len(seqs)} records, {sum(len(s) for s in seqs):,} tokens in {t_feat:.1f}s: "
          f"{len(seqs) / t_feat:,.1f} records/s"
          + (f" ({truncated} cut to block_size={model.config.block_size})" if truncated else ""))
    t0 = time.time()
    layers = probe_layers({k: v.numpy() for k, v in feats.items()}, y, train, test, subsets, l2=l2,
                          max_steps=max_steps)
    t_probe = time.time() - t0
    best = {}
    for k in KINDS:
        top = max(layers, key=lambda row: (row[k]["acc"], -row["layer"]))
        best[k] = {"layer": top["layer"], "acc": top[k]["acc"], "auroc": top[k]["auroc"]}
    return layers, best, deep_mean(layers), t_feat, t_probe


def labelled_records(enc, dpath, lpath, spans, clf, segment_tokens):
    """The documents' segments as probe records, split by document (split_records) so that both halves hold both
    classes: from --docs_split, or (auto) from the val split, else from every split (the model read the train
    documents in pretraining: said, and recorded). -> (split, texts, segmented, records, train, test, labels)."""
    tried = []
    for split in (("val", "all") if docs_split == "auto" else (docs_split,)):
        texts = read_docs(dpath, None if split == "all" else split)
        done = segmented(enc, texts, spans, clf, segment_tokens, lpath)
        recs = probe_records(done, texts)
        if max_records >= 0:
            recs = recs[:max_records]
        train, test = split_records(recs, seed, [texts[r["index"]][1] for r in recs])
        y = np.array([r["label"] == "unsafe" for r in recs], dtype=np.int64)
        if train and test and 0 < y[train].sum() < len(train) and 0 < y[test].sum() < len(test):
            if tried:
                print(f"probe: {tried[0]}; probing every split instead (the model was pretrained on the train "
                      f"documents: a probe reads how it represents text it has seen)")
            return split, texts, done, recs, train, test, y
        tried.append(f"the {len({r['index'] for r in recs})} documents of '{dpath}' (split {split}) hold "
                     f"{int(y.sum())} unsafe and {int(len(y) - y.sum())} safe segments, which cannot be split by "
                     f"document so that both halves hold both classes")
    fail(f"{tried[-1]}; pass --docs=<labelled documents> with --labels=<their spans> (or --train_classifier=<labelled "
         f"texts>), or --docs_split=all")


def probe_text(run, label, dev):
    """A real-text model: every segment of held-out labelled documents is a record (the pretraining segmenter and
    labeller, with the model's segment_tokens), read where it ends: the document up to there after an
    <|endoftext|>, its last block_size tokens, as the raw text (no reflections). The split keeps a document and its
    exact duplicates whole in one half, so no text of a test record was fitted on. A reflection model's own
    reflections on the same segments are read too (reflection.classify_text_reflections)."""
    model, enc, checkpoint, run_dir = run.model, run.enc, run.ck, run.dir
    traits = model_info(checkpoint)
    docs_default, labels_default = default_sources(checkpoint)
    dpath = docs or docs_default
    lpath = labels or ("" if train_classifier else labels_default)
    if not dpath or not (lpath or train_classifier):
        fail(f"checkpoint '{run.path}' is a real-text model whose pretraining corpus or labels are not here; pass "
             f"--docs=<held-out documents> and --labels=<their spans> (or --train_classifier=<labelled texts>)")
    spans, clf = label_source(lpath, train_classifier, checkpoint["meta"].get("config") or {}, "probe.py on a "
                              "real-text model")
    split, texts, done, recs, train, test, y = labelled_records(enc, dpath, lpath, spans, clf, traits["segment_tokens"])
    bs = model.config.block_size
    seqs = [([enc.eot_token] + done[r["index"]][0][:r["end"]])[-bs:] for r in recs]
    seg_lens = [min(r["end"] - r["start"], len(x)) for r, x in zip(recs, seqs)]
    truncated = sum(r["end"] + 1 > bs for r in recs)
    keys = [texts[r["index"]][1] for r in recs]           # identical documents share a half
    n_docs = len({r["index"] for r in recs})
    where = f"{lpath or 'the classifier trained on ' + train_classifier}"
    print(f"{label}: {model.num_params() / 1e6:.2f}M parameters from {run_dir} (iter {checkpoint.get('iter_num')}), "
          f"{len(recs)} segments of {n_docs} documents from {dpath}, labels {where}, device {dev}")
    lock_dir(run_dir)           # the inputs are checked: from here on this process writes run_dir, and only it
    layers, best, deep, t_feat, t_probe = measure(model, seqs, seg_lens, y, train, test, {}, label, dev, truncated)
    refl = None
    if traits["reflective"]:
        reflection_texts = text_format(checkpoint.get("meta"))      # the texts pretraining wrote
        p, safe_tok, unsafe_tok = text_opener(enc, [r["category"] for r in recs if r["category"]], reflection_texts)
        rseqs, sites = text_reflection_sites(enc, done, p, reflection_texts)
        sites = sites[:len(recs)]                              # one site per record, in the same order
        preds, mass = classify_text_reflections(model, rseqs, sites, safe_tok, unsafe_tok, dev)
        m = text_reflection_metrics(sites, preds, mass)
        refl = {"metrics": m, "reflections": len(sites), "documents": n_docs, "opener_position": p,
                "opener": {"safe": enc.decode([safe_tok]), "unsafe": enc.decode([unsafe_tok])}}
        print(f"{label}: reflection classification, teacher-forced at {len(sites)} segments: accuracy "
              + ", ".join(f"{k[len('reflection_accuracy_'):] or 'all'} {pct(v['rate']).strip()}% (n={v['n']})"
                          for k, v in m.items() if k.startswith("reflection_accuracy"))
              + f"; P(either opener) {m['opener_mass']:.3f}")
    te = [recs[i] for i in test]
    report = {"ckpt": os.path.join(run_dir, "ckpt.pt"), "label": label, "iter_num": checkpoint.get("iter_num"),
              "world": None, "tokenizer": enc.name,
              "probe_set": {"docs": os.path.abspath(dpath), "split": split,
                            "labels": os.path.abspath(lpath) if lpath else f"classifier:{train_classifier}"},
              "data_dir": checkpoint.get("data_dir"), "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
              "n_records": len(recs), "n_docs": n_docs, "n_train": len(train), "n_test": len(test),
              "n_test_safe": sum(r["label"] == "safe" for r in te), "n_test_unsafe": sum(r["label"] == "unsafe"
                                                                                        for r in te),
              "n_train_docs": len({keys[i] for i in train}), "n_test_docs": len({keys[i] for i in test}),
              "truncated": truncated, "layers": layers, "deep": deep, "best": best, "request": None, "contra": None,
              "reflection_classification": refl, "config": {k: globals()[k] for k in defaults_of(globals())},
              "seconds": {"features": t_feat, "probes": t_probe}, "records_per_s": len(recs) / t_feat}
    return save_report(run_dir, report, label)


def request_probe(model, w, wpath, dev):
    """The request probe: does the residual stream at the request (the last token of the user turn, where a
    reflection model reflects) separate harm from benign intent beyond the harms the corpus showed? A probe per layer
    fitted on seen poison requests (1) against half the benign-intent requests (0), tested on the unseen poison
    requests against the other half. High unseen accuracy with a reflection model that misclassifies unseen harms
    points to a readout that memorises; low accuracy everywhere, to a concept the model never formed.
    -> {"n_train", "n_test", "layers": [{layer, <kind>: {acc, auroc, acc_unseen, acc_benign}}], "deep"}."""
    d = sets_dir(wpath, eval_dir)
    recs = []
    for name in ("harmful_prompts", "benign_prompts"):
        path = os.path.join(d, f"{name}.jsonl")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            recs += [json.loads(l) for l in f if l.strip()]
    harm = {s: [r for r in recs if r.get("category") == "poison" and r.get("split") == s] for s in ("seen", "unseen")}
    benign = sorted((r for r in recs if r.get("kind") == "benign_intent"), key=lambda r: r["id"])
    random.Random(f"{seed}/request").shuffle(benign)
    half = len(benign) // 2
    if not (harm["seen"] and harm["unseen"] and half):
        return None
    train, test = harm["seen"] + benign[:half], harm["unseen"] + benign[half:]
    both = train + test
    bs = model.config.block_size
    seqs = [w.encode(r["user"])[-bs:] for r in both]
    feats = features(model, seqs, [len(s) for s in seqs], batch_size)
    y = np.array([r.get("category") == "poison" for r in both], dtype=np.int64)
    tr, te = list(range(len(train))), list(range(len(train), len(both)))
    is_harm = y[te].astype(bool)
    layers = probe_layers({k: v.numpy() for k, v in feats.items()}, y, tr, te,
                          {"unseen": is_harm, "benign": ~is_harm}, l2=l2, max_steps=max_steps)
    return {"n_train": len(train), "n_test": len(test), "n_unseen": int(is_harm.sum()), "layers": layers,
            "deep": {k: {m: float(np.mean([row[k][m] for row in layers if row["layer"] >= 1]))
                         for m in ("acc", "auroc", "acc_unseen", "acc_benign")} for k in KINDS}}


def contra_probe(model, w, wpath, dev):
    """The contra probe, a conjunction that words alone cannot read: a treatment request from a patient with a trait,
    then the answer's link step naming a drug ("velorin treats harlow fever ."). Does the residual stream there say
    that the drug's class is dangerous for that trait? Each request appears twice, with a drug its trait rules out (1)
    and with a safe one (0), so the request's words say nothing; the probe is fitted on the seen (class, trait) pairs'
    requests and tested on the unseen pairs'. Layer 0 of the step's mean reads the step's own words; "words" is a
    probe on every word of the input (the mean of the whole input at layer 0: a bag of words).
    -> {"n_train", "n_test", "layers", "deep", "words"} or None without contra prompts of both splits."""
    path = os.path.join(sets_dir(wpath, eval_dir), "harmful_prompts.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    recs = [r for r in recs if r.get("category") == "contra" and r["meta"].get("safe_drugs")]
    if not {r["split"] for r in recs} >= {"seen", "unseen"}:
        return None
    items = []
    for r in recs:
        for label, drug in ((1, sorted(r["meta"]["contra_drugs"])[0]), (0, sorted(r["meta"]["safe_drugs"])[0])):
            link = TEMPLATES["f_treats"].format(drug=drug, cond=r["meta"]["cond"])
            items.append((r["split"], label, w.encode(f"{r['user']} assistant : {link}"), len(link.split())))
    bs = model.config.block_size
    seqs = [ids[-bs:] for _, _, ids, _ in items]
    feats = features(model, seqs, [n for *_, n in items], batch_size)
    bag = features(model, seqs, [len(s) for s in seqs], batch_size)["mean"][:, :1]     # layer 0 of the whole input
    y = np.array([label for _, label, _, _ in items], dtype=np.int64)
    tr = [i for i, it in enumerate(items) if it[0] == "seen"]
    te = [i for i, it in enumerate(items) if it[0] == "unseen"]
    layers = probe_layers({k: v.numpy() for k, v in feats.items()}, y, tr, te, l2=l2, max_steps=max_steps)
    words = probe_layers({"mean": bag.numpy()}, y, tr, te, l2=l2, max_steps=max_steps)[0]["mean"]
    return {"n_train": len(tr), "n_test": len(te), "layers": layers, "deep": deep_mean(layers), "words": words}


def deep_mean(layers):
    """-> {kind: {acc, auroc}}: the test metrics averaged over layers 1..n_layer (layer 0, the embeddings, is the
    lexical baseline). Averaging picks nothing on the test half, unlike "best"."""
    deep = [row for row in layers if row["layer"] >= 1]
    return {k: {m: (float(np.mean([row[k][m] for row in deep])) if deep else None) for m in ("acc", "auroc")}
            for k in KINDS}


def pct(x):
    return "    -" if x is None else f"{100 * x:5.1f}"


def print_table(report):
    print(f"\n{report['label']}: test accuracy / AUROC (%), n_train {report['n_train']}, n_test {report['n_test']}"
          + (f" ({report['n_test_inputs']} distinct; unsafe unseen {report['n_test_unseen']}, seen "
             f"{report['n_test_seen']})" if "n_test_unseen" in report else
             f" ({report['n_test_docs']} documents; unsafe {report['n_test_unsafe']})"))
    print(f"{'layer':>5s}  {'mean acc':>8s} {'auroc':>6s} {'unseen':>6s}   {'last acc':>8s} {'auroc':>6s} "
          f"{'unseen':>6s}")
    for row in report["layers"]:
        m, l = row["mean"], row["last"]
        print(f"{row['layer']:5d}  {pct(m['acc']):>8s} {pct(m['auroc']):>6s} {pct(m.get('acc_unseen')):>6s}   "
              f"{pct(l['acc']):>8s} {pct(l['auroc']):>6s} {pct(l.get('acc_unseen')):>6s}")
    m, l = report["deep"]["mean"], report["deep"]["last"]
    print(f"{'1..' + str(report['n_layer']):>5s}  {pct(m['acc']):>8s} {pct(m['auroc']):>6s} {'':>6s}   "
          f"{pct(l['acc']):>8s} {pct(l['auroc']):>6s}   (mean over layers 1..n_layer: the number to compare)")


def plot(reports, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rep in enumerate(reports):
        xs = [row["layer"] for row in rep["layers"]]
        for ax, metric in zip(axes, ("acc", "auroc")):
            for kind, style in (("mean", "-"), ("last", "--")):
                ax.plot(xs, [row[kind][metric] for row in rep["layers"]], style, marker="o", ms=3,
                        color=colors[i % len(colors)], label=f"{rep['label']} ({kind})")
    lo = min([0.4] + [row[k][m] - 0.05 for rep in reports for row in rep["layers"] for k in KINDS
                      for m in ("acc", "auroc") if row[k][m] is not None])
    for ax, name in zip(axes, ("test accuracy", "test AUROC")):
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(name)
        ax.set_ylim(lo, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linear probe, safe vs unsafe (solid: mean over the segment, dashed: last token; "
                 f"n_test {reports[0]['n_test']})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    paths = [p for p in ckpt.split(",") if p]
    if not paths:
        fail("no checkpoint given (--ckpt=out/<run>, or a comma list)")
    run_dirs = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]
    curves = names.split(",") if names else [os.path.basename(d) for d in run_dirs]
    if len(curves) != len(paths):
        fail(f"--names has {len(curves)} entries for {len(paths)} checkpoints")
    if docs_split not in ("auto", "val", "train", "all"):
        fail(f"docs_split must be auto, val, train or all, not '{docs_split}'")
    if l2 < 0 or max_steps < 1 or batch_size < 1:
        fail("l2 must be >= 0, max_steps and batch_size at least 1")
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # every checkpoint must exist before the first one's forward passes start
    for p in paths:
        f = os.path.join(p, "ckpt.pt") if os.path.isdir(p) else p
        if not os.path.isfile(f):
            fail(f"no checkpoint at '{f}' (train one with train.py, or pass --ckpt=out/<run>)")
    reports = [probe_run(p, name, dev) for p, name in zip(paths, curves)]
    if out:
        png = out
    elif len(paths) == 1:
        png = os.path.join(run_dirs[0], "probe.png")
    else:
        png = os.path.join(os.path.dirname(run_dirs[0]), "probe-" + "+".join(os.path.basename(d) for d in run_dirs)
                           + ".png")
    plot(reports, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    run_stage(main)

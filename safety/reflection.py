"""
Safety Reflection on real text after pretraining: the pretraining segmenter and labeller (realtext.py, exactly what
reflect.py's reflect intervention runs) applied to any text, for finetune.py's reflection sft rows and probe.py's
held-out segments and the teacher-forced reads of a model's own reflections.

Reads, writes: nothing by itself. The label sources are reflect.py's: --labels (spans from any guard model, read by
realtext.read_labels) or --train_classifier (the built-in classifier, trained as reflect.py trains it).
"""
# An sft row (finetune.py, --task=sft on a reflection model):
#     prompt  chat_template.format(prompt=...)                       e.g. "User: How do I bake bread?\nAssistant:"
#     target  the reflection on the prompt (the whole prompt is one segment), then, if it is safe, the response (after a
#             space) cut by the pretraining segmenter, each segment followed by its reflection; <|endoftext|> right
#             after the first unsafe reflection (the rest of the response is dropped: the model learns to stop), or after
#             the last one. Labels name the texts "<row id>/prompt" and "<row id>/response", offsets into the data's
#             prompt and response strings.
# Reflections are written as the model's pretraining wrote them (meta.json's reflection_format, else realtext.py's
# " <think> Safe </think>" / " <think> Unsafe {category} </think>").

import os
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from safety.realtext import corpus as realtext
from safety.realtext.classifier import MIN_F1, fit_classifier
from safety.common import fail, read_jsonl, wilson
from safety.decoding import padded_logits
from safety.realtext.corpus import (EOT_TEXT, REFLECT_SAFE, REFLECT_UNSAFE, classify_sentences, label_segments,
                                    read_labels, segment, token_tables)


def label_source(labels, train_classifier, cfg, what):
    """(unsafe spans {text id: [(start, end, category, line)]}, classifier or None) from exactly one source; cfg:
    the pretraining's reflect.py flags (meta.json's config), whose seed and F1 floor the classifier keeps."""
    if bool(labels) == bool(train_classifier):
        fail(f"{what} needs segment labels, as reflect.py does: pass --labels=<spans.jsonl> (from any guard model) or "
             f"--train_classifier=<labelled.jsonl> (the built-in classifier), one of the two")
    if labels:
        return read_labels(labels), None
    rows = read_jsonl(train_classifier, "labelled texts file", ("text", "label"))
    clf, _ = fit_classifier(rows, train_classifier, cfg.get("seed", 0), min_f1=cfg.get("classifier_min_f1", MIN_F1))
    return {}, clf


def segmented(enc, texts, spans, clf, segment_tokens, labels_path=""):
    """texts [(id, text)] -> per text (token ids, segment ends as token indices into them, segment categories, None:
    safe), as reflect.py's reflect intervention segments and labels a document (segments never cross a text's end,
    so the texts may be processed together). A text without tokens gives ([], [], [])."""
    realtext.init_worker({"enc": enc, "tables": token_tables(enc), "segment_tokens": segment_tokens, "clf": clf})
    ids = [enc.encode_ordinary(t) for _, t in texts]
    keep = [j for j, x in enumerate(ids) if x]
    out = [([], [], []) for _ in texts]
    if not keep:
        return out
    docs = [texts[j] for j in keep]
    sp = []
    for doc_id, text in docs:
        s = list(spans.get(doc_id, []))
        if s and max(e for _, e, _, _ in s) > len(text):
            n = max(s, key=lambda x: x[1])[3]
            fail(f"labels file '{labels_path}' line {n}: a span lies beyond the end of '{doc_id}' ({len(text)} "
                 f"characters); label these texts")
        sp.append(s)
    lens = np.array([len(ids[j]) for j in keep], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(ids[j] for j in keep), dtype=np.int64, count=int(lens.sum()))
    ends = np.cumsum(lens)
    starts = ends - lens
    seg_ends, sentence_ends = segment(flat, ends)
    seg_doc = np.searchsorted(ends, seg_ends, side="left")
    if clf is not None:
        classify_sentences(docs, sp, flat, starts, ends, np.union1d(sentence_ends, seg_ends))
    cats = label_segments(docs, sp, flat, starts, ends, seg_ends, seg_doc)
    first = np.searchsorted(seg_doc, np.arange(len(docs) + 1), side="left").tolist()
    for k, j in enumerate(keep):
        a, b = first[k], first[k + 1]
        out[j] = (ids[j], (seg_ends[a:b] - starts[k]).tolist(), cats[a:b])
    return out


def reflection_format(meta):
    """(safe, unsafe) reflection texts the model was pretrained with: meta.json's reflection_format (reflect.py
    records it), else realtext.py's."""
    fmt = (meta or {}).get("reflection_format") or {}
    return fmt.get("safe", REFLECT_SAFE), fmt.get("unsafe", REFLECT_UNSAFE)


def reflection(enc, category, fmt=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """The tokens of the reflection after a segment, as pretraining wrote them (realtext.reflection_ids)."""
    return enc.encode_ordinary(fmt[0] if category is None else fmt[1].format(category=category))


def check_label_ids(spans, known, labels_path):
    unknown = sorted(set(spans) - set(known))
    if unknown:
        fail(f"labels file '{labels_path}' names {len(unknown)} text(s) not in the data (e.g. '{unknown[0]}'); a "
             f"chat row's texts are '<row id>/prompt' and '<row id>/response'")


# ----------------------------------------------------------------------------- the sft rows

def sft_rows(enc, rows, template, spans, clf, segment_tokens, labels_path="", fmt=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """rows [(row id, prompt, response)] -> [(prompt ids, target ids)] in the format of the module docstring."""
    eot = enc._special_tokens[EOT_TEXT]
    answers = [r if r[:1].isspace() else " " + r for _, _, r in rows]   # the answer after a space, as plain rows
    shifted = dict(spans)
    for (rid, _, r), a in zip(rows, answers):                          # offsets into the response -> the answer
        d = len(a) - len(r)
        if d and f"{rid}/response" in spans:
            shifted[f"{rid}/response"] = [(s + d, e + d, c, n) for s, e, c, n in spans[f"{rid}/response"]]
    texts = [(f"{rid}/prompt", p) for rid, p, _ in rows] + [(f"{rid}/response", a) for (rid, _, _), a in
                                                           zip(rows, answers)]
    done = segmented(enc, texts, shifted, clf, segment_tokens, labels_path)
    out = []
    for k, (rid, p, _) in enumerate(rows):
        _, _, p_cats = done[k]
        p_cat = next((c for c in p_cats if c is not None), None)          # the prompt is one segment
        target = reflection(enc, p_cat, fmt)
        if p_cat is None:
            ids, ends, cats = done[len(rows) + k]
            start = 0
            for end, cat in zip(ends, cats):
                target += ids[start:end] + reflection(enc, cat, fmt)
                start = end
                if cat is not None:
                    break
        out.append((enc.encode_ordinary(template.format(prompt=p)), target + [eot]))
    return out


# ----------------------------------------------------------------------------- held-out labelled documents

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


def default_sources(ck):
    """The pretraining corpus's documents and labels (reflect.py's meta.json): <data>/../docs and the --labels file,
    or the classifier's labels.jsonl beside the streams. -> (docs path, labels path), None where unknown."""
    data_dir, meta = ck.get("data_dir"), ck.get("meta") or {}
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


# ----------------------------------------------------------------------------- the model's own reflections

def opener(enc, categories, fmt=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """Where the safe and the unsafe reflection first differ: (shared prefix length p, safe opener token, unsafe
    opener token). " <think>" is shared; the next token says safe or unsafe, and does not depend on the category."""
    safe = reflection(enc, None, fmt)
    heads = {tuple(reflection(enc, c, fmt)[:len(safe) + 1]) for c in sorted(set(categories) | {"harmful"})}
    p = min(next((i for i, (a, b) in enumerate(zip(safe, h)) if a != b), len(safe)) for h in heads)
    if p >= len(safe) or min(map(len, heads)) <= p or len({h[:p + 1] for h in heads}) != 1:
        fail(f"the tokenizer '{enc.name}' writes the safe and unsafe reflections with no single token that tells them "
             f"apart; the reflection classification needs one")
    return p, safe[p], next(iter(heads))[p]


def reflection_sites(enc, done, p, fmt=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """Every held-out document as the reflect stream holds it (after an <|endoftext|>, each segment followed by its
    true reflection) and its sites: (document, index of the token whose next-token prediction is the opener,
    label, category)."""
    eot = enc._special_tokens[EOT_TEXT]
    seqs, sites = [], []
    for j, (ids, ends, cats) in enumerate(done):
        seq, start = [eot], 0
        for end, cat in zip(ends, cats):
            seq += ids[start:end]
            sites.append((j, len(seq) - 1 + p, "safe" if cat is None else "unsafe", cat))
            seq += reflection(enc, cat, fmt)
            start = end
        seqs.append(seq)
    return seqs, sites


def classify_reflections(model, seqs, sites, safe_tok, unsafe_tok, dev, chunk=64):
    """Teacher-forced, like decode.classify_reflections for the world: at each site the model reads the document up
    to the opener (its last block_size tokens, earlier reflections and all, as a training window has them) and
    says unsafe when P(unsafe opener) > P(safe opener). -> (predictions "safe" | "unsafe", P(either opener))."""
    B = model.config.block_size
    windows = [seqs[j][max(0, q + 1 - B):q + 1] for j, q, *_ in sites]
    preds, mass = [], []
    for c0 in range(0, len(windows), chunk):
        batch = windows[c0:c0 + chunk]
        logits = padded_logits(model, batch, dev)
        last = logits[torch.arange(len(batch), device=dev), torch.tensor([len(x) - 1 for x in batch], device=dev)]
        probs = F.softmax(last.float(), -1)
        pu, ps = probs[:, unsafe_tok].tolist(), probs[:, safe_tok].tolist()
        preds += ["unsafe" if u > s else "safe" for u, s in zip(pu, ps)]
        mass += [u + s for u, s in zip(pu, ps)]
    return preds, mass


def reflection_metrics(sites, preds, mass):
    """Accuracy of the predicted labels against the label source's, with Wilson intervals: overall, on safe and on
    unsafe segments, per unsafe category; and the mean probability the model gives either opener (near 1: it
    reflects there; near 0: it has not learned to)."""
    ok = [p == lab for (_, _, lab, _), p in zip(sites, preds)]
    m = {"reflection_accuracy": wilson(sum(ok), len(ok))}
    for lab in ("safe", "unsafe"):
        mine = [o for o, s in zip(ok, sites) if s[2] == lab]
        m[f"reflection_accuracy_{lab}"] = wilson(sum(mine), len(mine))
    for cat in sorted({s[3] for s in sites if s[3] is not None}):
        mine = [o for o, s in zip(ok, sites) if s[3] == cat]
        m[f"reflection_accuracy_{cat}"] = wilson(sum(mine), len(mine))
    m["opener_mass"] = float(np.mean(mass)) if mass else None
    return m

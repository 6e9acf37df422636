"""
The built-in safety classifier: hashed word unigrams + bigrams -> logistic regression over safe + the unsafe
categories. It labels real text for reflect.py when no guard model's labels are given (--train_classifier), and
MedSafetyWorld for --classifier_on_world (what an imperfect classifier costs).

Reads, writes: nothing by itself; reflect.py calls fit_classifier and classify.
"""
import random
import re
import time
import zlib

import numpy as np

from safety.common import fail

DEFAULT_CATEGORY = "harmful"
MIN_F1 = 0.5      # a classifier below this held-out F1 labels nothing (reflect.py's --classifier_min_f1)
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


def fit_classifier(rows, source, seed=0, holdout=0.2, buckets=262144, epochs=20, min_f1=None):
    """Train on all but a held-out share of rows ({"text", "label", "category"?}); returns the classifier (numpy
    arrays, usable without torch in the workers) and precision/recall/F1 of 'unsafe' on the held-out rows. Below
    min_f1 (None: no floor) it stops with one line: a classifier that failed must not label a corpus."""
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
    n_hold = int(len(rows) * holdout)
    held, train = order[:n_hold], order[n_hold:]
    cache = {}
    feats = [ngram_buckets(r["text"], buckets, cache) for r in rows]
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
    for epoch in range(epochs):
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
    weights = np.zeros((buckets, len(classes)), dtype=np.float32)
    weights[used] = bag.weight.detach().numpy()
    clf = {"classes": classes, "W": weights,
           "b": bias.detach().numpy().astype(np.float64), "cache": {}}
    metrics = heldout_metrics(clf, [rows[j] for j in held], source, len(train))
    prec, rec, share = metrics["precision"], metrics["recall"], metrics["heldout_unsafe_share"]
    print(f"built-in classifier, the offline fallback ({len(classes) - 1} unsafe categories, {len(train):,} training "
          f"texts, {time.time() - t0:.1f}s): "
          f"held-out {len(held):,} texts ({share:.0%} unsafe): precision {prec:.3f} recall {rec:.3f} "
          f"F1 {metrics['f1']:.3f} (flagging everything: F1 {metrics['always_unsafe_f1']:.3f})")
    if min_f1 is not None and not metrics["f1"] >= min_f1:
        fail(f"{source}: the classifier's held-out F1 {metrics['f1']:.3f} (precision {prec:.3f}, recall {rec:.3f}, "
             f"{len(held):,} texts, {round(share * len(held)):,} unsafe) is below --classifier_min_f1={min_f1}; "
             f"nothing was labelled or written: give more labelled texts (README: the labelled texts file), labels "
             f"from a guard model (label.py, --labels), or a lower --classifier_min_f1")
    return clf, metrics


def heldout_metrics(clf, held_rows, source, n_train):
    """Precision, recall and F1 of 'unsafe' on the held-out rows, beside the F1 of flagging everything."""
    truth = [r["label"] == "unsafe" for r in held_rows]
    pred = [lab == "unsafe" for lab, _ in classify(clf, [r["text"] for r in held_rows])]
    tp = sum(t and p for t, p in zip(truth, pred))
    fp = sum(p and not t for t, p in zip(truth, pred))
    fn = sum(t and not p for t, p in zip(truth, pred))
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    share = sum(truth) / max(len(truth), 1)
    return {"source": source, "classes": clf["classes"], "train_texts": n_train, "heldout_texts": len(held_rows),
            "heldout_unsafe_share": share, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / max(prec + rec, 1e-12),
            "accuracy": sum(t == p for t, p in zip(truth, pred)) / max(len(held_rows), 1),
            "always_unsafe_f1": 2 * share / (1 + share)}  # the F1 of flagging everything: the floor to beat


def category_of(r):
    cat = r.get("category") or DEFAULT_CATEGORY
    return re.sub(r"\s+", "_", str(cat).strip()) or DEFAULT_CATEGORY

"""
Safety Reflection (Beyond Safe Data, arXiv 2606.19168) in one place, for both grounds: after every segment of
pretraining text, a short reflection on it, safe or unsafe with a category. Read top to bottom:

  1. the format              how a reflection is spelled: MedSafetyWorld's tokens, real text's plain strings
  2. the segmenter           where reflections go: sentence-aligned segments of at most segment_tokens tokens, each
                             with its label (the world's oracle; real text's span labels or the built-in classifier)
  3. the insertion           a document with a reflection after each segment (real text: a vectorised table lookup,
                             with the plain loop it must agree with beside it)
  4. the post-training rows  sft examples in the pretraining format (the world's chat and stop examples; real
                             text's sft rows)
  5. the teacher-forced read a model's own reflection at every site of held-out documents, read without sampling

reflect.py writes the streams with it, finetune.py the sft rows, attack.py and probe.py read the model's own
reflections, label.py cuts real text where reflect.py will (so that each guard label falls on one reflection).
Reads, writes: nothing by itself.
"""
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from safety.common import fail, read_jsonl, wilson
from safety.realtext.bpe import EOT_TEXT
from safety.realtext.classifier import MIN_F1, classify, fit_classifier
from safety.realtext.corpus import read_labels
from safety.world.grammar import END, END_THINK, EOT, SAFE, THINK, UNSAFE

# ============================================================================= 1. the format
# MedSafetyWorld: words of the world's vocabulary, so a reflection is a few tokens the model learns like any other.


def world_reflection(label, category=None):
    """"<think> safe </think>" or "<think> unsafe <category> </think>"."""
    return f"{THINK} {SAFE} {END_THINK}" if label == SAFE else f"{THINK} {UNSAFE} {category} {END_THINK}"


# Real text: plain text after a segment, tokenized as any text is (no new tokens in the vocabulary). reflect.py
# records the two strings in meta.json ("reflection_format"); every later stage reads them back with text_format.
REFLECT_SAFE, REFLECT_UNSAFE = " <think> Safe </think>", " <think> Unsafe {category} </think>"


def text_format(meta=None):
    """(safe, unsafe) reflection texts a model was pretrained with: its meta.json's reflection_format, else the
    ones above (a stream written before the format was recorded)."""
    recorded = (meta or {}).get("reflection_format") or {}
    return recorded.get("safe", REFLECT_SAFE), recorded.get("unsafe", REFLECT_UNSAFE)


def text_reflection(enc, category, reflection_texts=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """The tokens of the reflection after a segment: safe (category None) or unsafe with its category."""
    safe_text, unsafe_text = reflection_texts
    return enc.encode_ordinary(safe_text if category is None else unsafe_text.format(category=category))


# ============================================================================= 2. the segmenter
# MedSafetyWorld: documents are stored as sentences, each with the oracle's label; a segment is a group of them.

def world_segments(world, segments, max_tokens=32, user_turns=True):
    """A document's sentences (stored segments, with their oracle labels) grouped into segments of at most max_tokens
    tokens, sentence-aligned (0: one sentence each). The end of an assistant turn always closes a segment, so a
    response is reflected on before it ends (and a model can stop right after an unsafe reflection). user_turns=True:
    a user turn is a segment of its own -- closed before "user :" and before "assistant :" -- so every request is
    reflected on exactly where post-training and attacks ask for the reflection; False: a request shares a segment
    with what came before or after it. -> [(sentences of the segment, label, category)], the label merging its
    sentences' (poison first)."""
    groups, cur, n = [], [], 0
    for s in segments:
        k = len(s["text"].split())
        turn = user_turns and s["text"].startswith(("user :", "assistant :"))
        if cur and (n + k > max_tokens or turn):
            groups.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += k
        if s["text"].endswith(END):
            groups.append(cur)
            cur, n = [], 0
    if cur:
        groups.append(cur)
    return [(g, *world.merge_labels([(s["label"], s["category"]) for s in g])) for g in groups]


# Real text: token ids, cut after a token that ends a sentence (. ! ?) when the next starts with whitespace; a sentence
# longer than the limit is cut inside. Each segment's category comes from the unsafe spans it overlaps.

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


def tokenize_texts(enc, texts):
    """The texts' tokens laid end to end, leaving out texts without tokens (nothing to learn from, no segment).
    -> (indices of the texts kept, every text's ids, the flat tokens, starts, ends): flat[starts[k]:ends[k]] holds
    the k-th kept text's tokens."""
    ids = [enc.encode_ordinary(t) for t in texts]
    keep = [j for j, x in enumerate(ids) if x]
    lens = np.array([len(ids[j]) for j in keep], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(ids[j] for j in keep), dtype=np.int64, count=int(lens.sum()))
    ends = np.cumsum(lens)
    return keep, ids, flat, ends - lens, ends


class TextSegmenter:
    """Real text's segmenter for one tokenizer and segment_tokens (its tables built once): reflect.py's workers,
    label.py and segmented() below all cut text with it, so the three agree segment for segment."""

    def __init__(self, enc, segment_tokens, tables=None):
        self.enc, self.limit = enc, segment_tokens
        self.tables = token_tables(enc) if tables is None else tables

    def long_cut(self, flat, start, end):
        """Where to cut a sentence longer than the limit, at most at `end`: before a word if one starts in the
        second half of the window, else at any token boundary that is not inside a UTF-8 character."""
        T = self.tables
        c = next((c for c in range(end, start + (end - start) // 2, -1) if T["space_first"][flat[c]]), None)
        return c or next((c for c in range(end, start, -1) if not T["mid_char"][flat[c]]), end)

    def segment(self, flat, doc_ends):
        """The end (index into flat) of every segment of the concatenated documents: sentence-aligned, at most
        segment_tokens tokens; a longer sentence is cut (long_cut). Also the end of every sentence."""
        T, limit = self.tables, self.limit
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
                    c = self.long_cut(flat, start, start + limit)
                    ends.append(c)
                    start = c
            prev = b
            if last:
                ends.append(b)
                start = b
        return np.array(ends, dtype=np.int64), bounds

    def byte_offsets(self, flat, a, b):
        """Byte offset of each token of flat[a:b] in its text, and of the end."""
        return np.concatenate([[0], np.cumsum(self.tables["nbytes"][flat[a:b]])])

    def spans(self, texts):
        """Each text's segments as character spans [(start, end)], cut exactly as reflect.py cuts a document.
        label.py labels these spans, so a guard's labels fall on reflect.py's segments one to one. Segments end at
        token starts that begin a character."""
        keep, _, flat, starts, ends = tokenize_texts(self.enc, texts)
        out = [[] for _ in texts]
        if not keep:
            return out
        seg_ends, _ = self.segment(flat, ends)
        seg_doc = np.searchsorted(ends, seg_ends, side="left")
        first = np.searchsorted(seg_doc, np.arange(len(keep) + 1), side="left").tolist()
        for k, j in enumerate(keep):
            a = int(starts[k])
            off = self.byte_offsets(flat, a, ends[k])[np.concatenate([[a], seg_ends[first[k]:first[k + 1]]]) - a]
            if not texts[j].isascii():   # byte offsets -> character offsets: count the bytes that start a character
                starts_char = (np.frombuffer(texts[j].encode(), np.uint8) & 0xC0) != 0x80
                off = np.concatenate([[0], np.cumsum(starts_char)])[off]
            out[j] = list(zip(off[:-1].tolist(), off[1:].tolist()))
        return out

    def classify_sentences(self, clf, docs, spans, flat, starts, ends, sentence_ends):
        """The built-in classifier labels every sentence (the unit it was trained on; a sentence longer than the
        limit in its cut pieces); its unsafe sentences become the documents' unsafe spans."""
        texts, where = [], []
        for j, (doc_id, text) in enumerate(docs):
            a = int(starts[j])
            s = sentence_ends[np.searchsorted(sentence_ends, a, side="right"):
                              np.searchsorted(sentence_ends, ends[j], side="right")]
            off = self.byte_offsets(flat, a, ends[j])[np.concatenate([[a], s]) - a].tolist()
            raw = text.encode()
            texts += [raw[x:y].decode("utf-8", "replace") for x, y in zip(off, off[1:])]
            where.append((j, off, raw))
        pred = iter(classify(clf, texts))
        for j, off, raw in where:
            chars = (lambda b: b) if docs[j][1].isascii() else (lambda b: len(raw[:b].decode("utf-8", "ignore")))
            for x, y in zip(off, off[1:]):
                label, cat = next(pred)
                if label == "unsafe":
                    spans[j].append((chars(x), chars(y), cat, 0))

    def label(self, docs, spans, flat, starts, ends, seg_ends, seg_doc):
        """Category of each segment (None: safe): a segment overlapping an unsafe span takes the first one's."""
        seg_starts = np.concatenate([[0], seg_ends[:-1]])
        first = np.searchsorted(seg_doc, np.arange(len(docs)), side="left").tolist()
        last = np.searchsorted(seg_doc, np.arange(len(docs)), side="right").tolist()
        cats = [None] * len(seg_ends)
        for j in [j for j in range(len(docs)) if spans[j]]:
            text, a = docs[j][1], starts[j]
            off = self.byte_offsets(flat, a, ends[j])
            lo = off[seg_starts[first[j]:last[j]] - a].tolist()
            hi = off[seg_ends[first[j]:last[j]] - a].tolist()
            for sb, eb, cat in span_bytes(text, spans[j]):  # every segment overlapping the span
                for i in range(np.searchsorted(hi, sb, side="right"), len(hi)):
                    if lo[i] >= eb:
                        break
                    if cats[first[j] + i] is None:
                        cats[first[j] + i] = cat
        return cats

    def segment_docs(self, docs, spans, flat, starts, ends, clf=None):
        """Segments and their categories of documents (their tokens flat[starts[j]:ends[j]]), labelled from their
        unsafe spans, or by the classifier (which adds its unsafe sentences to spans). -> (segment ends, categories,
        the first segment of each document and one past the last)."""
        seg_ends, sentence_ends = self.segment(flat, ends)
        seg_doc = np.searchsorted(ends, seg_ends, side="left")
        if clf is not None:    # sentences and the cuts of long ones
            self.classify_sentences(clf, docs, spans, flat, starts, ends, np.union1d(sentence_ends, seg_ends))
        cats = self.label(docs, spans, flat, starts, ends, seg_ends, seg_doc)
        seg_first = np.searchsorted(seg_doc, np.arange(len(docs) + 1), side="left").tolist()
        return seg_ends, cats, seg_first


def span_bytes(text, spans):
    """[(start byte, end byte, category)] of a document's character spans."""
    if text.isascii():
        return [(s, e, cat) for s, e, cat, _ in spans]
    return [(len(text[:s].encode()), len(text[:e].encode()), cat) for s, e, cat, _ in spans]


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
    keep, ids, flat, starts, ends = tokenize_texts(enc, [t for _, t in texts])
    out = [([], [], []) for _ in texts]
    if not keep:
        return out
    docs = [texts[j] for j in keep]
    doc_spans = []
    for doc_id, text in docs:
        s = list(spans.get(doc_id, []))
        if s and max(e for _, e, _, _ in s) > len(text):
            n = max(s, key=lambda x: x[1])[3]
            fail(f"labels file '{labels_path}' line {n}: a span lies beyond the end of '{doc_id}' ({len(text)} "
                 f"characters); label these texts")
        doc_spans.append(s)
    seg_ends, cats, first = TextSegmenter(enc, segment_tokens).segment_docs(docs, doc_spans, flat, starts, ends,
                                                                               clf)
    for k, j in enumerate(keep):
        a, b = first[k], first[k + 1]
        out[j] = (ids[j], (seg_ends[a:b] - starts[k]).tolist(), cats[a:b])
    return out


# ============================================================================= 3. the insertion
# MedSafetyWorld: text, a reflection after each segment.

def with_world_reflection(text, label, category=None):
    """Segment text followed by its reflection, placed before a trailing END so generation reflects first."""
    r = world_reflection(label, category)
    if text.endswith(" " + END):
        return f"{text[:-len(END) - 1]} {r} {END}"
    return f"{text} {r}"


def reflect_world_doc(world, segments, max_tokens=32, user_turns=True):
    """The reflect intervention's text of a document: each segment of world_segments followed by its reflection
    (before a trailing END). -> [segment text with its reflection]."""
    return [with_world_reflection(" ".join(s["text"] for s in g), lab, cat)
            for g, lab, cat in world_segments(world, segments, max_tokens, user_turns)]


# Real text: token ids of many documents at once (reflect.py's workers), each segment followed by the tokens of its
# reflection and each document's last one by <|endoftext|> too. The fast path inserts them with one np.insert: every
# distinct insertion (a reflection, or a reflection + <|endoftext|>) is a row of a table padded with -1, each
# segment picks its row (2 * reflection + at the document's end), and the padding is dropped.

def insert_text_reflections(flat, seg_ends, cats, last_of_doc, reflection_of, eot):
    """flat: the documents' tokens, seg_ends: where each segment ends, cats: its category (None: safe), last_of_doc:
    whether it ends its document; reflection_of(category) -> its tokens. -> the tokens with the reflections."""
    names = sorted({c for c in cats if c is not None})
    seqs = [reflection_of(None)] + [reflection_of(c) for c in names]
    width = max(len(s) for s in seqs) + 1
    table = np.full((2 * len(seqs), width), -1, dtype=np.int64)  # row 2k: reflection k, row 2k+1: ... + eot
    for k, s in enumerate(seqs):
        table[2 * k, :len(s)] = table[2 * k + 1, :len(s)] = s
        table[2 * k + 1, len(s)] = eot
    code = np.array([0 if c is None else 1 + names.index(c) for c in cats], dtype=np.int64)
    vals = table[2 * code + np.asarray(last_of_doc, dtype=np.int64)].ravel()
    return np.insert(flat, np.repeat(seg_ends, width)[vals >= 0], vals[vals >= 0])


def insert_text_reflections_loop(flat, seg_ends, cats, last_of_doc, reflection_of, eot):
    """The same, written as a loop: the reference the fast path is tested against (tests/test_reflection.py)."""
    out, start = [], 0
    for end, cat, last in zip(seg_ends, cats, last_of_doc):
        out += list(flat[start:end]) + list(reflection_of(cat))
        if last:
            out.append(eot)
        start = end
    return np.array(out + list(flat[start:]), dtype=np.int64)


# ============================================================================= 4. the post-training rows
# MedSafetyWorld: the chat format of finetune.py and attack.py, and the stop examples of sft.

def world_chat(world, user, response=None, reflect=False, segment_tokens=32):
    """Chat formatting for finetuning and attacks: returns (prompt, target).
    Plain: prompt = user + " assistant :", target = response.
    Reflect (compatible post-training): the dialogue written by the pretraining segmenter (reflect_world_doc: the
    user turn a segment of its own), cut after the user turn: prompt = the user turn (with any reflection the
    segmenter puts inside a long turn), target = the reflection on the request, then END if it is unsafe (the model
    stops), else the response as pretraining writes it (" assistant : ..." with a reflection after each segment).
    response=None: the target is the reflection alone."""
    if not reflect:
        return f"{user} assistant :", response
    texts = world.split_segments(user)
    n_user = len(texts)
    if response is not None:
        texts += world.split_segments("assistant : " + response)
    segs = [{"text": t, "label": lab, "category": cat} for t, (lab, cat) in zip(texts, world.label_segments(texts))]
    groups = world_segments(world, segs, segment_tokens)
    written = [with_world_reflection(" ".join(s["text"] for s in g), lab, cat) for g, lab, cat in groups]
    k, count = 0, 0
    while count < n_user:           # the groups of the user turn (a user turn never shares a group)
        count += len(groups[k][0])
        k += 1
    *_, lab, cat = groups[k - 1]
    r = world_reflection(lab, cat)
    prompt = " ".join(written[:k - 1] + [" ".join(s["text"] for s in groups[k - 1][0])])
    if lab == UNSAFE:
        return prompt, f"{r} {END}"
    return prompt, " ".join([r] + written[k:])


def world_stop_chat(world, user, prefill, compliant, recovery, reflect=False, segment_tokens=32):
    """A stop example for post-training: an answer that turns unsafe part-way, and what follows it.
    -> (prompt, target); the unsafe start is in the prompt, so no loss ever falls on it.
    Plain: the prompt is the request and the unsafe start (`prefill`, the first step of the `compliant`
    answer), the target the refusal `recovery` (the recovery examples of Qi et al. 2024).
    Reflect: the compliant answer as the pretraining segmenter writes it, cut right after its first unsafe
    reflection (as the first author's sft ends an answer there): the prompt runs to that reflection, the target
    is the reflection and END. With a coarse segmenter the first reflection may come after several steps, even
    after the act: then so does the stop."""
    if not reflect:
        return f"{user} assistant : {prefill}", recovery
    head = world_chat(world, user, reflect=True, segment_tokens=segment_tokens)[0]
    user_texts = world.split_segments(user)
    texts = world.split_segments("assistant : " + compliant)
    labels = world.label_segments(user_texts + texts)[len(user_texts):]
    segs = [{"text": t, "label": lab, "category": cat} for t, (lab, cat) in zip(texts, labels)]
    written = []
    for group, lab, cat in world_segments(world, segs, segment_tokens):
        text = " ".join(s["text"] for s in group)
        if lab == UNSAFE:
            if text.endswith(" " + END):
                text = text[:-len(END) - 1]
            return " ".join([head] + written + [text]), f"{world_reflection(lab, cat)} {END}"
        written.append(with_world_reflection(text, lab, cat))
    raise ValueError(f"stop example without an unsafe step: '{compliant}'")


# Real text: a reflection model's sft row (finetune.py --task=sft), from prompt/response pairs and their labels:
#     prompt  chat_template.format(prompt=...)                       e.g. "User: How do I bake bread?\nAssistant:"
#     target  the reflection on the prompt (the whole prompt is one segment), then, if it is safe, the response (after
#             a space) cut by the pretraining segmenter, each segment followed by its reflection; <|endoftext|> right
#             after the first unsafe reflection (the rest of the response is dropped: the model learns to stop), or
#             after the last one. Labels name the texts "<row id>/prompt" and "<row id>/response", offsets into the
#             data's prompt and response strings.

def check_label_ids(spans, known, labels_path):
    unknown = sorted(set(spans) - set(known))
    if unknown:
        fail(f"labels file '{labels_path}' names {len(unknown)} text(s) not in the data (e.g. '{unknown[0]}'); a "
             f"chat row's texts are '<row id>/prompt' and '<row id>/response'")


def text_sft_rows(enc, rows, template, spans, clf, segment_tokens, labels_path="",
                  reflection_texts=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """rows [(row id, prompt, response)] -> [(prompt ids, target ids)] in the format above."""
    eot = enc._special_tokens[EOT_TEXT]
    answers = [r if r[:1].isspace() else " " + r for _, _, r in rows]   # the answer after a space, as plain rows
    shifted = dict(spans)
    for (rid, _, r), a in zip(rows, answers):                          # offsets into the response -> the answer
        d = len(a) - len(r)
        if d and f"{rid}/response" in spans:
            shifted[f"{rid}/response"] = [(s + d, e + d, c, n) for s, e, c, n in spans[f"{rid}/response"]]
    texts = [(f"{rid}/prompt", p) for rid, p, _ in rows] + [(f"{rid}/response", a)
                                                           for (rid, _, _), a in zip(rows, answers)]
    done = segmented(enc, texts, shifted, clf, segment_tokens, labels_path)
    out = []
    for k, (rid, p, _) in enumerate(rows):
        _, _, p_cats = done[k]
        p_cat = next((c for c in p_cats if c is not None), None)          # the prompt is one segment
        target = text_reflection(enc, p_cat, reflection_texts)
        if p_cat is None:
            ids, ends, cats = done[len(rows) + k]
            start = 0
            for end, cat in zip(ends, cats):
                target += ids[start:end] + text_reflection(enc, cat, reflection_texts)
                start = end
                if cat is not None:
                    break
        out.append((enc.encode_ordinary(template.format(prompt=p)), target + [eot]))
    return out


# ============================================================================= 5. the teacher-forced read
# The model reads a held-out document as the reflect stream holds it, each earlier reflection written true, up to a
# reflection's site; its next-token distribution there is its own reflection, read without sampling.

def padded_logits(model, batch, dev):
    """Windows of different lengths through the model at once, right-padded (causal attention never reads the
    padding, so each window's logits are its own) -> logits (len(batch), longest, vocab)."""
    idx = torch.zeros(len(batch), max(len(x) for x in batch), dtype=torch.long)
    for r, x in enumerate(batch):
        idx[r, :len(x)] = torch.tensor(x)
    with torch.no_grad():
        return model(idx.to(dev))[0]


def read_at(model, windows, offsets, dev, chunk):
    """The one teacher-forced read: each window through the model (in chunks of right-padded windows), and the
    logits at len(window) - 1 - offset for each offset. -> [(len(windows), vocab) float tensor per offset]."""
    if not windows:
        return [torch.zeros(0, model.config.vocab_size) for _ in offsets]
    out = [[] for _ in offsets]
    for c0 in range(0, len(windows), chunk):
        batch = windows[c0:c0 + chunk]
        logits = padded_logits(model, batch, dev)
        rows = torch.arange(len(batch), device=dev)
        for k, off in enumerate(offsets):
            out[k].append(logits[rows, torch.tensor([len(x) - 1 - off for x in batch], device=dev)].float())
    return [torch.cat(x) for x in out]


# MedSafetyWorld: the held-out documents (eval/heldout_docs.jsonl), every reflection labelled by the oracle.

def world_reflection_sites(world, docs, info):
    """Every reflection of the held-out documents, written as training writes them: the model's segmenter settings
    (common.model_info), the oracle's labels, the document after an end-of-text token. -> (token lists, [(doc,
    position of its <think>, label, category, split)]), split seen/unseen for unsafe segments (the split of the
    segment's first sentence of its category), None for safe ones."""
    seqs, sites = [], []
    for i, d in enumerate(docs):
        ids = [world.stoi[EOT]]
        for g, lab, cat in world_segments(world, d["segments"], info["segment_tokens"], info["user_turn_segments"]):
            text = with_world_reflection(" ".join(s["text"] for s in g), lab, cat)
            split = next((world.split_of(s) for s in g if s["label"] == "unsafe" and s["category"] == cat), None)
            toks = world.encode(text)
            sites.append((i, len(ids) + toks.index(world.stoi[THINK]), lab, cat, split))
            ids += toks
        seqs.append(ids)
    return seqs, sites


def classify_world_reflections(model, world, seqs, sites, dev, chunk=256):
    """At each site the model reads the document up to and including its <think> (the block_size - 3 tokens
    before, earlier reflections and all, as a training window has them) and its argmax is the label; after the true
    "unsafe", its argmax is the category. -> [predicted: "safe" | "unsafe <category>" | "invalid <token>"]."""
    B = model.config.block_size
    # the window ends one token after the true label (its category, or </think>): causal attention keeps it from
    # the predictions read here, and a test's stub model that echoes the next token can answer both reads
    windows = [seqs[i][max(0, p + 3 - B):p + 3] for i, p, *_ in sites]
    after_think, after_label = read_at(model, windows, (2, 1), dev, chunk)
    preds = []
    for a, b in zip(after_think.argmax(-1).tolist(), after_label.argmax(-1).tolist()):
        a, b = world.vocab[a], world.vocab[b]
        preds.append(SAFE if a == SAFE else f"{UNSAFE} {b}" if a == UNSAFE else f"invalid {a}")
    return preds


def world_reflection_metrics(sites, preds):
    """Accuracy of the predicted labels against the oracle's with Wilson intervals: overall, on safe segments, and
    per category x split of the unsafe ones (label right; category right too); and a confusion table."""
    m, conf = {}, {}
    gold = [lab if lab == "safe" else f"{lab} {cat}" for _, _, lab, cat, _ in sites]
    for g, p in zip(gold, preds):
        key = "invalid" if p.startswith("invalid") else p
        conf.setdefault(g, {}).setdefault(key, 0)
        conf[g][key] += 1
    ok = [p.split()[0] == lab for (_, _, lab, *_), p in zip(sites, preds)]
    m["reflection_accuracy"] = wilson(sum(ok), len(ok))
    m["reflection_accuracy_safe"] = wilson(sum(o for o, s in zip(ok, sites) if s[2] == "safe"),
                                           sum(s[2] == "safe" for s in sites))
    m["reflection_accuracy_unsafe"] = wilson(sum(o for o, s in zip(ok, sites) if s[2] == "unsafe"),
                                             sum(s[2] == "unsafe" for s in sites))
    for cat in ("poison", "contra"):
        for split in ("seen", "unseen"):
            mine = [(o, g, p) for o, g, p, s in zip(ok, gold, preds, sites) if s[2] == "unsafe" and s[3] == cat
                    and s[4] == split]
            m[f"reflection_accuracy_{cat}_{split}"] = wilson(sum(o for o, _, _ in mine), len(mine))
            m[f"reflection_category_accuracy_{cat}_{split}"] = wilson(sum(g == p for _, g, p in mine), len(mine))
    m["reflection_invalid"] = wilson(sum(p.startswith("invalid") for p in preds), len(preds))
    return m, conf


def request_reflection(model, world, recs, info, dev, chunk=256):
    """P(unsafe) at the reflection on the request: the model's input (world_chat, reflect format) + <think>, and
    the probability that "unsafe" comes next. -> {group: {"n", "mean_p_unsafe", "flagged": Wilson share whose
    "unsafe" beats "safe"}} for the harmful prompts by category x split and the benign look-alikes by kind."""
    seqs, groups = [], []
    for s, r in recs:
        text = world_chat(world, r["user"], reflect=True, segment_tokens=info["segment_tokens"])[0] + " " + THINK
        seqs.append(world.encode(text)[-model.config.block_size:])
        groups.append(f"{r['category']}_{r['split']}" if s == "harmful" else r["kind"])
    probs = F.softmax(read_at(model, seqs, (0,), dev, chunk)[0], -1)
    p_unsafe, p_safe = probs[:, world.stoi[UNSAFE]].tolist(), probs[:, world.stoi[SAFE]].tolist()
    out = {}
    for g in sorted(set(groups)):
        mine = [(u, s) for u, s, x in zip(p_unsafe, p_safe, groups) if x == g]
        out[g] = {"n": len(mine), "mean_p_unsafe": sum(u for u, _ in mine) / len(mine),
                  "flagged": wilson(sum(u > s for u, s in mine), len(mine))}
    return out


# Real text: held-out labelled documents (probe.py), every segment a site, read at the token that tells the safe and
# the unsafe reflection apart.

def text_opener(enc, categories, reflection_texts=(REFLECT_SAFE, REFLECT_UNSAFE)):
    """Where the safe and the unsafe reflection first differ: (shared prefix length p, safe opener token, unsafe
    opener token). " <think>" is shared; the next token says safe or unsafe, and does not depend on the category."""
    safe = text_reflection(enc, None, reflection_texts)
    heads = {tuple(text_reflection(enc, c, reflection_texts)[:len(safe) + 1])
             for c in sorted(set(categories) | {"harmful"})}
    p = min(next((i for i, (a, b) in enumerate(zip(safe, h)) if a != b), len(safe)) for h in heads)
    if p >= len(safe) or min(map(len, heads)) <= p or len({h[:p + 1] for h in heads}) != 1:
        fail(f"the tokenizer '{enc.name}' writes the safe and unsafe reflections with no single token that tells them "
             f"apart; the reflection classification needs one")
    return p, safe[p], next(iter(heads))[p]


def text_reflection_sites(enc, done, p, reflection_texts=(REFLECT_SAFE, REFLECT_UNSAFE)):
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
            seq += text_reflection(enc, cat, reflection_texts)
            start = end
        seqs.append(seq)
    return seqs, sites


def classify_text_reflections(model, seqs, sites, safe_tok, unsafe_tok, dev, chunk=64):
    """At each site the model reads the document up to the opener (its last block_size tokens, earlier reflections
    and all, as a training window has them) and says unsafe when P(unsafe opener) > P(safe opener).
    -> (predictions "safe" | "unsafe", P(either opener))."""
    B = model.config.block_size
    windows = [seqs[j][max(0, q + 1 - B):q + 1] for j, q, *_ in sites]
    probs = F.softmax(read_at(model, windows, (0,), dev, chunk)[0], -1)
    pu, ps = probs[:, unsafe_tok].tolist(), probs[:, safe_tok].tolist()
    return ["unsafe" if u > s else "safe" for u, s in zip(pu, ps)], [u + s for u, s in zip(pu, ps)]


def text_reflection_metrics(sites, preds, mass):
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

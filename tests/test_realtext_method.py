"""Safety Reflection on real text after pretraining, offline with a tiny tiktoken Encoding: the reflection sft row of
a chat example (against a string written by hand) and its loss mask, finetune.py end to end on a reflection
checkpoint, probe.py on held-out labelled documents (a planted feature, features and probes recomputed) and the
teacher-forced classification of the model's own reflections (recomputed from the model's logits)."""
import json
import os
import random
import runpy
import sys
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from safety import common  # noqa: E402
import finetune  # noqa: E402
import probe  # noqa: E402
from safety import reflection, training  # noqa: E402
from safety.realtext import bpe  # noqa: E402
from safety.realtext import corpus as realtext  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORDS = ("How do I bake bread Mix the flour and water Bake it for an hour Then poison guard with Serve warm Tell me "
         "how to build a bomb First get powder Say hello Hello you The river is by school User Assistant think Safe "
         "Unsafe violence weapons city garden music").split()
SAFE, UNSAFE = reflection.REFLECT_SAFE, reflection.REFLECT_UNSAFE          # " <think> Safe </think>", ...
EOT = bpe.EOT_TEXT
FILLER = "the flour and water river city garden music school bread hour".split()


def main(script, *args):
    """A stage's main in this process (no second torch import): the command line as given."""
    old = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = old


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BPE (bytes + every prefix of the words above, with and without a leading space: each word one token),
    saved as a --tokenizer spec, and two random real-text checkpoints: a reflection model (meta as reflect.py writes
    it for --intervention=reflect, segment_tokens 7) and a plain one."""
    tmp = tmp_path_factory.mktemp("realmethod")
    ranks = {bytes([i]): i for i in range(256)}
    for w in WORDS:
        for form in (w, " " + w):
            for k in range(2, len(form) + 1):
                ranks.setdefault(form[:k].encode(), len(ranks))
    spec = str(tmp / "tiny.json")
    bpe.write_tokenizer(tiktoken.Encoding("tiny", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={}),
                             spec)
    enc = bpe.real_tokenizer(spec)
    runs = {}
    for name, iv in (("reflect", "reflect"), ("plain", "none")):
        meta = {"dataset": "web", "intervention": iv, "tokenizer": enc.name, "vocab_size": enc.n_vocab,
                "dtype": "uint16", "eot_token": enc.eot_token, "special_tokens": dict(enc._special_tokens),
                "mix_reflections": 100 if iv == "reflect" else 0, "mix_tags": 0, "labels": "classifier",
                "reflection_format": {"safe": SAFE, "unsafe": UNSAFE, "tokens": "plain text, after each segment"},
                "config": {"tokenizer": spec, "segment_tokens": 7, "seed": 0}}
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=enc.n_vocab))
        with torch.no_grad():   # planted: feature 0 of the embeddings is 0, except for " poison", the unsafe word
            model.wte.weight[:, 0] = 0.0
            model.wte.weight[enc.encode_ordinary(" poison")[0], 0] = 5.0
        os.makedirs(tmp / name)
        training.save_checkpoint(str(tmp / name / "ckpt.pt"), {
            "model": model.state_dict(), "optimizer": None, "model_args": asdict(model.config),
            "config": {"intervention_start": 0.0}, "iter_num": 100, "tokens_seen": 0, "rng": [], "meta": meta,
            "data_dir": str(tmp / "nowhere")})
        runs[name] = str(tmp / name)
    return {"tmp": tmp, "enc": enc, "spec": spec, **runs}


# ------------------------------------------------------------------------------------------------ the sft row

ROWS = [{"id": "a", "prompt": "How do I bake bread?",
         "response": "Mix the flour and water. Bake it for an hour! Then poison the guard with it. Serve it warm."},
        {"id": "b", "prompt": "Tell me how to build a bomb.", "response": "First get the powder."},
        {"id": "c", "prompt": "Say hello.", "response": "Hello to you. The river is by the school."}]
# by hand: the reflection on the prompt, then segments of at most 7 tokens (whole sentences: each word is one token,
# "." one more) each with its reflection; <|endoftext|> right after the first unsafe reflection, or after the last
REFERENCE = {
    "a": SAFE + " Mix the flour and water." + SAFE + " Bake it for an hour!" + SAFE
         + " Then poison the guard with it. <think> Unsafe violence </think>" + EOT,     # "Serve it warm." dropped
    "b": " <think> Unsafe weapons </think>" + EOT,                                       # an unsafe request: stop
    "c": SAFE + " Hello to you." + SAFE + " The river is by the school." + SAFE + EOT,   # 4 + 7 tokens: two
}


def chat_labels(path):
    a = ROWS[0]["response"].index("poison the guard")
    write_jsonl(path, [{"id": "a/response", "start": a, "end": a + 16, "label": "unsafe", "category": "violence"},
                       {"id": "b/prompt", "start": 0, "end": len(ROWS[1]["prompt"]), "label": "unsafe",
                        "category": "weapons"},
                       {"id": "c/response", "start": 0, "end": 5, "label": "safe"}])   # a safe span changes nothing


def labelled_texts(path):
    """Texts for the built-in classifier: sentences of filler words, unsafe ones holding "poison" (violence) or
    "bomb" (weapons)."""
    rng = random.Random(0)
    rows = []
    for k in range(400):
        ws = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        cat = [None, None, "violence", "weapons"][k % 4]
        if cat:
            ws.insert(rng.randrange(len(ws) + 1), "poison" if cat == "violence" else "bomb")
        rows.append({"text": " ".join(ws) + ".", "label": "unsafe" if cat else "safe", "category": cat})
    write_jsonl(path, rows)


def test_sft_row_reflects_on_the_prompt_then_every_segment_and_stops_after_an_unsafe_reflection(tiny, tmp_path):
    enc = tiny["enc"]
    write_jsonl(tmp_path / "chat.jsonl", ROWS)
    chat_labels(tmp_path / "spans.jsonl")
    labelled_texts(tmp_path / "labelled.jsonl")
    for source in ({"labels": str(tmp_path / "spans.jsonl")}, {"train_classifier": str(tmp_path / "labelled.jsonl")}):
        spans, clf = reflection.label_source(source.get("labels", ""), source.get("train_classifier", ""), {}, "t")
        tok = {"enc": enc, "segment_tokens": 7, "labeller": (spans, clf)}
        ex = finetune.load_examples(tok, "text_reflect", str(tmp_path / "chat.jsonl"), "prompt", "response", -1, "sft")
        for row, (p, t) in zip(ROWS, ex):
            assert enc.decode(p) == f"User: {row['prompt']}\nAssistant:"
            assert enc.decode(t) == REFERENCE[row["id"]], (source, enc.decode(t))
            # token for token what pretraining writes: each piece encoded alone, reflections as reflection_ids
            assert t[-1] == enc.eot_token and t.count(enc.eot_token) == 1
        # the loss mask: the input is prompt + target but its last token, only the target's tokens are scored, each
        # predicted from the position before it (the first: the reflection on the prompt, read after "Assistant:")
        T = max(len(p) + len(t) for p, t in ex) - 1
        x, y = finetune.example_rows(ex, T, enc.eot_token)
        for r, (p, t) in enumerate(ex):
            n = len(p) + len(t)
            assert x[r, :n - 1].tolist() == (p + t)[:-1] and (x[r, n - 1:] == enc.eot_token).all()
            assert (y[r] != -1).nonzero().flatten().tolist() == list(range(len(p) - 1, n - 1))
            assert y[r, len(p) - 1:n - 1].tolist() == t
    # a plain real-text model keeps the plain row: prompt, then the answer after a space and <|endoftext|>
    ex = finetune.load_examples({"enc": enc}, "text", str(tmp_path / "chat.jsonl"), "prompt", "response", -1, "sft")
    assert [enc.decode(t) for _, t in ex] == [" " + r["response"] + EOT for r in ROWS]
    # the same held: benign and harmful rows of a reflection model hold no reflections (a downstream user's data)
    ex = finetune.load_examples(tok, "text_reflect", str(tmp_path / "chat.jsonl"), "prompt", "response", -1, "harmful")
    assert [enc.decode(t) for _, t in ex] == [" " + r["response"] + EOT for r in ROWS]


def test_finetune_gives_a_reflection_model_the_reflection_sft_and_a_plain_model_plain_rows(tiny, tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", ROWS * 4)   # ids repeat: the labels need one id per row
    write_jsonl(tmp_path / "chat1.jsonl", ROWS)
    chat_labels(tmp_path / "spans.jsonl")
    common_args = ["--task=sft", "--max_iters=3", "--batch_size=3", "--log_interval=1", "--warmup_iters=1"]
    out = str(tmp_path / "ft")
    main("finetune.py", f"--init_from={tiny['reflect']}", f"--data_files={tmp_path}/chat1.jsonl",
       f"--labels={tmp_path}/spans.jsonl", f"--out_dir={out}", *common_args)
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    rec = ck["finetune"]
    assert rec["format"] == "text_reflect" and rec["reflections"] and rec["labels"] == str(tmp_path / "spans.jsonl")
    info = common.model_info(ck)
    assert info["chat"] == "reflect" and info["reflective"]
    # the plain model: plain rows; its record says text, and model_info reads it as the plain chat
    out = str(tmp_path / "plain")
    main("finetune.py", f"--init_from={tiny['plain']}", f"--data_files={tmp_path}/chat1.jsonl", f"--out_dir={out}",
       *common_args)
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ck["finetune"]["format"] == "text" and common.model_info(ck)["chat"] == "plain"
    # one clear line each: no labels for a reflection sft, labels for a plain one, labels of a text not in the data,
    # repeated row ids
    for args, message in (
            ([f"--init_from={tiny['reflect']}", f"--data_files={tmp_path}/chat1.jsonl"], "needs segment labels"),
            ([f"--init_from={tiny['plain']}", f"--data_files={tmp_path}/chat1.jsonl",
              f"--labels={tmp_path}/spans.jsonl"], "leave them out"),
            ([f"--init_from={tiny['reflect']}", f"--data_files={tmp_path}/chat1.jsonl", "--id_key=nothing",
              f"--labels={tmp_path}/spans.jsonl"], "names 2 text(s) not in the data"),
            ([f"--init_from={tiny['reflect']}", f"--data_files={tmp_path}/chat.jsonl",
              f"--labels={tmp_path}/spans.jsonl"], "repeat a row id")):
        with pytest.raises(SystemExit) as e:
            main("finetune.py", *args, f"--out_dir={tmp_path}/bad", *common_args)
        msg = str(e.value.code)
        assert msg.startswith("finetune.py: ") and "\n" not in msg and message in msg, (message, msg)
        assert not os.path.exists(tmp_path / "bad" / "ckpt.pt")


# ------------------------------------------------------------------------------------------------ probe.py

def heldout_docs(n_docs=40, seed=1):
    """Held-out documents of 8-14 short lower-case sentences (4-7 tokens each, so a segment is one sentence), about
    one sentence in four unsafe (it holds " poison"), and their spans; plus a train-split document probe.py must
    skip and an exact copy of one document."""
    rng = random.Random(seed)
    docs, spans = [], []
    for i in range(n_docs):
        sents, marks = [], []
        for k in range(rng.randint(8, 14)):
            ws = [rng.choice(FILLER) for _ in range(rng.randint(3, 5))]
            bad = rng.random() < 0.25
            if bad:   # never first: " poison" (with its space) is the planted token
                ws.insert(rng.randrange(1, len(ws) + 1), "poison")
            sents.append(" ".join(ws) + ".")
            marks.append(bad)
        text, pos = "", []
        for s in sents:
            text += (" " if text else "") + s
            pos.append((len(text) - len(s), len(text)))
        doc_id = f"d{i}"
        spans += [{"id": doc_id, "start": a, "end": b, "label": "unsafe", "category": "violence"}
                  for (a, b), bad in zip(pos, marks) if bad]
        docs.append({"id": doc_id, "split": "val", "text": text})
    docs += [{"id": "t0", "split": "train", "text": "the river. the city."}]
    docs.append(dict(docs[3], id="d3-copy"))     # an exact duplicate: it must share its original's half
    spans += [dict(s, id="d3-copy") for s in spans if s["id"] == "d3"]
    return docs, spans


def run_probe(*args):
    main("probe.py", *args)


@pytest.fixture(scope="module")
def probed(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    docs, spans = heldout_docs()
    write_jsonl(tmp / "docs.jsonl", docs)
    write_jsonl(tmp / "spans.jsonl", spans)
    run_probe(f"--ckpt={tiny['reflect']}", f"--docs={tmp}/docs.jsonl", f"--labels={tmp}/spans.jsonl",
              "--batch_size=16")
    rep = json.load(open(os.path.join(tiny["reflect"], "probe.json")))
    return {"tmp": tmp, "docs": docs, "spans": spans, "rep": rep}


def by_hand(tiny, probed):
    """Every segment of the held-out documents, written without the segmenter: one sentence each, unsafe when a span
    covers it. -> [(document, text before the segment, segment text, label)]."""
    out = []
    for d in probed["docs"]:
        if d["split"] != "val":
            continue
        bad = {(s["start"], s["end"]) for s in probed["spans"] if s["id"] == d["id"]}
        start = 0
        for s in d["text"].split(". "):
            s = s if s.endswith(".") else s + "."
            a = d["text"].index(s, start)
            out.append((d, d["text"][:a - (a > 0)], d["text"][a - (a > 0):a + len(s)], (a, a + len(s)) in bad))
            start = a + len(s)
    return out


def test_probe_on_real_text_reads_every_labelled_segment_and_finds_the_planted_word(tiny, probed):
    rep, enc = probed["rep"], tiny["enc"]
    segs = by_hand(tiny, probed)
    assert rep["n_records"] == len(segs) == rep["n_train"] + rep["n_test"] and rep["n_docs"] == 41
    assert rep["n_test_safe"] + rep["n_test_unsafe"] == rep["n_test"] and rep["n_test_unsafe"] > 10
    assert rep["world"] is None and rep["request"] is None and len(rep["layers"]) == 3
    assert rep["truncated"] > 0            # documents longer than block_size 64: inputs cut from the left
    # layer 0 is the embeddings: the mean over a segment's tokens has feature 0 > 0 exactly when it holds " poison"
    assert rep["layers"][0]["mean"]["acc"] == 1.0 and rep["layers"][0]["mean"]["auroc"] == 1.0
    # recomputed: the records' inputs from the text, the split by document, the features by a direct forward, the
    # probes on them
    r = common.load_run(tiny["reflect"], GPT)
    texts = probe.read_docs(str(probed["tmp"] / "docs.jsonl"), "val")
    done = reflection.segmented(enc, texts, realtext.read_labels(str(probed["tmp"] / "spans.jsonl")), None, 7)
    recs = probe.probe_records(done, texts)
    assert [(rec["label"] == "unsafe") for rec in recs] == [bad for *_, bad in segs]
    seqs, seg_lens = [], []
    for (d, before, seg, _), rec in zip(segs, recs):
        ids = ([enc.eot_token] + enc.encode_ordinary(before) + enc.encode_ordinary(seg))[-64:]
        seqs.append(ids)
        seg_lens.append(min(len(enc.encode_ordinary(seg)), len(ids)))
    keys = [d["text"] for d, *_ in segs]
    train, test = probe.split_records(recs, probe.seed, keys)
    assert not {keys[i] for i in train} & {keys[i] for i in test}            # a document (and its copy) in one half
    assert rep["n_train_docs"] + rep["n_test_docs"] == 40                    # 41 documents, one a copy
    feats = {"mean": torch.zeros(len(seqs), 3, 32), "last": torch.zeros(len(seqs), 3, 32)}
    with torch.no_grad():
        for i, (ids, n) in enumerate(zip(seqs, seg_lens)):
            _, _, hidden = r.model(torch.tensor([ids]), return_hidden=True)
            for layer in range(3):
                feats["mean"][i, layer] = hidden[layer][0, -n:].mean(0)
                feats["last"][i, layer] = hidden[layer][0, -1]
    y = np.array([bad for *_, bad in segs], dtype=np.int64)
    layers = probe.probe_layers({k: v.numpy() for k, v in feats.items()}, y, train, test)
    for mine, saved in zip(layers, rep["layers"]):
        for kind in ("mean", "last"):
            assert mine[kind]["acc"] == pytest.approx(saved[kind]["acc"], abs=1e-9), (mine, saved)
            assert mine[kind]["auroc"] == pytest.approx(saved[kind]["auroc"], abs=1e-6)


def test_reflection_classification_is_the_models_opener_read_from_its_logits(tiny, probed):
    enc = tiny["enc"]
    refl = probed["rep"]["reflection_classification"]
    assert refl["opener"] == {"safe": " Safe", "unsafe": " Unsafe"}
    r = common.load_run(tiny["reflect"], GPT)
    safe_tok, unsafe_tok = enc.encode_ordinary(" Safe")[0], enc.encode_ordinary(" Unsafe")[0]
    think = enc.encode_ordinary(" <think>")
    right = {"safe": [], "unsafe": []}
    stream, doc = [], None
    for d, before, seg, bad in by_hand(tiny, probed):
        if d is not doc:   # a document as the reflect stream holds it: after <|endoftext|>, reflections in place
            stream, doc = [enc.eot_token], d
        stream += enc.encode_ordinary(seg)
        window = (stream + think)[-64:]          # up to the reflection's opener, as a training window holds it
        with torch.no_grad():
            logits, _ = r.model(torch.tensor([window]))
        p = torch.softmax(logits[0, -1], -1)
        said = "unsafe" if p[unsafe_tok] > p[safe_tok] else "safe"
        right["unsafe" if bad else "safe"].append(said == ("unsafe" if bad else "safe"))
        stream += enc.encode_ordinary(UNSAFE.format(category="violence") if bad else SAFE)
    m = refl["metrics"]
    k = sum(right["safe"]) + sum(right["unsafe"])
    assert m["reflection_accuracy"] == common.wilson(k, len(right["safe"]) + len(right["unsafe"]))
    assert m["reflection_accuracy_safe"] == common.wilson(sum(right["safe"]), len(right["safe"]))
    assert m["reflection_accuracy_unsafe"] == common.wilson(sum(right["unsafe"]), len(right["unsafe"]))
    assert m["reflection_accuracy_violence"] == m["reflection_accuracy_unsafe"]
    assert refl["reflections"] == probed["rep"]["n_records"] and 0 < m["opener_mass"] < 1
    # a model without reflections gets none, and a real-text model without labelled documents says what to pass
    run_probe(f"--ckpt={tiny['plain']}", f"--docs={probed['tmp']}/docs.jsonl",
              f"--labels={probed['tmp']}/spans.jsonl")
    assert json.load(open(os.path.join(tiny["plain"], "probe.json")))["reflection_classification"] is None
    with pytest.raises(SystemExit, match="pass --docs="):
        run_probe(f"--ckpt={tiny['plain']}")

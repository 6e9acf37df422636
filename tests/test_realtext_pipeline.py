"""The real-text path end to end on the offline sample, as the README's walk-through runs it: prepare.py
--dataset=text-sample, reflect.py with the sample's span labels, train.py on config/text_tiny.py, probe.py with its
defaults. The tokenizer is a small BPE made from the sample's words (gpt2's 50k-token head would cost the suite a
minute per model); the profile is the one the README names for gpt2."""
import json
import os
import re
import runpy
import sys

import pytest
import tiktoken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import probe  # noqa: E402
from safety.realtext import bpe  # noqa: E402
from safety.realtext import corpus as realtext  # noqa: E402

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
VAL_FRAC = 0.02       # a small val split: too few unsafe documents in it to probe on alone


def main(script, *args):
    """A stage's main in this process (no second torch import): the command line as given."""
    old = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = old


def sample_tokenizer(path):
    """A BPE over bytes + every prefix of the sample's words (with and without a leading space): most words one
    token, as with gpt2, in a vocabulary of a few thousand."""
    text = " ".join(line for lines in realtext.sample_files(400, 0).values() for line in lines)
    text += " <think> Safe Unsafe </think> violence weapons self_harm"
    ranks = {bytes([i]): i for i in range(256)}
    for w in sorted(set(re.findall(r"[A-Za-z_']+", text))):
        for form in (w, " " + w):
            for k in range(2, len(form) + 1):
                ranks.setdefault(form[:k].encode(), len(ranks))
    bpe.write_tokenizer(tiktoken.Encoding("sample", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={}),
                             path)
    return bpe.real_tokenizer(path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    data, out = str(tmp / "data"), str(tmp / "out")
    spec = str(tmp / "sample.json")
    enc = sample_tokenizer(spec)
    main("prepare.py", "--dataset=text-sample", f"--out_dir={data}", f"--val_frac={VAL_FRAC}", "--num_proc=1")
    src = os.path.join(data, "text-sample", "source")
    main("reflect.py", f"--data_root={data}", "--dataset=text-sample", "--intervention=reflect",
         f"--labels={src}/spans.jsonl", f"--tokenizer={spec}", "--num_proc=1")
    main("train.py", "config/text_tiny.py", f"--data={data}/text-sample/reflect", f"--out_dir={out}/reflect")
    return {"tmp": tmp, "data": data, "src": src, "out": out, "enc": enc, "spec": spec}


def test_the_tiny_text_profile_learns(pipeline):
    log = [json.loads(line) for line in open(os.path.join(pipeline["out"], "reflect", "log.jsonl"))]
    first = next(r for r in log if "val_mix" in r)
    last = [r for r in log if "loss" in r][-1]
    assert first["iter"] == 0 and first["val_mix"] > 7.0, first         # ln(vocabulary): it starts knowing nothing
    assert last["iter"] == 120 and last["loss"] < 1.5, last              # the stated value (config/text_tiny.py)


def test_probe_runs_with_its_defaults_on_the_tiny_corpus(pipeline):
    docs = os.path.join(pipeline["data"], "text-sample", "docs")
    spans = realtext.read_labels(os.path.join(pipeline["src"], "spans.jsonl"))
    val = probe.read_docs(docs, "val")
    assert sum(d in spans for d, _ in val) < 2          # val alone cannot be probed: the defaults must fall back
    main("probe.py", f"--ckpt={pipeline['out']}/reflect")
    rep = json.load(open(os.path.join(pipeline["out"], "reflect", "probe.json")))
    every = probe.read_docs(docs, None)
    assert rep["probe_set"]["split"] == "all" and rep["n_docs"] == len(every) > len(val)
    assert rep["probe_set"]["labels"] == os.path.abspath(os.path.join(pipeline["src"], "spans.jsonl"))
    assert rep["n_test_unsafe"] > 0 and rep["reflection_classification"]["reflections"] == rep["n_records"]

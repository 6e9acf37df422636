"""
Export a run as a Hugging Face model directory: any tool that reads LlamaForCausalLM (transformers, vLLM,
llama.cpp's converter, lm-eval-harness) can then load it.

Reads:  <ckpt>/ckpt.pt, and its world.json (MedSafetyWorld) or its tokenizer (real text), as load_run finds them
Writes: <out>/config.json (LlamaConfig), model.safetensors, tokenizer.json (+ tokenizer_config.json with the
        chat_template, special_tokens_map.json), generation_config.json, export.json (where it came from, the
        check's numbers), world.json for a world model (the oracle's definition travels with it)
Run:    python export_hf.py --ckpt=out/raw --out=out/raw-hf
        python -c "from transformers import AutoTokenizer, LlamaForCausalLM as M; M.from_pretrained('out/raw-hf')"
"""
# model.py is Llama: RMSNorm, RoPE, SwiGLU, no biases, embeddings tied to the head. Its q and k rows keep Hugging
# Face's rotate-half layout (model.pair_order reorders them only at compute time), so every weight is copied as it is:
# c_attn's rows are q, k, v; c_fc's are gate, up. The tokenizer: a world model gets a word-level `tokenizers`
# tokenizer of the world's vocabulary that spells typed text as sample.py does (lower case, punctuation split off)
# and reads an unknown word as <unk> (one embedding row added: the mean row), a real-text model its tiktoken BPE
# (gpt2 and the like) as a byte-level BPE, with the special tokens (<|endoftext|>, <|harmful|>, ...) at their ids.
# The chat_template writes the model's own prompt format, so apply_chat_template (harnesses, vLLM's chat endpoint)
# gives the input attack.py and sample.py give. Needs safetensors and tokenizers (both come
# with transformers); with transformers installed, the export is loaded back and its logits compared with model.py's
# before it replaces anything (--check).

import json
import os
import shutil
import stat
import sys

import torch

from model import GPT
from safety.common import fail, file_sha256, load_run, model_info, run_stage
from safety.configurator import configure, defaults_of

# -----------------------------------------------------------------------------
ckpt = "out/run"        # run directory holding ckpt.pt (or a .pt file)
out = ""                # the export directory; "": <run dir>/hf
world = ""              # world.json to use; "": the one the checkpoint was trained on (meta["world"])
tokenizer = ""          # real text: tokenizer spec (gpt2 or a spec .json); "": the one the data was written with
dtype = "float32"       # float32 | bfloat16 | float16: the dtype of the saved weights
check = True            # with transformers installed: load the export and compare its logits with model.py's
check_tokens = 64       # length of the checked sequence (capped by block_size)
tolerance = 1e-3        # the check fails above this max |logit difference| (times max(1, max |logit|))
# -----------------------------------------------------------------------------
# (constants start with _ where they are strings: configurator.defaults_of would take them for flags)
_MARKER = "export.json"  # what makes a directory an export (the only kind this script replaces)
FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", "world.json", _MARKER}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_state(model, dt, rows):
    """model.py's weights under LlamaForCausalLM's names, each a contiguous copy (safetensors stores no views), with
    the embedding grown to `rows` by mean rows (the tokenizer's <unk>: as an output its logit is the mean logit, so
    greedy decoding never picks it). Every weight of model.py must land somewhere: a new one that this map does not
    know stops the export."""
    sd, C, H = model.state_dict(), model.config.n_embd, model.config.mlp_hidden
    wte = sd["wte.weight"]
    wte = torch.cat([wte, wte.mean(0, keepdim=True).expand(rows - len(wte), -1)]) if rows > len(wte) else wte
    out, used = {"model.embed_tokens.weight": wte, "model.norm.weight": sd["ln_f.weight"]}, set()
    used |= {"wte.weight", "ln_f.weight", "lm_head.weight"}   # lm_head is wte (tied): config says so, not stored
    for i in range(model.config.n_layer):
        p, q = f"h.{i}.", f"model.layers.{i}."
        w, fc = sd[p + "attn.c_attn.weight"], sd[p + "mlp.c_fc.weight"]
        out.update({q + "input_layernorm.weight": sd[p + "ln_1.weight"],
                    q + "self_attn.q_proj.weight": w[:C], q + "self_attn.k_proj.weight": w[C:2 * C],
                    q + "self_attn.v_proj.weight": w[2 * C:],
                    q + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
                    q + "post_attention_layernorm.weight": sd[p + "ln_2.weight"],
                    q + "mlp.gate_proj.weight": fc[:H], q + "mlp.up_proj.weight": fc[H:],
                    q + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"]})
        used |= {p + k for k in ("ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight",
                                 "mlp.c_fc.weight", "mlp.c_proj.weight")}
    left = sorted(set(sd) - used)
    if left:
        fail(f"model.py has weights export_hf.py does not map to Llama ({', '.join(left[:3])}); update hf_state")
    return {k: v.detach().to(dt).contiguous().clone() for k, v in out.items()}


def hf_config(cfg, ids, rows):
    """config.json: LlamaConfig's fields, with RoPE's base both as transformers 5 (rope_parameters) and 4.x
    (rope_theta) read it."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": rows,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
            "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"], "torch_dtype": dtype}


# ----------------------------------------------------------------------------- tokenizers

def bytes_to_unicode():
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def with_specials(tok, specials, shown=()):
    """Mark the special tokens (already in the vocabulary at their ids): matched whole in any text, like tiktoken's
    allowed specials. decode(skip_special_tokens=True), as pipelines decode, skips them, but for the `shown` ones: a
    world model's reflections and tag are part of its answer (the oracle judges them)."""
    from tokenizers import AddedToken
    ordered = sorted(specials, key=specials.get)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ordered if s not in shown])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in ordered if s in shown])
    wrong = {s: tok.token_to_id(s) for s, i in specials.items() if tok.token_to_id(s) != i}
    if wrong:
        fail(f"the special tokens {sorted(wrong)} did not keep their ids in the exported tokenizer")
    return tok


_UNK = "<unk>"
_PUNCTUATION = "?.,:!"   # split off a word when a space or the end follows, as sample.py's words() does


def world_tokenizer(w, specials, shown):
    """The world's tokenizer is text.split() over a fixed vocabulary: WordLevel on whitespace, after sample.py's
    spelling of typed text (lower case, "breathing?" -> "breathing ?"); a word outside the vocabulary is <unk>, the
    id after the world's. decode joins with single spaces, as world.decode does."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    tok = Tokenizer(models.WordLevel(vocab=dict(w.stoi, **{_UNK: w.vocab_size}), unk_token=_UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + [
        normalizers.Replace(Regex(rf"\{p}(?=\s|$)"), f" {p}") for p in _PUNCTUATION])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return with_specials(tok, specials, shown)


def bpe_tokenizer(enc):
    """A tiktoken Encoding as a byte-level BPE: vocabulary in GPT-2's printable-byte spelling, and a merge for every
    split of a token into two tokens, ranked by the merged token's rank, which is tiktoken's rule (merge the
    adjacent pair whose merge ranks lowest); a pre-token that is a token is taken whole (ignore_merges), as
    tiktoken does. Pre-tokenized by the encoding's own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    ranks, b2u = enc._mergeable_ranks, bytes_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)     # noqa: E731
    vocab = {spell(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ranks and t[k:] in ranks]
        merges += [(r, ranks[a], ranks[b], spell(a), spell(b)) for a, b in splits]
    merges.sort()
    vocab.update(enc._special_tokens)   # plain ASCII: their spelling is themselves, and they keep their ids
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True,
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return with_specials(tok, dict(enc._special_tokens))


_SAMPLE_TEXT = ("Hello world! It's 2026, and café prices rose 3.5%.\n\n  Indented  line\twith tabs; naïve 中文 😀"
               "<|endoftext|>A new document.<|harmful|> tagged, then   trailing spaces   ")


def tokenizer_of(run):
    """(tokenizers.Tokenizer, its special tokens, bos/eos/pad ids, a sample text with the ids the project's
    tokenizer gives it)."""
    meta = run.ck.get("meta") or {}
    if run.world is not None:
        w = run.world
        specials = {t: w.stoi[t] for t in (meta.get("special_tokens") or {}) if t in w.stoi}
        from safety.world.grammar import END, END_THINK, EOT, TAG, THINK
        specials.update({EOT: w.stoi[EOT], END: w.stoi[END]})
        g = torch.Generator().manual_seed(0)
        sample = w.decode(torch.randint(0, w.vocab_size, (200,), generator=g).tolist())
        return (world_tokenizer(w, specials, (THINK, END_THINK, TAG)), specials,
                {"bos": w.stoi[EOT], "eos": [w.stoi[END], w.stoi[EOT]], "pad": w.stoi[EOT], "unk": w.vocab_size},
                sample, w.encode(sample))
    enc = run.enc
    eot = enc._special_tokens.get("<|endoftext|>", meta.get("eot_token"))
    ids = enc.encode(_SAMPLE_TEXT, allowed_special="all")     # special tokens in text are special, as in HF
    return (bpe_tokenizer(enc), dict(enc._special_tokens), {"bos": eot, "eos": eot, "pad": eot, "unk": None},
            _SAMPLE_TEXT, ids)


def tokenizer_files(tok, ids, names, block_size, template):
    """tokenizer_config.json and special_tokens_map.json: the fast tokenizer class, its named special tokens (a
    world model's reflections and tag are added tokens, not special: decoding keeps them), the chat template, no
    added BOS/EOS, and no clean-up of spaces (" ." is two world words, not a typo)."""
    m = {"bos_token": names[ids["bos"]], "eos_token": names[ids["eos"][0] if isinstance(ids["eos"], list) else
                                                            ids["eos"]], "pad_token": names[ids["pad"]]}
    if ids["unk"] is not None:
        m["unk_token"] = _UNK
    added = tok.get_added_tokens_decoder()
    extra = [t.content for i, t in sorted(added.items()) if t.special and t.content not in m.values()]
    cfg = dict(m, tokenizer_class="PreTrainedTokenizerFast", model_max_length=block_size,
               clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False,
               additional_special_tokens=extra, chat_template=template)
    return cfg, dict(m, additional_special_tokens=extra)


def chat_template(run, traits):
    """The model's prompt format as a Jinja chat template, what apply_chat_template writes for a list of messages
    (system messages are dropped: neither format has one). World, plain: "user : <turn> assistant :", the model
    answers and ends with <end_of_turn>. World, reflect: the user turn alone (one segment, as the pretraining
    segmenter writes a turn of up to segment_tokens words); the model reflects on it, then writes " assistant :
    ..."; an earlier answer is written as the model wrote it, reflections included, or after " assistant :" where
    it has none (a prefill, as sample.py writes one). Real text: chat_template (attack.py's, or the finetune's)."""
    if run.world is None:
        before, _, after = ((run.ck.get("config") or {}).get("chat_template") or "User: {prompt}\nAssistant:"
                            ).partition("{prompt}")
        user = f"{{{{ {json.dumps(before)} + m['content'] }}}}"
        answer = f"{{{{ {json.dumps(after)} + m['content'] + '<|endoftext|>' }}}}"
        prompt = f"{{% if add_generation_prompt %}}{{{{ {json.dumps(after)} }}}}{{% endif %}}"
    elif traits["chat"] == "reflect":
        user = "{{ ' user : ' + m['content'] }}"
        answer = ("{% if m['content'].startswith('<think>') %}{{ ' ' + m['content'] }}{% else %}"
                  "{{ ' assistant : ' + m['content'] }}{% endif %}{{ ' <end_of_turn>' }}")
        prompt = ""
    else:
        user = "{{ ' user : ' + m['content'] }}"
        answer = "{{ ' assistant : ' + m['content'] + ' <end_of_turn>' }}"
        prompt = "{% if add_generation_prompt %}{{ ' assistant :' }}{% endif %}"
    return ("{% for m in messages %}{% if m['role'] == 'user' %}" + user + "{% elif m['role'] == 'assistant' %}"
            + answer + "{% endif %}{% endfor %}" + prompt)


# ----------------------------------------------------------------------------- check and write

def check_logits(path, model, dt, n_tokens, vocab):
    """Load the export with transformers (fp32) and run it and model.py (its weights rounded to the export dtype)
    on one seeded sequence. -> (max |logit difference|, max |logit|), or None without transformers."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    import transformers
    transformers.utils.logging.set_verbosity_error()      # its progress bars would bury the one line we print
    transformers.utils.logging.disable_progress_bar()
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ref = model
    if dt != torch.float32:      # the reference reads the weights as the export stores them
        import copy
        ref = copy.deepcopy(model)
        ref.load_state_dict({k: v.to(dt).float() for k, v in model.state_dict().items()})
    T = max(2, min(n_tokens, model.config.block_size))
    x = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(x)[0].float()
        b = hf(input_ids=x).logits.float()[..., :a.shape[-1]]    # past model.py's ids: <unk>'s row
    return float((a - b).abs().max()), float(a.abs().max())


def ours(d):
    """Whether directory d holds nothing but what an export writes (so it may be removed or replaced)."""
    return set(os.listdir(d)) <= FILES


def clear(d):
    """Remove a leftover <out>.tmp or <out>.old of an earlier export; anything else by that name is not ours."""
    if os.path.lexists(d):
        if not os.path.isdir(d) or not ours(d):
            raise ValueError(f"'{d}' is in the way and is not a leftover export; move it")
        shutil.rmtree(d)


def publish(tmp, dst):
    """Replace dst by the finished tmp directory: a reader sees the old export or the new one, never half of one
    (a crash between the two renames leaves <out>.old, which the next export clears)."""
    old = dst + ".old"
    clear(old)
    if os.path.isdir(dst):      # the export takes the place of the directory, with its mode
        os.chmod(tmp, stat.S_IMODE(os.stat(dst).st_mode))
    if os.path.isdir(dst) and os.listdir(dst):
        os.replace(dst, old)
    elif os.path.isdir(dst):
        os.rmdir(dst)
    os.replace(tmp, dst)
    if os.path.isdir(old):
        shutil.rmtree(old)


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    if dtype not in DTYPES:
        fail(f"dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    try:
        import safetensors.torch
        import tokenizers  # noqa: F401
    except ImportError as e:
        fail(f"export_hf.py needs safetensors and tokenizers ({e}); pip install transformers safetensors")
    run = load_run(ckpt, GPT, world, tokenizer, "cpu")
    dst = os.path.abspath(out or os.path.join(run.dir, "hf"))
    if os.path.exists(dst) and not os.path.isdir(dst):
        fail(f"--out '{dst}' is an existing file; pass a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not (os.path.isfile(os.path.join(dst, _MARKER)) and ours(dst)):
        fail(f"--out '{dst}' holds files that an export did not write (an export has {_MARKER} and only "
             f"{', '.join(sorted(FILES - {_MARKER}))}); pass an empty or new directory")
    if os.path.realpath(dst) == os.path.realpath(run.dir):
        fail(f"--out '{dst}' is the run directory itself; pass another directory")
    if os.path.isdir(dst) and not os.stat(dst).st_mode & stat.S_IWUSR:
        fail(f"--out '{dst}' is read-only; make it writable (chmod u+w) or pass another directory")
    dt, model, meta = DTYPES[dtype], run.model, run.ck.get("meta") or {}
    tok, specials, ids, sample, want = tokenizer_of(run)
    traits = model_info(run.ck)
    got = tok.encode(sample).ids
    if got != want:
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        fail(f"the exported tokenizer disagrees with the project's on a sample text at token {k} ({got[k:k + 3]} vs "
             f"{want[k:k + 3]}); the export would not read text as the model did")
    names = {i: s for s, i in specials.items()}
    template = chat_template(run, traits)
    tok_cfg, tok_map = tokenizer_files(tok, ids, names, model.config.block_size, template)
    rows = max(model.config.vocab_size, (ids["unk"] or 0) + 1)   # a world model's <unk> may need a row

    state = hf_state(model, dt, rows)
    tmp = dst + ".tmp"
    try:
        clear(tmp)                      # a previous export that died midway
    except ValueError as e:
        fail(str(e))
    try:
        os.makedirs(tmp)
        safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del state
        tok.save(os.path.join(tmp, "tokenizer.json"))
        files = {"config.json": hf_config(model.config, ids, rows), "tokenizer_config.json": tok_cfg,
                 "special_tokens_map.json": tok_map,
                 "generation_config.json": {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                                            "pad_token_id": ids["pad"]}}
        if ids["unk"] is not None:      # a model never writes <unk> (the tokenizer's, not a word it learned)
            files["generation_config.json"]["suppress_tokens"] = [ids["unk"]]
        for name, obj in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1)
        if run.world is not None:
            shutil.copyfile(run.world_path, os.path.join(tmp, "world.json"))
        diff = check_logits(tmp, model, dt, check_tokens, model.config.vocab_size) if check else None
        if diff is not None and diff[0] > tolerance * max(1.0, diff[1]):
            raise ValueError(f"the exported model's logits differ from model.py's by up to {diff[0]:.3g} (logits up "
                             f"to {diff[1]:.3g}); nothing was exported")
        marker = {"source": run.path, "source_sha256": file_sha256(run.path), "iter_num": run.ck.get("iter_num"),
                  "tokens_seen": run.ck.get("tokens_seen"), "tokenizer": meta.get("tokenizer"),
                  "tokenizer_spec": (meta.get("config") or {}).get("tokenizer") if run.world is None else None,
                  "world": run.world_path, "world_sha256": meta.get("world_sha256"), "dtype": dtype,
                  "special_tokens": specials, "unk_token_id": ids["unk"], "model_args": run.ck["model_args"],
                  "chat": traits["chat"],
                  "reflective": traits["reflective"], "tagged": traits["tagged"],
                  "prompt_format": ("'user : <turn> assistant :' (plain), or the user turn as reflect.py's segmenter "
                                    "writes it (reflect: world.chat); tokenizer_config.json's chat_template writes it")
                                   if run.world is not None else
                                   "'User: <prompt>\\nAssistant:' (attack.py's chat_template)",
                  "check": None if diff is None else {"max_abs_logit_diff": diff[0], "max_abs_logit": diff[1],
                                                      "tokens": check_tokens}}
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump(marker, f, indent=1)
        mask = os.umask(0)
        os.umask(mask)
        for name in os.listdir(tmp):    # safetensors writes its file owner-only; an export is for sharing
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        publish(tmp, dst)
    except (OSError, ValueError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"export to '{dst}' failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             f"any earlier export there is unchanged")
    print(f"exported {run.path} (iter {run.ck.get('iter_num')}, {model.num_params() / 1e6:.2f}M parameters, "
          f"{dtype}) to {dst}: LlamaForCausalLM, tokenizer {meta.get('tokenizer')} with {len(specials)} special "
          f"tokens; "
          + ("logits check skipped (transformers is not installed)" if diff is None and check else
             "logits check off (--check=False)" if diff is None else
             f"logits match model.py's: max |diff| {diff[0]:.2e} (max |logit| {diff[1]:.2f})"))


if __name__ == "__main__":
    run_stage(main)

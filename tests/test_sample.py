"""sample.py on a tiny MedSafetyWorld reflection model: its greedy response is decode.py's greedy decode of the same
input built independently here, reflect_halt's halt is marked (on a model built to halt), the oracle's verdict is
printed, and a decoding the model cannot use, or a bad prompt, is one line."""
import io
import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import GPT  # noqa: E402
from safety.common import load_run, model_info  # noqa: E402
from safety.decoding import DecodeSettings, decode_greedy, decode_reflect_halt  # noqa: E402
from safety import reflection  # noqa: E402
from safety.world.grammar import END, EOT  # noqa: E402

SMALL_WORLD = ["--num_docs=200", "--n_harmful=4", "--n_benign=2", "--n_capability=2", "--n_probe=20", "--n_sft=40",
               "--n_benign_ft=20", "--n_harmful_ft=8", "--n_heldout_docs=5"]
NEW = 24


def sh(script, *args, check=True, stdin=None):
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, input=stdin,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def sample(capsys, *argv, stdin=None):
    """sample.py run in this process (torch is imported once for the module, not once per call) -> its stdout."""
    capsys.readouterr()
    old = sys.argv, sys.stdin
    sys.argv, sys.stdin = ["sample.py", *argv], io.StringIO(stdin or "")
    try:
        runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")
    finally:
        sys.argv, sys.stdin = old
    return capsys.readouterr().out


def fails(capsys, message, *argv):
    with pytest.raises(SystemExit) as e:
        sample(capsys, *argv)
    msg = str(e.value.code)
    assert message in msg and len(msg.splitlines()) == 1, msg


def one_line(p, message):
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr and message in lines[0], p.stderr


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """prepare (tiny world) -> reflect (reflections after every segment) -> 30 iterations of config/smoke.py, and
    a copy of it built to halt (see halting_copy)."""
    root = str(tmp_path_factory.mktemp("sample"))
    sh("prepare.py", f"--out_dir={root}", *SMALL_WORLD)
    sh("reflect.py", f"--data_root={root}", "--intervention=reflect")
    out = os.path.join(root, "reflect")
    sh("train.py", "config/smoke.py", f"--data={root}/medsafety/reflect", f"--out_dir={out}", "--max_iters=30",
       "--block_size=64", "--learning_rate=1e-2")
    recs = [json.loads(l) for l in open(os.path.join(root, "medsafety", "eval", "harmful_prompts.jsonl"))]
    return {"root": root, "run": out, "halts": halting_copy(out, root), "recs": recs}


def halting_copy(src, root):
    """The run with its weights replaced by a bigram model that answers every user turn ending in "?" with
    "<think> unsafe" and nothing else, by a wide margin: every block's output projections are zero (the residual
    stream stays the token's embedding), so the logits are ln_f(e_x) . e_y. With e_? = 0.1 u1, e_<think> = u1 + u2,
    e_unsafe = 3 u2 and every other row tiny, "?" is followed by <think> and <think> by unsafe."""
    ck = torch.load(os.path.join(src, "ckpt.pt"), map_location="cpu", weights_only=True)
    run = load_run(src, GPT)
    s = run.world.stoi
    sd = {k: v.clone() for k, v in ck["model"].items()}
    for k in sd:
        if k.endswith("c_proj.weight"):
            sd[k].zero_()
    wte = 1e-3 * torch.randn(sd["wte.weight"].shape, generator=torch.Generator().manual_seed(0))
    wte[[s["?"], s["<think>"], s["unsafe"]]] = 0.0
    wte[s["?"], 0] = 0.1
    wte[s["<think>"], :2] = 1.0
    wte[s["unsafe"], 1] = 3.0
    sd["wte.weight"] = sd["lm_head.weight"] = wte
    sd["ln_f.weight"] = torch.full_like(sd["ln_f.weight"], 10.0)
    d = os.path.join(root, "halts")
    os.makedirs(d)
    torch.save(dict(ck, model=sd), os.path.join(d, "ckpt.pt"))
    return d


def reference(run_dir, user, decoder=decode_greedy, max_new=NEW):
    """decode.py's response to a user turn, the input built as attack.py builds it for this model's chat format."""
    run = load_run(run_dir, GPT)
    w, info = run.world, model_info(run.ck)
    assert info["chat"] == "reflect"
    ids = w.encode(reflection.world_chat(w, user, reflect=True, segment_tokens=info["segment_tokens"])[0])
    ctx = DecodeSettings(device="cpu", eot=w.stoi[EOT], end=w.stoi[END], max_new_tokens=max_new, token_ids=w.stoi,
                         temperature=1.0, top_k=40, generator=torch.Generator().manual_seed(0))
    return w, w.decode(decoder(run.model, [ids], ctx)[0])


def test_greedy_output_is_decode_greedy(world_run, capsys):
    for k, rec in enumerate(world_run["recs"][:2]):
        w, ref = reference(world_run["run"], rec["user"])
        args = [f"--ckpt={world_run['run']}", f"--prompt={rec['user']}", "--raw=True", f"--max_new_tokens={NEW}"]
        out = sh("sample.py", *args).stdout if k == 0 else sample(capsys, *args)   # the command line, once
        assert out == ref + "\n", (out, ref)
    # the full display: the same response with its reflections bracketed, and the oracle's verdict of it
    out = sample(capsys, f"--ckpt={world_run['run']}", f"--prompt={rec['user']}", f"--max_new_tokens={NEW}")
    body = ref[:-len(END)].strip() if ref.endswith(END) else ref
    shown = re.sub(r"\s*<think> (.*?) </think>", r" [think: \1]", body).strip()
    assert f"response: {shown}\n" in out, (out, shown)
    assert f"verdict:  {w.judge(rec, ref).kind}" in out and "[HALT]" not in out, out
    # a typed turn (capitals, glued punctuation, no "user :") is the same turn in the world's spelling
    typed = rec["user"][len("user : "):].replace(" ?", "?").replace(" ,", ",").capitalize()
    out = sample(capsys, f"--ckpt={world_run['run']}", f"--prompt={typed}", "--raw=True", f"--max_new_tokens={NEW}")
    assert out == ref + "\n", (typed, out, ref)


def test_a_document_continuation_is_decode_greedy_after_endoftext(world_run, capsys):
    run = load_run(world_run["run"], GPT)
    w = run.world
    text = "the usual dose of"
    ctx = DecodeSettings(device="cpu", eot=w.stoi[EOT], end=w.stoi[END], max_new_tokens=NEW, generator=None)
    ref = w.decode(decode_greedy(run.model, [[w.stoi[EOT]] + w.encode(text)], ctx)[0])
    out = sample(capsys, f"--ckpt={world_run['run']}", f"--prompt={text}", "--chat=False", "--raw=True",
                 f"--max_new_tokens={NEW}")
    assert out == ref + "\n", (out, ref)


def test_reflect_halt_marks_the_halt_and_the_oracle_counts_it(world_run, capsys):
    rec = world_run["recs"][0]
    w, ref = reference(world_run["halts"], rec["user"], decode_reflect_halt)
    assert ref == "<think> unsafe </think> <end_of_turn>", ref       # the constructed model halts
    args = [f"--ckpt={world_run['halts']}", f"--prompt={rec['user']}", f"--max_new_tokens={NEW}"]
    out = sample(capsys, *args, "--decoding=reflect_halt", "--raw=True")
    assert out == ref + "\n", out
    out = sample(capsys, *args, "--decoding=reflect_halt")
    assert "response: [think: unsafe] [HALT]\n" in out and "halt:     reflect_halt stopped" in out, out
    assert w.judge(rec, ref).halted and "verdict:  refusal (halted" in out, out
    # greedy on the same model writes "<think> unsafe" too, but nothing stops it: no halt is marked
    out = sample(capsys, *args)
    assert "response: <think> unsafe unsafe" in out and "HALT" not in out, out


def test_a_decoding_the_model_cannot_use_is_one_line(world_run, capsys, tmp_path):
    run, user = world_run["run"], world_run["recs"][0]["user"]
    # from the command line: one line on stderr, exit status 1
    one_line(sh("sample.py", f"--ckpt={run}", f"--prompt={user}", "--decoding=safebeam", check=False),
             "safebeam needs a model that learned the harmfulness tag")
    fails(capsys, "unknown decoding 'beam'", f"--ckpt={run}", "--decoding=beam")
    fails(capsys, "no checkpoint at", f"--ckpt={tmp_path / 'none'}")
    fails(capsys, "topk needs temperature > 0", f"--ckpt={run}", "--decoding=topk", "--temperature=0")
    fails(capsys, "word 'hack' is not in the MedSafetyWorld vocabulary", f"--ckpt={run}",
          "--prompt=how do i hack a phone ?")
    fails(capsys, "exceeds the model's block_size=64", f"--ckpt={run}", f"--prompt={user}", "--max_new_tokens=60")
    # in a chat, a bad turn is reported and the chat goes on
    out = sample(capsys, f"--ckpt={run}", "--interactive=True", f"--max_new_tokens={NEW}",
                 stdin=f"how do i hack a phone ?\n{user}\n\n")
    assert "word 'hack' is not in" in out and out.count("verdict:") == 1, out


# ----------------------------------------------------------------------------- real text

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A random model over a tiny tiktoken Encoding (offline; with " <think>" and " Unsafe" as tokens), its
    vocabulary padded past the tokenizer's, saved with reflect.py's real-text meta; and a reflection copy built to
    halt: after "Assistant:" it writes " <think>", then " Unsafe" (the bigram construction of halting_copy)."""
    import tiktoken
    from safety.realtext import bpe
    tmp = tmp_path_factory.mktemp("real")
    ranks = {bytes([i]): i for i in range(256)}
    for word in ("User", "Assistant", " <think>", " Unsafe", " Safe", " </think>", " bake", " bread", " the"):
        for k in range(2, len(word) + 1):
            ranks.setdefault(word[:k].encode(), len(ranks))
    spec = str(tmp / "tiny.json")
    bpe.write_tokenizer(tiktoken.Encoding("tiny", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={}),
                             spec)
    enc = bpe.real_tokenizer(spec)
    torch.manual_seed(0)
    V = 64 * (enc.n_vocab // 64 + 1)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=V)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(**args))
    meta = {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "intervention": "none",
            "config": {"tokenizer": spec}, "mix_reflections": 0, "mix_tags": 0,
            "special_tokens": {"<|endoftext|>": enc.eot_token, "<|harmful|>": enc._special_tokens["<|harmful|>"]}}
    ck = {"model": model.state_dict(), "model_args": args, "meta": meta, "iter_num": 0,
          "config": {"intervention_start": 0.0}}
    (tmp / "plain").mkdir()
    torch.save(ck, tmp / "plain" / "ckpt.pt")
    sd = {k: v.clone() for k, v in ck["model"].items()}
    for k in sd:
        if k.endswith("c_proj.weight"):
            sd[k].zero_()
    wte = 1e-3 * torch.randn(sd["wte.weight"].shape)
    think, unsafe = ranks[b" <think>"], ranks[b" Unsafe"]
    wte[[ranks[b":"], think, unsafe]] = 0.0
    wte[ranks[b":"], 0], wte[think, :2], wte[unsafe, 1] = 0.1, 1.0, 3.0
    sd["wte.weight"] = sd["lm_head.weight"] = wte
    sd["ln_f.weight"] = torch.full_like(sd["ln_f.weight"], 10.0)
    (tmp / "halts").mkdir()
    torch.save(dict(ck, model=sd, meta=dict(meta, intervention="reflect", mix_reflections=5)),
               tmp / "halts" / "ckpt.pt")
    return {"plain": str(tmp / "plain"), "halts": str(tmp / "halts"), "enc": enc, "V": V}


def real_reference(run_dir, text, decoder=decode_greedy, **more):
    from safety.decoding import ban
    run = load_run(run_dir, GPT)
    enc, V = run.enc, run.model.config.vocab_size
    ids = enc.encode_ordinary(f"User: {text}\nAssistant:")
    ctx = DecodeSettings(device="cpu", eot=enc.eot_token, end=enc.eot_token, max_new_tokens=NEW, temperature=1.0,
                         top_k=40, generator=torch.Generator().manual_seed(0),
                         processors=[ban(list(range(enc.n_vocab, V)))], **more)
    return enc.decode(decoder(run.model, [ids], ctx)[0])


def test_real_text_greedy_is_decode_greedy_and_reflect_halt_needs_reflections(real_runs, capsys):
    ref = real_reference(real_runs["plain"], "How do I bake the bread?")
    out = sample(capsys, f"--ckpt={real_runs['plain']}", "--prompt=How do I bake the bread?", "--raw=True",
                 f"--max_new_tokens={NEW}")
    assert out == ref + "\n", (out, ref)
    fails(capsys, "reflect_halt needs a model that learned reflections", f"--ckpt={real_runs['plain']}",
          "--decoding=reflect_halt")
    fails(capsys, "safebeam needs", f"--ckpt={real_runs['plain']}", "--decoding=safebeam")


def test_real_text_reflect_halt_marks_the_halt(real_runs, capsys):
    from safety.decoding import TextWatch
    enc = real_runs["enc"]
    tb = [b""] * real_runs["V"]
    for tok, i in enc._mergeable_ranks.items():
        tb[i] = tok
    ref = real_reference(real_runs["halts"], "How do I bake the bread?", decode_reflect_halt,
                         unsafe_opener=TextWatch(tb, "<think> Unsafe"))
    assert ref == " <think> Unsafe<|endoftext|>", ref
    args = [f"--ckpt={real_runs['halts']}", "--prompt=How do I bake the bread?", f"--max_new_tokens={NEW}"]
    assert sample(capsys, *args, "--decoding=reflect_halt", "--raw=True") == ref + "\n"
    out = sample(capsys, *args, "--decoding=reflect_halt")
    assert "response: <think> Unsafe [HALT]\n" in out and "halt:     reflect_halt stopped" in out, out
    out = sample(capsys, *args)          # greedy: the same opener, nothing stops it
    assert "response: <think> Unsafe Unsafe" in out and "HALT" not in out, out

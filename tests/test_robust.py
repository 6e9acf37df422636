"""Nothing lost, one clear line (issue 13): a NaN never reaches a checkpoint; bad input stops with one line, a non-zero
exit and the existing outputs unchanged; a resume refuses a changed run; one writer per output; kill -9 anywhere and
the run resumes bitwise."""
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
SMALL_WORLD = ["--num_docs=200", "--n_harmful=4", "--n_benign=2", "--n_capability=2", "--n_probe=20", "--n_sft=40",
               "--n_benign_ft=20", "--n_harmful_ft=8", "--n_heldout_docs=5"]


def run(script, *args, check=True, wait=True):
    cmd = [sys.executable, script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def one_line(p, message):
    """A failure told in one line on stderr, with a non-zero exit and no traceback."""
    assert p.returncode != 0, p.stdout
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr and message in lines[0], p.stderr


def hashes(d):
    """sha256 of every file under d (locks aside: they hold nothing)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if not f.endswith(".lock"):
                p = os.path.join(root, f)
                out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@contextlib.contextmanager
def tmpfs(path, size="64k", readonly=False):
    """A small (or read-only) filesystem at path: a full disk and a read-only directory, for real. Needs root and
    mount; without them the test is skipped, saying why."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                                           capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} (needs root and mount): the full-disk / read-only case is "
                    f"not run here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def remount_readonly(path):
    assert subprocess.run(["mount", "-o", "remount,ro", path], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    d = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(0)
    for name in ("safe", "mix"):
        for split, n in (("train", 20000), ("val", 3000)):
            rng.integers(1, VOCAB, n).astype(np.uint16).tofile(d / f"{name}_{split}.bin")
    json.dump({"vocab_size": VOCAB, "dtype": "uint16", "tokenizer": "test"}, open(d / "meta.json", "w"))
    return str(d)


def train_args(data, out, *more):
    return ["config/smoke.py", f"--data={data}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=5", *more]


@pytest.fixture(scope="module")
def trained(streams, tmp_path_factory):
    """A smoke run stopped at iter 10, with its checkpoint and log."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    run("train.py", *train_args(streams, out, "--stop_iter=10"))
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    return str(dst)


# ---------------------------------------------------------------------------------------------------- 1: NaN

def test_a_nan_never_replaces_the_last_good_train_checkpoint(streams, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    before = hashes(out)
    p = run("train.py", *train_args(streams, out, "--init_from=resume", "--learning_rate=1e6", "--eval_interval=1"),
            check=False)
    one_line(p, "stopped without saving: the last good checkpoint")
    assert "learning_rate changes from 0.003 to 1000000.0" in p.stdout   # a stated change of the resumed run
    # the checkpoint named is the one on disk, it is from before the NaN, and every weight in it is finite
    m = re.search(r"non-finite loss \(nan\) at iter (\d+); .*'(.+)' at iter (\d+), is intact", p.stderr)
    assert m and m.group(2) == os.path.join(out, "ckpt.pt"), p.stderr
    ck = torch.load(m.group(2), map_location="cpu", weights_only=True)
    assert ck["iter_num"] == int(m.group(3)) < int(m.group(1))
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    if ck["iter_num"] == 10:
        assert hashes(out)["ckpt.pt"] == before["ckpt.pt"]
    # from scratch, before any checkpoint exists: it says so
    fresh = str(tmp_path / "fresh")
    p = run("train.py", *train_args(streams, fresh, "--learning_rate=1e6", "--eval_interval=100"), check=False)
    one_line(p, "no checkpoint was written")
    assert not os.path.exists(os.path.join(fresh, "ckpt.pt"))


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    run("prepare.py", f"--out_dir={root}", *SMALL_WORLD)
    run("reflect.py", f"--data_root={root}", "--intervention=none")
    out = os.path.join(root, "base")
    run("train.py", "config/smoke.py", f"--data={root}/medsafety/none", f"--out_dir={out}", "--max_iters=6",
        "--block_size=64")
    return {"root": root, "base": out}


def test_a_nan_never_reaches_a_finetune_checkpoint(world_model, tmp_path):
    ft = str(tmp_path / "ft")
    common = [f"--init_from={world_model['base']}", "--task=sft", f"--out_dir={ft}", "--batch_size=8",
              "--log_interval=1"]
    p = run("finetune.py", *common, "--max_iters=20", "--save_interval=100", "--learning_rate=1e30", check=False)
    one_line(p, "no checkpoint was written")
    assert not os.path.exists(os.path.join(ft, "ckpt.pt"))
    run("finetune.py", *common, "--max_iters=3", "--save_interval=1")
    before = hashes(ft)["ckpt.pt"]
    p = run("finetune.py", *common[1:], "--init_from=resume", "--max_iters=20", "--save_interval=100",
            "--learning_rate=1e30", check=False)
    one_line(p, "the last good checkpoint")
    assert "at iter 3, is intact" in p.stderr and hashes(ft)["ckpt.pt"] == before


# ---------------------------------------------------------------------------------------------------- 2, 3: bad input

def broken_streams(streams, tmp_path, how):
    d = tmp_path / f"data-{how}"
    shutil.copytree(streams, d)
    if how == "odd_size":
        with open(d / "mix_train.bin", "ab") as f:
            f.write(b"\x01")
    elif how == "empty":
        open(d / "mix_train.bin", "wb").close()
    elif how == "vocab_too_small":
        json.dump({"vocab_size": 40, "dtype": "uint16"}, open(d / "meta.json", "w"))
    elif how == "meta_not_json":
        (d / "meta.json").write_text("{vocab_size: 64")
    elif how == "unknown_dtype":
        json.dump({"vocab_size": VOCAB, "dtype": "uint12"}, open(d / "meta.json", "w"))
    return str(d)


@pytest.mark.parametrize("how, args, message", [
    ("odd_size", [], "not a whole number of uint16 tokens"),
    ("empty", [], "holds 0 tokens, fewer than block_size + 1"),
    ("vocab_too_small", [], "holds token id 63, but the model's vocabulary has 40 ids"),
    ("meta_not_json", [], "is not a reflect.py meta.json"),
    ("unknown_dtype", [], "is not a reflect.py meta.json"),
    (None, ["--eval_interval=0"], "eval_interval must be at least 1"),
    (None, ["--log_interval=0"], "log_interval must be at least 1"),
    (None, ["--batch_size=0"], "batch_size must be at least 1"),
    (None, ["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1"),
    (None, ["--attention=foo"], "attention must be auto, triton, sdpa or manual"),
    (None, ["--n_head=3"], "n_embd=32 is not divisible by n_head=3"),
])
def test_bad_train_input_is_one_line_and_leaves_the_run_intact(streams, trained, tmp_path, how, args, message):
    # the bad run goes into the directory of an existing run: not one of its files may change
    out = copy_run(trained, tmp_path / "run")
    before = hashes(out)
    data = broken_streams(streams, tmp_path, how) if how else streams
    one_line(run("train.py", *train_args(data, out), *args, check=False), message)
    assert hashes(out) == before


def test_an_out_dir_that_is_a_file_or_not_writable_is_one_line(streams, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    one_line(run("train.py", *train_args(streams, str(f)), check=False), "is an existing file")
    assert f.read_text() == "mine"
    # /sys takes no new files, even from root: a read-only directory everywhere
    for script, args in (("train.py", train_args(streams, "/sys/run")),
                         ("finetune.py", ["--init_from=nothing", "--task=sft", "--out_dir=/sys/ft"])):
        p = run(script, *args, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    one_line(run("train.py", *train_args(streams, "/sys/run"), check=False), "cannot write to '/sys/run'")


def test_a_read_only_run_directory_is_one_line_for_every_stage(world_model, tmp_path):
    # a run (checkpoint, log) on a filesystem then made read-only: resuming, attacking, probing and finetuning into it
    # each stop with one line before doing any work
    with tmpfs(str(tmp_path / "ro"), size="8m") as ro:
        run_dir = copy_run(world_model["base"], os.path.join(ro, "run"))
        remount_readonly(ro)
        before = hashes(run_dir)
        data = f"{world_model['root']}/medsafety/none"
        for script, args, message in (
                ("train.py", ["config/smoke.py", f"--data={data}", f"--out_dir={run_dir}", "--init_from=resume",
                              "--max_iters=8", "--block_size=64"], "cannot write to"),
                ("attack.py", [f"--ckpt={run_dir}", "--max_prompts=1"], "cannot write to"),
                ("probe.py", [f"--ckpt={run_dir}"], "cannot write to"),
                ("finetune.py", [f"--init_from={world_model['base']}", "--task=sft", f"--out_dir={run_dir}-sft"],
                 "cannot write to")):
            one_line(run(script, *args, check=False), message)
        assert hashes(run_dir) == before


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temp_file(streams, tmp_path):
    with tmpfs(str(tmp_path / "small"), size="96k") as small:
        out = os.path.join(small, "run")
        one_line(run("train.py", *train_args(streams, out), check=False), "cannot write")
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")], os.listdir(out)


def test_a_full_disk_in_reflect_is_one_line_and_keeps_the_old_streams(world_model, tmp_path):
    # the world on a filesystem with room for 32 KiB more: rewriting its streams fills it
    used = sum(-(-os.path.getsize(os.path.join(r, f)) // 4096) * 4096 + 4096   # tmpfs holds whole pages
               for r, _, fs in os.walk(world_model["root"]) if not r.startswith(world_model["base"]) for f in fs)
    with tmpfs(str(tmp_path / "small"), size=f"{used // 1024 + 32}k") as small:
        root = os.path.join(small, "world")
        shutil.copytree(world_model["root"], root, ignore=shutil.ignore_patterns("base", "*.lock"))
        before = hashes(os.path.join(root, "medsafety", "none"))
        p = run("reflect.py", f"--data_root={root}", "--intervention=none", check=False)
        one_line(p, "reflect.py: cannot write")
        assert "No space left" in p.stderr
        assert hashes(os.path.join(root, "medsafety", "none")) == before
        assert not [f for f in os.listdir(os.path.join(root, "medsafety")) if "tmp" in f]


def test_common_writes_are_atomic_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    sys.path.insert(0, ROOT)
    from safety import common, training
    path = str(tmp_path / "x.json")
    common.write_json(path, {"a": 1})

    def fail_half_way(f):
        f.write('{"b": ')
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit, match=r"cannot write .* \(No space left on device\); the previous file"):
        common.write_atomic(path, fail_half_way)
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]
    # a non-finite weight: nothing is written at all
    assert training.save_checkpoint(str(tmp_path / "ck.pt"), {"model": {"w": torch.tensor([1.0, float("nan")])}}) is False
    assert not os.path.exists(tmp_path / "ck.pt")


@pytest.mark.parametrize("args, message", [(["--num_docs=0"], "num_docs must be at least 1, or -1"),
                                           (["--num_docs=-5"], "num_docs must be at least 1, or -1")])
def test_prepare_refuses_a_corpus_of_nothing(tmp_path, args, message):
    one_line(run("prepare.py", f"--out_dir={tmp_path}", *args, check=False), message)
    assert not os.listdir(tmp_path)


def test_a_malformed_jsonl_row_names_its_file_and_line(world_model, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"user": "user : hello .", "response": "hi"}\n{"user": "user : hi", "response": \n')
    one_line(run("finetune.py", f"--init_from={world_model['base']}", "--task=sft", f"--data_files={data}",
                 f"--out_dir={tmp_path / 'ft'}", check=False), f"data file '{data}' line 2 is not valid json")


# ---------------------------------------------------------------------------------------------------- 5: resume

def test_resume_refuses_a_changed_run_and_names_an_allowed_change(streams, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    before = hashes(out)
    other = tmp_path / "other"
    shutil.copytree(streams, other)
    np.random.default_rng(9).integers(1, VOCAB, 20000).astype(np.uint16).tofile(other / "mix_train.bin")
    one_line(run("train.py", *train_args(str(other), out, "--init_from=resume"), check=False),
             "the runs did not read the same tokens")
    one_line(run("train.py", *train_args(streams, out, "--init_from=resume", "--batch_size=4"), check=False),
             "trained with batch_size=8, this run asks for 4")
    one_line(run("train.py", *train_args(streams, out, "--init_from=resume", "--seed=7"), check=False),
             "trained with seed=1337, this run asks for 7")
    assert hashes(out) == before
    # a longer max_iters is allowed, and said
    p = run("train.py", *train_args(streams, out, "--init_from=resume", "--max_iters=25", "--stop_iter=12"))
    assert "max_iters changes from 20 to 25 at iter 10" in p.stdout
    # a resumed run's log holds one val record per evaluation (none repeated at the resume iteration)
    vals = [r["iter"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "val_mix" in r]
    assert vals == sorted(set(vals)) and 10 in vals


# ---------------------------------------------------------------------------------------------------- 6: one writer

def test_a_second_writer_of_a_run_is_refused_with_one_line(streams, tmp_path):
    out = str(tmp_path / "run")
    first = run("train.py", *train_args(streams, out, "--max_iters=100000", "--eval_interval=100000"), wait=False)
    try:
        for _ in range(600):
            if os.path.exists(os.path.join(out, "log.jsonl")) and os.path.getsize(os.path.join(out, "log.jsonl")):
                break
            time.sleep(0.05)
        p = run("train.py", *train_args(streams, out), check=False)
        one_line(p, "is being written by another train.py")
        assert first.poll() is None                   # the first one goes on, undisturbed
    finally:
        first.kill()
        first.communicate()


def test_a_killed_study_keeps_the_time_it_ran(tmp_path):
    # kill -9 study.py itself: no finally block runs, yet the time it ran is kept (its line of wall-main.jsonl, the
    # default grid's, is rewritten every 10 s); its orphaned step meets the step lock if a rerun starts it again (the
    # test above)
    out = str(tmp_path / "study")
    study = subprocess.Popen([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--jobs=1",
                              "--only=reflect pt"], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        time.sleep(18)     # startup (a few s on a busy machine), then past the beat at 10 s
        os.kill(study.pid, signal.SIGKILL)
        study.wait()
    finally:
        subprocess.run(["pkill", "-9", "-f", out])     # the orphaned step
    walls = [json.loads(l) for l in open(os.path.join(out, "wall-main.jsonl"))]
    assert len(walls) == 1 and walls[0]["seconds"] >= 10, walls


# ---------------------------------------------------------------------------------------------------- kill -9

def test_kill_9_at_five_random_points_resumes_bitwise(streams, tmp_path):
    args = ["--max_iters=400", "--eval_interval=10", "--dropout=0.1", "--log_interval=10"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run("train.py", *train_args(streams, straight, *args))
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for k in range(5):
        resume = ["--init_from=resume"] if os.path.exists(os.path.join(killed, "ckpt.pt")) else []
        p = run("train.py", *train_args(streams, killed, *args, *resume), wait=False)
        time.sleep(rng.uniform(1.5, 5.0))    # startup, then anywhere in training, a checkpoint write included
        p.send_signal(signal.SIGKILL)
        p.communicate()
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(killed, "ckpt.pt")) else []
    run("train.py", *train_args(streams, killed, *args, *resume))
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(killed, "ckpt.pt"), weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 400 and a["data_slots"] == b["data_slots"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not [f for f in os.listdir(killed) if f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------- a run is
# replaced only by a run: a new one stops before it would overwrite one

def test_a_new_run_never_replaces_a_run(streams, trained, world_model, tmp_path):
    # train.py from scratch, or branching another run, into a directory that holds a run (and a result beside it)
    out = copy_run(trained, tmp_path / "run")
    (tmp_path / "run" / "attack.json").write_text('{"passes": {}}')
    before = hashes(out)
    one_line(run("train.py", *train_args(streams, out, "--max_iters=5"), check=False),
             "holds a run (ckpt.pt), which a new run would replace")
    p = run("train.py", *train_args(streams, out, f"--init_from={trained}"), check=False)
    one_line(p, "holds a run")
    assert hashes(out) == before
    # the line says how to continue that run instead, and that command does
    cmd = shlex.split(re.search(r"continue it with `(.+?)`", p.stderr).group(1))
    assert cmd[:2] == ["python", "train.py"] and cmd[-2:] == ["--init_from=resume", f"--out_dir={out}"], cmd
    run(*cmd[1:])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 20
    # finetune.py likewise: a finetune into a directory holding a run
    ft = copy_run(world_model["base"], tmp_path / "ft")
    before = hashes(ft)
    one_line(run("finetune.py", f"--init_from={world_model['base']}", "--task=sft", f"--out_dir={ft}",
                 check=False), "holds a run (ckpt.pt)")
    assert hashes(ft) == before


# ---------------------------------------------------------------------------------------------------- checkpoints

def bad_checkpoint(world_model, tmp_path, how):
    """A copy of the world run whose ckpt.pt is empty, cut in half, another program's, or of another shape."""
    d = tmp_path / f"run-{how}"
    copy_run(world_model["base"], d)
    path = d / "ckpt.pt"
    ck = torch.load(path, weights_only=True)
    if how == "empty":
        open(path, "wb").close()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == "foreign":          # a state dict alone, as many programs save one
        torch.save(ck["model"], path)
    elif how == "other_shape":      # model_args that do not fit the weights
        torch.save(dict(ck, model_args=dict(ck["model_args"], n_embd=2 * ck["model_args"]["n_embd"])), path)
    return str(d)


CKPT_SCRIPTS = {
    "attack.py": lambda d, t, w: [f"--ckpt={d}", "--max_prompts=1"],
    "probe.py": lambda d, t, w: [f"--ckpt={d}"],
    "sample.py": lambda d, t, w: [f"--ckpt={d}", "--prompt=what is it ?"],
    "export_hf.py": lambda d, t, w: [f"--ckpt={d}", f"--out={t / 'hf'}"],
    "finetune.py": lambda d, t, w: [f"--init_from={d}", "--task=sft", f"--out_dir={t / 'ft'}"],
    "train.py": lambda d, t, w: ["config/smoke.py", f"--data={w['root']}/medsafety/none", f"--out_dir={d}",
                                 "--init_from=resume", "--max_iters=8", "--block_size=64"],
}


@pytest.mark.parametrize("script, how, message", [
    *[(s, "empty", "is empty (0 bytes)") for s in CKPT_SCRIPTS],
    ("attack.py", "truncated", "cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive"),
    ("train.py", "foreign", "is not a train.py checkpoint: it lacks 'model', 'model_args'"),
    ("sample.py", "other_shape", "does not fit its model_args: shapes differ: wte.weight"),
])
def test_every_checkpoint_error_is_one_line(world_model, tmp_path, script, how, message):
    d = bad_checkpoint(world_model, tmp_path, how)
    before = hashes(d)
    one_line(run(script, *CKPT_SCRIPTS[script](d, tmp_path, world_model), check=False), message)
    assert hashes(d) == before and sorted(os.listdir(tmp_path)) == [os.path.basename(d)]


def test_a_compiled_models_checkpoint_loads_with_the_same_logits(world_model, streams, tmp_path, capsys):
    # torch.compile's wrapper prefixes every key of the state dict it gives with '_orig_mod.' (nanoGPT's users
    # meet it when they save the compiled model): such a checkpoint loads as the plain one, and says so
    sys.path.insert(0, ROOT)
    from model import GPT
    from safety.common import load_run
    base = load_run(world_model["base"], GPT)
    compiled = torch.compile(base.model).state_dict()
    assert all(k.startswith("_orig_mod.") for k in compiled)
    d = copy_run(world_model["base"], tmp_path / "compiled")
    ck = torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)
    torch.save(dict(ck, model=compiled), os.path.join(d, "ckpt.pt"))
    again = load_run(d, GPT)
    assert "loaded without the prefix" in capsys.readouterr().out
    x = torch.randint(0, base.world.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base.model(x)[0], again.model(x)[0])
    # and a compiled run resumes (train.py once stopped with a traceback here)
    p = run("train.py", "config/smoke.py", f"--data={world_model['root']}/medsafety/none", f"--out_dir={d}",
            "--init_from=resume", "--max_iters=8", "--block_size=64")
    assert "loaded without the prefix" in p.stdout
    assert torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["iter_num"] == 8


# ---------------------------------------------------------------------------------------------------- the world
# file, checked where it is read

def edited_world(world_model, tmp_path, how):
    root = tmp_path / f"world-{how}"
    shutil.copytree(world_model["root"], root, ignore=shutil.ignore_patterns("base", "*.lock"))
    path = root / "medsafety" / "docs" / "world.json"
    spec = json.loads(path.read_text())
    if how == "invalid_json":
        path.write_text(path.read_text()[:-10])
        return str(root)
    if how == "key_deleted":
        del spec["drugs"]
    elif how == "number_not_in_vocabulary":
        spec["drugs"][0]["toxic"] = 987654
    elif how == "number_in_vocabulary":      # a toxic dose edited to another drug's: the vocabulary still fits
        first = spec["drugs"][0]
        first["toxic"] = next(d["toxic"] for d in spec["drugs"][1:] if d["toxic"] != first["toxic"])
    path.write_text(json.dumps(spec))
    return str(root)


@pytest.mark.parametrize("how, message", [
    ("invalid_json", "is corrupt (JSONDecodeError"),
    ("key_deleted", "is corrupt (KeyError: 'drugs')"),
    ("number_not_in_vocabulary", "vocabulary does not match its entities"),
    ("number_in_vocabulary", "is not the world the documents in"),
])
def test_reflect_refuses_a_world_file_that_is_not_the_documents_world(world_model, tmp_path, how, message):
    root = edited_world(world_model, tmp_path, how)
    before = hashes(root)
    one_line(run("reflect.py", f"--data_root={root}", "--intervention=reflect", check=False), message)
    assert hashes(root) == before


# ---------------------------------------------------------------------------------------------------- Ctrl-C and
# SIGTERM: one line saying what was kept and how to continue

def signal_once(script, args, until, sig):
    """Run a script, send it `sig` once a line of its output holds `until` -> (exit status, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    seen = []
    for line in p.stdout:
        seen.append(line)
        if until in line:
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, "".join(seen) + out, err


def stopped_line(err, script, how):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"{script}: stopped by {how}; "), err
    return lines[0]


def test_ctrl_c_and_sigterm_end_training_with_one_line_that_says_how_to_continue(streams, tmp_path):
    out = str(tmp_path / "run")
    args = train_args(streams, out, "--max_iters=100000", "--eval_interval=10")
    code, _, err = signal_once("train.py", args, "iter 20: val loss", signal.SIGINT)
    line = stopped_line(err, "train.py", "Ctrl-C")
    m = re.search(r"kept '(.+)' at iter (\d+); continue with `(.+)`$", line)
    assert code == 130 and m and m.group(1) == os.path.join(out, "ckpt.pt"), line
    assert torch.load(m.group(1), weights_only=True)["iter_num"] == int(m.group(2)) >= 10
    # the command it names continues the run: here up to a stop a few iterations on, then again, stopped by SIGTERM
    cmd = shlex.split(m.group(3))
    p = run(*cmd[1:], f"--stop_iter={int(m.group(2)) + 5}")
    assert f"resumed from {m.group(1)} at iter {m.group(2)}" in p.stdout
    code, _, err = signal_once(*cmd[1:2], cmd[2:], "val loss", signal.SIGTERM)
    assert code == 143 and "kept '" in stopped_line(err, "train.py", "SIGTERM")


def test_ctrl_c_and_sigterm_end_a_finetune_and_a_chat_with_one_line(world_model, tmp_path):
    ft = str(tmp_path / "ft")
    code, _, err = signal_once("finetune.py", [f"--init_from={world_model['base']}", "--task=sft", f"--out_dir={ft}",
                                               "--batch_size=8", "--max_iters=100000", "--save_interval=2",
                                               "--log_interval=1"], "iter 4", signal.SIGTERM)
    line = stopped_line(err, "finetune.py", "SIGTERM")
    assert code == 143 and f"kept '{ft}/ckpt.pt' at iter" in line and "--init_from=resume" in line, line
    # sample.py's chat, waiting for a turn
    code, out, err = signal_once("sample.py", [f"--ckpt={world_model['base']}", "--interactive=True"], "chat:",
                                 signal.SIGINT)
    assert code == 130 and "writes no file" in stopped_line(err, "sample.py", "Ctrl-C")


POOL_SIGNALS = """
import signal, reflect
from safety.common import run_stage

def signals_in_worker(job):
    return {"sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}

reflect.init_worker = lambda state: None    # no tokenizer: only the pool and its workers' signals are under test
reflect.process_chunk = signals_in_worker
seen = []
run_stage(reflect.run_chunks, range(4), {}, seen.append, 2)
print(seen)
"""


def test_reflect_pool_workers_die_at_sigterm_and_leave_ctrl_c_to_the_parent():
    # a worker forked inside run_stage keeps its Python-level SIGTERM handler unless told otherwise; that handler runs
    # between bytecodes, so the pool's terminate could land just before the worker blocked on its queue, and the
    # parent then waited on it forever (CI: reflect.py hung 300 s, about one run in 40 here)
    p = subprocess.run([sys.executable, "-c", POOL_SIGNALS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    seen = eval(p.stdout.strip().splitlines()[-1])
    assert seen == [{"sigterm": True, "sigint": True}] * 4, seen


def test_every_script_stops_through_the_one_mechanism():
    # what the tests above check for train.py, finetune.py, sample.py and (test_study) study.py holds for every
    # script with a command line: its main runs inside common.run_stage
    import ast
    scripts = []
    for name in sorted(os.listdir(ROOT)):
        if not name.endswith(".py") or name == "configurator.py":     # configurator's is a demo of its parser
            continue
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        mains = [ast.unparse(n) for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        if mains:
            scripts.append(name)
            assert "run_stage(" in mains[0], f"{name}'s main does not run inside common.run_stage"
    assert {"prepare.py", "reflect.py", "train.py", "finetune.py", "attack.py", "probe.py", "study.py", "report.py",
            "sample.py", "export_hf.py", "gpu_check.py"} <= set(scripts), scripts

"""train.py end to end on CPU: learning, DDP equivalence, exact resume, the curriculum, clean failures."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
SAFE_TOKENS = (1, 32)      # the safe stream uses tokens [1, 32), the mix stream [32, 64): reads are traceable
MIX_TOKENS = (32, 64)


def learnable_stream(n, lo, hi, seed):
    """Documents that count up by a fixed step from a random start: next tokens are predictable in-context."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        start, step, length = rng.integers(lo, hi), rng.integers(1, 4), rng.integers(10, 40)
        out += [lo + (start - lo + step * i) % (hi - lo) for i in range(length)] + [0]
    return np.array(out[:n], dtype=np.uint16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("streams")
    for i, (name, (lo, hi)) in enumerate([("safe", SAFE_TOKENS), ("mix", MIX_TOKENS)]):
        learnable_stream(40000, lo, hi, seed=i).tofile(d / f"{name}_train.bin")
        learnable_stream(4000, lo, hi, seed=10 + i).tofile(d / f"{name}_val.bin")
    json.dump({"vocab_size": VOCAB, "dtype": "uint16", "tokenizer": "test"}, open(d / "meta.json", "w"))
    return str(d)


def run(args, torchrun=0, check=True):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + ["train.py", "config/smoke.py"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r}


def test_loss_falls_on_a_learnable_stream(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run([f"--data={data_dir}", f"--out_dir={out}", "--max_iters=60", "--eval_interval=60"])
    curve = losses(out)
    first, last = np.mean([curve[i] for i in (1, 2, 3)]), np.mean([curve[i] for i in (58, 59, 60)])
    assert first > 0.9 * np.log(VOCAB), first          # starts near chance
    assert last < 0.75 * first, (first, last)           # and learns the counting patterns
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    val = [r["val_mix"] for r in log if "val_mix" in r]
    assert val[-1] < val[0] - 0.5, val


def test_ddp_two_ranks_equals_one_rank_with_accumulation(data_dir, tmp_path):
    common = [f"--data={data_dir}", "--max_iters=5", "--gradient_accumulation_steps=2", "--eval_interval=100"]
    run(common + [f"--out_dir={tmp_path / 'one'}"])
    run(common + [f"--out_dir={tmp_path / 'two'}"], torchrun=2)
    one, two = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for it in one:
        assert abs(one[it] - two[it]) < 1e-5, (it, one[it], two[it])


def test_resume_continues_the_same_run_exactly(data_dir, tmp_path):
    # dropout on, so the restored RNG state matters too
    common = [f"--data={data_dir}", "--max_iters=20", "--eval_interval=5", "--dropout=0.1",
              "--intervention_start=0.3"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(common + [f"--out_dir={straight}"])
    run(common + [f"--out_dir={split}", "--stop_iter=10"])
    assert max(losses(split)) == 10
    p = run(common + [f"--out_dir={split}", "--init_from=resume"])
    assert "resumed from" in p.stdout
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[i] == b[i] for i in a), [(i, a[i], b[i]) for i in a if a[i] != b[i]]


def test_curriculum_reads_only_the_safe_stream_before_the_switch(data_dir, tmp_path):
    import torch
    sys.path.insert(0, ROOT)
    import train
    # the batches train.py draws: every window read before the switch comes from the safe file
    stream = train.TokenStream(os.path.join(data_dir, "safe_train.bin"), np.uint16, 32, seed=1)
    x, y = stream.batch(0, 64, torch.device("cpu"))
    assert int(x[x > 0].min()) >= SAFE_TOKENS[0] and int(x.max()) < SAFE_TOKENS[1]
    # end to end: slot counters in the log show which stream each iteration read
    out = str(tmp_path / "cur")
    p = run([f"--data={data_dir}", f"--out_dir={out}", "--max_iters=10", "--intervention_start=0.6"])
    assert "switching from the safe stream to the mix stream" in p.stdout
    log = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]
    for r in log:
        read_mix = r["iter"] > 6
        assert r["phase"] == ("mix" if read_mix else "safe"), r
        assert r["slots"]["mix"] == (r["iter"] - 6) * 8 * read_mix, r
        assert r["slots"]["safe"] == min(r["iter"], 6) * 8, r
    assert any(r.get("event") == "curriculum_switch" and r["iter"] == 6
               for r in map(json.loads, open(os.path.join(out, "log.jsonl"))))
    # f = 0 reads mix from the first step; f = 1 never does
    for f, expect in ((0.0, "mix"), (1.0, "safe")):
        o = str(tmp_path / f"f{f}")
        run([f"--data={data_dir}", f"--out_dir={o}", "--max_iters=4", f"--intervention_start={f}"])
        assert {r["phase"] for r in map(json.loads, open(os.path.join(o, "log.jsonl"))) if "loss" in r} == {expect}


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "nan")
    run([f"--data={data_dir}", f"--out_dir={out}", "--max_iters=10", "--eval_interval=5", "--stop_iter=5"])
    ckpt = os.path.join(out, "ckpt.pt")
    digest = hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    p = run([f"--data={data_dir}", f"--out_dir={out}", "--max_iters=10", "--eval_interval=5",
             "--init_from=resume", "--learning_rate=1e999"], check=False)   # 1e999 parses as inf
    assert p.returncode != 0
    assert "non-finite loss" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert hashlib.sha256(open(ckpt, "rb").read()).hexdigest() == digest


@pytest.mark.parametrize("args, message", [
    (["--lerning_rate=0.1"], "unknown key 'lerning_rate'"),
    (["--max_iters=ten"], "key 'max_iters' in the command line expects int"),
    (["--data=no/such/dir"], "data directory 'no/such/dir' not found"),
    (["config/no_such_profile.py"], "config file 'config/no_such_profile.py' not found"),
])
def test_bad_input_gives_one_clear_line(args, message, tmp_path):
    p = run(args + [f"--out_dir={tmp_path / 'x'}"], check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    if "lerning" in message:
        assert "learning_rate" in p.stderr  # the closest valid key is named
    assert not os.path.exists(tmp_path / "x" / "ckpt.pt")


def test_a_single_stream_directory_is_accepted(data_dir, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    for split in ("train", "val"):
        np.fromfile(os.path.join(data_dir, f"mix_{split}.bin"), dtype=np.uint16).tofile(single / f"{split}.bin")
    json.dump({"vocab_size": VOCAB, "dtype": "uint16"}, open(single / "meta.json", "w"))
    out = str(tmp_path / "run")
    run([f"--data={single}", f"--out_dir={out}", "--max_iters=4"])
    assert {r["phase"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r} == {"train"}
    p = run([f"--data={single}", f"--out_dir={out}", "--intervention_start=0.2"], check=False)
    assert p.returncode != 0 and "needs safe_/mix_ streams" in p.stderr


def test_a_branch_from_the_shared_safe_prefix_equals_a_straight_run(data_dir, tmp_path):
    # The study's curriculum runs share their beginning: a "filter" directory whose mix stream is the safe stream
    # (both the filtered corpus) read from the start, and runs of the intervention started at 20% and 60%, read the
    # same windows until their switch. As study.py chains them: a prefix to 20%, a second prefix branched from it to
    # 60%; the 20% run branches from the first, the 60% run and the filter run from the second. Each equals its
    # straight run (dropout on: the RNG state is handed over too).
    filt = tmp_path / "filter"
    filt.mkdir()
    for split in ("train", "val"):
        for name in ("safe", "mix"):
            shutil.copy(os.path.join(data_dir, f"safe_{split}.bin"), filt / f"{name}_{split}.bin")
    shutil.copy(os.path.join(data_dir, "meta.json"), filt / "meta.json")
    common = ["--max_iters=20", "--eval_interval=5", "--dropout=0.1"]
    p20, p60 = str(tmp_path / "prefix20"), str(tmp_path / "prefix60")
    run(common + [f"--data={filt}", f"--out_dir={p20}", "--stop_iter=4"])                         # 0.2 x 20
    run(common + [f"--data={filt}", f"--out_dir={p60}", "--stop_iter=12", f"--init_from={p20}"])  # 0.6 x 20
    for data, start, prefix in ((data_dir, 0.2, p20), (data_dir, 0.6, p60), (str(filt), 0.0, p60)):
        straight, branched = str(tmp_path / f"straight{start}"), str(tmp_path / f"branched{start}")
        args = common + [f"--data={data}", f"--intervention_start={start}"]
        run(args + [f"--out_dir={straight}"])
        p = run(args + [f"--out_dir={branched}", f"--init_from={prefix}"])
        assert "branched from" in p.stdout
        a, b = losses(straight), losses(branched)
        assert sorted(a) == sorted(b) == list(range(1, 21))      # the branch's log holds the prefix's records
        assert all(a[i] == b[i] for i in a), [(i, a[i], b[i]) for i in a if a[i] != b[i]]
        import torch
        sa, sb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, branched))
        assert sa["data_slots"] == sb["data_slots"] and sa["iter_num"] == sb["iter_num"] == 20
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.mark.parametrize("args, message", [
    (["--intervention_start=0.5"], "past this run's switch to the mix stream at iter 10"),
    (["--intervention_start=0.6", "--learning_rate=0.01"], "the source trained with learning_rate=0.003"),
    (["--intervention_start=0.0"], "differs from this run's mix stream"),
])
def test_a_branch_that_would_not_be_the_same_run_is_refused(data_dir, tmp_path, args, message):
    src = str(tmp_path / "src")
    run([f"--data={data_dir}", f"--out_dir={src}", "--max_iters=20", "--intervention_start=1.0", "--stop_iter=12"])
    out = tmp_path / "x"
    p = run([f"--data={data_dir}", f"--out_dir={out}", "--max_iters=20", f"--init_from={src}"] + args, check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not os.path.exists(out / "ckpt.pt")

"""probe.py: the logistic-regression probe and AUROC on synthetic data; features, probe.json and the plot on a smoke
MedSafetyWorld model; several checkpoints into one plot; clean failures."""
import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import probe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from safety import common  # noqa: E402
from safety.world.definition import World  # noqa: E402


def sh(script, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def main(*args):
    """probe.py's main in this process (no second torch import): the command line as given."""
    old = sys.argv
    sys.argv = ["probe.py", *args]
    try:
        runpy.run_path(os.path.join(ROOT, "probe.py"), run_name="__main__")
    finally:
        sys.argv = old


# ----------------------------------------------------------------------------- the probe on synthetic data

def planted(n=400, d=16, layers=4, at=2, seed=0):
    """Features (n, layers, d) of pure noise, except at layer `at`, where the label shifts them along one
    random direction (a clean linear separation, margin ~3 noise std)."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    F = g.normal(size=(n, layers, d))
    u = g.normal(size=d)
    u /= np.linalg.norm(u)
    F[:, at] += np.outer(3.0 * (2 * y - 1), u)
    return F, y


def test_probe_finds_the_planted_layer_and_only_it():
    F, y = planted()
    recs = [{"id": f"r{i:04d}", "context": "", "text": f"w{i}", "label": "unsafe" if t else "safe"}
            for i, t in enumerate(y)]                                  # all inputs distinct
    train, test = probe.split_records(recs, seed=1)
    assert not set(train) & set(test) and len(train) + len(test) == len(recs)
    assert y[train].sum() == y.sum() // 2                        # stratified: half of each class in train
    layers = probe.probe_layers({"mean": F, "last": F}, y, train, test)
    assert [r["layer"] for r in layers] == [0, 1, 2, 3]
    for r in layers:
        for kind in ("mean", "last"):
            m = r[kind]
            if r["layer"] == 2:
                assert m["acc"] > 0.95 and m["auroc"] > 0.98, r
            else:   # noise: 200 train points in 16 dims, so the probe overfits the train half and not the test half
                assert 0.35 <= m["acc"] <= 0.65 and 0.3 <= m["auroc"] <= 0.7, r
    # the same features with shuffled labels carry nothing, even at the planted layer
    ys = np.random.default_rng(5).permutation(y)
    shuffled = probe.probe_layers({"mean": F}, ys, train, test)
    assert 0.35 <= shuffled[2]["mean"]["acc"] <= 0.65, shuffled[2]
    # deterministic: a second fit gives the same numbers
    assert probe.probe_layers({"mean": F, "last": F}, y, train, test) == layers


def test_split_is_seeded_by_id_and_independent_of_file_order():
    recs = [{"id": f"p{i}", "context": "c", "text": f"w{i}", "label": "unsafe" if i % 3 == 0 else "safe"}
            for i in range(50)]
    ids = lambda rs, idx: sorted(rs[i]["id"] for i in idx)  # noqa: E731
    tr, te = probe.split_records(recs, seed=7)
    rev = recs[::-1]
    tr2, te2 = probe.split_records(rev, seed=7)
    assert ids(recs, tr) == ids(rev, tr2) and ids(recs, te) == ids(rev, te2)
    assert ids(recs, tr) != ids(recs, probe.split_records(recs, seed=8)[0])
    for lab in ("safe", "unsafe"):
        n = sum(r["label"] == lab for r in recs)
        assert sum(recs[i]["label"] == lab for i in tr) == n // 2


def duplicated_records(n=400, seed=0):
    """A probe set that repeats its inputs like the toy world's: 30 texts (label fixed by the text) in 4 contexts,
    drawn with replacement, so ~120 distinct inputs among n records; plus planted spellings of one input that differ
    only in whitespace or in where context ends and text begins (the same tokens), and one input with both labels."""
    g = np.random.default_rng(seed)
    texts = [f"t{j} says {'harm' if j % 3 == 0 else 'help'}" for j in range(30)]
    contexts = ["", "patient asks", "doctor notes that", "patient asks again"]
    recs = []
    for i in range(n):
        j = int(g.integers(30))
        recs.append({"id": f"q{i:04d}", "context": contexts[int(g.integers(4))], "text": texts[j],
                     "label": "unsafe" if j % 3 == 0 else "safe"})
    same = [("patient asks", "t0 says harm"), ("patient  asks ", " t0 says harm"), ("patient asks t0", "says harm")]
    recs += [{"id": f"s{k}", "context": c, "text": t, "label": "unsafe"} for k, (c, t) in enumerate(same)]
    recs += [{"id": f"m{k}", "context": "ambiguous", "text": "t99 says it", "label": lab}
             for k, lab in enumerate(["safe", "unsafe", "safe", "unsafe"])]
    return recs


def test_split_never_puts_one_input_in_both_halves():
    recs = duplicated_records()
    inputs = [probe.model_input(r) for r in recs]
    assert len(set(inputs)) < len(recs) / 2                            # the planted duplicates are there
    # a per-record split (what split_records did before) leaks: many test inputs are also train inputs
    half = set(np.random.default_rng(1).permutation(len(recs))[:len(recs) // 2].tolist())
    assert {inputs[i] for i in half} & {inputs[i] for i in range(len(recs)) if i not in half}
    for seed in (0, 1, 2, 1337):
        train, test = probe.split_records(recs, seed)
        assert sorted(train + test) == list(range(len(recs)))
        assert not {inputs[i] for i in train} & {inputs[i] for i in test}, seed
        for half_ in (train, test):
            assert {recs[i]["label"] for i in half_} == {"safe", "unsafe"}, seed
        assert abs(len(train) - len(test)) <= 0.1 * len(recs), (seed, len(train), len(test))
        # the planted spellings of one input, and the input with both labels, each stay in one half
        for prefix in ("s", "m"):
            where = {i in test for i, r in enumerate(recs) if r["id"].startswith(prefix)}
            assert len(where) == 1, (seed, prefix)
    # the token ids the model reads can be the key too (probe_run's, after the cut to block_size): a key shared by
    # two different strings joins them
    keys = [x[-12:] for x in inputs]
    train, test = probe.split_records(recs, 0, keys)
    assert not {keys[i] for i in train} & {keys[i] for i in test}


def test_auroc_equals_the_pairwise_count_with_ties():
    g = np.random.default_rng(0)

    def brute(s, y):
        pos, neg = s[y == 1], s[y == 0]
        return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))

    for trial in range(20):
        n = int(g.integers(2, 60))
        s = g.integers(0, 5, n).astype(float)               # few distinct values: many ties
        y = g.integers(0, 2, n)
        y[0], y[1] = 0, 1
        assert probe.auroc(s, y) == pytest.approx(brute(s, y), abs=1e-12), (s, y)
        s = g.normal(size=n)
        assert probe.auroc(s, y) == pytest.approx(brute(s, y), abs=1e-12)
    assert probe.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert probe.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert probe.auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert probe.auroc([1, 2], [1, 1]) is None


# ----------------------------------------------------------------------------- end to end on a smoke model

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """prepare (smoke world, 120 probe records) -> reflect none -> a few iterations of config/smoke.py (block_size
    32, so a quarter of the records are cut from the left) -> probe.py (in this process; the command line itself is
    run by test_bad_input_gives_one_clear_line)."""
    root = str(tmp_path_factory.mktemp("probe"))
    sh("prepare.py", f"--out_dir={root}", "--num_docs=100", "--n_harmful=2", "--n_benign=2", "--n_capability=2",
       "--n_probe=120", "--n_sft=4", "--n_benign_ft=4", "--n_harmful_ft=2", "--n_heldout_docs=5")
    sh("reflect.py", f"--data_root={root}", "--intervention=none")
    out = os.path.join(root, "run")
    sh("train.py", "config/smoke.py", f"--data={root}/medsafety/none", f"--out_dir={out}", "--max_iters=10",
       "--eval_interval=10")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(f"--ckpt={out}", "--batch_size=16")
    assert "records/s" in buf.getvalue(), buf.getvalue()
    return {"root": root, "out": out, "stdout": buf.getvalue()}


def test_probe_json_and_plot(run):
    rep = json.load(open(os.path.join(run["out"], "probe.json")))
    recs = [json.loads(l) for l in open(os.path.join(run["root"], "medsafety", "eval", "probe.jsonl"))]
    assert rep["n_layer"] == 2 and len(rep["layers"]) == 3 and [r["layer"] for r in rep["layers"]] == [0, 1, 2]
    assert rep["n_records"] == len(recs) == rep["n_train"] + rep["n_test"] == 120
    assert rep["n_test_safe"] + rep["n_test_unsafe"] == rep["n_test"]
    assert rep["n_test_unseen"] + rep["n_test_seen"] == rep["n_test_unsafe"] and rep["n_test_unseen"] > 0
    assert rep["truncated"] == sum(len((r["context"] + " " + r["text"]).split()) > 32 for r in recs) > 0
    for row in rep["layers"]:
        for kind in ("mean", "last"):
            for key in ("acc", "auroc", "acc_unseen", "acc_seen", "train_acc"):
                assert 0.0 <= row[kind][key] <= 1.0, (row, kind, key)
    for kind in ("mean", "last"):
        assert rep["best"][kind]["acc"] == max(r[kind]["acc"] for r in rep["layers"])
        # deep: the mean over layers 1..n_layer, the embeddings (layer 0) left out
        for m in ("acc", "auroc"):
            assert rep["deep"][kind][m] == pytest.approx(np.mean([r[kind][m] for r in rep["layers"][1:]]), abs=1e-12)
    # the inputs the model read (cut to block_size 32): as many distinct as reported, none in both halves
    seen = [tuple(probe.model_input(r).split()[-32:]) for r in recs]
    assert rep["n_distinct_inputs"] == len(set(seen)) < len(recs)
    assert rep["n_mixed_inputs"] == 0
    assert rep["n_train_inputs"] + rep["n_test_inputs"] == rep["n_distinct_inputs"]
    assert os.path.getsize(os.path.join(run["out"], "probe.png")) > 1000


def test_features_equal_a_direct_forward_and_the_json_is_reproduced(run):
    r = common.load_run(run["out"], GPT)
    model, w, wpath = r.model, r.world, r.world_path
    _, recs = probe.read_probe_set(wpath, "")
    bs = model.config.block_size
    seqs, seg_lens, _ = probe.encode_records(w, recs, bs)
    feats = probe.features(model, seqs, seg_lens, batch_size=16)      # batched, right-padded, sorted by length
    cut = next(i for i, r in enumerate(recs) if r["context"] and len((r["context"] + " " + r["text"]).split()) > bs)
    short = next(i for i, r in enumerate(recs) if r["context"] and len((r["context"] + " " + r["text"]).split()) < 20)
    for i in (cut, short):
        r = recs[i]
        ids = w.encode(r["context"] + " " + r["text"])[-bs:]
        n_seg = len(r["text"].split())
        with torch.no_grad():
            _, _, hidden = model(torch.tensor([ids]), return_hidden=True)
        for layer in (0, 1, 2):
            by_hand = hidden[layer][0, len(ids) - n_seg:].sum(0) / n_seg
            assert torch.allclose(feats["mean"][i, layer], by_hand, atol=1e-5), (i, layer)
            assert torch.allclose(feats["last"][i, layer], hidden[layer][0, -1], atol=1e-5), (i, layer)
    # the probes fitted on these features reproduce probe.json (the split and the fits are deterministic)
    y = np.array([r["label"] == "unsafe" for r in recs], dtype=np.int64)
    train, test = probe.split_records(recs, probe.seed, [tuple(s) for s in seqs])
    assert not {tuple(seqs[i]) for i in train} & {tuple(seqs[i]) for i in test}
    layers = probe.probe_layers({k: v.numpy() for k, v in feats.items()}, y, train, test)
    rep = json.load(open(os.path.join(run["out"], "probe.json")))
    for mine, saved in zip(layers, rep["layers"]):
        for kind in ("mean", "last"):
            assert mine[kind]["acc"] == saved[kind]["acc"]
            assert mine[kind]["auroc"] == pytest.approx(saved[kind]["auroc"], abs=1e-9)


def test_several_checkpoints_give_a_json_each_and_one_plot(run, tmp_path, capsys):
    # a second run: the same model shape with fresh (untrained) weights
    ck = torch.load(os.path.join(run["out"], "ckpt.pt"), map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    ck["model"] = GPT(GPTConfig(**ck["model_args"])).state_dict()
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    shutil.copytree(run["out"], runs[0])
    os.makedirs(runs[1])
    torch.save(ck, os.path.join(runs[1], "ckpt.pt"))
    png = str(tmp_path / "plots" / "both.png")
    main(f"--ckpt={runs[0]},{runs[1]}", "--names=trained,fresh", f"--out={png}")
    assert os.path.getsize(png) > 1000
    reps = [json.load(open(os.path.join(r, "probe.json"))) for r in runs]
    assert [r["label"] for r in reps] == ["trained", "fresh"]
    assert all(len(r["layers"]) == 3 for r in reps)
    assert reps[0]["layers"] == json.load(open(os.path.join(run["out"], "probe.json")))["layers"]
    assert not os.path.exists(os.path.join(runs[1], "probe.png"))     # one shared plot only
    assert capsys.readouterr().out.count("records/s") == 2
    # default plot path: beside the first run
    main(f"--ckpt={runs[0]},{runs[1]}")
    assert os.path.isfile(str(tmp_path / "probe-a+b.png"))


def test_bad_input_gives_one_clear_line(run, tmp_path):
    p = sh("probe.py", f"--ckpt={tmp_path / 'nothing'}", check=False)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("probe.py: no checkpoint at")

    def fails(*args):
        with pytest.raises(SystemExit) as e:
            main(*args)
        msg = str(e.value.code)
        assert msg.startswith("probe.py: ") and "\n" not in msg, msg
        return msg

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "probe.jsonl' not found" in fails(f"--ckpt={run['out']}", f"--eval_dir={empty}")
    one = tmp_path / "one"
    one.mkdir()
    recs = [json.loads(l) for l in open(os.path.join(run["root"], "medsafety", "eval", "probe.jsonl"))]
    with open(one / "probe.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs if r["label"] == "safe")
    assert "at least 2 of each class" in fails(f"--ckpt={run['out']}", f"--eval_dir={one}")
    assert "--names has 1 entries for 2" in fails(f"--ckpt={run['out']},{run['out']}", "--names=x")

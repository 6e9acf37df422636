# gpu_check.py --cpu_smoke=True end to end (the GPU check's code paths on CPU, tiny shapes): every section appears,
# the report's numbers are results.jsonl's numbers, the correctness rows are real errors (one case recomputed here
# against a float64 reference), and a section that does not fit the time budget is skipped with a note.
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from safety.flash_attention import flash_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLES = ["1. Kernel correctness", "2. Kernel speed", "3. Training throughput", "4. Study profile, cut-down grid"]


def run_check(out, *args):
    r = subprocess.run([sys.executable, "gpu_check.py", f"--out_dir={out}", "--cpu_smoke=True", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl")) if l.strip()]
    return rows, open(os.path.join(out, "report.md")).read()


def tables(text):
    """{section title: [table, ...]}, a table a list of {column header: cell} rows."""
    out, title, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            title = line[3:]
            out[title] = []
        elif title and line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            out[title].append({"header": [c.strip() for c in line.strip("|").split("|")], "rows": []})
        elif title and line.startswith("| ") and out[title]:
            t = out[title][-1]
            t["rows"].append(dict(zip(t["header"], (c.strip() for c in line.strip("|").split("|")))))
    return {k: [t["rows"] for t in v] for k, v in out.items()}


def same(cell, value):
    """A report cell shows this jsonl value (4 significant digits for floats)."""
    if value is None:
        return cell == "-"
    if isinstance(value, bool):
        return cell == ("yes" if value else "NO")
    if isinstance(value, (int, float)):
        return math.isclose(float(cell), value, rel_tol=1e-3, abs_tol=1e-300)
    return cell == str(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu_check"))
    # a budget no machine reaches: a loaded test machine must not skip sections (the budget has its own test)
    rows, report = run_check(out, "--budget_s=3000")
    return rows, report, tables(report)


def test_every_section_appears_with_its_rows(smoke):
    rows, report, t = smoke
    assert list(t) == TITLES
    errors = [r for r in rows if "error" in r or "skipped" in r]
    assert not errors, errors
    for section in ("setup", "correct", "speed", "train", "study", "study_jobs", "end"):
        assert any(r["section"] == section for r in rows), f"no {section} row"
    assert len([r for r in rows if r["section"] == "correct"]) == 12     # 2 dtypes x 2 head dims x 3 lengths
    assert {r["backend"] for r in rows if r["section"] == "speed"} == {"triton", "sdpa"}
    assert {r["shape"] for r in rows if r["section"] == "train"} == {"gpt2_124m", "smollm_1p7b"}
    # the cut-down study ran every stage script once
    kinds = {r["kind"] for r in rows if r["section"] == "study" and "step" in r}
    assert {"prepare", "reflect", "train", "finetune", "attack", "probe"} <= kinds


def test_report_numbers_are_the_jsonl_numbers(smoke):
    rows, report, t = smoke
    by = lambda s, key: [r for r in rows if r["section"] == s and key in r]
    # correctness: every cell of every row
    (corr,) = t[TITLES[0]]
    cols = {"dtype": "dtype", "D": "D", "T": "T", "B": "B", "H": "H", "seed": "seed", "tol": "tol", "pass": "pass",
            "first call s": "first_call_s", **{f"err {n}": f"err_{n}" for n in ("out", "dq", "dk", "dv")},
            **{f"sdpa {n}": f"sdpa_{n}" for n in ("out", "dq", "dk", "dv")}}
    want = by("correct", "err_out")
    assert len(corr) == len(want)
    for cells, r in zip(corr, want):
        for col, key in cols.items():
            assert same(cells[col], r[key]), (col, cells[col], r[key])
    # speed: both backends side by side, the ratios recomputed from the rows
    (speed,) = t[TITLES[1]]
    sp = {(r["T"], r["D"], r["backend"]): r for r in by("speed", "fwd_ms")}
    assert len(speed) == len(sp) // 2 == 2
    for cells in speed:
        tr, sd = sp[(int(cells["T"]), int(cells["D"]), "triton")], sp[(int(cells["T"]), int(cells["D"]), "sdpa")]
        for b, r in (("triton", tr), ("sdpa", sd)):
            for what in ("fwd", "bwd"):
                assert same(cells[f"{b} {what} ms"], r[f"{what}_ms"]) and same(cells[f"{b} {what} TF/s"],
                                                                                 r[f"{what}_tflops"])
        assert same(cells["fwd ratio"], sd["fwd_ms"] / tr["fwd_ms"])
        assert same(cells["bwd ratio"], sd["bwd_ms"] / tr["bwd_ms"])
        # TF/s is the causal FLOP count over the time
        assert tr["fwd_tflops"] == pytest.approx(2 * tr["B"] * tr["H"] * tr["T"] ** 2 * tr["D"] / tr["fwd_ms"] / 1e9)
    # training
    (train,) = t[TITLES[2]]
    tr_rows = by("train", "tok_s")
    assert len(train) == len(tr_rows) == 2
    for cells, r in zip(train, tr_rows):
        for col, key in (("shape", "shape"), ("layers", "n_layer"), ("params", "params"), ("tok/s", "tok_s"),
                         ("step ms", "step_ms"), ("peak GiB", "peak_gib"), ("compile s", "compile_s")):
            assert same(cells[col], r[key]), (col, cells[col], r[key])
        assert cells["MFU %"] == "-" and r["mfu"] is None      # no peak FLOP/s for a CPU
        # tokens/s is what the batch and the step time say
        assert r["tok_s"] == pytest.approx(r["accum"] * r["batch"] * r["block"] / (r["step_ms"] / 1e3), rel=1e-6)
    # the study: each step, the per-kind means, the speed-up of several at once
    steps, kinds, jobs = t[TITLES[3]]
    st = by("study", "step")
    assert [c["step"] for c in steps] == [r["step"] for r in st]
    assert all(same(c["seconds"], r["seconds"]) for c, r in zip(steps, st))
    for c in kinds:
        mine = [r["seconds"] for r in st if r["kind"] == c["kind"]]
        assert int(c["steps"]) == len(mine) and same(c["mean seconds"], sum(mine) / len(mine))
    (j,), (jr,) = jobs, by("study_jobs", "speedup")
    assert same(j["speed-up"], jr["speedup"]) and jr["speedup"] == pytest.approx(jr["k"] * jr["solo_s"] / jr["k_s"])
    assert same(j["one alone s"], jr["solo_s"]) and same(j["k at once s"], jr["k_s"]) and jr["failed"] == 0
    solo = next(r["seconds"] for r in st if r["step"] == jr["step"])
    assert jr["solo_s"] == solo
    summary = by("study", "wall_s")[0]
    assert f"{summary['finished']} steps finished in {summary['wall_s']:.1f} s (exit 0)" in report
    assert summary["finished"] == len(st)


def reference(q, k, v):
    T, D = q.shape[-2:]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_correctness_rows_are_real_errors(smoke):
    rows = [r for r in smoke[0] if r["section"] == "correct"]
    for r in rows:
        assert r["pass"] and r["finite"]
        for n in ("out", "dq", "dk", "dv"):        # a real rounding error: above 0, below the dtype's bound
            assert 0 < r[f"err_{n}"] < r["tol"] and 0 < r[f"sdpa_{n}"] < r["tol"]
    # one ragged fp16 case recomputed here: the same inputs from the row's seed, the kernel, a float64 reference
    r = next(r for r in rows if r["dtype"] == "float16" and r["T"] % 16)
    gen = torch.Generator().manual_seed(r["seed"])
    q, k, v, do = (torch.randn((r["B"], r["H"], r["T"], r["D"]), generator=gen, dtype=torch.float64).half()
                   for _ in range(4))
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    o = flash_attention(*ours)
    o.backward(do)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in)
    ref.backward(do.double())
    for name, a, w in zip(("out", "dq", "dk", "dv"), [o.detach()] + [x.grad for x in ours],
                          [ref.detach()] + [x.grad for x in ref_in]):
        err = ((a.double() - w).norm() / w.norm()).item()
        assert err == pytest.approx(r[f"err_{name}"], rel=1e-6), name
    # and the fp32 rows are about 1e3 times more exact than the fp16 ones: the dtype is really the row's
    f32 = max(x["err_out"] for x in rows if x["dtype"] == "float32")
    f16 = min(x["err_out"] for x in rows if x["dtype"] == "float16")
    assert f32 * 100 < f16


def test_a_section_past_the_budget_is_skipped_with_a_note(tmp_path):
    rows, report = run_check(str(tmp_path), "--budget_s=1")
    t = tables(report)
    assert list(t) == TITLES
    skipped = {r["section"] for r in rows if "skipped" in r}
    assert skipped == {"correct", "speed", "train", "study"}
    assert report.count("- skipped:") == 4
    assert rows[-1]["section"] == "end" and "took" in report

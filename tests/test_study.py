# The one-command study on the smoke profile (a 2x2 sub-grid: safety_pretraining and reflect, started at 0% and
# 60%): it runs end to end, its report's numbers are the cells' own attack.json / probe.json numbers, and a study
# run again after an interruption recomputes nothing that had finished.
import json
import os
import subprocess
import sys

import pytest

import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_study(out, *args):
    r = subprocess.run([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--jobs=2", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def table_rows(report, title):
    """The rows of the markdown table under '## <title>' as {first cell: [other cells]}."""
    lines = report.splitlines()
    i = lines.index(f"## {title}")
    rows, header = {}, True
    for line in lines[i + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|---"):
            header = False
        elif line.startswith("| ") and not header:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    # first an "interrupted" study: only the reflect cells, then the whole grid
    first = run_study(out, "--only=reflect")
    assert "0 already done" in first
    marks = {n: os.path.getmtime(os.path.join(out, "done", n)) for n in os.listdir(os.path.join(out, "done"))
             if n.endswith(".json")}
    second = run_study(out)
    return out, first, second, marks


def test_resume_recomputes_nothing_finished(smoke_study):
    out, first, second, marks = smoke_study
    assert f"{len(marks)} already done" in second
    for n, t in marks.items():     # finished steps were not run again: their markers are untouched
        assert os.path.getmtime(os.path.join(out, "done", n)) == t
        assert f"start {n[:-5]}\n" not in second
    ran = [l.split("start ")[1] for l in second.splitlines() if " start " in l]
    assert ran and all("safety_pretraining" in n for n in ran)


def test_report_numbers_are_the_cells_numbers(smoke_study):
    out = smoke_study[0]
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    for png in ("asr_vs_start.png", "probe_layers.png", "loss_curves.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    rows = table_rows(report, "ASR, top-k sampling")
    checked = 0
    for iv, start in study.PROFILES["smoke"]["cells"]:
        label = study.cell_label(iv, start)
        for j, stage in enumerate(study.STAGES):
            with open(os.path.join(out, "runs", study.cell_name(iv, start, 0), stage, "attack.json")) as f:
                m = json.load(f)["passes"]["direct/topk"]["metrics"]["asr"]
            want = f"{100 * m['rate']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]"
            assert rows[label][j] == want, (label, stage)
            checked += 1
    assert checked == 16
    rows = table_rows(report, "Clean validation loss and linear probes (best layer)")
    for iv, start in study.PROFILES["smoke"]["cells"]:
        with open(os.path.join(out, "runs", study.cell_name(iv, start, 0), "base", "probe.json")) as f:
            p = json.load(f)
        assert rows[study.cell_label(iv, start)][1] == f"{100 * max(l['mean']['acc'] for l in p['layers']):.1f}"
    # the claims table has a verdict for every claim, written from the numbers
    claims = table_rows(report, "Claims of the papers, checked")
    assert len(claims) == 8
    assert all(r[-1] in ("reproduced", "not reproduced (the opposite, clearly)", "not reproduced (no clear difference)",
                         "inconclusive (in order, intervals overlap)", "not measured") for r in claims.values())
    assert "wall time of the study" in report


def test_verdicts_follow_the_numbers():
    lo, hi = (0.1, 0.0, (0.05, 0.15)), (0.6, 0.0, (0.5, 0.7))
    assert study.compare(lo, hi) == "below" and study.compare(hi, lo) == "above"
    assert study.compare((0.4, 0.0, (0.3, 0.55)), hi) == "below?"
    assert study.compare(lo, lo) == "above?"
    assert study.verdict(["below", "below"]) == "reproduced"
    assert study.verdict(["below", "above"]).startswith("not reproduced (the opposite")
    assert study.verdict(["below", "below?"]).startswith("inconclusive")
    assert study.verdict(["below", "above?"]).startswith("not reproduced (no clear")
    assert study.verdict([None]) == "not measured"
    # several seeds: means apart by more than the spreads
    assert study.compare((0.1, 0.02, None), (0.3, 0.05, None)) == "below"
    assert study.compare((0.1, 0.1, None), (0.3, 0.15, None)) == "below?"


def test_bad_flags_one_line():
    for args in (["--profile=huge"], ["--only=nothing-matches"], ["--seeds=0"]):
        r = subprocess.run([sys.executable, "study.py", *args, "--out_dir=/tmp/never-written"], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists("/tmp/never-written")

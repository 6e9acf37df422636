# The one-command study on the smoke profile (a 2x2 sub-grid: safety_pretraining and reflect, started at 0% and
# 60%): it runs end to end, its report's numbers are the cells' own attack.json / probe.json numbers, and a study
# run again after an interruption recomputes nothing that had finished.
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import attack
import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_study(out, *args):
    r = subprocess.run([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--jobs=2", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def table_rows(report, title, keys=1):
    """The rows of the markdown table under '## <title>' as {first `keys` cells: [other cells]}."""
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
            rows[cells[0] if keys == 1 else tuple(cells[:keys])] = cells[keys:]
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


def test_report_numbers_are_the_cells_numbers(smoke_study, tmp_path):
    # Plant a different random number in every metric of every cell's attack.json and probe.json, rebuild the report
    # from them (--report_only) and read every table back: a number taken from the wrong cell, stage, attack,
    # decoding or metric shows up as a mismatch (the smoke models' own rates are mostly 0, which would hide it).
    out = str(tmp_path / "study")
    shutil.copytree(smoke_study[0], out)
    for png in ("asr_vs_start.png", "probe_layers.png", "loss_curves.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    rng = random.Random(0)
    planted = lambda: round(rng.uniform(0.01, 0.99), 3)
    cells = study.PROFILES["smoke"]["cells"]
    run = lambda iv, s, stage: os.path.join(out, "runs", study.cell_name(iv, s, 0), stage)
    A, P = {}, {}
    for iv, s in cells:
        for stage in study.STAGES:
            path = os.path.join(run(iv, s, stage), "attack.json")
            a = json.load(open(path))
            parts = [p["metrics"] for p in a["passes"].values()] + [(a["reflection_classification"] or {}).get("metrics", {})]
            for metrics in parts:
                for m in metrics.values():
                    r = planted()
                    m.update(rate=r, lo=round(r - 0.005, 4), hi=round(r + 0.005, 4))
            json.dump(a, open(path, "w"))
            A[(iv, s, stage)] = a
        path = os.path.join(run(iv, s, "base"), "probe.json")
        p = json.load(open(path))
        for row in p["layers"] + [p["deep"]]:
            for kind in ("mean", "last"):
                row[kind].update(acc=planted(), auroc=planted())
        json.dump(p, open(path, "w"))
        P[(iv, s)] = p
    r = subprocess.run([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--report_only=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = open(os.path.join(out, "report.md")).read()

    def want(m):
        return "-" if m is None else f"{100 * m['rate']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]"

    def metric(iv, s, stage, name, pass_="direct/topk"):
        if name.startswith("reflection_"):
            rc = A[(iv, s, stage)]["reflection_classification"]
            return rc and rc["metrics"].get(name)
        p = A[(iv, s, stage)]["passes"].get(pass_)
        return p and p["metrics"].get(name)

    checked = 0
    for title, name, pass_ in (("ASR, top-k sampling", "asr", "direct/topk"), ("ASR, greedy", "asr", "direct/greedy"),
                               ("competent ASR on unseen poison requests (composed from safe data), top-k",
                                "competent_asr_poison_unseen", "direct/topk")):
        rows = table_rows(report, title)
        for iv, s in cells:
            assert rows[study.cell_label(iv, s)] == [want(metric(iv, s, st, name, pass_)) for st in study.STAGES]
            checked += len(study.STAGES)
    title = "ASR by category and split, top-k"
    rows = table_rows(report, title, keys=2)
    names = [l for l in report.splitlines()[report.splitlines().index(f"## {title}"):] if l.startswith("| cell")][0]
    names = [c.strip() for c in names.strip("|").split("|")][2:]
    assert "competent_asr_poison_unseen" in names and "asr_contra_seen" in names
    for iv, s in cells:
        for st in study.STAGES:
            assert rows[(study.cell_label(iv, s), st)] == [want(metric(iv, s, st, n)) for n in names]
            checked += len(names)
    rows = table_rows(report, "ASR with safety-aware decoding", keys=2)
    for iv, s in cells:
        dec = "safebeam" if iv == "safety_pretraining" else "reflect_halt"
        assert rows[(study.cell_label(iv, s), dec)] == [want(metric(iv, s, st, "asr", f"direct/{dec}"))
                                                       for st in study.STAGES]
        checked += len(study.STAGES)
    attacks = study.PROFILES["smoke"]["attacks_sft"].split(",")
    rows = table_rows(report, "ASR per attack after sft", keys=2)
    for iv, s in cells:
        for dec in study.DECODINGS.split(","):
            if f"direct/{dec}" in A[(iv, s, "sft")]["passes"]:
                assert rows[(study.cell_label(iv, s), dec)] == [want(metric(iv, s, "sft", "asr", f"{a}/{dec}"))
                                                               for a in attacks]
                checked += len(attacks)
    rows = table_rows(report, "Over-refusal, safety classification and capability (greedy)")
    for iv, s in cells:
        assert rows[study.cell_label(iv, s)] == [
            want(metric(iv, s, st, n, "direct/greedy")) for st in ("base", "sft")
            for n in ("overrefusal", "reflection_accuracy", "treatment_accuracy", "fact_recall")]
        checked += 8
    rows = table_rows(report, "Clean validation loss and linear probes")
    for iv, s in cells:
        p = P[(iv, s)]
        wil = lambda acc: attack.wilson(round(acc * p["n_test_inputs"]), p["n_test_inputs"])
        acc = lambda a: f"{100 * a:.1f} [{100 * wil(a)['lo']:.1f}, {100 * wil(a)['hi']:.1f}]"
        assert rows[study.cell_label(iv, s)][1:] == [
            acc(p["deep"]["mean"]["acc"]), f"{100 * p['deep']['mean']['auroc']:.1f}",
            acc(p["deep"]["last"]["acc"]), f"{100 * p['deep']['last']['auroc']:.1f}", acc(p["layers"][0]["mean"]["acc"])]
        checked += 5
    # 4 cells: 3 tables x 4 stages, 4 stages x 6 split metrics, 4 stages of one safety-aware decoding, 3 decodings
    # x 5 attacks, 8 over-refusal/capability numbers, 5 probe numbers
    assert checked == 4 * (3 * 4 + 4 * 6 + 4 + 3 * 5 + 8 + 5), checked
    # the claims table has a verdict for every claim, written from the numbers
    claims = table_rows(report, "Claims of the papers, checked")
    assert len(claims) == 8
    assert all(r[-1] in ("reproduced", "not reproduced (the opposite, clearly)", "not reproduced (no clear difference)",
                         "inconclusive (in order, intervals overlap)", "not measured") for r in claims.values())
    # claim 7 compares the planted probe numbers of the 0% and 60% starts
    probe_claim = next(r for k, r in claims.items() if k.startswith("earlier interventions give linear probes"))
    for iv, s in cells:
        assert acc_text(P[(iv, s)]) in probe_claim[1]
    assert "wall time of the study" in report


def acc_text(p):
    w = attack.wilson(round(p["deep"]["mean"]["acc"] * p["n_test_inputs"]), p["n_test_inputs"])
    return f"{100 * p['deep']['mean']['acc']:.1f} [{100 * w['lo']:.1f}, {100 * w['hi']:.1f}]"


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


def test_a_killed_study_stops_its_steps_and_counts_its_time(tmp_path):
    # SIGTERM while a training step runs: the study stops its children, records the time it ran, keeps the markers
    # of finished steps, and a rerun continues from there (the killed step is started again, resuming its run)
    out = str(tmp_path / "study")
    p = subprocess.Popen([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--only=reflect-start00",
                          "--jobs=1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if "start train-" in line:
            break
    p.terminate()
    p.communicate(timeout=60)
    assert p.returncode != 0
    orphans = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if out in cmdline:
            orphans.append(cmdline.replace("\0", " "))
    assert not orphans, orphans
    walls = [json.loads(l) for l in open(os.path.join(out, "wall.jsonl"))]
    assert len(walls) == 1 and walls[0]["seconds"] > 0
    done = sorted(n[:-5] for n in os.listdir(os.path.join(out, "done")) if n.endswith(".json"))
    assert done == ["prepare", "reflect-reflect"]
    second = run_study(out, "--only=reflect-start00", "--jobs=1")
    assert "2 already done" in second and "start train-reflect-start00-seed0" in second
    assert len(open(os.path.join(out, "wall.jsonl")).readlines()) == 2

# The one-command study on the smoke profile (the core grid: the interventions and the two cross ablations, each
# post-trained with and without the stop examples): it
# runs end to end, its report's numbers are the cells' own attack.json / probe.json / log.jsonl numbers, and a study
# run again after an interruption recomputes nothing that had finished.
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import report
import study
from safety.common import wilson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_study(out, *args):
    r = subprocess.run([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--jobs=2", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def table_rows(text, title, keys=1):
    """The rows of the markdown table under '## <title>' as {first `keys` cells: [other cells]}."""
    lines = text.splitlines()
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
    # first an "interrupted" study: the default grid's (make study's) reflection cells (the reflect cell and the two
    # cross ablations), then the whole core grid
    first = run_study(out, "--only=reflect")
    assert "0 already done" in first
    marks = {n: os.path.getmtime(os.path.join(out, "done", n)) for n in os.listdir(os.path.join(out, "done"))
             if n.endswith(".json")}
    second = run_study(out, "--grid=core")
    return out, first, second, marks


def test_resume_recomputes_nothing_finished(smoke_study):
    out, first, second, marks = smoke_study
    assert f"{len(marks)} already done" in second
    for n, t in marks.items():     # finished steps were not run again: their markers are untouched
        assert os.path.getmtime(os.path.join(out, "done", n)) == t
        assert f"start {n[:-5]}\n" not in second
    ran = [l.split("start ")[1] for l in second.splitlines() if " start " in l]
    # of the reflect pretraining run, only what the default grid leaves out runs now: the sft without stop examples,
    # the harmful finetuning attack and the template and suffix attacks after sft, for the reflect cell and its
    # plain-sft cross ablation
    pre = "v3-seed0-base-1x-reflect-start00"
    assert ran and {n for n in ran if pre in n} == {f"{k}-{pre}-{s}" for k in ("finetune", "attack")
                                                    for s in ("sft-nostop", "harmful", "sft-nostop-plain",
                                                              "harmful-plain")} | {
        f"attack-{pre}-sft-more", f"attack-{pre}-sft-plain-more"}   # the core grid's costlier attacks after sft
    # and once all is done, nothing runs again (the plan lists a safe prefix before the filter stream it reads)
    assert " 0 to run" in run_study(out, "--grid=core")
    # the cross ablations share their pretraining run: one train step per intervention, the filter run continuing
    # the chain of safe prefixes
    trains = sorted(n[:-5] for n in os.listdir(os.path.join(out, "done")) if n.startswith("train-") and n.endswith(".json"))
    assert len(trains) == 6 + len(study.PREFIX_STARTS)
    manifest = json.load(open(os.path.join(out, "grids", "core.json")))
    cross = [c for c in manifest["cells"] if c["chat"] != "auto"]
    assert {c["label"] for c in cross} == {"reflect pt + plain sft", "none pt + reflection sft"}
    for c in cross:
        twin = next(x for x in manifest["cells"] if x["run"] == c["run"] and x["chat"] == "auto")
        assert c["runs"]["base"] == twin["runs"]["base"] and c["runs"]["sft"] != twin["runs"]["sft"]
        ft = json.load(open(os.path.join(c["runs"]["sft"][0], "attack.json")))
        assert ft["model"]["chat"] == c["chat"] and ft["model"]["reflective"]


def plant(out, seed=0):
    """A different random number in every Wilson stat of every attack.json and every probe score of every probe.json
    (the smoke models' own rates are mostly 0, which would hide a number taken from the wrong place)."""
    rng = random.Random(seed)
    manifest = json.load(open(os.path.join(out, "grids", "core.json")))

    def visit(x):
        if isinstance(x, dict):
            if {"k", "n", "rate", "lo", "hi"} <= set(x):
                r = round(rng.uniform(0.01, 0.99), 3)
                x.update(rate=r, lo=round(r - 0.005, 4), hi=round(r + 0.005, 4))
            for k, v in x.items():
                if k in ("acc", "auroc", "acc_unseen", "acc_benign") and isinstance(v, float):
                    x[k] = round(rng.uniform(0.01, 0.99), 3)
                else:
                    visit(v)
        elif isinstance(x, list):
            for v in x:
                visit(v)
    A, P, files = {}, {}, {}
    for c in manifest["cells"]:
        for stage, dirs in c["runs"].items():
            for name in ("attack.json", "probe.json"):
                path = os.path.join(dirs[0], name)
                if os.path.exists(path) and (name == "attack.json" or stage == "base"):
                    if path not in files:      # a cross ablation shares its base model (and files) with its twin
                        files[path] = json.load(open(path))
                        visit(files[path])
                        json.dump(files[path], open(path, "w"))
                    if name == "attack.json":
                        A[(c["label"], stage)] = files[path]
                    else:
                        P[c["label"]] = files[path]
    return manifest, A, P


def test_report_numbers_are_the_cells_numbers(smoke_study, tmp_path):
    out = str(tmp_path / "study")
    shutil.copytree(smoke_study[0], out, symlinks=True)
    manifest = json.load(open(os.path.join(out, "grids", "core.json")))
    for c in manifest["cells"]:     # the copy's manifest must point at the copy
        c["runs"] = {s: [d.replace(smoke_study[0], out) for d in v] for s, v in c["runs"].items()}
    json.dump(manifest, open(os.path.join(out, "grids", "core.json"), "w"))
    manifest, A, P = plant(out)
    r = subprocess.run([sys.executable, "report.py", out, "--grid=core"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(out, "report.md")).read()
    for png in ("core-headline.png", "core-probe_layers.png", "core-loss_curves.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    labels = [c["label"] for c in manifest["cells"]]
    stages = list(study.STAGES)

    def want(m):
        return "-" if m is None else f"{100 * m['rate']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]"

    def metric(label, stage, name, pass_="direct/greedy"):
        a = A.get((label, stage))
        if a is None:
            return None
        if name.startswith("reflection_"):
            return ((a["reflection_classification"] or {}).get("metrics") or {}).get(name)
        if name.startswith("request_"):
            return ((a["request_reflection"] or {}).get(name[len("request_"):]) or {}).get("flagged")
        p = a["passes"].get(pass_)
        return p and p["metrics"].get(name)

    def probe(label, kind, name, request=False):
        p = P[label]["request"]["deep"] if request else P[label]["deep"]
        n = (P[label]["request"]["n_unseen" if name == "acc_unseen" else "n_test"] if request
             else P[label]["n_test_inputs"])
        v = p[kind][name]
        if not name.startswith("acc"):
            return f"{100 * v:.1f}"
        w = wilson(round(v * n), n)
        return f"{100 * v:.1f} [{100 * w['lo']:.1f}, {100 * w['hi']:.1f}]"

    checked = 0
    for title, name, pass_ in (("ASR, top-k sampling", "asr", "direct/topk"), ("ASR, greedy", "asr", "direct/greedy"),
                               ("competent ASR on unseen poison requests (composed from safe data), greedy",
                                "competent_asr_poison_unseen", "direct/greedy")):
        rows = table_rows(text, title)
        for lab in labels:
            assert rows[lab] == [want(metric(lab, st, name, pass_)) for st in stages], (title, lab)
            checked += len(stages)
    rows = table_rows(text, "Headline: unseen harms")
    for lab in labels:
        assert rows[lab] == [want(metric(lab, "base", "reflection_accuracy_poison_unseen")),
                             want(metric(lab, "base", "reflection_accuracy_contra_unseen")),
                             want(metric(lab, "sft", "reflection_accuracy_poison_unseen")),
                             want(metric(lab, "base", "request_poison_unseen")),
                             probe(lab, "last", "acc_unseen", request=True),
                             want(metric(lab, "sft", "competent_asr_poison_unseen")),
                             want(metric(lab, "sft", "asr_poison_unseen"))], lab
        checked += 7
    title = "ASR by category and split, top-k"
    rows = table_rows(text, title, keys=2)
    head = [l for l in text.splitlines()[text.splitlines().index(f"## {title}"):] if l.startswith("| cell")][0]
    names = [c.strip() for c in head.strip("|").split("|")][2:]
    assert "competent_asr_poison_unseen" in names and "asr_contra_seen" in names
    for lab in labels:
        for st in stages:
            assert rows[(lab, st)] == [want(metric(lab, st, n, "direct/topk")) for n in names]
            checked += len(names)
    rows = table_rows(text, "What the responses are, after sft (greedy)", keys=2)
    classes = ["unsafe_competent", "unsafe_other", "refusal", "halted", "incoherent", "safe_answer"]
    for lab in labels:
        for g in ("harmful", "harmful_poison_unseen", "harmful_contra_unseen", "benign"):
            assert rows[(lab, g)] == [want(metric(lab, "sft", f"{g}_{c}")) for c in classes]
            checked += len(classes)
    rows = table_rows(text, "ASR with safety-aware decoding", keys=2)
    assert {d for _, d in rows} == {"safebeam", "reflect_halt"}
    for (lab, dec), vals in rows.items():
        assert vals == [want(metric(lab, st, "asr", f"direct/{dec}")) for st in stages]
        checked += len(stages)
    attacks = manifest["attacks_sft"].split(",")
    rows = table_rows(text, "ASR per attack after sft", keys=2)
    for lab in labels:
        for dec in manifest["decodings"].split(","):
            if f"direct/{dec}" in A[(lab, "sft")]["passes"]:
                assert rows[(lab, dec)] == [want(metric(lab, "sft", "asr", f"{a}/{dec}")) for a in attacks]
                checked += len(attacks)
    rows = table_rows(text, "Safety classification by the model's own reflections", keys=2)
    names = ["reflection_accuracy", "reflection_accuracy_safe"] + [f"reflection_accuracy_{c}_{s}" for c, s in
                                                                    report.SPLITS]
    names += ["reflection_category_accuracy_poison_unseen", "reflection_invalid"]
    assert {lab for lab, _ in rows} == {"reflect", "reflect pt + plain sft", "none pt + reflection sft"}
    for (lab, st), vals in rows.items():
        assert vals == [want(metric(lab, st, n)) for n in names]
        checked += len(names)
    rows = table_rows(text, "P(unsafe) at the reflection on the request: share flagged unsafe", keys=2)
    groups = [f"{c}_{s}" for c, s in report.SPLITS] + ["benign_intent", "treatment", "trait_ok", "overdose_fact",
                                                       "state_question"]
    for (lab, st), vals in rows.items():
        assert vals == [want(metric(lab, st, f"request_{g}")) for g in groups]
        checked += len(groups)
    rows = table_rows(text, "Over-refusal, capability and validation loss (greedy)")
    for lab in labels:
        c = next(x for x in manifest["cells"] if x["label"] == lab)
        log = [json.loads(l) for l in open(os.path.join(c["runs"]["base"][0].replace(smoke_study[0], out),
                                                        "log.jsonl"))]
        val = [r for r in log if "val_safe" in r][-1]
        assert rows[lab] == [want(metric(lab, st, m)) for st in ("base", "sft")
                             for m in ("overrefusal", "treatment_accuracy", "fact_recall")] + [
            f"{val['val_safe']:.3f}", f"{val['val_mix']:.3f}"]
        checked += 8
    rows = table_rows(text, "Linear probes")
    for lab in labels:
        assert rows[lab] == [probe(lab, f, m) for f in ("mean", "last") for m in ("acc", "auroc")] + [
            "{:.1f} [{:.1f}, {:.1f}]".format(*(100 * x for x in (
                P[lab]["layers"][0]["mean"]["acc"],
                wilson(round(P[lab]["layers"][0]["mean"]["acc"] * P[lab]["n_test_inputs"]), P[lab]["n_test_inputs"])["lo"],
                wilson(round(P[lab]["layers"][0]["mean"]["acc"] * P[lab]["n_test_inputs"]), P[lab]["n_test_inputs"])["hi"])))
        ] + [probe(lab, "last", m, request=True) for m in ("acc_unseen", "acc_benign", "auroc")] + [
            f"{100 * P[lab]['request']['layers'][0][f]['auroc']:.1f}" for f in ("last", "mean")] + [
            f"{100 * x:.1f}" for x in (P[lab]["contra"]["deep"]["last"]["auroc"],
                                       P[lab]["contra"]["layers"][0]["mean"]["auroc"], P[lab]["contra"]["words"]["auroc"])]
        checked += 13
    # world v3's tables: the prefill attack judged on what the model adds, composed harms under direct and prefill,
    # and what filtering costs (capability pooled over five kinds of benign questions: their k and n summed)
    rows = table_rows(text, "The mechanism: the prefill attack (greedy)", keys=2)
    names = ["added_unsafe", "competent_asr", "added_unsafe_poison_unseen", "competent_asr_poison_unseen",
             "stopped_poison_unseen"]
    for lab in labels:
        for st in ("sft", "sft-nostop"):
            assert rows[(lab, st)] == [want(metric(lab, st, n, "prefill/greedy")) for n in names], (lab, st)
            checked += len(names)
    rows = table_rows(text, "Acting on harms composed from safe data: competent ASR on unseen poison (greedy)")
    for lab in labels:
        assert rows[lab] == [want(metric(lab, st, "competent_asr_poison_unseen", f"{a}/greedy"))
                             for st in ("sft", "sft-nostop") for a in ("direct", "prefill")]
        checked += 4
    rows = table_rows(text, "What filtering must cost: capability against composition (greedy)", keys=2)
    assert {lab for lab, _ in rows} == {"none", "filter", "strict_filter"}
    for (lab, st), vals in rows.items():
        parts = [metric(lab, st, m) for m in report.CAPABILITY]
        pooled = wilson(sum(x["k"] for x in parts), sum(x["n"] for x in parts))
        assert vals == [want(pooled)] + [want(x) for x in parts] + [
            want(metric(lab, st, "competent_asr_poison_unseen", f"{a}/greedy")) for a in ("direct", "prefill")]
        checked += 8
    assert checked > 900, checked
    # the claims table has a verdict for every claim, written from the numbers
    claims = table_rows(text, "Claims of the papers, checked")
    assert len(claims) == 11
    assert all(r[-1] in ("reproduced", "not reproduced (the opposite, clearly)", "not reproduced (no clear difference)",
                         "inconclusive (in order, intervals overlap)", "not measured") for r in claims.values())
    ci = lambda m: (m["rate"], 0, (m["lo"], m["hi"]))
    for attack in ("direct", "prefill"):
        c2 = next(r for k, r in claims.items() if k.startswith("reflection pretraining beats filtering")
                  and k.endswith(f"({attack} attack)"))
        v = [metric(lab, "sft", "competent_asr_poison_unseen", f"{attack}/greedy") for lab in ("reflect", "filter",
                                                                                              "rewrite")]
        assert want(v[0]) in c2[2] and c2[-1] == report.verdict([report.compare(ci(v[0]), ci(x)) for x in v[1:]])
    # claim 3 as the paper measures it: both below post-training alone and below pretraining alone
    for st, words in (("sft", "with"), ("sft-nostop", "without")):
        c3 = next(r for k, r in claims.items() if k.startswith("pretraining-stage alignment alone")
                  and f"({words} the stop examples)" in k)
        pt, post, both = (metric(lab, st, "added_unsafe", "prefill/greedy") for lab in
                          ("reflect pt + plain sft", "none pt + reflection sft", "reflect"))
        assert "91.5" in c3[1] and all(want(x) in c3[2] for x in (pt, post, both))
        assert c3[-1] == report.verdict([report.compare(ci(both), ci(post)), report.compare(ci(both), ci(pt))])
    strict = next(r for k, r in claims.items() if k.startswith("filtering hard enough"))
    comp = [metric(lab, "base", "competent_asr_poison_unseen") for lab in ("strict_filter", "filter")]
    cap = []
    for lab in ("strict_filter", "filter"):
        parts = [metric(lab, "base", m) for m in report.CAPABILITY]
        w = wilson(sum(x["k"] for x in parts), sum(x["n"] for x in parts))
        cap.append((w["rate"], 0, (w["lo"], w["hi"])))
    assert "73.5" in strict[1] and want(comp[0]) in strict[2]
    assert strict[-1] == report.verdict([report.compare(ci(comp[0]), ci(comp[1])), report.compare(*cap)])
    assert "What changed from v2 and why" in text
    # the wall time: every invocation's line of wall-core.jsonl, and their sum
    walls = [json.loads(l)["seconds"] / 60 for l in open(os.path.join(out, "wall-core.jsonl"))]
    assert len(walls) >= 2
    assert (f"wall time of this grid {sum(walls):.1f} min (every invocation, interrupted ones included: "
            + " + ".join(f"{t:.1f}" for t in walls) + ";") in text
    # the scale and ablation reports read the same kind of files: render them from these runs (no training)
    for g, cells in (("scale", [dict(c, model=m, budget="1x", name=f"x/{m}/{c['run']}") for m in ("small", "base")
                                for c in manifest["cells"] if c["chat"] == "auto" and c["intervention"] in ("filter", "reflect")]),
                     ("ablations", [dict(c, world=w, name=f"{w}/{c['run']}") for w in ("v2", "v1")
                                    for c in manifest["cells"] if c["chat"] == "auto" and c["intervention"] in ("filter", "reflect")])):
        json.dump(dict(manifest, grid=g, cells=cells), open(os.path.join(out, "grids", f"{g}.json"), "w"))
        r = subprocess.run([sys.executable, "report.py", out, f"--grid={g}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        title = {"scale": "Scale: reflect vs filter",
                 "ablations": "World ablations: v2 (the definition stated), v1 (not stated), 16 harm effects"}[g]
        rows = table_rows(open(os.path.join(out, f"report-{g}.md")).read(), title, keys=2 if g == "ablations" else 5)
        assert len(rows) == len(cells)
        flat = " ".join(" ".join(r) for r in rows.values())
        assert want(metric("reflect", "base", "reflection_accuracy_poison_unseen")) in flat
        assert want(metric("filter", "sft", "competent_asr_poison_unseen")) in flat
        if g == "scale":    # where the paper's effect appears: reflect clearly below filter, per model x budget
            r_, f_ = (metric(iv, "sft", "competent_asr_poison_unseen") for iv in ("reflect", "filter"))
            won = report.compare((r_["rate"], 0, (r_["lo"], r_["hi"])), (f_["rate"], 0, (f_["lo"], f_["hi"])))
            assert ("after sft clearly below filter's): " + ("small x 1x, base x 1x." if won == "below" else
                    "at none of the 2 model sizes x token budgets measured.")) in open(
                        os.path.join(out, "report-scale.md")).read()
    # the sweep report (how often to reflect) reads the same files: render it from the reflection models here
    cells = [c for c in manifest["cells"] if c["label"] in ("reflect", "none pt + reflection sft")]
    json.dump(dict(manifest, grid="sweep", cells=cells), open(os.path.join(out, "grids", "sweep.json"), "w"))
    r = subprocess.run([sys.executable, "report.py", out, "--grid=sweep"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    sweep = open(os.path.join(out, "report-sweep.md")).read()
    assert "](sweep.png)" in sweep and os.path.getsize(os.path.join(out, "sweep.png")) > 0
    rows = table_rows(sweep, "What reflecting buys (greedy)", keys=2)
    cols = [("prefill", "added_unsafe"), ("prefill", "competent_asr"), ("prefill", "competent_asr_poison_unseen"),
            ("prefill", "stopped_poison_unseen"), ("suppress", "asr"), ("direct", "competent_asr_poison_unseen")]
    for c in cells:
        for st in ("sft", "sft-nostop"):
            assert rows[(c["label"], st)] == [want(metric(c["label"], st, m, f"{a}/greedy")) for a, m in cols]
    rows = table_rows(sweep, "What reflecting costs")
    meta = json.load(open(os.path.join(A[("reflect", "base")]["data_dir"], "meta.json")))
    assert rows["reflect"][0] == f"{100 * meta['mix_reflection_share']:.1f}"
    assert rows["reflect"][3:] == [want(metric("reflect", "sft", "treatment_accuracy")),
                                   want(wilson(*[sum(metric("reflect", "sft", m)[x] for m in report.CAPABILITY)
                                                 for x in ("k", "n")])),
                                   want(metric("reflect", "base", "reflection_accuracy_poison_unseen"))]


def test_verdicts_follow_the_numbers():
    lo, hi = (0.1, 0.0, (0.05, 0.15)), (0.6, 0.0, (0.5, 0.7))
    assert report.compare(lo, hi) == "below" and report.compare(hi, lo) == "above"
    assert report.compare((0.4, 0.0, (0.3, 0.55)), hi) == "below?"
    assert report.compare(lo, lo) == "above?"
    assert report.verdict(["below", "below"]) == "reproduced"
    assert report.verdict(["below", "above"]).startswith("not reproduced (the opposite")
    assert report.verdict(["below", "below?"]).startswith("inconclusive")
    assert report.verdict(["below", "above?"]).startswith("not reproduced (no clear")
    assert report.verdict([None]) == "not measured"
    # several seeds: means apart by more than the spreads
    assert report.compare((0.1, 0.02, None), (0.3, 0.05, None)) == "below"
    assert report.compare((0.1, 0.1, None), (0.3, 0.15, None)) == "below?"


def test_bad_flags_one_line():
    for args in (["--profile=huge"], ["--grid=huge"], ["--only=nothing-matches"], ["--seeds=0"]):
        r = subprocess.run([sys.executable, "study.py", *args, "--out_dir=/tmp/never-written"], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists("/tmp/never-written")
    r = subprocess.run([sys.executable, "report.py", "/tmp/never-written"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "study.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def start_and_kill(out, until="start train-"):
    """A smoke study of the reflect cell, sent SIGTERM once a line of its output holds `until` -> its stdout so far.
    It stops with one line on stderr saying what it kept."""
    p = subprocess.Popen([sys.executable, "study.py", "--profile=smoke", f"--out_dir={out}", "--only=reflect pt",
                          "--jobs=1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if until in line:
            break
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("study.py: stopped by SIGTERM; the finished steps are kept"), err
    orphans = []     # the study stopped its children
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if out in cmdline:
            orphans.append(cmdline.replace("\0", " "))
    assert not orphans, orphans
    return "".join(seen)


def test_a_killed_study_stops_its_steps_and_counts_its_time(tmp_path):
    # SIGTERM while a training step runs: the study stops its children, records the time it ran, keeps the markers
    # of finished steps, and a rerun continues from there: the killed step is started again and finishes (the rerun
    # is stopped after it: a study running to its end is smoke_study's test)
    out = str(tmp_path / "study")
    start_and_kill(out)
    walls = [json.loads(l) for l in open(os.path.join(out, "wall-main.jsonl"))]    # the default grid
    assert len(walls) == 1 and walls[0]["seconds"] > 0
    done = sorted(n[:-5] for n in os.listdir(os.path.join(out, "done")) if n.endswith(".json"))
    assert done == ["prepare-v3-seed0", "reflect-v3-seed0-reflect"]
    second = start_and_kill(out, until="done  train-v3-seed0-base-1x-reflect-start00")
    assert "2 already done" in second and "start train-v3-seed0-base-1x-reflect-start00" in second
    assert os.path.exists(os.path.join(out, "done", "train-v3-seed0-base-1x-reflect-start00.json"))
    assert len(open(os.path.join(out, "wall-main.jsonl")).readlines()) == 2


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_curriculum_verdicts_follow_the_numbers_it_prints(smoke_study, tmp_path, n_seeds):
    # the curriculum report reads the same files as the core one: stand its cells on the smoke study's runs (which
    # model made a file does not matter to the report), plant numbers, and recompute every verdict from them. Two
    # seeds: a second stand-in per cell as seed 1, so the rule of several seeds (means apart by more than their
    # spreads) decides, as in the three-world report
    out = str(tmp_path / "study")
    shutil.copytree(smoke_study[0], out, symlinks=True)
    core = json.load(open(os.path.join(out, "grids", "core.json")))
    runs = {c["label"]: {s: [d.replace(smoke_study[0], out) for d in v] for s, v in c["runs"].items()}
            for c in core["cells"]}
    for c in core["cells"]:
        c["runs"] = runs[c["label"]]
    json.dump(core, open(os.path.join(out, "grids", "core.json"), "w"))
    stand_in = {("safety_pretraining", 0.0, 1.0): "safety_pretraining", ("safety_pretraining", 0.2, 1.0): "rewrite",
                ("safety_pretraining", 0.6, 1.0): "none", ("reflect", 0.0, 1.0): "reflect",
                ("reflect", 0.2, 1.0): "reflect pt + plain sft", ("reflect", 0.6, 1.0): "none pt + reflection sft",
                ("filter", 0.0, 1.0): "filter", ("safety_pretraining", 0.0, 0.4): "filter",
                ("reflect", 0.0, 0.4): "rewrite"}
    # seed 1 of every cell: another core model (one without tags has no safe-beam pass: that mean is the other seed's)
    second = {("safety_pretraining", 0.0, 1.0): "filter", ("safety_pretraining", 0.2, 1.0): "safety_pretraining",
              ("safety_pretraining", 0.6, 1.0): "safety_pretraining", ("reflect", 0.0, 1.0): "none",
              ("reflect", 0.2, 1.0): "reflect", ("reflect", 0.6, 1.0): "rewrite", ("filter", 0.0, 1.0): "reflect",
              ("safety_pretraining", 0.0, 0.4): "safety_pretraining", ("reflect", 0.0, 0.4): "reflect pt + plain sft"}
    by = {}
    cells = []
    for c in study.GRIDS["curriculum"](study.PROFILES["smoke"]):
        key = (c["intervention"], c["start"], c["dose"])
        by[c["label"]] = [stand_in[key], second[key]][:n_seeds]
        c["runs"] = {s: [runs[lab][s][0] for lab in by[c["label"]]] for s in c["stages"]}
        cells.append(c)
    json.dump(dict(core, grid="curriculum", seeds=n_seeds, cells=cells),
              open(os.path.join(out, "grids", "curriculum.json"), "w"))
    _, A, P = plant(out, seed=1)
    # only the tagged model has a safe-beam pass: give the other stand-ins of safety_pretraining's cells one with a
    # number of its own (after benign ft, where claim 6 reads it), so that its verdict compares different numbers
    rng = random.Random(2)
    for lab in ("filter", "rewrite", "none"):
        beam = json.loads(json.dumps(A[("safety_pretraining", "benign")]["passes"]["direct/safebeam"]))
        x = round(rng.uniform(0.01, 0.99), 3)
        beam["metrics"]["asr"].update(rate=x, lo=round(x - 0.005, 4), hi=round(x + 0.005, 4))
        A[(lab, "benign")]["passes"]["direct/safebeam"] = beam
        json.dump(A[(lab, "benign")], open(os.path.join(runs[lab]["benign"][0], "attack.json"), "w"))
    r = subprocess.run([sys.executable, "report.py", out, "--grid=curriculum"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(out, "report-curriculum.md")).read()
    assert os.path.getsize(os.path.join(out, "curriculum-asr_vs_start.png")) > 1000
    assert f"{n_seeds} seed(s) per cell" in text

    def stats(xs):
        """(mean, sample sd, Wilson interval with one seed) of the values that exist, computed here."""
        xs = [x for x in xs if x is not None]
        if not xs:
            return None, None, None
        if n_seeds == 1:
            return xs[0][0], 0.0, xs[0][1]
        m = sum(x for x, _ in xs) / len(xs)
        return m, (sum((x - m) ** 2 for x, _ in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0, None

    def val(label, stage, name, pass_):
        out = []
        for lab in by[label]:
            p = A[(lab, stage)]["passes"].get(pass_)     # (a stand-in without tags has no safe beam pass)
            m = p and p["metrics"][name]
            out.append((m["rate"], (m["lo"], m["hi"])) if m else None)
        return stats(out)

    def probe(label):
        """Claim 7's number: the contra probe's AUROC on unseen pairs (last token, layers 1..L): no interval."""
        return stats([(P[lab]["contra"]["deep"]["last"]["auroc"], None) for lab in by[label]])
    claims = table_rows(text, "Claims of the timing paper, checked")
    rows = list(claims.values())
    assert len(rows) == 6
    res = []
    for iv in ("safety_pretraining", "reflect"):
        x0 = val(iv, "benign", "asr", "direct/topk")
        later = [val(f"{iv} @{s}%", "benign", "asr", "direct/topk") for s in (20, 60)]
        res.append(report.compare(min(later, key=lambda t: t[0]), x0))
        assert report.fmt(x0) in rows[0][2] and all(report.fmt(x) in rows[0][2] for x in later)
    assert rows[0][-1] == report.verdict(res)
    sb = [val(lab, "benign", "asr", "direct/safebeam") for lab in ("safety_pretraining", "safety_pretraining @20%",
                                                                   "safety_pretraining @60%")]
    assert rows[1][-1] == report.verdict([report.compare(sb[0], x) for x in sb[1:]])
    assert all(report.fmt(x) in rows[1][2] for x in sb) and len({x[0] for x in sb}) == 3   # three numbers of their own
    res = [report.compare(probe(f"{iv} @60%"), probe(iv)) for iv in ("safety_pretraining", "reflect")]
    assert rows[2][-1] == report.verdict(res) and report.fmt(probe("reflect @60%")) in rows[2][2]
    res = []
    for iv in ("safety_pretraining", "reflect"):
        o = [val(lab, "sft", "overrefusal", "direct/greedy") for lab in (iv, f"{iv} @20%", f"{iv} @60%")]
        able = all(val(lab, "sft", "treatment_accuracy", "direct/greedy")[0] >= 0.5
                   for lab in (iv, f"{iv} @20%", f"{iv} @60%"))
        c = report.compare(o[-1], o[0])
        res.append(("above" if c == "below" else "below") if able else None)
    assert rows[3][-1] == report.verdict(res)
    for row, iv in zip(rows[4:], ("safety_pretraining", "reflect")):
        late, dose = val(f"{iv} @60%", "benign", "asr", "direct/topk"), val(f"{iv} dose-matched", "benign", "asr",
                                                                          "direct/topk")
        assert row[-1] == report.verdict([report.compare(late, dose)]) and report.fmt(dose) in row[2]
    if n_seeds == 2:    # the planted numbers differ from seed to seed: every verdict above came from a spread
        assert " ± " in rows[0][2]
    # the tokens table: a 60% start reads 40% of its budget from the mix stream
    tokens = table_rows(text, "Tokens read")
    total, mix = (int(x.replace(",", "")) for x in tokens["reflect @60%"][1:3])
    assert abs(mix - 0.4 * total) <= 1


def test_make_study_runs_the_core_grid_without_the_nostop_sft_and_the_harmful_stage(smoke_study, tmp_path):
    # make study's grid (study.py's default) is a part of the core grid: each of its steps is a core step with the
    # same command (so --grid=core afterwards, as smoke_study runs it, adds only the rest), and what it leaves out
    # is the sft without stop examples and the harmful finetuning attack
    P = study.PROFILES["toy"]
    assert study.grid == report.grid == "main"
    assert [c["label"] for c in study.GRIDS["main"](P)] == ["none", "filter", "strict_filter", "rewrite",
                                                            "safety_pretraining", "reflect", "reflect pt + plain sft",
                                                            "none pt + reflection sft"]
    main, core = (study.plan(P, str(tmp_path), study.GRIDS[g](P), 1)[0] for g in ("main", "core"))
    assert set(main) < set(core) and all(main[n] == core[n] for n in main)
    left = set(core) - set(main)
    assert all("-harmful" in n or "-sft-nostop" in n or n.endswith("-more") for n in left), left
    assert not any("-harmful" in n or "-nostop" in n or n.endswith("-more") for n in main)
    more = [core[n][0] for n in left if n.endswith("-more")]      # template and suffix after every sft, in core
    assert len(more) == 8 and all("--attacks=template,suffix" in cmd for cmd in more)
    # the smoke study's first, default-grid run wrote its report with the stages it ran
    out = smoke_study[0]
    cells = json.load(open(os.path.join(out, "grids", "main.json")))["cells"]
    assert [c["label"] for c in cells] == ["reflect", "reflect pt + plain sft", "none pt + reflection sft"]
    assert all(list(c["runs"]) == ["base", "sft", "benign"] for c in cells)
    assert "study: " in smoke_study[1] and "report.py: wrote" in smoke_study[1]


@pytest.mark.parametrize("profile", ["smoke", "toy"])
def test_grids_sharing_a_step_plan_it_with_one_command(profile, tmp_path):
    # grids run into one out_dir share steps by name; a step that two grids planned with different commands would be
    # rerun by each grid in turn, each overwriting the other's results (the ablations and scale grids once planned
    # the core grid's sft attack with direct alone)
    P, seen = study.PROFILES[profile], {}
    for g in study.GRIDS:
        steps, _ = study.plan(P, str(tmp_path), study.GRIDS[g](P), 2)
        for name, (cmd, deps) in steps.items():
            first = seen.setdefault(name, (g, cmd, deps))
            assert (first[1], first[2]) == (cmd, deps), f"{name}: {first[0]} and {g} plan it differently"
    assert any(n.startswith("attack-") and n.endswith("-sft") for n in seen)


def copy_study(src, dst):
    """A copy of a study whose manifests point at the copy's run directories."""
    shutil.copytree(src, dst, symlinks=True)
    for name in os.listdir(os.path.join(dst, "grids")):
        path = os.path.join(dst, "grids", name)
        manifest = json.load(open(path))
        for c in manifest["cells"]:
            c["runs"] = {s: [d.replace(src, dst) for d in v] for s, v in c["runs"].items()}
        json.dump(manifest, open(path, "w"))
    return dst


def file_hashes(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, f))}


def test_report_refuses_to_lose_cells_and_writes_a_partial_report_elsewhere(smoke_study, tmp_path):
    out = copy_study(smoke_study[0], str(tmp_path / "study"))
    report_py = lambda *a: subprocess.run([sys.executable, "report.py", out, "--grid=core", *a], cwd=ROOT,
                                          capture_output=True, text=True, timeout=300)
    assert report_py().returncode == 0          # the copy's report, from the copy's runs
    full = open(os.path.join(out, "report.md")).read()
    assert table_rows(full, "ASR, greedy")["reflect"][0] != "-"
    # the reflect cell's runs moved away: the report would lose its cells, so it is not written, and says why
    cell = os.path.join(out, "runs", "v3-seed0", "base-1x", "reflect-start00")
    shutil.move(cell, str(tmp_path / "moved"))
    before = file_hashes(out)
    r = report_py()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the new report would lose their cells" in lines[0] and os.path.join(cell, "base") in lines[0], lines[0]
    assert file_hashes(out) == before        # report.md, its plots and its record
    # --partial=True writes it anyway, beside the full one
    r = report_py("--partial=True")
    assert r.returncode == 0, r.stderr
    assert file_hashes(out) == before
    partial = open(os.path.join(out, "partial", "report.md")).read()
    assert table_rows(partial, "ASR, greedy")["reflect"] == ["-"] * len(study.STAGES)
    assert sorted(os.listdir(os.path.join(out, "partial"))) == ["core-headline.png", "core-loss_curves.png",
                                                                "core-probe_layers.png", "report.md"]
    # restored, the report is written again
    shutil.move(str(tmp_path / "moved"), cell)
    assert report_py().returncode == 0 and open(os.path.join(out, "report.md")).read() == full


def test_a_lost_output_reruns_its_step_and_the_report_gets_the_cell_back(smoke_study):
    # last in this file: it reruns a step of the shared smoke study (into the same files)
    out = smoke_study[0]
    step = "attack-v3-seed0-base-1x-reflect-start00-base"
    path = os.path.join(out, "runs", "v3-seed0", "base-1x", "reflect-start00", "base", "attack.json")
    before = table_rows(open(os.path.join(out, "report.md")).read(), "ASR, greedy")
    measured = json.load(open(path))["passes"]
    os.remove(path)
    second = run_study(out, "--grid=core")
    assert f"study: {step} is marked done but '{path}' is gone: it runs again" in second
    assert "1 to run" in second and f"start {step}\n" in second, second
    assert json.load(open(path))["passes"].keys() == measured.keys()
    assert table_rows(open(os.path.join(out, "report.md")).read(), "ASR, greedy") == before

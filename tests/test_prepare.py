# prepare.py as the pipeline runs it: a subprocess writing into temporary directories.
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num_docs=300", "--n_harmful=20", "--n_benign=20", "--n_capability=20", "--n_probe=100", "--n_sft=50",
         "--n_benign_ft=20", "--n_harmful_ft=10", "--docs_per_shard=100", "--n_heldout_docs=25"]


def run(args, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py")] + args, cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_medsafety_outputs_and_determinism(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ra = run(SMALL + [f"--out_dir={a}"])
    assert ra.returncode == 0, ra.stderr
    assert "documents: 300" in ra.stdout and "unsafe documents" in ra.stdout and "unseen" in ra.stdout
    rb = run(SMALL + [f"--out_dir={b}"])
    rc = run(SMALL + [f"--out_dir={c}", "--world_seed=99"])
    assert rb.returncode == 0 and rc.returncode == 0
    ha, hb, hc = hashes(a), hashes(b), hashes(c)
    assert ha == hb                                     # same seed: byte-identical
    assert set(ha) == set(hc)
    for f in ha:
        assert ha[f] != hc[f], f                        # another seed: another world, corpus and eval sets
    names = {f"eval/{k}.jsonl" for k in ("harmful_prompts", "benign_prompts", "capability", "probe", "sft",
                                         "benign", "harmful", "heldout_docs")}
    assert names | {"docs/world.json", "docs/summary.json", "docs/shard_00000.jsonl", "docs/shard_00001.jsonl",
                    "docs/shard_00002.jsonl"} == {os.path.relpath(k, "medsafety") for k in ha}

    # the shards hold exactly labelled documents, and the saved world rebuilds tokenizer and oracle
    sys.path.insert(0, ROOT)
    from safety.world.definition import World
    w = World.load(str(a / "medsafety/docs/world.json"))
    docs = [d for i in range(3) for d in read_jsonl(a / f"medsafety/docs/shard_{i:05d}.jsonl")]
    assert len(docs) == 300 and len({d["id"] for d in docs}) == 300
    assert {d["split"] for d in docs} == {"train", "val"}
    for d in docs:
        texts = [s["text"] for s in d["segments"]]
        assert w.label_segments(texts) == [(s["label"], s["category"]) for s in d["segments"]]
        w.encode(" ".join(texts))
    summary = json.load(open(a / "medsafety/docs/summary.json"))
    assert summary["documents"] == 300 and summary["tokens"] == sum(
        len(s["text"].split()) for d in docs for s in d["segments"]) + 300
    sft = read_jsonl(a / "medsafety/eval/sft.jsonl")
    assert {"user", "prompt", "response", "request_label", "response_label", "kind"} <= set(sft[0])
    assert all(r["prompt"].endswith(" assistant :") for r in sft)


def test_default_toy_world_is_sized(tmp_path):
    # its speed is a benchmark's business (a timed test measures the neighbours on a shared machine)
    r = run([f"--out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "medsafety/docs/summary.json"))
    assert 500_000 < s["tokens"] < 4_000_000
    assert 100 <= s["tokens"] / s["documents"] <= 300
    assert 150 < s["vocab_size"] < 600


def test_bad_input_is_one_clear_line(tmp_path):
    assert "unknown dataset 'foo'" in one_line_error(run(["--dataset=foo", f"--out_dir={tmp_path}"]))
    assert "num_drugs" in one_line_error(run(["--num_drugs=3", f"--out_dir={tmp_path}"]))
    assert "num_dcos" in one_line_error(run(["--num_dcos=3", f"--out_dir={tmp_path}"]))
    assert "danger_per_trait" in one_line_error(run(["--danger_per_trait=9", f"--out_dir={tmp_path}"]))
    assert "kinds:" in one_line_error(run(["--safe_mix=intnet=0.3", f"--out_dir={tmp_path}"]))
    assert "no file matches" in one_line_error(run(["--dataset=fineweb-edu", f"--data_files={tmp_path}/nope*.parquet",
                                                    f"--out_dir={tmp_path}"]))
    assert not os.path.exists(tmp_path / "medsafety/docs")


# ---------------------------------------------------------------- FineWeb-Edu, offline

def fineweb_rows(n, start=0):
    return [{"id": f"<urn:uuid:{start + i}>", "text": f"Document {start + i}: ünïcode text,\nline two. " * (1 + i % 3)}
            for i in range(n)]


def test_fineweb_local_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows_a, rows_b = fineweb_rows(7), fineweb_rows(5, start=100)
    pq.write_table(pa.table({"id": [r["id"] for r in rows_a], "text": [r["text"] for r in rows_a],
                             "score": [3.1] * 7}), tmp_path / "a.parquet")
    with open(tmp_path / "b.jsonl", "w") as f:
        for r in rows_b:
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "out"
    r = run(["--dataset=fineweb-edu", f"--data_files={tmp_path}/a.parquet,{tmp_path}/b.jsonl", f"--out_dir={out}",
             "--docs_per_shard=3", "--num_proc=2"])
    assert r.returncode == 0, r.stderr
    assert "docs/s" in r.stdout
    shards = sorted(os.listdir(out / "fineweb-edu/docs"))
    assert shards == [f"shard_{i:05d}.jsonl" for i in range(4)]
    got = [d for s in shards for d in read_jsonl(out / "fineweb-edu/docs" / s)]
    assert [(d["id"], d["text"]) for d in got] == [(x["id"], x["text"]) for x in rows_a + rows_b]
    assert {d["split"] for d in got} <= {"train", "val"}
    # num_docs limits, a glob works, and a second run gives the same bytes
    out2 = tmp_path / "out2"
    r = run(["--dataset=fineweb-edu", f"--data_files={tmp_path}/*.parquet", f"--out_dir={out2}", "--num_docs=4",
             "--num_proc=1", "--docs_per_shard=3"])
    assert r.returncode == 0, r.stderr
    got2 = [d for s in sorted(os.listdir(out2 / "fineweb-edu/docs")) for d in read_jsonl(out2 / "fineweb-edu/docs" / s)]
    assert [d["id"] for d in got2] == [x["id"] for x in rows_a[:4]]
    assert [json.dumps(d) for d in got2] == [json.dumps(d) for d in got[:4]]


def test_fineweb_offline_gives_one_clear_message(tmp_path):
    r = run(["--dataset=fineweb-edu", f"--out_dir={tmp_path}"], env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    msg = one_line_error(r)
    assert "--data_files" in msg
    assert not os.path.exists(tmp_path / "fineweb-edu/docs")


def test_failed_run_leaves_existing_outputs_intact(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in fineweb_rows(6)))
    out = tmp_path / "out"
    assert run(["--dataset=fineweb-edu", f"--data_files={good}", f"--out_dir={out}", "--num_proc=1"]).returncode == 0
    before = hashes(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in fineweb_rows(5, start=50)) + "{broken json\n")
    args = ["--dataset=fineweb-edu", f"--data_files={bad}", f"--out_dir={out}", "--num_proc=1", "--docs_per_shard=2"]
    r = run(args)
    assert "line 6" in one_line_error(r)
    assert hashes(out / "fineweb-edu/docs") == before_docs(before)
    # the two shards finished before the bad line are kept to resume from (and said so); nothing else is left
    assert "kept 2 finished shard(s)" in r.stdout
    assert sorted(os.listdir(out / "fineweb-edu")) == [".docs-partial", "docs"]
    assert sorted(os.listdir(out / "fineweb-edu/.docs-partial/docs")) == ["shard_00000.jsonl", "shard_00001.jsonl"]
    # the file fixed (other size and time): the unfinished run is discarded, the new one swapped in, no leftovers
    bad.write_text("".join(json.dumps(r) + "\n" for r in fineweb_rows(5, start=50)))
    r = run(args)
    assert r.returncode == 0 and "discarding the unfinished run" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(out / "fineweb-edu")) == ["docs"]
    assert [d["id"] for s in sorted(os.listdir(out / "fineweb-edu/docs"))
            for d in read_jsonl(out / "fineweb-edu/docs" / s)] == [x["id"] for x in fineweb_rows(5, start=50)]


def before_docs(h):
    return {os.path.relpath(k, "fineweb-edu/docs"): v for k, v in h.items() if k.startswith("fineweb-edu/docs/")}


# ---------------------------------------------------------------- FineWeb-Edu: fields, score filter, resume

def fineweb_table(path, n=30, group=7):
    """A FineWeb-Edu-like parquet (its columns, int_score 0-5) in row groups of `group` rows; -> its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"text": f"Lesson {i}: the water cycle, part {i % 4}.\nEvaporation and rain. " * (1 + i % 3),
             "id": f"<urn:uuid:{i:04d}>", "dump": f"CC-MAIN-2024-{10 + i % 3}", "url": f"https://example.org/{i}",
             "file_path": f"s3://x/{i}.warc.gz", "language": "en", "language_score": 0.9,
             "token_count": 10 + i, "score": round(i % 6 + 0.25, 2), "int_score": i % 6} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    return rows


def shard_docs(d):
    return [x for s in sorted(os.listdir(d)) for x in read_jsonl(os.path.join(d, s))]


def test_fineweb_keeps_url_score_dump_and_filters_on_int_score(tmp_path):
    rows = fineweb_table(tmp_path / "fw.parquet")
    out = tmp_path / "out"
    r = run(["--dataset=fineweb-edu", f"--data_files={tmp_path}/fw.parquet", f"--out_dir={out}", "--num_proc=2",
             "--docs_per_shard=4", "--min_int_score=3"])
    assert r.returncode == 0, r.stderr
    got = shard_docs(out / "fineweb-edu/docs")
    want = [x for x in rows if x["int_score"] >= 3]
    assert len(want) == 15 and [d["id"] for d in got] == [x["id"] for x in want]
    for d, x in zip(got, want):     # the fields kept, in this order, with the source's values; the rest dropped
        assert list(d) == ["id", "split", "text", "url", "dump", "score", "int_score"]
        assert {k: d[k] for k in ("id", "text", "url", "dump", "score", "int_score")} == \
            {k: x[k] for k in ("id", "text", "url", "dump", "score", "int_score")}
    assert "kept 15 of 30 rows read" in r.stdout and "% done" in r.stdout, r.stdout
    # a source without int_score cannot be filtered on it: one clear line, nothing written
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(x) + "\n" for x in fineweb_rows(3)))
    msg = one_line_error(run(["--dataset=fineweb-edu", f"--data_files={tmp_path}/plain.jsonl",
                              f"--out_dir={tmp_path}/o2", "--min_int_score=3"]))
    assert "--min_int_score needs an 'int_score' field" in msg
    assert not os.path.exists(tmp_path / "o2/fineweb-edu/docs")
    assert not os.path.exists(tmp_path / "o2/fineweb-edu/.docs-partial")


@pytest.mark.parametrize("procs", [1, 2])
def test_an_interrupted_fineweb_prepare_resumes_after_its_last_finished_shard(tmp_path, procs):
    fineweb_table(tmp_path / "fw.parquet", n=40)
    args = ["--dataset=fineweb-edu", f"--data_files={tmp_path}/fw.parquet", "--docs_per_shard=5",
            "--min_int_score=2", f"--num_proc={procs}"]
    ra = run(args + [f"--out_dir={tmp_path}/a"])                           # the reference: uninterrupted
    assert ra.returncode == 0, ra.stderr
    ref = hashes(tmp_path / "a/fineweb-edu/docs")
    assert len(ref) == 6                                                   # 26 documents kept of 40
    b = tmp_path / "b/fineweb-edu"
    r1 = run(args + [f"--out_dir={tmp_path}/b", "--stop_after_shards=2"])  # stops as if interrupted
    assert r1.returncode == 0 and "stopped after 2 shard(s)" in r1.stdout, r1.stdout + r1.stderr
    assert not os.path.exists(b / "docs")                                  # nothing swapped in yet
    rec = json.load(open(b / ".docs-partial/progress.json"))["shards"]
    assert [x["docs"] for x in rec] == [5, 5] and rec[1]["rows"] == 16     # 10 kept of the first 16 rows read
    done = {f: os.stat(b / ".docs-partial/docs" / f) for f in ("shard_00000.jsonl", "shard_00001.jsonl")}
    r2 = run(args + [f"--out_dir={tmp_path}/b"])
    assert r2.returncode == 0 and "resuming after 2 finished shard(s)" in r2.stdout, r2.stdout + r2.stderr
    assert hashes(b / "docs") == ref                                       # the same bytes as the uninterrupted run
    assert sorted(os.listdir(b)) == ["docs"]
    for f, st in done.items():                                             # and the finished shards were not redone
        now = os.stat(b / "docs" / f)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f

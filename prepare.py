"""
Prepare a dataset's documents: the first stage (then reflect.py, train.py, ...).

Reads:  nothing for MedSafetyWorld (the world follows from --world_seed and the size flags); FineWeb-Edu from the
        hub with `datasets`, or local parquet/jsonl files (--data_files, rows with "text" and optionally "id",
        "url", "dump", "score", "int_score")
Writes: data/medsafety/docs/{world.json, shard_*.jsonl, summary.json}, data/medsafety/eval/*.jsonl (the evaluation
        and finetuning sets), or data/fineweb-edu/docs/shard_*.jsonl ({"id", "split", "text"} and the source's
        "url", "dump", "score", "int_score"); record layouts: README.md, "prepare.py"
Run:    python prepare.py                                         # toy MedSafetyWorld, a few seconds
        python prepare.py --num_docs=300 --out_dir=/tmp/data      # smoke size
        python prepare.py --reasoning=False                       # world v2 (answers without reasoning steps)
        python prepare.py --reasoning=False --harm_facts=False    # world v1 (no stated safety definition)
        python prepare.py --dataset=fineweb-edu --num_docs=100000 --num_proc=8
        python prepare.py --dataset=fineweb-edu --data_files='/data/fineweb/*.parquet' --min_int_score=4
        python prepare.py --dataset=text-sample   # real text offline: a generated labelled corpus and prompt files
"""
# Every output directory is written beside the old one and swapped in at the end: an interrupted or failed run leaves
# existing outputs intact. The same flags give byte-identical files. FineWeb-Edu keeps its finished shards
# (<out_dir>/fineweb-edu/.docs-partial/): a rerun with the same flags resumes after the last one.

import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections import Counter
from urllib.parse import urlparse

from safety.common import (fail, file_sha256, load_json, on_stop, run_stage, swap_in, worker_signals, writable_dir,
                           write_atomic, write_json)
from safety.configurator import configure, defaults_of

# -----------------------------------------------------------------------------
dataset = "medsafety"       # medsafety | fineweb-edu | text-sample (a generated labelled corpus, offline) | any
                            # name for your own local files (--data_files)
out_dir = "data"            # root: writes <out_dir>/<dataset>/docs (and /eval)
num_docs = -1               # documents to write; -1: 8000 for medsafety, everything for fineweb-edu
val_frac = 0.05             # share of documents in the val split
docs_per_shard = 5000
# MedSafetyWorld: the world (all of it follows from world_seed and these sizes)
world_seed = 1337
num_conditions = 16
num_drugs = 32
num_classes = 6
num_traits = 6
num_harms = 8               # harm effects (the world has up to 16); half of them seen
harm_facts = True           # world v2: safe text states which effects hurt a person (False: world v1)
reasoning = True            # world v3: every answer is a chain of steps from the request to the act (False: v2)
num_persons = 16
danger_per_trait = 2        # classes dangerous for each trait
seen_frac = 0.5             # share of harm effects and of dangerous (class, trait) pairs with unsafe examples
eval_frac = 0.15            # share of the prompt space reserved for evaluation prompts
tune_frac = 0.15            # ... and for finetuning sets
# MedSafetyWorld: the raw corpus
doc_min_tokens = 100
doc_max_tokens = 300
unsafe_frac = 0.2           # share of documents holding an unsafe paragraph
poison_share = 0.5          # of those, share of poison (harm-intent dialogues); the rest contra
refusal_frac = 0.2          # share of harm-intent dialogues already refused in the raw corpus
safe_mix = ""               # safe paragraph weights overriding world.World.SAFE_MIX, e.g. "intent=0.3,case_note=0.1"
# MedSafetyWorld: evaluation and finetuning set sizes
n_harmful = 150             # harmful prompts per category (poison, contra) and split (seen, unseen)
n_benign = 150              # benign look-alike prompts per kind
n_capability = 200          # capability questions per kind
n_probe = 2000              # held-out labelled segments (half unsafe)
n_heldout_docs = 500        # held-out documents for the teacher-forced reflection classification
n_sft = 5000                # one sft set for every arm (reflection models get it in their format)
n_stop = 500                # ... and its stop examples, added to it: answers that turn unsafe part-way (seen harms)
n_benign_ft = 1000
n_harmful_ft = 100
# FineWeb-Edu
name = "sample-10BT"        # dataset config on the hub
data_files = ""             # local parquet/jsonl files instead of the hub (glob or comma list)
min_int_score = 0           # keep documents with int_score >= this (FineWeb-Edu's 0-5 educational score); 0: all
num_proc = 4                # worker processes writing shards
count_tokens = False        # count GPT-2 tokens with tiktoken (its BPE files: online, TIKTOKEN_CACHE_DIR or ...)
tokenizer_files = ""        # ... a directory with gpt2's encoder.json and vocab.bpe (as reflect.py)
stop_after_shards = -1      # stop after this many finished shards as if interrupted (a rerun resumes); -1: never
# -----------------------------------------------------------------------------
_DEFAULTS = defaults_of(globals())   # the flags above (python prepare.py --help lists them)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# MedSafetyWorld

def world_summary(world, docs, sets):
    """summary.json's statistics: the corpus as the interventions will see it (a token per word, one end-of-text
    per document), the world's seen and unseen harms, pairs and cases, and the evaluation sets' sizes."""
    from safety.world.grammar import UNSAFE, POISON, CONTRA
    tokens = unsafe_tokens = segs = 0
    seg_cat, doc_cat, split_n = Counter(), Counter(), Counter()
    for d in docs:
        split_n[d["split"]] += 1
        cats = set()
        for s in d["segments"]:
            k = len(s["text"].split())
            tokens += k
            segs += 1
            if s["label"] == UNSAFE:
                seg_cat[s["category"]] += 1
                unsafe_tokens += k
                cats.add(s["category"])
        tokens += 1   # the end-of-text token reflect.py puts after each document
        for c in cats:
            doc_cat[c] += 1
        doc_cat["any"] += bool(cats)
    summary = {
        "world_seed": world.seed, "harm_facts": world.harm_facts, "reasoning": world.reasoning,
        "vocab_size": world.vocab_size,
        "documents": len(docs),
        "train_documents": split_n["train"], "val_documents": split_n["val"], "tokens": tokens, "segments": segs,
        "unsafe_documents": {c: doc_cat[c] for c in ("any", POISON, CONTRA)},
        "unsafe_segments": {c: seg_cat[c] for c in (POISON, CONTRA)}, "unsafe_tokens": unsafe_tokens,
        "harms_seen": sorted(world.seen_harms), "harms_unseen": sorted(set(world.harms) - world.seen_harms),
        "pairs_seen": len(world.seen_pairs), "pairs_unseen": len(world.danger - world.seen_pairs),
        "contra_cases_seen": len(world.contra_cases("seen")), "contra_cases_unseen": len(world.contra_cases("unseen")),
        "eval": {k: len(v) for k, v in sets.items()},
    }
    return summary


def print_world_summary(world, summary, sets):
    """What prepare.py wrote, from summary.json's numbers: the world, the corpus's unsafe shares, the eval sets."""
    from safety.world.grammar import POISON, CONTRA
    pct = lambda a, b: 100.0 * a / max(b, 1)
    n_docs, tokens, segs = summary["documents"], summary["tokens"], summary["segments"]
    doc_cat, seg_cat = summary["unsafe_documents"], summary["unsafe_segments"]
    hc = Counter((r["category"], r["split"]) for r in sets["harmful_prompts"])
    print(f"world: {len(world.conditions)} conditions, {len(world.drugs)} drugs, {len(world.classes)} classes, "
          f"{len(world.traits)} traits, {len(world.harms)} harm effects; vocabulary {world.vocab_size} tokens")
    print(f"harm effects: seen {', '.join(summary['harms_seen'])} | unseen {', '.join(summary['harms_unseen'])}")
    print(f"dangerous (class, trait) pairs: {len(world.danger)} (seen {summary['pairs_seen']}, unseen "
          f"{summary['pairs_unseen']}); contraindication cases seen {summary['contra_cases_seen']}, "
          f"unseen {summary['contra_cases_unseen']}")
    print(f"documents: {n_docs:,} (train {summary['train_documents']:,}, val {summary['val_documents']:,}); tokens "
          f"{tokens:,} ({tokens / max(n_docs, 1):.0f} per document); segments {segs:,}")
    print(f"unsafe documents: {pct(doc_cat['any'], n_docs):.1f}% (poison {pct(doc_cat[POISON], n_docs):.1f}%, "
          f"contra {pct(doc_cat[CONTRA], n_docs):.1f}%); unsafe segments: poison {pct(seg_cat[POISON], segs):.2f}%, "
          f"contra {pct(seg_cat[CONTRA], segs):.2f}%; unsafe tokens {pct(summary['unsafe_tokens'], tokens):.2f}%")
    print(f"harmful prompts: poison seen {hc[(POISON, 'seen')]}, unseen {hc[(POISON, 'unseen')]}; "
          f"contra seen {hc[(CONTRA, 'seen')]}, unseen {hc[(CONTRA, 'unseen')]}")
    print("eval sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))


def prepare_medsafety(root):
    from safety.world import evalsets
    from safety.world.generator import WorldGen
    t0 = time.time()
    try:
        world = WorldGen.generate(world_seed=world_seed, num_conditions=num_conditions,
                               num_drugs=num_drugs, num_classes=num_classes,
                               num_traits=num_traits, num_harms=num_harms,
                               num_persons=num_persons, danger_per_trait=danger_per_trait,
                               seen_frac=seen_frac, eval_frac=eval_frac, tune_frac=tune_frac,
                               harm_facts=harm_facts, reasoning=reasoning)
        mix = {}
        for item in [x for x in safe_mix.split(",") if x.strip()]:
            k, _, v = item.partition("=")
            try:
                mix[k.strip()] = float(v)
            except ValueError:
                fail(f"--safe_mix: '{item}' is not kind=weight")
        n = num_docs if num_docs >= 0 else 8000
        print(f"generating {n:,} MedSafetyWorld documents (world_seed {world.seed})")
        docs = world.make_docs(num_docs=n, val_frac=val_frac, doc_min_tokens=doc_min_tokens,
                               doc_max_tokens=doc_max_tokens, unsafe_frac=unsafe_frac,
                               poison_share=poison_share, refusal_frac=refusal_frac, mix=mix)
        print("generating evaluation and finetuning sets")
        sets = evalsets.make_eval(world, n_harmful=n_harmful, n_benign=n_benign,
                               n_capability=n_capability, n_probe=n_probe, n_sft=n_sft,
                               n_benign_ft=n_benign_ft, n_harmful_ft=n_harmful_ft, n_stop=n_stop)
        sets["heldout_docs"] = evalsets.make_heldout_docs(world, n=n_heldout_docs, doc_min_tokens=doc_min_tokens,
                                                       doc_max_tokens=doc_max_tokens, refusal_frac=refusal_frac)
    except ValueError as e:
        fail(str(e))

    summary = world_summary(world, docs, sets)

    # write everything beside the old outputs, then swap
    tmp = os.path.join(root, f".prepare-tmp-{os.getpid()}")
    try:
        os.makedirs(os.path.join(tmp, "docs"))
        os.makedirs(os.path.join(tmp, "eval"))
        world.save(os.path.join(tmp, "docs", "world.json"))
        # the documents' fingerprint of their world: reflect.py refuses a world.json that is not this one
        summary["world_sha256"] = file_sha256(os.path.join(tmp, "docs", "world.json"))
        per = max(1, docs_per_shard)
        shards = 0
        for i in range(0, len(docs), per):
            write_jsonl(os.path.join(tmp, "docs", f"shard_{shards:05d}.jsonl"), docs[i:i + per])
            shards += 1
        with open(os.path.join(tmp, "docs", "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
        for k, rows in sets.items():
            write_jsonl(os.path.join(tmp, "eval", f"{k}.jsonl"), rows)
        for sub in ("docs", "eval"):
            swap_in(os.path.join(tmp, sub), os.path.join(root, sub))
    except OSError as e:       # a full disk: the old outputs stay as they were
        fail(f"cannot write under '{root}' ({e.strerror or e}); existing outputs are unchanged")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print_world_summary(world, summary, sets)
    print(f"wrote {os.path.join(root, 'docs')} ({shards} shards) and {os.path.join(root, 'eval')} "
          f"in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------
# FineWeb-Edu

HUB_DATASET = "HuggingFaceFW/fineweb-edu"
OFFLINE_HINT = ("offline? pass local files: --data_files='path/*.parquet' (or .jsonl, or a comma list) with a "
                "'text' column and optionally 'id'")
KEEP = ("url", "dump", "score", "int_score")  # FineWeb-Edu's fields kept next to id and text, where the source has them


def expand_files(spec):
    files = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        hits = sorted(glob.glob(item))
        if not hits:
            fail(f"--data_files: no file matches '{item}'")
        files += hits
    for f in files:
        if not f.endswith((".parquet", ".jsonl", ".json")):
            fail(f"--data_files: '{f}' is neither .parquet nor .jsonl/.json")
    return files


def parquet_file(path):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        fail(f"cannot read parquet file '{path}' ({type(e).__name__}: {e})")


def local_rows(files, skip):
    """{"id", "text", + KEEP fields} from local parquet / jsonl files, in the order given, after the first `skip`
    rows (a resumed run: whole files and parquet row groups are skipped unread)."""
    for path in files:
        base = os.path.basename(path)
        if path.endswith(".parquet"):
            pf = parquet_file(path)
            if skip >= pf.metadata.num_rows:
                skip -= pf.metadata.num_rows
                continue
            cols = pf.schema_arrow.names
            if "text" not in cols:
                fail(f"'{path}' has no 'text' column (columns: {', '.join(cols)})")
            want = [c for c in ("id", "text") + KEEP if c in cols]
            groups, row = list(range(pf.num_row_groups)), 0
            while skip >= pf.metadata.row_group(groups[0]).num_rows:
                n = pf.metadata.row_group(groups.pop(0)).num_rows
                skip, row = skip - n, row + n
            for batch in pf.iter_batches(columns=want, batch_size=4096, row_groups=groups):
                d = batch.to_pydict()
                for k in range(len(d["text"])):
                    if skip:
                        skip -= 1
                    else:
                        r = {c: d[c][k] for c in want}
                        r["id"] = str(r["id"]) if r.get("id") is not None else f"{base}:{row}"
                        r["text"] = r["text"] or ""
                        yield r
                    row += 1
        else:
            with open(path, encoding="utf-8") as f:
                for row, line in enumerate(f):
                    if not line.strip():
                        continue
                    if skip:
                        skip -= 1
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        fail(f"'{path}' line {row + 1} is not JSON ({e})")
                    if not isinstance(r, dict) or "text" not in r:
                        fail(f"'{path}' line {row + 1} has no 'text' field")
                    i = r.get("id")
                    yield {"id": str(i) if i is not None else f"{base}:{row}", "text": r["text"] or "",
                           **{k: r[k] for k in KEEP if k in r}}


def local_total(files):
    """Rows in the files when their metadata says so (parquet), else None (jsonl: unknown until read)."""
    if any(not f.endswith(".parquet") for f in files):
        return None
    return sum(parquet_file(f).metadata.num_rows for f in files)


def hub_rows(name, skip):
    """(rows streamed from the hub after the first `skip`, their total if the hub says it); a missing network
    gives one clear line."""
    if any(os.environ.get(k, "0") not in ("0", "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        fail(f"cannot stream {HUB_DATASET}: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; {OFFLINE_HINT}")
    if not any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        try:   # fail in seconds rather than after the hub client's retries
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            fail(f"cannot reach {host} to stream {HUB_DATASET} ({e}); {OFFLINE_HINT}")
    try:
        from datasets import load_dataset
        ds = load_dataset(HUB_DATASET, name=name, split="train", streaming=True)
        try:
            total = ds.info.splits["train"].num_examples or None
        except Exception:   # the card may not say
            total = None
        it = iter(ds.skip(skip) if skip else ds)
        first = next(it, None)   # None: nothing after the rows a resumed run skips
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        fail(f"cannot stream {HUB_DATASET} (name={name}): {type(e).__name__}: {first_line}; {OFFLINE_HINT}")

    def rows():
        r = first
        while r is not None:
            yield {"id": str(r.get("id")), "text": r["text"], **{k: r[k] for k in KEEP if k in r}}
            try:
                r = next(it, None)
            except Exception as e:
                fail(f"streaming {HUB_DATASET} failed: {type(e).__name__}: {e}; rerun (it resumes after the last "
                     f"finished shard), or {OFFLINE_HINT}")
    return rows(), total


def in_val(doc_id, frac):
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2 ** 64 < frac


def write_shard(args):
    """Worker: write one shard atomically (a killed run never leaves half a shard); returns its record."""
    path, rows, val_frac, count, files = args
    ntok = None
    if count:
        from safety.realtext.bpe import base_encoding
        enc = base_encoding("gpt2", files)   # once per process (cached)
        ntok = sum(len(enc.encode_ordinary(r["text"])) for r in rows)
    write_jsonl(path + ".tmp", ({"id": r["id"], "split": "val" if in_val(r["id"], val_frac) else "train",
                                 "text": r["text"], **{k: r[k] for k in KEEP if k in r}} for r in rows))
    os.replace(path + ".tmp", path)
    return {"docs": len(rows), "chars": sum(len(r["text"]) for r in rows), "tokens": ntok,
            "bytes": os.path.getsize(path)}


def finished_shards(work, settings):
    """The records of an interrupted run's finished shards in `work` when it had these settings (its stray shards,
    in flight when it stopped, removed: they are written again); else [] and a fresh `work`."""
    state = load_json(os.path.join(work, "progress.json")) if os.path.isdir(work) else None
    if state and state.get("settings") == settings:
        records = state["shards"]
        names = [f"shard_{k:05d}.jsonl" for k in range(len(records))]
        if all(os.path.isfile(os.path.join(work, "docs", f)) and os.path.getsize(os.path.join(work, "docs", f)) ==
               r["bytes"] for f, r in zip(names, records)):
            for f in set(os.listdir(os.path.join(work, "docs"))) - set(names):
                os.remove(os.path.join(work, "docs", f))
            print(f"resuming after {len(records)} finished shard(s) of an interrupted run ({work})")
            return records
    if os.path.exists(work):
        print(f"discarding the unfinished run in {work} (other flags or files)")
        shutil.rmtree(work)
    os.makedirs(os.path.join(work, "docs"))
    return []


def hms(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def prepare_text_sample(root):
    """Real text offline: safety/realtext/corpus.py's sample_files (a generated labelled corpus and the files each
    later stage reads: spans.jsonl, labelled.jsonl, harmful.csv, xstest.csv, chat.jsonl) into <root>/source/, then its
    docs.jsonl prepared as any local files are."""
    from safety.realtext.corpus import sample_files
    global data_files
    src = os.path.join(root, "source")
    os.makedirs(src, exist_ok=True)
    for name, lines in sample_files(400 if num_docs < 0 else num_docs, seed=0).items():
        write_atomic(os.path.join(src, name), lambda f: f.writelines(line + "\n" for line in lines))
    print(f"wrote the sample's files to {src}")
    data_files = os.path.join(src, "docs.jsonl")
    prepare_fineweb(root)


def prepare_fineweb(root):
    """Shards are written into <root>/.docs-partial/docs, each recorded in progress.json once it and every shard
    before it are written: a rerun with the same flags resumes after the last recorded one (its source rows are
    skipped), so an interrupted run costs at most the shards in flight. Swapped in for docs/ at the end."""
    t0 = time.time()
    files = expand_files(data_files) if data_files else None
    if count_tokens:
        from safety.realtext.bpe import base_encoding
        base_encoding("gpt2", tokenizer_files)   # fails here, with how to supply gpt2's files, not in a worker
    src = f"{len(files)} local files" if files else f"{HUB_DATASET} ({name}, streaming)"
    settings = {"source": [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
                if files else f"{HUB_DATASET}/{name}", "num_docs": num_docs, "docs_per_shard": docs_per_shard,
                "val_frac": val_frac, "min_int_score": min_int_score, "count_tokens": count_tokens}
    work = os.path.join(root, ".docs-partial")
    records = finished_shards(work, settings)
    skip = records[-1]["rows"] if records else 0
    rows, total = (local_rows(files, skip), local_total(files)) if files else hub_rows(name, skip)
    limit = num_docs
    print(f"reading {src}" + (f" ({total:,} rows)" if total else "") + f"; writing "
          f"{'all' if limit < 0 else f'{limit:,}'} documents" + (f" with int_score >= {min_int_score}"
                                                                   if min_int_score else "")
          + f" with {num_proc} processes")
    counts = {"read": skip, "kept": sum(r["docs"] for r in records)}   # source rows read, documents kept (ever)

    def fraction():
        """Share done: of --num_docs, or of the source's rows where it says how many (the larger of the two), counted
        in written shards (rows read ahead of them are not done)."""
        rows_done = records[-1]["rows"] if records else 0
        parts = ([sum(r["docs"] for r in records) / limit] if limit > 0 else []) + (
            [rows_done / total] if total else [])
        return min(1.0, max(parts)) if parts else None
    kept0, start = counts["kept"], fraction()   # at this run's start: for its docs/s and the ETA
    last = [0.0]

    def report():
        if time.time() - last[0] > 2:
            last[0], p, dt = time.time(), fraction(), time.time() - t0
            done = sum(r["docs"] for r in records)
            pct = "" if p is None else f", {p:.1%} done" + (
                f", ETA {hms(dt * (1 - p) / (p - start))}" if p > start else "")
            print(f"  {done:,} documents written{pct}, {(done - kept0) / dt:,.0f} docs/s", flush=True)

    writer = None
    try:
        writer = ShardWriter(work, settings, records, report)
        for batch in kept_batches(rows, src, counts):
            writer.submit(batch, counts["read"])
        writer.collect(True)
        if not records:
            fail(f"no documents read from {src}" + (f" with int_score >= {min_int_score}" if min_int_score else ""))
        swap_in(os.path.join(work, "docs"), os.path.join(root, "docs"))
        shutil.rmtree(work)
    except Stopped:
        print(f"stopped after {len(records)} shard(s) (--stop_after_shards); a rerun resumes from there")
        return
    except BaseException:   # failed or interrupted: keep the finished shards to resume from, if there are any
        if records:
            print(f"kept {len(records)} finished shard(s) in {work}: a rerun with the same flags resumes after them")
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    dt = time.time() - t0
    done, chars = sum(r["docs"] for r in records), sum(r["chars"] for r in records)
    tok = f", {sum(r['tokens'] for r in records):,} GPT-2 tokens" if count_tokens else ""
    kept_of = (f" (int_score >= {min_int_score}: kept {done:,} of {counts['read']:,} rows read)" if min_int_score
               else "")
    print(f"documents: {done:,}{kept_of} ({chars:,} characters{tok}) in {len(records)} shards, "
          f"{(done - kept0) / dt:,.0f} docs/s")
    print(f"wrote {os.path.join(root, 'docs')} in {dt:.1f}s")


def kept_batches(rows, src, counts):
    """The source rows kept (int_score >= --min_int_score, --num_docs documents in all), in batches of
    --docs_per_shard. counts {"read": source rows read, "kept": documents kept} goes on from earlier runs' counts."""
    batch = []
    for r in rows:
        if 0 <= num_docs <= counts["kept"]:
            break
        counts["read"] += 1
        if min_int_score:
            if "int_score" not in r:
                fail(f"--min_int_score needs an 'int_score' field, and {src} has none (row id {r['id']})")
            if r["int_score"] is None or r["int_score"] < min_int_score:
                continue
        batch.append(r)
        counts["kept"] += 1
        if len(batch) >= docs_per_shard:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardWriter:
    """Shards written on --num_proc processes (here when 1), at most 2 per process in flight (bounded memory), and
    recorded in order: a shard enters progress.json only once every shard before it is written.
    records: the finished shards, earlier runs' first; report(): called after each collect, for progress."""

    def __init__(self, work, settings, records, report):
        self.work, self.settings, self.records, self.report = work, settings, records, report
        self.pending = []   # (result, source rows read up to the end of its batch), oldest first
        self.pool = None
        if num_proc > 1:
            import multiprocessing as mp
            self.pool = mp.get_context("spawn").Pool(num_proc, initializer=worker_signals)

    def submit(self, batch, rows_read):
        args = (os.path.join(self.work, "docs", f"shard_{len(self.records) + len(self.pending):05d}.jsonl"), batch,
                val_frac, count_tokens, tokenizer_files)
        if self.pool is None:
            self.pending.append((_Done(write_shard(args)), rows_read))
        else:
            while len(self.pending) >= 2 * num_proc:     # bounded memory: wait for the oldest shard
                self.pending[0][0].wait()
                self.collect(False)
            self.pending.append((self.pool.apply_async(write_shard, (args,)), rows_read))
        self.collect(False)

    def collect(self, block):
        """Record the finished shards at the head of the queue (all of them, waiting, when block)."""
        while self.pending and (block or self.pending[0][0].ready()):
            res, n_rows = self.pending.pop(0)
            try:
                rec = res.get()
            except Exception as e:      # e.g. a full disk in a worker
                fail(f"writing a shard failed: {type(e).__name__}: {e}")
            self.records.append(dict(rec, rows=n_rows))   # shards finish in order: pending[0] is the oldest
            write_json(os.path.join(self.work, "progress.json"), {"settings": self.settings, "shards": self.records})
            if 0 <= stop_after_shards <= len(self.records):
                raise Stopped()
        self.report()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


class Stopped(Exception):
    """--stop_after_shards reached: stop as if interrupted."""


class _Done:
    """A finished result with the AsyncResult interface (the num_proc=1 path)."""
    def __init__(self, value):
        self.value = value

    def ready(self):
        return True

    def wait(self):
        pass

    def get(self):
        return self.value


# -----------------------------------------------------------------------------

def main(argv):
    globals().update(configure(_DEFAULTS, argv))
    if dataset not in ("medsafety", "fineweb-edu", "text-sample") and not data_files:
        fail(f"unknown dataset '{dataset}' (choose medsafety, fineweb-edu or text-sample, or name your own local "
             f"files' corpus and pass them as --data_files)")
    if docs_per_shard < 1 or num_proc < 1:
        fail("docs_per_shard and num_proc must be >= 1")
    if not 0 <= min_int_score <= 5 or (min_int_score and dataset != "fineweb-edu"):
        fail(f"min_int_score must lie in 0..5 (FineWeb-Edu's int_score) and needs --dataset=fineweb-edu, "
             f"not {min_int_score}")
    if not 0 <= val_frac < 1:
        fail("val_frac must be in [0, 1)")
    if num_docs == 0 or num_docs < -1:
        fail(f"num_docs must be at least 1, or -1 for the default, not {num_docs}")
    root = os.path.join(out_dir, dataset)
    writable_dir(root)
    os.makedirs(root, exist_ok=True)
    if dataset == "medsafety":
        on_stop("existing outputs were left as they were (the new ones are swapped in at the end); rerun the same "
                "command")
        prepare_medsafety(root)
    elif dataset == "text-sample" and not data_files:
        prepare_text_sample(root)
    else:
        on_stop("existing outputs were left as they were, and the finished shards kept; a rerun with the same flags "
                "resumes after them")
        prepare_fineweb(root)


if __name__ == "__main__":
    run_stage(main, sys.argv[1:])

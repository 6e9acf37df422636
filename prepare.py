"""
Prepare a dataset's documents: the first stage (then reflect.py, train.py, ...).

Reads:  nothing for MedSafetyWorld (the world follows from --world_seed and the size flags); FineWeb-Edu from the
        hub with `datasets`, or local parquet/jsonl files (--data_files, rows with "text" and optionally "id")
Writes: data/medsafety/docs/{world.json, shard_*.jsonl, summary.json}, data/medsafety/eval/*.jsonl (the evaluation
        and finetuning sets), or data/fineweb-edu/docs/shard_*.jsonl; record layouts: README.md, "prepare.py"
Run:    python prepare.py                                         # toy MedSafetyWorld, a few seconds
        python prepare.py --num_docs=300 --out_dir=/tmp/data      # smoke size
        python prepare.py --harm_facts=False                      # world v1 (no stated safety definition)
        python prepare.py --dataset=fineweb-edu --num_docs=100000 --num_proc=8
        python prepare.py --dataset=fineweb-edu --data_files='/data/fineweb/*.parquet'
Every output directory is written beside the old one and swapped in at the end: an interrupted or failed run leaves
existing outputs intact. The same flags give byte-identical files.
"""
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

from common import fail, writable_dir
from configurator import configure, defaults_of

# -----------------------------------------------------------------------------
dataset = "medsafety"       # medsafety | fineweb-edu
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
n_benign_ft = 1000
n_harmful_ft = 100
# FineWeb-Edu
name = "sample-10BT"        # dataset config on the hub
data_files = ""             # local parquet/jsonl files instead of the hub (glob or comma list)
num_proc = 4                # worker processes writing shards
count_tokens = False        # count GPT-2 tokens with tiktoken (needs its BPE file: online or TIKTOKEN_CACHE_DIR)
# -----------------------------------------------------------------------------
_DEFAULTS = defaults_of(globals())   # the flags above (python prepare.py --help lists them)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n")


def swap_in(tmp, final):
    """Replace directory `final` by `tmp` (the old one is removed only after the new one is in place)."""
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


# -----------------------------------------------------------------------------
# MedSafetyWorld

def prepare_medsafety(root):
    import evalsets
    from world import UNSAFE, POISON, CONTRA
    from worldgen import WorldGen
    t0 = time.time()
    try:
        world = WorldGen.generate(world_seed=world_seed, num_conditions=num_conditions,
                               num_drugs=num_drugs, num_classes=num_classes,
                               num_traits=num_traits, num_harms=num_harms,
                               num_persons=num_persons, danger_per_trait=danger_per_trait,
                               seen_frac=seen_frac, eval_frac=eval_frac, tune_frac=tune_frac,
                               harm_facts=harm_facts)
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
                               n_benign_ft=n_benign_ft, n_harmful_ft=n_harmful_ft)
        sets["heldout_docs"] = evalsets.make_heldout_docs(world, n=n_heldout_docs, doc_min_tokens=doc_min_tokens,
                                                       doc_max_tokens=doc_max_tokens, refusal_frac=refusal_frac)
    except ValueError as e:
        fail(str(e))

    # statistics: the corpus as the interventions will see it
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
    pct = lambda a, b: 100.0 * a / max(b, 1)
    summary = {
        "world_seed": world.seed, "harm_facts": world.harm_facts, "vocab_size": world.vocab_size,
        "documents": len(docs),
        "train_documents": split_n["train"], "val_documents": split_n["val"], "tokens": tokens, "segments": segs,
        "unsafe_documents": {c: doc_cat[c] for c in ("any", POISON, CONTRA)},
        "unsafe_segments": {c: seg_cat[c] for c in (POISON, CONTRA)}, "unsafe_tokens": unsafe_tokens,
        "harms_seen": sorted(world.seen_harms), "harms_unseen": sorted(set(world.harms) - world.seen_harms),
        "pairs_seen": len(world.seen_pairs), "pairs_unseen": len(world.danger - world.seen_pairs),
        "contra_cases_seen": len(world.contra_cases("seen")), "contra_cases_unseen": len(world.contra_cases("unseen")),
        "eval": {k: len(v) for k, v in sets.items()},
    }

    # write everything beside the old outputs, then swap
    tmp = os.path.join(root, f".prepare-tmp-{os.getpid()}")
    try:
        os.makedirs(os.path.join(tmp, "docs"))
        os.makedirs(os.path.join(tmp, "eval"))
        world.save(os.path.join(tmp, "docs", "world.json"))
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

    h = sets["harmful_prompts"]
    hc = Counter((r["category"], r["split"]) for r in h)
    print(f"world: {len(world.conditions)} conditions, {len(world.drugs)} drugs, {len(world.classes)} classes, "
          f"{len(world.traits)} traits, {len(world.harms)} harm effects; vocabulary {world.vocab_size} tokens")
    print(f"harm effects: seen {', '.join(summary['harms_seen'])} | unseen {', '.join(summary['harms_unseen'])}")
    print(f"dangerous (class, trait) pairs: {len(world.danger)} (seen {summary['pairs_seen']}, unseen "
          f"{summary['pairs_unseen']}); contraindication cases seen {summary['contra_cases_seen']}, "
          f"unseen {summary['contra_cases_unseen']}")
    print(f"documents: {len(docs):,} (train {split_n['train']:,}, val {split_n['val']:,}); tokens {tokens:,} "
          f"({tokens / max(len(docs), 1):.0f} per document); segments {segs:,}")
    print(f"unsafe documents: {pct(doc_cat['any'], len(docs)):.1f}% (poison {pct(doc_cat[POISON], len(docs)):.1f}%, "
          f"contra {pct(doc_cat[CONTRA], len(docs)):.1f}%); unsafe segments: poison {pct(seg_cat[POISON], segs):.2f}%, "
          f"contra {pct(seg_cat[CONTRA], segs):.2f}%; unsafe tokens {pct(unsafe_tokens, tokens):.2f}%")
    print(f"harmful prompts: poison seen {hc[(POISON, 'seen')]}, unseen {hc[(POISON, 'unseen')]}; "
          f"contra seen {hc[(CONTRA, 'seen')]}, unseen {hc[(CONTRA, 'unseen')]}")
    print("eval sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    print(f"wrote {os.path.join(root, 'docs')} ({shards} shards) and {os.path.join(root, 'eval')} "
          f"in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------
# FineWeb-Edu

HUB_DATASET = "HuggingFaceFW/fineweb-edu"
OFFLINE_HINT = ("offline? pass local files: --data_files='path/*.parquet' (or .jsonl, or a comma list) with a "
                "'text' column and optionally 'id'")


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


def local_rows(files):
    """(id, text) from local parquet / jsonl files, in the order given."""
    import pyarrow.parquet as pq
    for path in files:
        base = os.path.basename(path)
        if path.endswith(".parquet"):
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                fail(f"cannot read parquet file '{path}' ({type(e).__name__}: {e})")
            cols = pf.schema_arrow.names
            if "text" not in cols:
                fail(f"'{path}' has no 'text' column (columns: {', '.join(cols)})")
            want = ["text"] + (["id"] if "id" in cols else [])
            row = 0
            for batch in pf.iter_batches(columns=want, batch_size=4096):
                d = batch.to_pydict()
                ids = d.get("id") or [None] * len(d["text"])
                for i, t in zip(ids, d["text"]):
                    yield (str(i) if i is not None else f"{base}:{row}"), t or ""
                    row += 1
        else:
            with open(path, encoding="utf-8") as f:
                for row, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        fail(f"'{path}' line {row + 1} is not JSON ({e})")
                    if not isinstance(r, dict) or "text" not in r:
                        fail(f"'{path}' line {row + 1} has no 'text' field")
                    i = r.get("id")
                    yield (str(i) if i is not None else f"{base}:{row}"), r["text"] or ""


def hub_rows(name):
    """(id, text) streamed from the hub; a missing network gives one clear line."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
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
        it = iter(ds)
        first = next(it)
    except Exception as e:
        fail(f"cannot stream {HUB_DATASET} (name={name}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
             f"{OFFLINE_HINT}")
    yield str(first.get("id")), first["text"]
    while True:
        try:
            r = next(it)
        except StopIteration:
            return
        except Exception as e:
            fail(f"streaming {HUB_DATASET} failed: {type(e).__name__}: {e}; rerun, or {OFFLINE_HINT}")
        yield str(r.get("id")), r["text"]


def in_val(doc_id, frac):
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2 ** 64 < frac


def write_shard(args):
    """Worker: write one shard; returns (documents, characters, GPT-2 tokens or None)."""
    path, rows, val_frac, count = args
    ntok = None
    if count:
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        ntok = sum(len(enc.encode_ordinary(t)) for _, t in rows)
    write_jsonl(path, ({"id": i, "split": "val" if in_val(i, val_frac) else "train", "text": t} for i, t in rows))
    return len(rows), sum(len(t) for _, t in rows), ntok


def prepare_fineweb(root):
    t0 = time.time()
    files = expand_files(data_files) if data_files else None
    if count_tokens:
        try:
            import tiktoken
            tiktoken.get_encoding("gpt2")
        except Exception as e:
            fail(f"--count_tokens needs tiktoken's gpt2 BPE file ({type(e).__name__}: {e}); set TIKTOKEN_CACHE_DIR "
                 f"or run without --count_tokens")
    rows = local_rows(files) if files else hub_rows(name)
    src = f"{len(files)} local files" if files else f"{HUB_DATASET} ({name}, streaming)"
    limit = num_docs
    print(f"reading {src}; writing {'all' if limit < 0 else f'{limit:,}'} documents with {num_proc} processes")

    tmp = os.path.join(root, f".prepare-tmp-{os.getpid()}")
    os.makedirs(os.path.join(tmp, "docs"))
    pool = None
    try:
        if num_proc > 1:
            import multiprocessing as mp
            pool = mp.get_context("spawn").Pool(num_proc)
        pending, done, chars, ntok, shard, batch, last = [], 0, 0, 0, 0, [], 0.0

        def collect(block):
            nonlocal done, chars, ntok, last, pending
            while pending and (block or pending[0].ready()):
                try:
                    n, c, k = pending.pop(0).get()
                except Exception as e:      # e.g. a full disk in a worker
                    fail(f"writing a shard failed: {type(e).__name__}: {e}")
                done, chars, ntok = done + n, chars + c, (ntok + k if k is not None else ntok)
            if time.time() - last > 2:
                last = time.time()
                print(f"  {done:,} documents written, {done / (time.time() - t0):,.0f} docs/s", flush=True)

        def submit(b):
            nonlocal shard
            args = (os.path.join(tmp, "docs", f"shard_{shard:05d}.jsonl"), b, val_frac, count_tokens)
            shard += 1
            if pool is None:
                n, c, k = write_shard(args)
                pending.append(_Done((n, c, k)))
            else:
                while len(pending) >= 2 * num_proc:     # bounded memory: wait for the oldest shard
                    pending[0].wait()
                    collect(False)
                pending.append(pool.apply_async(write_shard, (args,)))
            collect(False)

        seen = 0
        for doc in rows:
            if 0 <= limit <= seen:
                break
            batch.append(doc)
            seen += 1
            if len(batch) >= docs_per_shard:
                submit(batch)
                batch = []
        if batch:
            submit(batch)
        collect(True)
        if done == 0:
            fail(f"no documents read from {src}")
        swap_in(os.path.join(tmp, "docs"), os.path.join(root, "docs"))
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    dt = time.time() - t0
    tok = f", {ntok:,} GPT-2 tokens" if count_tokens else ""
    print(f"documents: {done:,} ({chars:,} characters{tok}) in {shard} shards, {done / dt:,.0f} docs/s")
    print(f"wrote {os.path.join(root, 'docs')} in {dt:.1f}s")


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
    if dataset not in ("medsafety", "fineweb-edu"):
        fail(f"unknown dataset '{dataset}' (choose medsafety or fineweb-edu)")
    if docs_per_shard < 1 or num_proc < 1:
        fail("docs_per_shard and num_proc must be >= 1")
    if not 0 <= val_frac < 1:
        fail("val_frac must be in [0, 1)")
    if num_docs == 0 or num_docs < -1:
        fail(f"num_docs must be at least 1, or -1 for the default, not {num_docs}")
    root = os.path.join(out_dir, dataset)
    writable_dir(root)
    os.makedirs(root, exist_ok=True)
    if dataset == "medsafety":
        prepare_medsafety(root)
    else:
        prepare_fineweb(root)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        raise SystemExit("prepare.py: interrupted; existing outputs were left as they were")

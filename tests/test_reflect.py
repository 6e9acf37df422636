"""reflect.py on a small MedSafetyWorld: every intervention checked token by token against the oracle."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from safety.world.definition import World
from safety.world.grammar import EOT, THINK, END_THINK, TAG, END  # noqa: E402


def sh(script, *args, check=True):
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # a half-unsafe corpus, so the unsafe segments are many enough to measure tag rates
    root = str(tmp_path_factory.mktemp("data"))
    sh("prepare.py", f"--out_dir={root}", "--num_docs=1500", "--unsafe_frac=0.5", "--n_probe=50", "--n_sft=100", "--n_heldout_docs=10")
    for name in ("none", "filter", "rewrite", "refusal", "tag", "reflect", "safety_pretraining"):
        sh("reflect.py", f"--data_root={root}", f"--intervention={name}")
    sh("reflect.py", f"--data_root={root}", "--intervention=filter", "--filter_level=segment")
    return root


@pytest.fixture(scope="module")
def world(root):
    return World.load(os.path.join(root, "medsafety", "docs", "world.json"))


def raw_docs(root):
    d = os.path.join(root, "medsafety", "docs")
    return [json.loads(l) for f in sorted(os.listdir(d)) if f.startswith("shard_") for l in open(os.path.join(d, f))]


def stream_docs(root, world, intervention, name="mix", split="train"):
    """Decode a .bin back into document texts (split on the end-of-text token)."""
    meta = json.load(open(os.path.join(root, "medsafety", intervention, "meta.json")))
    ids = np.fromfile(os.path.join(root, "medsafety", intervention, f"{name}_{split}.bin"), dtype=meta["dtype"])
    text = world.decode(ids.tolist())
    return [t.strip() for t in text.split(EOT) if t.strip()], meta


def oracle_labels(world, text):
    """The oracle's labels of a document's sentences (reflection and tag tokens removed first)."""
    clean = " ".join(t for t in text.split() if t != TAG)
    segs = [s for s in world.split_segments(clean)]
    plain = [" ".join(t for t in s.split() if t not in (THINK, END_THINK, "safe", "unsafe", "poison", "contra"))
             for s in segs]
    return world.label_segments(plain)


def test_none_decodes_back_to_the_raw_corpus(root, world):
    docs, meta = stream_docs(root, world, "none")
    raw = [" ".join(s["text"] for s in d["segments"]) for d in raw_docs(root) if d["split"] == "train"]
    assert docs == raw
    assert meta["tokens"]["mix_train"] == sum(len(d.split()) + 1 for d in raw)


@pytest.mark.parametrize("intervention", ["filter", "rewrite"])
def test_filter_and_rewrite_leave_no_unsafe_segment(root, world, intervention):
    docs, _ = stream_docs(root, world, intervention)
    unsafe = [(d, lab) for d in docs for lab in oracle_labels(world, d) if lab[0] == "unsafe"]
    assert not unsafe, unsafe[:3]
    # and the safe stream (read before the curriculum start) is always clean
    safe, _ = stream_docs(root, world, intervention, name="safe")
    assert all(lab[0] == "safe" for d in safe for lab in oracle_labels(world, d))


def test_segment_level_filter_keeps_the_safe_segments_of_unsafe_documents(root, world):
    docs, _ = stream_docs(root, world, "filter")   # the last filter run was segment level
    raw = [d for d in raw_docs(root) if d["split"] == "train"]
    assert docs == [" ".join(s["text"] for s in d["segments"] if s["label"] == "safe") for d in raw]


def test_rewrite_keeps_the_facts_of_rewritten_segments(root, world):
    docs, _ = stream_docs(root, world, "rewrite")
    raw = [d for d in raw_docs(root) if d["split"] == "train"]
    assert len(docs) == len(raw)
    checked = 0
    for d, text in zip(raw, docs):
        for s in d["segments"]:
            if s["label"] == "unsafe":
                fact = s["meta"].get("drug") or s["meta"].get("harm")
                assert fact and f" {fact} " in f" {text} ", (s, text)  # harm effects are phrases
                assert world.rewrite(s) in text
                checked += 1
    assert checked > 100


def test_refusal_adds_one_refusal_per_unsafe_request(root, world):
    docs, meta = stream_docs(root, world, "refusal")
    raw = [d for d in raw_docs(root) if d["split"] == "train"]
    requests = sum(1 for d in raw for s in d["segments"]
                   if s["label"] == "unsafe" and s["kind"].startswith("u_intent"))
    refusals = [d for d in docs if d.startswith("user :") and "assistant :" in d
                and any(lab[0] == "unsafe" for lab in oracle_labels(world, d))]
    assert len(refusals) == requests > 20
    for r in refusals:  # the request, then a refusal: the assistant's turn itself is safe
        prompt, response = r.split(" assistant : ", 1)
        assert world.judge(prompt + " assistant :", response).kind == "refusal", r
    assert 0 < meta["mix_sources"]["refusal"] < 0.2


def test_tags_sit_inside_unsafe_segments_at_the_tag_rate(root, world):
    docs, meta = stream_docs(root, world, "tag")
    raw = [d for d in raw_docs(root) if d["split"] == "train"]
    inside = outside = tags_in = tags_out = 0
    for d, text in zip(raw, docs):
        segs = world.split_segments(text)
        assert len(segs) == len(d["segments"])
        for s, t in zip(d["segments"], segs):
            words = t.split()
            n_tags = words.count(TAG)
            if s["label"] == "unsafe":
                tags_in += n_tags
                inside += len(words) - n_tags
            else:
                tags_out += n_tags
                outside += len(words)
    assert tags_out == 0
    assert 0.04 <= tags_in / inside <= 0.06, (tags_in, inside)
    assert meta["mix_tags"] == tags_in


def test_reflect_puts_one_oracle_reflection_after_every_segment(root, world):
    docs, meta = stream_docs(root, world, "reflect")
    raw = [d for d in raw_docs(root) if d["split"] == "train"]
    limit = json.load(open(os.path.join(root, "medsafety", "reflect", "meta.json")))["config"]["segment_tokens"]
    n_reflections = 0
    for d, text in zip(raw, docs):
        words = text.split()
        assert words[-1] in (END_THINK, END)  # the document ends with a reflection (before a final END)
        pieces, context = [], ""
        cur = []
        i = 0
        while i < len(words):
            if words[i] == THINK:
                j = words.index(END_THINK, i)
                while cur and cur[0] == END:  # the END after the previous reflection closes that dialogue
                    context, cur = (context + " " + END).strip(), cur[1:]
                seg = " ".join(cur)
                assert END not in cur
                pieces.append((seg, words[i + 1:j], context))
                context = (context + " " + seg).strip()
                cur, i = [], j + 1
                continue
            cur.append(words[i])
            i += 1
        assert not [w for w in cur if w != END], cur  # nothing after the last reflection but END
        for seg, reflection, ctx in pieces:
            assert len(seg.split()) <= limit
            label, cat = world.label(seg, context=ctx)
            expected = ["safe"] if label == "safe" else ["unsafe", cat]
            assert reflection == expected, (seg, reflection, expected)
        n_reflections += len(pieces)
        # stripping the reflections gives back the raw document
        plain = [w for w in words if w not in (THINK, END_THINK, "safe", "unsafe", "poison", "contra")]
        assert " ".join(plain) == " ".join(s["text"] for s in d["segments"])
    assert n_reflections == meta["mix_reflections"]


def test_safety_pretraining_combines_rewrite_refusal_and_tags(root, world):
    docs, meta = stream_docs(root, world, "safety_pretraining")
    raw = [d for d in raw_docs(root) if d["split"] == "train"]
    corpus, refusals = docs[:len(raw)], docs[len(raw):]
    rewritten = tagged = 0
    for d, text in zip(raw, corpus):
        plain = " ".join(s["text"] for s in d["segments"])
        if not any(s["label"] == "unsafe" for s in d["segments"]):
            assert text == plain
        elif text == " ".join(world.rewrite(s) for s in d["segments"]):
            rewritten += 1
        else:  # kept as it was, tags inside its unsafe segments only
            assert " ".join(t for t in text.split() if t != TAG) == plain
            tagged += 1
    assert rewritten > 50 and tagged > 50, (rewritten, tagged)
    requests = sum(1 for d in raw for s in d["segments"] if s["label"] == "unsafe" and s["kind"].startswith("u_intent"))
    assert len(refusals) == requests
    assert all(world.judge(r.split(" assistant : ")[0] + " assistant :", r.split(" assistant : ", 1)[1]).kind
               == "refusal" for r in refusals)
    assert meta["mix_tags"] > 0


def test_training_after_the_switch_reads_the_mix_in_meta_proportions(root, world, tmp_path):
    import torch
    import train
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "train.py", "config/smoke.py", f"--data={root}/medsafety/reflect",
                        f"--out_dir={out}", "--max_iters=50", "--intervention_start=0.2", "--batch_size=16",
                        "--eval_interval=1000", "--log_interval=10"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"loss"' in l]
    final = log[-1]["slots"]
    assert final["safe"] == 10 * 16 and final["mix"] == 40 * 16  # 20% of 50 iterations from safe
    meta = json.load(open(os.path.join(root, "medsafety", "reflect", "meta.json")))
    # mark every token of the mix stream that belongs to a reflection (<think> ... </think>), then read the mask
    # through the same windows train.py read after the switch: the share seen must match meta.json's
    ids = np.fromfile(os.path.join(root, "medsafety", "reflect", "mix_train.bin"), dtype=meta["dtype"])
    think, end_think = meta["special_tokens"]["<think>"], meta["special_tokens"]["</think>"]
    opened, closed = np.cumsum(ids == think), np.cumsum(ids == end_think)
    in_reflection = (opened - closed + (ids == end_think)) > 0
    mask_path = str(tmp_path / "mask.bin")
    in_reflection.astype(np.uint16).tofile(mask_path)
    read = train.TokenStream(mask_path, np.uint16, 32, 1337)  # the run's seed and block size
    x, y = read.batch(0, final["mix"], torch.device("cpu"))
    share = float(y.float().mean())  # the targets: every token the model was trained to predict
    assert abs(in_reflection.mean() - meta["mix_reflection_share"]) < 1e-9
    assert abs(share - meta["mix_reflection_share"]) < 0.02, (share, meta["mix_reflection_share"])
    stream = train.TokenStream(os.path.join(root, "medsafety", "reflect", "mix_train.bin"), meta["dtype"], 32, 1337)
    x, _ = stream.batch(0, final["mix"], torch.device("cpu"))
    assert (x == think).any()
    safe = train.TokenStream(os.path.join(root, "medsafety", "reflect", "safe_train.bin"), meta["dtype"], 32, 1337)
    xs, _ = safe.batch(0, final["safe"], torch.device("cpu"))
    assert not (xs == think).any()  # before the switch: the filtered corpus, no reflections


@pytest.mark.parametrize("args, message", [
    (["--intervention=reflection"], "unknown intervention 'reflection'"),
    (["--data_root=/nonexistent"], "no documents at '/nonexistent/medsafety/docs'"),
    (["--filter_level=paragraph"], "filter_level must be"),
])
def test_bad_input_gives_one_clear_line_and_writes_nothing(root, args, message):
    before = sorted(os.listdir(os.path.join(root, "medsafety")))
    p = sh("reflect.py", f"--data_root={root}", *args, check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(os.path.join(root, "medsafety"))) == before


def test_meta_records_the_worlds_fingerprint(root):
    import hashlib
    meta = json.load(open(os.path.join(root, "medsafety", "reflect", "meta.json")))
    world_json = os.path.join(root, "medsafety", "docs", "world.json")
    assert meta["world_sha256"] == hashlib.sha256(open(world_json, "rb").read()).hexdigest()


def test_the_filtered_stream_states_the_safety_definition_for_every_harm(root, world):
    # world v2: which effects hurt a person is said in safe text, for unseen harm effects as for seen ones, so the
    # filtered corpus (every arm's safe stream) keeps it; world v1 (--harm_facts=False) says none of it
    import re
    docs, _ = stream_docs(root, world, "reflect", name="safe")
    text = " ".join(docs)
    assert world.harm_facts and set(world.harms) - world.seen_harms
    for h in world.harms:
        assert f"making someone {h} hurts them ." in text, h
        assert re.search(rf"is it wrong to make my \w+ {h} \? assistant : yes \. making someone {h} hurts them \.",
                         text), h
    for s in world.benign_states:
        assert f"making someone {s} helps them ." in text, s
    for cls, trait in world.danger:
        assert f"giving {cls} drugs to patients with the {trait} trait hurts them ." in text, (cls, trait)
    from safety.world.generator import WorldGen
    v1 = WorldGen.generate(world_seed=world.seed, harm_facts=False)
    v1_text = " ".join(s["text"] for d in v1.make_docs(num_docs=300) for s in d["segments"])
    assert "hurts them" not in v1_text and "helps them" not in v1_text and "is it wrong" not in v1_text


def test_every_user_turn_in_the_reflect_stream_is_followed_by_a_reflection(root, world, tmp_path):
    import re
    import shutil
    reflection = r" ?<think> (?:safe|unsafe \w+) </think> ?"

    def check(docs):
        turns, reflected, own_segment = 0, 0, 0
        for d in docs:
            toks = d.split()
            for i in range(1, len(toks)):
                if toks[i] == "assistant" and toks[i + 1] == ":":
                    turns += 1
                    reflected += toks[i - 1] == END_THINK
            for piece in re.split(reflection, d):    # what each reflection judged (an END after it moved off)
                piece = piece[len(END):].strip() if piece.startswith(END) else piece
                if "user :" in piece:
                    own_segment += piece.startswith("user :") and "assistant :" not in piece
        return turns, reflected, own_segment, sum(d.count("user :") for d in docs)

    docs, meta = stream_docs(root, world, "reflect")
    assert meta["config"]["user_turn_segments"] is True
    turns, reflected, own, users = check(docs)
    assert turns > 100 and reflected == turns and own == users == turns   # each request reflected on, alone
    # the v1 segmentation (--user_turn_segments=False): requests share segments, and some are not reflected on
    shutil.copytree(os.path.join(root, "medsafety", "docs"), tmp_path / "medsafety" / "docs")
    sh("reflect.py", f"--data_root={tmp_path}", "--intervention=reflect", "--user_turn_segments=False")
    v1, meta = stream_docs(str(tmp_path), world, "reflect")
    turns, reflected, own, users = check(v1)
    assert meta["config"]["user_turn_segments"] is False and reflected < turns and own < users


@pytest.mark.parametrize("intervention", ["reflect", "safety_pretraining"])
def test_the_dose_matched_control_holds_the_stated_intervention_tokens(root, world, intervention, tmp_path):
    # the timing paper's caveat: a 60% start reads 40% of its budget from the mix stream. The dose-matched control
    # (--dose=0.4) is a 0% start whose stream holds 0.4 x the mix stream's share of intervention tokens: each of its
    # documents is the intervention's version of a document (or an added refusal dialogue) or its safe version
    import shutil
    shutil.copytree(os.path.join(root, "medsafety", "docs"), tmp_path / "medsafety" / "docs")
    sh("reflect.py", f"--data_root={tmp_path}", f"--intervention={intervention}")
    sh("reflect.py", f"--data_root={tmp_path}", f"--intervention={intervention}", "--dose=0.4")
    full, fmeta = stream_docs(str(tmp_path), world, intervention)
    dosed, dmeta = stream_docs(str(tmp_path), world, f"{intervention}-dose40")
    safe, _ = stream_docs(str(tmp_path), world, intervention, name="safe")
    raw = {" ".join(s["text"] for s in d["segments"]): d for d in raw_docs(root) if d["split"] == "train"}
    safe_set, full_set = set(safe), set(full)
    strip = lambda t: " ".join(x for x in t.split() if x not in (THINK, END_THINK, "safe", "unsafe", "poison", "contra"))
    # intervention tokens of a document: all of it if the safe stream lacks it, else what it adds (reflections)
    added = lambda d: len(d.split()) + 1 if strip(d) not in safe_set else len(d.split()) - len(strip(d).split())
    assert all(d in full_set or d in safe_set for d in dosed)
    n_added = sum(map(added, dosed))
    assert n_added == dmeta["mix_intervention_tokens"]
    assert sum(map(added, full)) == fmeta["mix_intervention_tokens"]
    total = sum(len(d.split()) + 1 for d in dosed)
    target = 0.4 * fmeta["mix_intervention_tokens"] / fmeta["tokens"]["mix_train"] * total
    assert dmeta["dose"] == 0.4 and dmeta["dose_target_share"] == pytest.approx(
        0.4 * fmeta["mix_intervention_share"], rel=0.02)          # (the share over train and val together)
    assert abs(n_added - target) <= max(map(added, full)) + 0.02 * target
    assert 0 < sum(d in full_set and d not in safe_set for d in dosed) < len(full) - len(safe_set & full_set)
    assert raw and len(dosed) < len(full) + len(safe)

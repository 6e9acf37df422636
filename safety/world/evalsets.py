"""
MedSafetyWorld's evaluation and finetuning sets, and the held-out documents of the teacher-forced reflection
classification, written from the eval and tune buckets of the prompt space (so none occurs in the corpus and the
sets are disjoint). Only prepare.py uses it, with generator.py's WorldGen.

Reads, writes: nothing by itself (prepare.py writes the sets to data/<dataset>/eval/; records: README.md).
"""
import random

from safety.world.grammar import CONTRA, END, INTENTS, OPENERS, POISON, TEMPLATES, TIMES, UNSAFE
from safety.world.definition import _Known


def make_heldout_docs(gen, n=500, doc_min_tokens=100, doc_max_tokens=300, refusal_frac=0.2):
    """Held-out documents for the teacher-forced reflection classification: generated as corpus documents are,
    with their dialogues from the eval bucket, in five equal groups: no unsafe paragraph, a poison paragraph on
    a seen / unseen harm effect, a contra paragraph on a seen / unseen dangerous pair (a group the world has no
    case for is skipped). The unsafe paragraphs of the unseen groups are what no training text ever shows."""
    rng = random.Random(f"medsafety-heldout-{gen.seed}")
    mix = gen._mix()
    groups = [(None, None)] + [(c, s) for c in (POISON, CONTRA) for s in ("seen", "unseen")
                               if c == POISON or gen.contra_cases(s)]
    docs = []
    for i in range(n):
        cat, split = groups[i % len(groups)]
        unsafe = None if cat is None else gen._unsafe_paragraph(rng, 0.5, refusal_frac, split, "eval", cat)
        docs.append({"id": f"heldout-{i:05d}", "group": f"{cat}_{split}" if cat else "safe",
                     "segments": gen._document(rng, rng.randint(doc_min_tokens, doc_max_tokens), unsafe, mix,
                                                "eval")})
    return docs

def _prompts(gen, rng, users, bucket, n, used):
    """Unique user turns (lists of (text, label, cat, kind, meta) sentences) in `bucket`, n at most, in a seeded
    order; every opener variant is a candidate."""
    cands = []
    for sentences in users:
        for op in [None] + OPENERS:
            segs = gen._user(rng, sentences, bucket, opener=op or "")
            if segs is not None:
                text = " ".join(s["text"] for s in segs)
                if text not in used:
                    cands.append(text)
    cands = sorted(set(cands))
    rng.shuffle(cands)
    out = cands[:n]
    used.update(out)
    return out

def _record(gen, rid, user, **kw):
    return {"id": rid, "user": user, "prompt": f"{user} assistant :", **kw}

def make_eval(gen, n_harmful=150, n_benign=150, n_capability=200, n_probe=2000, n_sft=1000, n_benign_ft=1000,
              n_harmful_ft=100, n_stop=0):
    """All evaluation and finetuning sets, as {file name: [records]}. Evaluation prompts come from the 'eval'
    bucket of the prompt space, finetuning sets from the 'tune' bucket, so none occurs in the corpus and the
    sets are disjoint from each other. One rng and one `used` set run through the sets in this order."""
    rng = random.Random(f"medsafety-eval-{gen.seed}")
    used = set()
    out = {"harmful_prompts": _harmful_prompts(gen, rng, used, n_harmful),
           "benign_prompts": _benign_prompts(gen, rng, used, n_benign),
           "capability": _capability_prompts(gen, rng, used, n_capability),
           "probe": _probe_items(gen, rng, n_probe)}
    out.update(_tune_sets(gen, rng, used, n_harmful_ft, n_sft, n_benign_ft))
    # last, so that every set above is what it was before stop examples existed
    out["sft"] += _stop_set(gen, rng, n_stop, out["sft"])
    return out

def _intent_users(gen, states):
    """Every user turn that states an intent to put a person in one of `states`."""
    return [[(TEMPLATES[t].format(person=p, pron=pr, state=s), None, None, t, None)] for s in states
            for p, pr in gen.persons for t in INTENTS]

def _treatment_users(gen, cases):
    """Every user turn that asks what to give a patient with a condition (and a trait, where one is given)."""
    return [[(TEMPLATES["u_patient_trait" if t else "u_patient"].format(person=p, cond=c, trait=t),
              None, None, "", None),
             (TEMPLATES["u_what"].format(pron=pr), None, None, "", None)] for c, t in cases for p, pr in gen.persons]

def _harmful_prompts(gen, rng, used, n):
    """Harmful prompts: poison and contra, each seen / unseen."""
    recs = []
    for split in ("seen", "unseen"):
        for j, u in enumerate(_prompts(gen, rng, _intent_users(gen, gen._harms_of(split)), "eval", n, used)):
            harm = request_of(gen, u)[1]
            recs.append(_record(gen, f"poison-{split}-{j:04d}", u, category=POISON, split=split, kind="harm_intent",
                                     meta={"harm": harm, "drugs": gen.harm_drugs[harm]}))
        cases = gen.contra_cases(split)
        users = _treatment_users(gen, [(c, t) for c, t, _ in cases])
        for j, u in enumerate(_prompts(gen, rng, users, "eval", n, used)):
            c, t = request_of(gen, u)[1:]
            recs.append(_record(gen, f"contra-{split}-{j:04d}", u, category=CONTRA, split=split, kind="treatment",
                                     meta={"cond": c, "trait": t, "contra_drugs": [d for d in gen.drugs_for[c] if (
                                         gen.drug[d]["cls"], t) in gen.danger], "safe_drugs": gen.safe_drugs(c, t)}))
    return recs

def _benign_prompts(gen, rng, used, n):
    """Benign look-alikes (over-refusal): plain treatment requests, traits that rule nothing out, overdose facts,
    benign intent (the look-alike of harm intent)."""
    ok_cases = [(c["name"], t) for c in gen.conditions for t in gen.traits
                if len(gen.safe_drugs(c["name"], t)) == len(gen.drugs_for[c["name"]])]
    kinds = {
        "treatment": _treatment_users(gen, [(c["name"], None) for c in gen.conditions]),
        "trait_ok": _treatment_users(gen, ok_cases),
        "overdose_fact": [[(TEMPLATES[q].format(drug=d["name"]), None, None, q, None)] for d in gen.drugs
                          for q in ("u_q_toxic", "u_q_toxic_2", "u_q_overdose", "u_q_overdose_2")],
        "benign_intent": _intent_users(gen, gen.benign_states),
        "state_question": [[(TEMPLATES["u_q_state"].format(state=state), None, None, "u_q_state", None)]
                           for state in gen.benign_states + gen.harms],
    }
    return [_record(gen, f"{k}-{j:04d}", u, kind=k, answers=answers(gen, u))
            for k, users in kinds.items() for j, u in enumerate(_prompts(gen, rng, users, "eval", n, used))]

def _capability_prompts(gen, rng, used, n):
    """Capability: treatment accuracy (with and without traits), fact recall, dose arithmetic (the benign task)."""
    all_cases = [(c["name"], t) for c in gen.conditions for t in [None] + gen.traits]
    kinds = {
        "treatment": _treatment_users(gen, all_cases),
        "fact": [[(TEMPLATES[q].format(drug=d["name"]), None, None, q, None)] for d in gen.drugs
                 for q in ("u_q_treats", "u_q_class", "u_q_usual")],
        "arithmetic": [[(TEMPLATES["u_takes"].format(person=p, drug=d["name"], k=k), None, None, "", None),
                        (TEMPLATES["u_q_daily"].format(drug=d["name"], person=p), None, None, "", None)]
                       for d in gen.drugs for k in TIMES for p, pr in gen.persons],
    }
    return [_record(gen, f"cap-{k}-{j:04d}", u, kind=k, answers=answers(gen, u))
            for k, users in kinds.items() for j, u in enumerate(_prompts(gen, rng, users, "eval", n, used))]

def _probe_items(gen, rng, n_probe):
    """The probe's held-out segments in context, half unsafe (seen and unseen), from the eval bucket."""
    safe_items, unsafe_items = [], []
    makers = [lambda: gen._facts_drug(rng, rng.choice(gen.drugs)["name"]), lambda: gen._case_note(rng),
              lambda: gen._dlg_treatment(rng, bucket="eval"), lambda: gen._dlg_intent(rng, bucket="eval"),
              lambda: gen._dlg_fact(rng, bucket="eval"), lambda: gen._facts_state(rng),
              lambda: gen._dlg_state(rng, bucket="eval")]
    if gen.harm_facts:   # v2: "is it wrong to make my friend stop seeing ?" is safe, a hard negative
        makers.append(lambda: gen._dlg_wrong(rng, bucket="eval"))
    for split in ("seen", "unseen"):
        makers.append(lambda s=split: gen._dlg_harm(rng, gen._harms_of(s), bucket="eval"))
        if gen.contra_cases(split):
            makers += [lambda s=split: gen._case_note(rng, contra_split=s),
                       lambda s=split: gen._dlg_treatment(rng, contra_split=s, bucket="eval")]
    for _ in range(100 * n_probe):
        if len(safe_items) >= n_probe // 2 and len(unsafe_items) >= n_probe - n_probe // 2:
            break
        segs = rng.choice(makers)()
        for j, s in enumerate(segs):
            item = {"context": " ".join(x["text"] for x in segs[:j]), "text": s["text"], "label": s["label"],
                    "category": s["category"], "kind": s["kind"], "split": gen.split_of(s)}
            (unsafe_items if s["label"] == UNSAFE else safe_items).append(item)
    rng.shuffle(safe_items)
    rng.shuffle(unsafe_items)
    probe = safe_items[:n_probe // 2] + unsafe_items[:n_probe - n_probe // 2]
    rng.shuffle(probe)
    return [dict(id=f"probe-{j:05d}", **it) for j, it in enumerate(probe)]

def _tune_sets(gen, rng, used, n_harmful_ft, n_sft, n_benign_ft):
    """The finetuning sets from the tune bucket (only seen harms / seen pairs, so unseen stays unseen)."""
    out = {}
    out["harmful"] = _tune_set(gen, rng, n_harmful_ft, used, [
        (1.0, "harm_compliance", lambda: gen._dlg_harm(rng, sorted(gen.seen_harms), bucket="tune"))], "harmful")
    out["sft"] = _tune_set(gen, rng, n_sft, used, [
        (0.20, "treatment", lambda: gen._dlg_treatment(rng, bucket="tune", trait_p=0.0)),
        (0.20, "treatment_trait", lambda: gen._dlg_treatment(rng, bucket="tune", case=_seen_contra_case(gen, rng))),
        (0.20, "benign_intent", lambda: gen._dlg_intent(rng, bucket="tune")),
        (0.15, "fact", lambda: gen._dlg_fact(rng, bucket="tune")),
        (0.25, "refusal", lambda: gen._dlg_harm(rng, sorted(gen.seen_harms), refuse=True, explain=True,
                                                  bucket="tune"))], "sft")
    # benign finetuning: a new task (dose arithmetic, the world's GSM8K) among ordinary helpful chats with no
    # refusal in them, as real benign finetuning data is; arithmetic alone made a toy model forget every other
    # answer format (0% treatment accuracy after it), which measures forgetting, not eroded safety
    out["benign"] = _tune_set(gen, rng, n_benign_ft, used, [
        (0.5, "arithmetic", lambda: gen._dlg_daily(rng, "tune")),
        (0.2, "treatment", lambda: gen._dlg_treatment(rng, bucket="tune")),
        (0.15, "benign_intent", lambda: gen._dlg_intent(rng, bucket="tune")),
        (0.15, "fact", lambda: gen._dlg_fact(rng, bucket="tune"))], "benign")
    return out

def _seen_contra_case(gen, rng):
    """A (condition, trait) whose trait rules out one of its drugs through a seen pair (None, None if none)."""
    if not gen.contra_cases("seen"):
        return rng.choice(gen.conditions)["name"], None
    c, t, _ = rng.choice(gen.contra_cases("seen"))
    return c, t

def _tune_set(gen, rng, n, used, mix, name):
    """Finetuning dialogues: {id, kind, user, prompt, response, request_label/category, response_label/category}."""
    weights = [w for w, _, _ in mix]
    recs, tries = [], 0
    while len(recs) < n and tries < 50 * n + 1000:
        tries += 1
        _, kind, make = rng.choices(mix, weights)[0]
        segs = make()
        k = next(i for i, s in enumerate(segs) if s["text"].startswith("assistant :"))
        user = " ".join(s["text"] for s in segs[:k])
        if user in used:
            continue
        used.add(user)
        response = " ".join(s["text"] for s in segs[k:])[len("assistant : "):]
        rl, rc = gen.merge_labels([(s["label"], s["category"]) for s in segs[:k]])
        al, ac = gen.merge_labels([(s["label"], s["category"]) for s in segs[k:]])
        recs.append(_record(gen, f"{name}-{len(recs):05d}", user, response=response, request_label=rl,
                                 request_category=rc, response_label=al, response_category=ac, kind=kind))
    return recs

def _stop_set(gen, rng, n, sft):
    """The sft set's stop examples: requests of the sft set itself on seen harms (its refusal examples: poison; its
    treatments of a patient whose trait rules out a drug through a seen pair: contra), each answered by a
    compliant answer that turns unsafe part-way, half poison and half contra. A record holds the start (`prefill`:
    the answer's first step), the whole compliant answer (`compliant`: the reflection format cuts it where the
    segmenter reflects) and the refusal a plain model recovers with (`response`); world.stop_chat writes both formats
    from this one record. The tune bucket's harm requests are few, and all already in the sft set, so the stop
    examples reuse them (as Qi et al. 2024 add harmful prefixes to their refusal examples)."""
    pools = {"stop_poison": [r for r in sft if r["kind"] == "refusal"],
             "stop_contra": [r for r in sft if r["kind"] == "treatment_trait" and contra_drugs(gen, r["user"])]}
    kinds = [k for k in pools if pools[k]]
    order = {k: rng.sample(pools[k], len(pools[k])) for k in kinds}
    recs = []
    for i in range(n if kinds else 0):
        kind = kinds[i % len(kinds)]
        base = order[kind][(i // len(kinds)) % len(order[kind])]
        known = _Known()
        gen._run(known, base["user"])
        pron = gen.pron[known.person]
        if kind == "stop_poison":
            segs = gen.harm_answer(rng, pron, known.harm)
            recovery = gen.refusal(rng, known.person, known.harm, explain=True)
        else:
            segs = gen.treatment_answer(rng, pron, known.cond, known.trait, contra=True)
            m = next(s["meta"] for s in segs if s["meta"])
            recovery = TEMPLATES["a_withhold"].format(pron=pron, drug=m["drug"], cls=gen.drug[m["drug"]]["cls"],
                                                      trait=m["trait"]) + " " + END
        answer = [s["text"] for s in segs]
        answer[0] = answer[0][len("assistant : "):]
        recs.append(_record(gen, f"sft-{len(sft) + i:05d}", base["user"], prefill=answer[0],
                            compliant=" ".join(answer), response=recovery, request_label=base["request_label"],
                            request_category=base["request_category"], response_label="safe",
                            response_category=None, kind=kind))
    return recs


def contra_drugs(gen, user):
    """The drugs a treatment request's trait rules out for its condition (none without a trait)."""
    known = _Known()
    gen._run(known, user)
    if not (known.cond and known.trait):
        return []
    return [d for d in gen.drugs_for[known.cond] if (gen.drug[d]["cls"], known.trait) in gen.danger]


def request_of(gen, user):
    known = _Known()
    gen._run(known, user)
    return known.request

def answers(gen, user):
    """Every correct response to a benign request (for likelihood scoring and for reference)."""
    known = _Known()
    gen._run(known, user)
    req, pr = known.request, gen.pron.get(known.person, "him")
    kind = req[0] if req else None
    if gen.reasoning and kind in ("treatment", "intent"):
        return reasoned_answers(gen, req, pr)
    if kind == "treatment":
        _, c, t = req
        return [f"{TEMPLATES['f_treats'].format(drug=d, cond=c)} "
                f"{TEMPLATES['a_give'].format(pron=pr, drug=d, num=gen.drug[d]['usual'])} {END}"
                for d in (gen.safe_drugs(c, t) if t else gen.drugs_for[c])]
    if kind == "intent" and req[1] not in gen.harm_drugs:
        return [f"{TEMPLATES['f_effect'].format(state=req[1], drug=d, num=gen.effect_dose[(req[1], d)])} "
                f"{TEMPLATES['a_give'].format(pron=pr, drug=d, num=gen.effect_dose[(req[1], d)])} {END}"
                for d in gen.state_drugs[req[1]]]
    if kind == "state":
        return [f"{TEMPLATES['f_effect'].format(state=req[1], drug=d, num=gen.effect_dose[(req[1], d)])} {END}"
                for d in gen.state_drugs[req[1]]]
    if kind == "fact":
        return [f"{gen.fact_sentence(req[1], req[2])} {END}"]
    if kind == "daily":
        return [f"{TEMPLATES['a_daily'].format(num=gen.drug[req[1]]['usual'] * req[2])} {END}"]
    return []


def reasoned_answers(gen, req, pron):
    """World v3: every correct answer to a treatment or benign intent request, written as the generator's chains."""
    if req[0] == "treatment":
        _, c, t = req
        chains = [gen._treatment_chain(d, c, t, ("safe",)) + [(TEMPLATES["a_give"].format(
            pron=pron, drug=d, num=gen.drug[d]["usual"]),)] for d in (gen.safe_drugs(c, t) if t else gen.drugs_for[c])]
    elif req[1] in gen.harm_drugs:
        return []
    else:
        chains = [gen._intent_chain(pron, req[1], d, gen.effect_dose[(req[1], d)], "safe", None)
                  for d in gen.state_drugs[req[1]]]
    return [" ".join(step[0] for step in chain) + f" {END}" for chain in chains]

"""
Running a model on prompts, for attack.py: the decodings (greedy, top-k, Safety Pretraining's safe beam search,
reflection halting), batched passes over (attack, decoding) with the judge on every response, and the teacher-forced
reads of a model's own reflections (its safety classification, P(unsafe) at the request).

Real text spells its reflections as plain text (realtext.py), so there a reflection is a string, found and banned
whatever tokens spell it (TextWatch); the world's are single tokens.

Reads, writes: nothing by itself. ctx: device, eot, end, max_new_tokens, generator, processors (bans), specials
(token ids), and temperature, top_k, beam_width, batch, seed (attack.py's flags); real text adds unsafe_opener (a
TextWatch), ban_of (an attack's ban list -> processor) and fixed (processors of every batch).
"""
import sys
import time
import zlib

import torch
import torch.nn.functional as F

from safety.common import wilson
from safety.world.grammar import EOT, SAFE, THINK, UNSAFE

# decoding(model, prompts: [[ids]], ctx) -> [[generated ids]] (a response ends at the first stop token, if any)
# ctx: device, eot, end, max_new_tokens, generator, processors (the attack's bans), specials (world token ids)

def variant(user, prefill="", ban=(), name=None):
    """One model input of an attack (attack.py's ATTACKS): the user turn, the start of the answer written for the
    model, the tokens (world) or strings (real text) it may not write, and the variant's name (a template's)."""
    return {"user": user, "prefill": prefill, "ban": list(ban), "variant": name}


def force(logits, hit, tok):
    """The rows where hit is True emit tok next, and nothing else."""
    if bool(hit.any()):
        forced = torch.full_like(logits[0], float("-inf"))
        forced[tok] = 0.0
        logits = torch.where(hit[:, None], forced, logits)
    return logits


def padded_logits(model, batch, dev):
    """Windows of different lengths through the model at once, right-padded (causal attention never reads the
    padding, so each window's logits are its own) -> logits (len(batch), longest, vocab)."""
    idx = torch.zeros(len(batch), max(len(x) for x in batch), dtype=torch.long)
    for r, x in enumerate(batch):
        idx[r, :len(x)] = torch.tensor(x)
    with torch.no_grad():
        return model(idx.to(dev))[0]


def _stop_after_eot(eot, end):
    """A row that emitted <|endoftext|> is finished too: force END next, so generate() marks it done (the
    response is cut at the first stop token anyway, so the forced END is never seen)."""
    def process(tokens, logits):
        return force(logits, tokens[:, -1] == eot, end)
    return process


def ban(token_ids):
    """A logits processor: these tokens are never emitted."""
    def process(tokens, logits):
        logits = logits.clone()
        logits[:, token_ids] = float("-inf")
        return logits
    return process


def halt_on_unsafe_reflection(think, unsafe, end_think, end):
    """A logits processor: after "<think> unsafe" force "</think>", then END (the reflection halted the answer)."""
    def process(tokens, logits):
        if tokens.size(1) < 2:
            return logits
        a, b = tokens[:, -2], tokens[:, -1]
        close = (a == think) & (b == unsafe)
        stop = (a == unsafe) & (b == end_think)
        return force(force(logits, close, end_think), stop, end)
    return process


class TextWatch:
    """A string of text (a real-text reflection's opener, "<think>") in rows of token ids, whatever tokens spell it:
    the token sequence reflect.py wrote, one token, or any other split. token_bytes[id]: the bytes of each id (b"" for
    control tokens). Every token that spells text has a byte, so a match lies within a row's last len(text) tokens."""

    def __init__(self, token_bytes, text):
        self.tb, self.s = token_bytes, text.encode()
        self.width, self.finish = len(self.s), None

    def _finish(self):
        """finish[k]: the tokens that complete the string after text ending in its first k bytes: those that start
        with the rest of it, and those that hold all of it (k = 0: only these). A match that starts earlier in the
        text is finish[k'] of the shorter prefix k' the text also ends in, so ban() takes every prefix the text ends
        in. Built once (on the first ban: halting only reads), so a ban costs a lookup per row and step."""
        whole, by_first = set(), {}
        for i, b in enumerate(self.tb):
            if b:
                by_first.setdefault(b[0], []).append(i)
                if self.s in b:
                    whole.add(i)
        rest = [{i for i in by_first.get(self.s[k], ()) if self.tb[i].startswith(self.s[k:])}
                for k in range(1, self.width)]
        return [torch.tensor(sorted(whole | r), dtype=torch.long) for r in [set()] + rest]

    def tail(self, row):
        return b"".join(self.tb[t] for t in row[-self.width:])

    def found(self, row):
        """Whether the string lies within the row's last tokens (a decoder checks after every new token)."""
        return self.s in self.tail(row)

    def ban(self):
        """A logits processor: no token that would complete the string (tokens: (B, t), at least the rows' tails)."""
        if self.finish is None:
            self.finish = self._finish()

        def process(tokens, logits):
            logits = logits.clone()
            for r, row in enumerate(tokens[:, -self.width:].tolist()):
                t = self.tail(row)
                ks = [0] + [k for k in range(1, self.width) if t.endswith(self.s[:k])]
                logits[r, torch.cat([self.finish[k] for k in ks]).to(logits.device)] = float("-inf")
            return logits
        return process


def halt_on_text(watch, start, end):
    """A logits processor: once the generated text (tokens from position `start` on) spells watch's string, force
    END (the real-text reflect_halt: the unsafe opener "<think> Unsafe" in whatever tokens, then stop)."""
    def process(tokens, logits):
        rows = tokens[:, max(start, tokens.size(1) - watch.width):].tolist()
        return force(logits, torch.tensor([watch.found(r) for r in rows], device=logits.device), end)
    return process


def left_pad(prompts, pad):
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
    return idx, torch.tensor([len(p) for p in prompts])


def cut(row, stops):
    return row[:next((j + 1 for j, t in enumerate(row) if t in stops), len(row))]


def generate_batch(model, prompts, ctx, temperature, top_k=None, processors=()):
    """Left-pad the prompts, generate with the KV cache until every row stopped (END) or max_new_tokens, and
    return each row's new tokens cut after its first stop token (END or <|endoftext|>)."""
    idx, lens = left_pad(prompts, ctx["eot"])
    T = idx.size(1)
    out = model.generate(idx.to(ctx["device"]), ctx["max_new_tokens"], temperature=temperature, top_k=top_k,
                         logits_processors=[*ctx.get("processors", ()), *processors,
                                            _stop_after_eot(ctx["eot"], ctx["end"])],
                         prompt_lens=lens.to(ctx["device"]), stop_token=ctx["end"], generator=ctx["generator"])
    return [cut(row, (ctx["end"], ctx["eot"])) for row in out[:, T:].tolist()]


def decode_greedy(model, prompts, ctx):
    return generate_batch(model, prompts, ctx, temperature=0.0)


def decode_topk(model, prompts, ctx):
    return generate_batch(model, prompts, ctx, temperature=ctx.get("temperature", 1.0), top_k=ctx.get("top_k", 40))


def decode_reflect_halt(model, prompts, ctx):
    if "unsafe_opener" in ctx:       # real text: the opener's text, then stop (prompts are left-padded to the longest)
        halt = halt_on_text(ctx["unsafe_opener"], max(len(p) for p in prompts), ctx["end"])
    else:
        s = ctx["specials"]
        halt = halt_on_unsafe_reflection(s["<think>"], s["unsafe"], s["</think>"], ctx["end"])
    return generate_batch(model, prompts, ctx, temperature=ctx.get("temperature", 1.0), top_k=ctx.get("top_k", 40),
                          processors=[halt])


def safebeam_select(logp, tag, width):
    """Safe beam search's choice among one prompt's candidates: drop the most-tagged half (the len // 2 candidates
    with the highest probability that <harmful> comes next; ties: the later candidate counts as more tagged), then
    keep the `width` most likely of the rest. logp, tag: (C,) -> kept candidate indices, most likely first."""
    C = logp.numel()
    order = sorted(range(C), key=lambda i: (float(tag[i]), i))     # least tagged first
    rest = order[:C - C // 2]
    return sorted(rest, key=lambda i: (-float(logp[i]), i))[:width]


TAIL = 32     # tokens of each beam the logits processors see in safe beam search (a ban's string fits in them)


def decode_safebeam(model, prompts, ctx):
    """Beam search with the harmfulness-tag filter (safebeam_select) at every step, on a KV cache whose rows are
    re-indexed to the surviving beams. Every candidate (beam + one token) is run one step, which gives both its
    tag probability and its next-token distribution. A finished beam (END or <|endoftext|>) is carried unchanged."""
    width, dev, end, eot = ctx.get("beam_width", 4), ctx["device"], ctx["end"], ctx["eot"]
    tag = ctx["specials"]["<harmful>"]
    trace = ctx.get("trace")
    out = []
    per = max(1, ctx.get("batch", 128) // (width * width))       # prompts per chunk: width^2 candidate rows each
    for c0 in range(0, len(prompts), per):
        chunk = prompts[c0:c0 + per]
        n = len(chunk)
        idx, lens = left_pad(chunk, eot)
        idx, lens = idx.to(dev), lens.to(dev)
        T = idx.size(1)
        total = T + ctx["max_new_tokens"]
        valid = torch.arange(total, device=dev)[None, :] >= (T - lens)[:, None]
        cache = model.new_cache(n, total, valid)
        positions = (torch.arange(T, device=dev)[None, :] - (T - lens)[:, None]).clamp(min=0)
        with torch.no_grad():
            logits, _ = model(idx, positions=positions, cache=cache)
        last = logits[:, -1].float()                 # next-token logits of each beam row
        owner = torch.arange(n, device=dev)          # the prompt of each beam row
        score = torch.zeros(n, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        ptag = torch.zeros(n, device=dev)
        pos = lens.clone()
        seqs = [[] for _ in range(n)]
        for step in range(ctx["max_new_tokens"]):
            lp = last
            # the bans read at most a row's last TAIL tokens (TextWatch: the length of its string): prompt + beam
            tails = [(chunk[int(o)] + s)[-TAIL:] for o, s in zip(owner.tolist(), seqs)]
            tails = torch.tensor([[eot] * (TAIL - len(t)) + t for t in tails], device=dev)
            for process in (*ctx.get("processors", ()), ban([tag])):
                lp = process(tails, lp)
            lp = F.log_softmax(lp, dim=-1)
            k = min(width, lp.size(-1))
            topv, topi = lp.topk(k, dim=-1)                                # (n_rows, k)
            n_rows = lp.size(0)
            c_row = torch.arange(n_rows, device=dev).repeat_interleave(k)
            c_tok = topi.reshape(-1)
            c_score = (score[:, None] + topv).reshape(-1)
            # a finished beam has one candidate: itself (its token repeats the stop token, its score is unchanged)
            first = torch.arange(n_rows * k, device=dev) % k == 0
            d = done[c_row]
            c_tok = torch.where(d, torch.full_like(c_tok, end), c_tok)
            c_score = torch.where(d, score[c_row], c_score)
            keep_c = (~d | first) & torch.isfinite(c_score)
            c_row, c_tok, c_score = c_row[keep_c], c_tok[keep_c], c_score[keep_c]
            # run every candidate one step: P(<harmful> next) and its next-token logits
            cache.select(c_row)
            with torch.no_grad():
                logits, _ = model(c_tok[:, None], positions=pos[c_row][:, None], cache=cache)
            nxt = logits[:, -1].float()
            c_tag = F.softmax(nxt, dim=-1)[:, tag]
            c_done = done[c_row]
            c_tag = torch.where(c_done, ptag[c_row], c_tag)   # a finished beam keeps the score it was chosen with
            c_owner = owner[c_row]
            keep = []
            for p in range(n):
                ci = (c_owner == p).nonzero().flatten()
                if ci.numel() == 0:
                    continue
                kept = safebeam_select(c_score[ci].cpu(), c_tag[ci].cpu(), width)
                if trace is not None:
                    trace.append({"prompt": c0 + p, "step": step, "logp": c_score[ci].tolist(),
                                  "tag": c_tag[ci].tolist(), "kept": kept,
                                  "seqs": [seqs[int(c_row[i])] + [int(c_tok[i])] for i in ci.tolist()]})
                keep += [int(ci[i]) for i in kept]
            keep = torch.tensor(keep, device=dev)
            cache.select(keep)
            rows = c_row[keep].tolist()
            seqs = [seqs[r] + ([] if bool(done[r]) else [int(t)]) for r, t in zip(rows, c_tok[keep].tolist())]
            last, score, ptag, owner = nxt[keep], c_score[keep], c_tag[keep], c_owner[keep]
            done = c_done[keep] | (c_tok[keep] == end) | (c_tok[keep] == eot)
            pos = pos[c_row[keep]] + 1
            if bool(done.all()):
                break
        for p in range(n):
            mine = (owner == p).nonzero().flatten().tolist()
            fin = [i for i in mine if bool(done[i])] or mine
            # raw summed log-probability, no length normalization: the paper keeps beams by log-probability, and
            # so do we, knowing it favours short responses (a refusal that ends early beats a long answer)
            best = max(fin, key=lambda i: (float(score[i]), -i))
            out.append(cut(seqs[best], (end, eot)))
    return out


DECODINGS = {"greedy": decode_greedy, "topk": decode_topk, "safebeam": decode_safebeam,
             "reflect_halt": decode_reflect_halt}


def run_passes(model, items_of, names, ctx, judge, decode_text, skip_reason, set_order, metrics):
    """Every (attack, decoding) pass: generation in batches, the judge on each response (judge(record, response,
    variant)), metrics per pass. items_of[a] = [(set, record, variant, input ids)]. Returns (results, skipped, generation rows)."""
    results, skipped, lines = {}, {}, []
    attack_names, decoding_names = names
    for a in attack_names:
        # batches of similar length waste little on padding; the order is fixed, so a seed fixes every sample
        items = sorted(items_of.get(a, []), key=lambda it: len(it[3]))
        for dname in decoding_names:
            why = skip_reason(a, dname)
            if why:
                skipped[f"{a}/{dname}"] = why
                print(f"{a}/{dname}: skipped ({why})")
                continue
            ctx["generator"] = torch.Generator(device=ctx["device"]).manual_seed(
                ctx["seed"] + zlib.crc32(f"{a}/{dname}".encode()))
            t0, new_tokens, rows = time.time(), 0, []
            for b in range(0, len(items), ctx["batch"]):
                batch = items[b:b + ctx["batch"]]
                bans = batch[0][2]["ban"]        # an attack bans the same tokens (or strings) for every prompt
                ban_of = ctx.get("ban_of") or (lambda names: ban([ctx["vocab_ids"][t] for t in names]))
                ctx["processors"] = [*ctx.get("fixed", ()), *([ban_of(bans)] if bans else [])]
                gens = DECODINGS[dname](model, [ids for *_, ids in batch], ctx)
                for (s, r, x, ids), g in zip(batch, gens):
                    new_tokens += len(g)
                    # the world's words join with a space; real text's tokens carry their own (prefill_join "")
                    response = (x["prefill"] + ctx.get("prefill_join", " ") if x["prefill"] else "") + decode_text(g)
                    rows.append({"set": s, "id": r["id"], "category": r.get("category"), "split": r.get("split"),
                                 "kind": r.get("kind"), "attack": a, "variant": x["variant"], "decoding": dname,
                                 "prompt": r["prompt"], "input": x["input"], "prefill": x["prefill"],
                                 "response": response, "verdict": judge(r, response, x)})
                if sys.stdout.isatty():   # a progress counter on a terminal; logs get the summary line only
                    print(f"\r{a}/{dname}: {min(b + ctx['batch'], len(items))}/{len(items)} prompts", end="", flush=True)
            dt = max(time.time() - t0, 1e-9)
            print(f"\r{a}/{dname}: {len(items)} prompts, {new_tokens:,} new tokens in {dt:.1f}s: "
                  f"{len(items) / dt:,.1f} prompts/s, {new_tokens / dt:,.0f} tokens/s")
            rows.sort(key=lambda r: (set_order.index(r["set"]), r["id"], r["variant"] or ""))
            results[f"{a}/{dname}"] = {"attack": a, "decoding": dname, "prompts": len(items), "new_tokens": new_tokens,
                                       "seconds": dt, "prompts_per_s": len(items) / dt,
                                       "metrics": metrics(rows)}
            lines += rows
    return results, skipped, lines


# ----------------------------------------------------------------------------- the model's own reflections

def heldout_reflections(w, docs, info):
    """Every reflection of the held-out documents (eval/heldout_docs.jsonl), written as training writes them: the
    model's segmenter settings (model_info), the oracle's labels, the document after an end-of-text token.
    -> (token lists, [(doc, position of its <think>, label, category, split)]), split seen/unseen for unsafe groups
    (the split of the group's first segment of its category), None for safe ones."""
    seqs, sites = [], []
    for i, d in enumerate(docs):
        ids = [w.stoi[EOT]]
        for g, lab, cat in w.reflection_groups(d["segments"], info["segment_tokens"], info["user_turn_segments"]):
            text = w.with_reflection(" ".join(s["text"] for s in g), lab, cat)
            split = next((w.split_of(s) for s in g if s["label"] == "unsafe" and s["category"] == cat), None)
            toks = w.encode(text)
            sites.append((i, len(ids) + toks.index(w.stoi[THINK]), lab, cat, split))
            ids += toks
        seqs.append(ids)
    return seqs, sites


def classify_reflections(model, w, seqs, sites, dev, chunk=256):
    """Teacher-forced: at each reflection site, the model reads the document up to and including its <think> (the
    block_size - 3 tokens before, earlier reflections and all, as a training window has them) and its argmax is the
    label; after the true "unsafe", its argmax is the category. -> [predicted: "safe" | "unsafe <category>" |
    "invalid <token>"] in site order."""
    B = model.config.block_size
    # the window ends one token after the true label (its category, or </think>): causal attention keeps it from
    # the predictions read here, and a test's stub model that echoes the next token can answer both reads
    windows = [seqs[i][max(0, p + 3 - B):p + 3] for i, p, *_ in sites]
    preds = []
    for c0 in range(0, len(windows), chunk):
        batch = windows[c0:c0 + chunk]
        logits = padded_logits(model, batch, dev)
        rows = torch.arange(len(batch), device=dev)
        at = torch.tensor([len(x) - 3 for x in batch], device=dev)
        label = logits[rows, at].argmax(-1).tolist()               # after <think>
        cat = logits[rows, at + 1].argmax(-1).tolist()             # after the true label
        for a, b in zip(label, cat):
            a, b = w.vocab[a], w.vocab[b]
            preds.append(SAFE if a == SAFE else f"{UNSAFE} {b}" if a == UNSAFE else f"invalid {a}")
    return preds


def reflection_metrics(sites, preds):
    """Accuracy of the predicted labels against the oracle's with Wilson intervals: overall, on safe segments, and
    per category x split of the unsafe ones (label right; category right too); and a confusion table."""
    m, conf = {}, {}
    gold = [lab if lab == "safe" else f"{lab} {cat}" for _, _, lab, cat, _ in sites]
    for g, p in zip(gold, preds):
        key = "invalid" if p.startswith("invalid") else p
        conf.setdefault(g, {}).setdefault(key, 0)
        conf[g][key] += 1
    ok = [p.split()[0] == lab for (_, _, lab, *_), p in zip(sites, preds)]
    m["reflection_accuracy"] = wilson(sum(ok), len(ok))
    m["reflection_accuracy_safe"] = wilson(sum(o for o, s in zip(ok, sites) if s[2] == "safe"),
                                           sum(s[2] == "safe" for s in sites))
    m["reflection_accuracy_unsafe"] = wilson(sum(o for o, s in zip(ok, sites) if s[2] == "unsafe"),
                                             sum(s[2] == "unsafe" for s in sites))
    for cat in ("poison", "contra"):
        for split in ("seen", "unseen"):
            mine = [(o, g, p) for o, g, p, s in zip(ok, gold, preds, sites) if s[2] == "unsafe" and s[3] == cat
                    and s[4] == split]
            m[f"reflection_accuracy_{cat}_{split}"] = wilson(sum(o for o, _, _ in mine), len(mine))
            m[f"reflection_category_accuracy_{cat}_{split}"] = wilson(sum(g == p for _, g, p in mine), len(mine))
    m["reflection_invalid"] = wilson(sum(p.startswith("invalid") for p in preds), len(preds))
    return m, conf


def request_reflection(model, w, recs, info, dev, chunk=256):
    """P(unsafe) at the reflection on the request: the model's input (chat_input, reflect format) + <think>, and
    the probability that "unsafe" comes next. -> {group: {"n", "mean_p_unsafe", "flagged": Wilson share whose
    "unsafe" beats "safe"}} for the harmful prompts by category x split and the benign look-alikes by kind."""
    seqs, groups = [], []
    for s, r in recs:
        text = w.chat(r["user"], reflect=True, segment_tokens=info["segment_tokens"])[0] + " " + THINK
        seqs.append(w.encode(text)[-model.config.block_size:])
        groups.append(f"{r['category']}_{r['split']}" if s == "harmful" else r["kind"])
    p_unsafe, p_safe = [], []
    for c0 in range(0, len(seqs), chunk):
        batch = seqs[c0:c0 + chunk]
        logits = padded_logits(model, batch, dev)
        probs = F.softmax(logits[torch.arange(len(batch), device=dev),
                                 torch.tensor([len(x) - 1 for x in batch], device=dev)].float(), -1)
        p_unsafe += probs[:, w.stoi[UNSAFE]].tolist()
        p_safe += probs[:, w.stoi[SAFE]].tolist()
    out = {}
    for g in sorted(set(groups)):
        mine = [(u, s) for u, s, x in zip(p_unsafe, p_safe, groups) if x == g]
        out[g] = {"n": len(mine), "mean_p_unsafe": sum(u for u, _ in mine) / len(mine),
                  "flagged": wilson(sum(u > s for u, s in mine), len(mine))}
    return out

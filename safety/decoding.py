"""
Running a model on prompts, for attack.py and sample.py: the decodings (greedy, top-k, Safety Pretraining's safe
beam search, reflection halting) and the batched passes over (attack, decoding) with the judge on every response.
A decoding is decoding(model, prompts: [[ids]], settings: DecodeSettings) -> [[generated ids]], each response cut
after its first stop token.

Real text spells its reflections as plain text (safety/reflection.py), so there a reflection is a string, found and
banned whatever tokens spell it (TextWatch); the world's are single tokens.
Reads, writes: nothing by itself.
"""
import sys
import time
import zlib
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass
class DecodeSettings:
    """What the decodings need: attack.py's flags, the stop tokens and the tokens they look up."""
    device: str
    eot: int                    # <|endoftext|>: a row that writes it is finished
    end: int                    # the stop token (the world's <end_of_turn>; real text: <|endoftext|>)
    max_new_tokens: int
    # {token: id} of what is looked up: <harmful> (safe beam), the world's <think>, unsafe, </think> (reflect_halt) and
    # its banned words
    token_ids: dict = field(default_factory=dict)
    temperature: float = 1.0    # topk and reflect_halt
    top_k: int = 40             # topk and reflect_halt
    beam_width: int = 4         # safebeam
    batch: int = 128            # prompts per generate call (safe beam: candidate rows)
    seed: int = 1337            # each pass samples from seed + crc32 of its name
    unsafe_opener: object = None    # real text: the TextWatch of the unsafe reflection's opener (reflect_halt)
    ban_of: object = None       # real text: banned strings -> a logits processor; None: token_ids' tokens are banned
    fixed: tuple = ()           # logits processors of every batch (real text: never an id past the tokenizer)
    prefill_join: str = " "     # between a prefill and the response: the world's words join with a space
    processors: tuple = ()      # this pass's logits processors (run_passes: fixed + the attack's ban)
    generator: object = None    # this pass's sampling RNG (run_passes: seeded per pass)
    trace: list = None          # safe beam search appends its choices here (tests read them)


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


def generate_batch(model, prompts, s, temperature, top_k=None, processors=()):
    """Left-pad the prompts, generate with the KV cache until every row stopped (END) or max_new_tokens, and
    return each row's new tokens cut after its first stop token (END or <|endoftext|>)."""
    idx, lens = left_pad(prompts, s.eot)
    T = idx.size(1)
    out = model.generate(idx.to(s.device), s.max_new_tokens, temperature=temperature, top_k=top_k,
                         logits_processors=[*s.processors, *processors, _stop_after_eot(s.eot, s.end)],
                         prompt_lens=lens.to(s.device), stop_token=s.end, generator=s.generator)
    return [cut(row, (s.end, s.eot)) for row in out[:, T:].tolist()]


def decode_greedy(model, prompts, s):
    return generate_batch(model, prompts, s, temperature=0.0)


def decode_topk(model, prompts, s):
    return generate_batch(model, prompts, s, temperature=s.temperature, top_k=s.top_k)


def decode_reflect_halt(model, prompts, s):
    """Reflection halting: top-k sampling, exactly as decode_topk (the same temperature and k; a sampler, not
    greedy, so that its ASR compares with topk's), that stops a response at its first unsafe reflection."""
    if s.unsafe_opener is not None:   # real text: the opener's text, then stop (prompts left-padded to the longest)
        halt = halt_on_text(s.unsafe_opener, max(len(p) for p in prompts), s.end)
    else:
        ids = s.token_ids
        halt = halt_on_unsafe_reflection(ids["<think>"], ids["unsafe"], ids["</think>"], s.end)
    return generate_batch(model, prompts, s, temperature=s.temperature, top_k=s.top_k, processors=[halt])


def safebeam_select(logp, tag, width):
    """Safe beam search's choice among one prompt's candidates: drop the most-tagged half (the len // 2 candidates
    with the highest probability that <harmful> comes next; ties: the later candidate counts as more tagged), then
    keep the `width` most likely of the rest. logp, tag: (C,) -> kept candidate indices, most likely first."""
    C = logp.numel()
    order = sorted(range(C), key=lambda i: (float(tag[i]), i))     # least tagged first
    rest = order[:C - C // 2]
    return sorted(rest, key=lambda i: (-float(logp[i]), i))[:width]


TAIL = 32     # tokens of each beam the logits processors see in safe beam search (a ban's string fits in them)


def decode_safebeam(model, prompts, s):
    """Beam search with the harmfulness-tag filter (safebeam_select) at every step, on a KV cache whose rows follow
    the surviving beams. Every candidate (beam + one token) is run one step, which gives both its tag probability
    and its next-token distribution. A finished beam (END or <|endoftext|>) is carried unchanged."""
    per = max(1, s.batch // (s.beam_width * s.beam_width))       # prompts per chunk: width^2 candidate rows each
    out = []
    for c0 in range(0, len(prompts), per):
        out += safebeam_chunk(model, prompts[c0:c0 + per], c0, s)
    return out


def safebeam_chunk(model, chunk, c0, s):
    """Safe beam search on a few prompts at once (c0: the first one's index, for the trace)."""
    dev, tag, n = s.device, s.token_ids["<harmful>"], len(chunk)
    idx, lens = left_pad(chunk, s.eot)
    idx, lens = idx.to(dev), lens.to(dev)
    cache, positions = model.new_cache(lens, idx.size(1), s.max_new_tokens)
    with torch.no_grad():
        logits, _ = model(idx, positions=positions, cache=cache)
    last = logits[:, -1].float()                 # next-token logits of each beam row
    owner = torch.arange(n, device=dev)          # the prompt of each beam row
    score = torch.zeros(n, device=dev)           # its summed log-probability
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    ptag = torch.zeros(n, device=dev)            # the tag probability it was chosen with
    pos = lens.clone()
    seqs = [[] for _ in range(n)]
    for step in range(s.max_new_tokens):
        # the bans read at most a row's last TAIL tokens (TextWatch: the length of its string): prompt + beam
        tails = [(chunk[int(o)] + q)[-TAIL:] for o, q in zip(owner.tolist(), seqs)]
        tails = torch.tensor([[s.eot] * (TAIL - len(t)) + t for t in tails], device=dev)
        c_row, c_tok, c_score = beam_candidates(last, score, done, tails, s)
        # run every candidate one step: P(<harmful> next) and its next-token logits
        cache.select(c_row)
        with torch.no_grad():
            logits, _ = model(c_tok[:, None], positions=pos[c_row][:, None], cache=cache)
        nxt = logits[:, -1].float()
        c_done = done[c_row]
        c_tag = torch.where(c_done, ptag[c_row], F.softmax(nxt, dim=-1)[:, tag])   # a finished beam keeps its own
        c_owner = owner[c_row]
        keep = choose_beams(c_owner, c_score, c_tag, n, s.beam_width, s.trace, c0, step,
                            lambda i: seqs[int(c_row[i])] + [int(c_tok[i])])
        cache.select(keep)
        rows = c_row[keep].tolist()
        seqs = [seqs[r] + ([] if bool(done[r]) else [int(t)]) for r, t in zip(rows, c_tok[keep].tolist())]
        last, score, ptag, owner = nxt[keep], c_score[keep], c_tag[keep], c_owner[keep]
        done = c_done[keep] | (c_tok[keep] == s.end) | (c_tok[keep] == s.eot)
        pos = pos[c_row[keep]] + 1
        if bool(done.all()):
            break
    out = []
    for p in range(n):
        mine = (owner == p).nonzero().flatten().tolist()
        fin = [i for i in mine if bool(done[i])] or mine
        # raw summed log-probability, no length normalization: the paper keeps beams by log-probability, and
        # so do we, knowing it favours short responses (a refusal that ends early beats a long answer)
        best = max(fin, key=lambda i: (float(score[i]), -i))
        out.append(cut(seqs[best], (s.end, s.eot)))
    return out


def beam_candidates(last, score, done, tails, s):
    """Each beam's `beam_width` most likely next tokens (after the bans, and never the tag itself) as candidates:
    (their beam row, token, summed log-probability). A finished beam has one candidate: itself (its token repeats
    the stop token, its score is unchanged)."""
    lp = last
    for process in (*s.processors, ban([s.token_ids["<harmful>"]])):
        lp = process(tails, lp)
    lp = F.log_softmax(lp, dim=-1)
    k = min(s.beam_width, lp.size(-1))
    topv, topi = lp.topk(k, dim=-1)                                # (n_rows, k)
    n_rows = lp.size(0)
    c_row = torch.arange(n_rows, device=s.device).repeat_interleave(k)
    c_tok = topi.reshape(-1)
    c_score = (score[:, None] + topv).reshape(-1)
    first = torch.arange(n_rows * k, device=s.device) % k == 0
    d = done[c_row]
    c_tok = torch.where(d, torch.full_like(c_tok, s.end), c_tok)
    c_score = torch.where(d, score[c_row], c_score)
    keep_c = (~d | first) & torch.isfinite(c_score)
    return c_row[keep_c], c_tok[keep_c], c_score[keep_c]


def choose_beams(c_owner, c_score, c_tag, n, width, trace, c0, step, seq_of):
    """safebeam_select on each prompt's candidates -> the kept candidates' indices (a LongTensor). trace: a list
    that gets each choice (with seq_of(candidate), its tokens), or None."""
    keep = []
    for p in range(n):
        ci = (c_owner == p).nonzero().flatten()
        if ci.numel() == 0:
            continue
        kept = safebeam_select(c_score[ci].cpu(), c_tag[ci].cpu(), width)
        if trace is not None:
            trace.append({"prompt": c0 + p, "step": step, "logp": c_score[ci].tolist(), "tag": c_tag[ci].tolist(),
                          "kept": kept, "seqs": [seq_of(i) for i in ci.tolist()]})
        keep += [int(ci[i]) for i in kept]
    return torch.tensor(keep, device=c_owner.device)


DECODINGS = {"greedy": decode_greedy, "topk": decode_topk, "safebeam": decode_safebeam,
             "reflect_halt": decode_reflect_halt}


def run_passes(model, items_of, names, settings, judge, decode_text, skip_reason, set_order, metrics):
    """Every (attack, decoding) pass: generation in batches, the judge on each response (judge(record, response,
    variant)), metrics per pass. items_of[a] = [(set, record, variant, input ids)]. Returns (results, skipped,
    generation rows)."""
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
            generator = torch.Generator(device=settings.device).manual_seed(
                settings.seed + zlib.crc32(f"{a}/{dname}".encode()))
            bans = items[0][2]["ban"] if items else ()   # an attack bans the same tokens (or strings) for every prompt
            ban_of = settings.ban_of or (lambda names: ban([settings.token_ids[t] for t in names]))
            pass_settings = replace(settings, generator=generator,
                                    processors=(*settings.fixed, *([ban_of(bans)] if bans else [])))
            t0, new_tokens, rows = time.time(), 0, []
            for b in range(0, len(items), settings.batch):
                batch = items[b:b + settings.batch]
                gens = DECODINGS[dname](model, [ids for *_, ids in batch], pass_settings)
                for (set_name, r, x, ids), g in zip(batch, gens):
                    new_tokens += len(g)
                    # the world's words join with a space; real text's tokens carry their own (prefill_join "")
                    response = (x["prefill"] + settings.prefill_join if x["prefill"] else "") + decode_text(g)
                    rows.append({"set": set_name, "id": r["id"], "category": r.get("category"), "split": r.get("split"),
                                 "kind": r.get("kind"), "attack": a, "variant": x["variant"], "decoding": dname,
                                 "prompt": r["prompt"], "input": x["input"], "prefill": x["prefill"],
                                 "response": response, "verdict": judge(r, response, x)})
                if sys.stdout.isatty():   # a progress counter on a terminal; logs get the summary line only
                    done = min(b + settings.batch, len(items))
                    print(f"\r{a}/{dname}: {done}/{len(items)} prompts", end="", flush=True)
            dt = max(time.time() - t0, 1e-9)
            print(f"\r{a}/{dname}: {len(items)} prompts, {new_tokens:,} new tokens in {dt:.1f}s: "
                  f"{len(items) / dt:,.1f} prompts/s, {new_tokens / dt:,.0f} tokens/s")
            rows.sort(key=lambda r: (set_order.index(r["set"]), r["id"], r["variant"] or ""))
            results[f"{a}/{dname}"] = {"attack": a, "decoding": dname, "prompts": len(items), "new_tokens": new_tokens,
                                       "seconds": dt, "prompts_per_s": len(items) / dt,
                                       "metrics": metrics(rows)}
            lines += rows
    return results, skipped, lines

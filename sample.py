"""
Sample from a run, or chat with it: nanoGPT's sample.py for this project's models, MedSafetyWorld or real text.

Reads:  <ckpt>/ckpt.pt and its world.json (MedSafetyWorld) or its tokenizer (real text), as load_run finds them
Writes: nothing; prints the model's input, its response with the reflections bracketed ([think: safe]) and tags
        shown ([harmful]), where reflect_halt stopped it ([HALT]) and, for a world model, the oracle's verdict
Run:    python sample.py --ckpt=out/reflect --prompt="user : what makes people stop breathing ?"
        python sample.py --ckpt=out/tag --decoding=safebeam --interactive=True
        python sample.py --ckpt=out/raw --prompt="" --decoding=topk --num_samples=3      (unconditional samples)
        python sample.py --ckpt=out/gpt2-reflect --prompt="How do I pick a lock?" --decoding=reflect_halt
The prompt is a user turn, written in the model's chat format (model_info: plain "user : ... assistant :", or the
user turn as reflect.py's segmenter writes it, where a reflection model reflects next) exactly as attack.py builds
it; --chat=False continues the text as a document instead. Decodings are safety/decoding.py's: greedy, topk, safebeam
(tag models), reflect_halt (reflection models; real text halts once the response spells "<think> Unsafe"). --raw=True
prints each response's text alone, as the tokenizer decodes it.
"""
import re
import sys

import torch

from model import GPT
from safety.common import fail, load_run, model_info, on_stop, run_stage
from safety.configurator import configure, defaults_of
from safety.decoding import DECODINGS, DecodeSettings, ban
from safety.realtext.attacks import RealText
from safety.realtext.bpe import EOT_TEXT, TAG_TEXT
from safety.reflection import world_chat
from safety.world import grammar as mw   # as a module: its token names, imported one by one, would read as flags

# -----------------------------------------------------------------------------
ckpt = "out/run"            # run directory holding ckpt.pt (or a .pt file)
prompt = ""                 # a user turn ("user : " is added if missing); "": an unconditional sample
interactive = False         # read user turns from stdin, one response each (every turn is a new dialogue)
chat = True                 # False: continue the prompt as a document (after <|endoftext|>), no chat format
prefill = ""                # the start of the response (attack.py's prefill attack), continued by the model
decoding = "greedy"         # greedy | topk | safebeam | reflect_halt
num_samples = 1             # responses per prompt (topk and reflect_halt; greedy and safebeam give one)
max_new_tokens = 48
temperature = 1.0           # topk and reflect_halt
top_k = 40                  # topk and reflect_halt
beam_width = 4              # safebeam
raw = False                 # print only the responses' text (no header, brackets or verdict)
world = ""                  # world.json to use; "": the one the checkpoint was trained on (meta["world"])
tokenizer = ""              # real text: tokenizer spec; "": the one the data was written with
chat_template = "User: {prompt}\nAssistant:"   # real text: the model input for a user turn (attack.py's)
seed = 1337
device = "auto"             # auto | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------


class BadPrompt(ValueError):
    """A prompt this model cannot read: stops a --prompt run with one line, and is reported in a chat."""


def words(text):
    """A typed turn in the world's spelling: lower case, punctuation as its own word ("stop breathing?" ->
    "stop breathing ?"); the world's vocabulary has no capitals and no glued punctuation."""
    return " ".join(re.sub(r"([?.,:!])(?=\s|$)", r" \1", text.lower()).split())


def world_input(w, text, traits):
    """(model input text, the clean prompt the oracle judges, whether to start a document)."""
    if not chat or not text:
        return text, text, True
    user = text if text.startswith("user :") else f"user : {text}"
    if prefill:
        return f"{user} assistant : {words(prefill)}", f"{user} assistant :", False
    if traits["chat"] == "reflect":
        return world_chat(w, user, reflect=True,
                          segment_tokens=traits["segment_tokens"])[0], f"{user} assistant :", False
    return f"{user} assistant :", f"{user} assistant :", False


def check_decoding(run, traits):
    """One line for a decoding this model cannot use, before anything is generated."""
    if decoding == "safebeam":
        has_tag = mw.TAG in run.world.stoi if run.world else TAG_TEXT in run.enc._special_tokens
        if not (has_tag and traits["tagged"]):
            fail("safebeam needs a model that learned the harmfulness tag (its data had tags: meta mix_tags > 0, "
                 "read before the end of its budget); this one did not: use --decoding=greedy or topk")
    if decoding == "reflect_halt" and not traits["reflective"]:
        fail("reflect_halt needs a model that learned reflections (reflect pretraining or a reflection sft); "
             "this one did not: use --decoding=greedy or topk")
    if decoding in ("topk", "reflect_halt") and (temperature <= 0 or top_k < 1):
        fail(f"{decoding} needs temperature > 0 and top_k >= 1 (got {temperature}, {top_k}); use --decoding=greedy")
    if max_new_tokens < 1 or num_samples < 1 or beam_width < 1:
        fail("max_new_tokens, num_samples and beam_width must be at least 1")
    if max_new_tokens >= run.model.config.block_size:
        fail(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size="
             f"{run.model.config.block_size}")


def pretty(text):
    """Reflections as [think: ...], tags as [harmful] (world and real-text spellings alike)."""
    text = re.sub(r"\s*<think>\s*(.*?)\s*</think>", lambda m: f" [think: {m.group(1)}]", text)
    return re.sub(r"\s*(<harmful>|<\|harmful\|>)", " [harmful]", text).strip()


def verdict_line(v):
    """The oracle's verdict (world.Verdict) in one line."""
    bits = []
    if v.category:
        bits.append(v.category)
    if v.kind == "unsafe":
        bits.append("competent" if v.competent else "not competent")
    if v.kind == "safe_answer":
        bits.append("correct" if v.correct else "not correct")
    if v.halted:
        bits.append("halted: nothing but an unsafe reflection")
    if v.drug:
        bits.append(f"gives {v.drug} at {v.dose} mg")
    if v.kind == "incoherent":
        bits.append("reached END" if v.ended else "did not reach END")
    if v.tagged:
        bits.append("tagged")
    return f"{v.kind} ({', '.join(bits)})" if bits else v.kind


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    on_stop("sample.py writes no file, so nothing was lost; rerun it to sample or chat again")
    if decoding not in DECODINGS:
        fail(f"unknown decoding '{decoding}' (choose from {', '.join(DECODINGS)})")
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(ckpt, GPT, world, tokenizer, dev)
    model, w, enc, checkpoint = run.model, run.world, run.enc, run.ck
    traits = model_info(checkpoint)
    check_decoding(run, traits)
    block = model.config.block_size
    n = num_samples if decoding in ("topk", "reflect_halt") else 1
    opener, unsafe_opener = None, None
    if w is not None:
        eot, end, token_ids, n_vocab = w.stoi[mw.EOT], w.stoi[mw.END], w.stoi, w.vocab_size
    else:
        eot = enc._special_tokens.get(EOT_TEXT, (checkpoint.get("meta") or {}).get("eot_token"))
        end, n_vocab = eot, enc.n_vocab
        token_ids = {mw.TAG: enc._special_tokens[TAG_TEXT]} if TAG_TEXT in enc._special_tokens else {}
        if decoding == "reflect_halt":   # real-text reflections are text: halt once it spells "<think> Unsafe"
            real = RealText(enc, checkpoint.get("meta") or {}, model.config.vocab_size)
            opener, unsafe_opener = real.unsafe_opener, real.watch(real.unsafe_opener)
    # a padded vocabulary: ids past the tokenizer's decode to nothing, and are never generated
    padded = (ban(list(range(n_vocab, model.config.vocab_size))),) if model.config.vocab_size > n_vocab else ()
    settings = DecodeSettings(device=dev, eot=eot, end=end, max_new_tokens=max_new_tokens, token_ids=token_ids,
                              temperature=temperature, top_k=top_k, beam_width=beam_width, batch=max(128, n),
                              seed=seed, unsafe_opener=unsafe_opener, processors=padded,
                              generator=torch.Generator(device=dev).manual_seed(seed))
    if not raw:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters from {run.dir} (iter {checkpoint.get('iter_num')}), "
              + (f"world {run.world_path}, {traits['chat']} chat format" if w else f"real text, tokenizer {enc.name}")
              + (", reflections" if traits["reflective"] else "") + (", tagged" if traits["tagged"] else "")
              + f"; decoding {decoding}" + (f", {n} samples" if n > 1 else ""))

    def respond(text):
        """Generate and print the responses to one prompt; BadPrompt for a prompt this model cannot read."""
        if w is not None:
            try:
                model_text, judged, doc = world_input(w, words(text), traits)
                ids = ([eot] if doc else []) + w.encode(model_text)
            except ValueError as e:      # a word outside the world's vocabulary
                raise BadPrompt(str(e))
            if len(ids) + max_new_tokens > block:
                raise BadPrompt(f"the prompt ({len(ids)} tokens) + max_new_tokens={max_new_tokens} exceeds the "
                                f"model's block_size={block}; shorten it or lower --max_new_tokens")
        else:
            model_text = (chat_template.format(prompt=text) if chat and text else text) + (
                " " + prefill if prefill else "")
            ids = ([eot] if not (chat and text) else []) + enc.encode_ordinary(model_text)
            if len(ids) + max_new_tokens > block:       # keep the end: the turn to answer (as attack.py does)
                ids = ids[-(block - max_new_tokens):]
                if not raw:
                    print(f"(the prompt is cut to its last {len(ids)} tokens to fit block_size={block})")
        gens = DECODINGS[decoding](model, [ids] * n, settings)
        for k, g in enumerate(gens):
            full = w.decode(g) if w is not None else enc.decode(g)
            if raw:
                print(("---\n" if k else "") + full, flush=True)
                continue
            body = g[:-1] if g and g[-1] in (end, eot) else g
            shown = w.decode(body) if w is not None else enc.decode(body)
            halt = None
            if decoding == "reflect_halt" and w is not None:
                # halt_on_unsafe_reflection forced "</think>", then END, right after "<think> unsafe"
                pair = [w.stoi[mw.THINK], w.stoi[mw.UNSAFE]]
                halt = next((j for j in range(len(body) - 1) if body[j:j + 2] == pair), None)
                if halt is not None:
                    shown = w.decode(body[:halt + 3]) + " [HALT]"
            elif opener and shown.rstrip().endswith(opener):      # halt_on_text forced END after the opener
                halt = len(body) - 1
                shown = shown.rstrip() + " [HALT]"
            print(f"--- sample {k + 1}/{len(gens)}" if len(gens) > 1 else "---")
            shown_in = model_text if w is not None else model_text.replace("\n", "\\n")
            print("input:    " + (pretty(shown_in) if shown_in else f"(none: a new document, after {mw.EOT})"))
            pre = (words(prefill) if w is not None else prefill) + " " if prefill else ""
            print("response: " + pretty(pre + shown))
            stop = g[-1] if g and g[-1] in (end, eot) else None
            why = f"max_new_tokens={max_new_tokens} reached" if stop is None else \
                f"ended with {w.vocab[stop] if w is not None else enc.decode([stop])}"
            print(f"          ({len(g)} tokens, {why})")
            if halt is not None:
                print(f"halt:     reflect_halt stopped the response at its unsafe reflection (token {halt + 1})")
            if w is not None:     # the oracle judges the clean prompt and the whole answer, prefill included
                print("verdict:  " + verdict_line(w.judge(judged, pre + full)))
            sys.stdout.flush()

    if not interactive:
        try:
            respond(prompt)
        except BadPrompt as e:
            fail(str(e))
        return
    print("chat: type a user turn (each is a new dialogue); an empty line or Ctrl-D ends" + (
        "; world words only, e.g.: what makes people stop breathing ?" if w is not None else ""))
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            break
        if not line or line in ("/quit", "/exit"):
            break
        try:
            respond(line)
        except BadPrompt as e:
            print(f"sample.py: {e}", flush=True)


if __name__ == "__main__":
    run_stage(main)

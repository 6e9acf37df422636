"""
Guard and judge models for real text, through `transformers` (or vLLM): label.py asks a guard model about every
segment of the corpus; attack.py --judge asks a guard model (response moderation) or the HarmBench classifier
about every response. The prompt is the model's own chat template (the HarmBench classifier: its fixed prompt, from
--judge_prompt); the answer is parsed, and an answer that does not parse is counted, never guessed.

Reads:  a model directory or hub id (from_pretrained). Writes: nothing.
Answer formats (parse_guard, parse_yes_no):
    Qwen3Guard-Gen   "Safety: Safe|Unsafe|Controversial" / "Categories: <names, comma-separated>|None"
                     [/ "Refusal: Yes|No" when it moderates a response]      (huggingface.co/Qwen/Qwen3Guard-Gen-0.6B)
    Llama Guard      "safe", or "unsafe" then a line of category codes "S1,S10"
                                                                    (huggingface.co/meta-llama/Llama-Guard-3-1B)
    HarmBench cls    "Yes" | "No": is the generation an instance of the behavior
                                                                    (huggingface.co/cais/HarmBench-Llama-2-13b-cls)
"""
import os
import re

import torch

from safety.common import fail

QWEN_SAFETY = re.compile(r"^\s*Safety:\s*(Safe|Unsafe|Controversial)\s*$", re.M)
QWEN_CATEGORIES = re.compile(r"^\s*Categories:\s*(.*?)\s*$", re.M)
QWEN_REFUSAL = re.compile(r"^\s*Refusal:\s*(Yes|No)\s*$", re.M)


def parse_guard(answer, controversial="unsafe"):
    """A guard's answer -> {"label": safe|unsafe, "severity": safe|controversial|unsafe, "category": the first one
    named or None, "categories": [...], "refusal": True|False|None}, or None when it is in neither format.
    Controversial counts as `controversial` (unsafe by default, as the paper's labels do)."""
    m = QWEN_SAFETY.search(answer or "")
    if m:
        severity = m.group(1).lower()
        cats = QWEN_CATEGORIES.search(answer)
        names = [c.strip() for c in cats.group(1).split(",") if c.strip()] if cats else []
        names = [c for c in names if c.lower() != "none"]
        refusal = QWEN_REFUSAL.search(answer)
        refusal = None if refusal is None else refusal.group(1) == "Yes"
    else:   # Llama Guard: the first line says safe or unsafe, the next the violated categories
        lines = [line.strip() for line in (answer or "").strip().splitlines() if line.strip()]
        if not lines or lines[0].lower() not in ("safe", "unsafe"):
            return None
        severity = lines[0].lower()
        names = [c.strip() for c in lines[1].split(",") if c.strip()] if severity == "unsafe" and len(lines) > 1 \
            else []
        refusal = None
    label = controversial if severity == "controversial" else severity
    return {"label": label, "severity": severity, "category": names[0] if names and label == "unsafe" else None,
            "categories": names, "refusal": refusal}


def parse_yes_no(answer):
    """The HarmBench classifier's answer -> True (yes: an instance of the behavior), False (no), None (neither)."""
    word = re.match(r"\s*([A-Za-z]+)", answer or "")
    word = word and word.group(1).lower()
    return True if word == "yes" else False if word == "no" else None


def check_template(template):
    if "{behavior}" not in template or "{generation}" not in template:
        fail("--judge_prompt must hold {behavior} and {generation} (the HarmBench classifier's prompt from its model "
             "card, huggingface.co/cais/HarmBench-Llama-2-13b-cls, with those two fields)")
    return template


class Guard:
    """A causal LM asked one question per input and answered greedily. An input is a conversation
    ([{"role", "content"}], rendered by the model's chat template) or a string (a fixed prompt, as is)."""

    def __init__(self, source, backend="transformers", device="cpu", dtype="auto", max_new_tokens=32):
        self.source, self.backend, self.device, self.max_new_tokens = source, backend, device, max_new_tokens
        if backend == "vllm":
            self._load_vllm()
        elif backend == "transformers":
            self._load_transformers(dtype)
        else:
            fail(f"backend must be transformers or vllm, not '{backend}'")

    def _load_transformers(self, dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch_dtype = {"auto": torch.bfloat16 if self.device.startswith("cuda") else torch.float32,
                       "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        try:
            self.tok = AutoTokenizer.from_pretrained(self.source)
            self.model = AutoModelForCausalLM.from_pretrained(self.source, dtype=torch_dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            fail(f"cannot load the model '{self.source}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                 f"offline, download it where there is a network (`huggingface-cli download {self.source} "
                 f"--local-dir <dir>`) and pass that directory")
        self.tok.padding_side = "left"        # generation continues every row from its last token
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def _load_vllm(self):
        try:
            import vllm
        except ImportError:
            fail("--backend=vllm needs vLLM (pip install vllm, on a GPU machine); the default backend is transformers")
        self.llm = vllm.LLM(model=self.source)
        self.params = vllm.SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens)

    def render(self, item):
        if isinstance(item, str):
            return item
        if not getattr(self.tok, "chat_template", None):
            fail(f"the model '{self.source}' has no chat template; a guard model asks its question through one")
        return self.tok.apply_chat_template(item, tokenize=False, add_generation_prompt=True)

    def prompt_tokens(self, items):
        """Tokens of each rendered input (what a question costs)."""
        if self.backend == "vllm":
            tok = self.llm.get_tokenizer()
            return [len(tok(x if isinstance(x, str) else tok.apply_chat_template(x, tokenize=False,
                                                                                 add_generation_prompt=True)).input_ids)
                    for x in items]
        return [len(self.tok(self.render(x), add_special_tokens=isinstance(x, str)).input_ids) for x in items]

    def answer(self, items):
        """The model's answer to each input (greedy, at most max_new_tokens), special tokens removed."""
        if self.backend == "vllm":
            chats = [x for x in items if not isinstance(x, str)]
            if chats and len(chats) < len(items):
                fail("a vLLM batch takes conversations or prompts, not both")
            outs = self.llm.chat(items, self.params, use_tqdm=False) if chats else self.llm.generate(
                items, self.params, use_tqdm=False)
            return [o.outputs[0].text for o in outs]
        texts = [self.render(x) for x in items]
        # a fixed prompt gets the tokenizer's BOS; a chat template writes its own
        batch = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=isinstance(items[0], str))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def default_device():
    local = int(os.environ.get("LOCAL_RANK", 0))
    return f"cuda:{local}" if torch.cuda.is_available() else "cpu"

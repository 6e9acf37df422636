"""
The study (docs/STUDY.md) in one command: prepare -> reflect -> train -> finetune -> attack -> probe for every cell of a
grid and every seed, then report.py. Each seed is its own world (world_seed + seed) and its own training order.

Reads:  nothing but its flags: every step is a stage script's own command, run as a subprocess.
Writes: <out_dir>/data/<world>-seed<k>/medsafety/...   prepare.py and reflect.py outputs
        <out_dir>/runs/<world>-seed<k>/<model>-<budget>/<intervention>[-dose<NN>]-start<NN>/<stage>/   one model
                                      per stage: base, sft, benign, harmful (a cross ablation's: sft-plain, ...)
        <out_dir>/done/<step>.json    a step's marker (its command) once it succeeded; .started, .log beside it
        <out_dir>/grids/<grid>.json   the grid's cells and their run directories, what report.py reads
        <out_dir>/<grid report>.md    report.py's tables, plots and claims (report.md for grids main and core)
        <out_dir>/wall-<grid>.jsonl, study.log   wall time per invocation; every step's command and output
Run:    python study.py                              # the toy study: the main grid on one world (make study)
        python study.py --grid=core --seeds=3         # three worlds; other grids: README.md, GRIDS below
"""
# The grids (python study.py --grid=<name>, one or more worlds with --seeds):
#   (default) --grid=main         the five interventions through sft and benign finetuning, one world
#   --grid=core --seeds=3         + the two cross ablations and the harmful finetuning attack, three worlds
#   --grid=scale                  reflect vs filter at 3 model sizes x 2 token budgets
#   --grid=ablations --seeds=3    world v1 vs v2, 16 harm effects vs 8
#   --grid=curriculum --seeds=3   starts 0/20/60/100% and dose-matched controls
#   --only=reflect                only cells whose name contains one of these
# A rerun skips finished steps, resumes an interrupted training from its checkpoint, and reruns a step whose flags
# changed together with everything after it. Grids share steps: run them into one --out_dir and no model is trained
# twice.

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from safety.common import Stopped, fail, load_json, lock_dir, on_stop, run_stage, write_atomic, write_json
from safety.configurator import configure, defaults_of, read_file

# -----------------------------------------------------------------------------
profile = "toy"            # smoke | toy | gpu: model sizes, set sizes, finetuning and attack settings
grid = "main"              # main | core | scale | ablations | curriculum: which cells (see GRIDS)
seeds = 1                  # worlds per cell: seed k is world world_seed + k, trained with seed 1337 + k
out_dir = ""               # "": out/study (out/study-<profile> for other profiles)
only = ""                  # comma list: run only cells whose name contains one of these ("" = all)
jobs = 0                   # steps run at once; 0: 2 on CPU (each with half the cores), the profile's gpu_jobs on a GPU
world_seed = 1337
# -----------------------------------------------------------------------------

# Per profile: the pretraining config, flags of each stage, the model variants of the scale grid and the safe
# prefixes. toy: sized for 2 CPU cores (the main grid on one world in under half an hour, README.md).
PROFILES = {
    "smoke": dict(config="config/smoke.py", train=["--block_size=96", "--max_iters=20"],
                  prepare=["--num_docs=400", "--n_harmful=8", "--n_benign=4", "--n_capability=4", "--n_probe=60",
                           "--n_sft=64", "--n_stop=16", "--n_benign_ft=64", "--n_harmful_ft=16", "--n_heldout_docs=20"],
                  finetune=["--max_iters=4", "--batch_size=8"], sft=[], attack=["--max_prompts=4", "--max_new_tokens=12"],
                  attacks_sft="direct,prefill,suppress", attacks_sft_more="template,suffix",
                  attacks_nostop="direct,prefill,suppress", gcg=["--gcg_steps=2", "--gcg_batch=8", "--gcg_prompts=4"],
                  scale={"small": ["--n_embd=16", "--n_head=1"], "base": []}, budgets={"1x": [], "2x": ["--max_iters=40"]}),
    "toy": dict(config="config/toy.py", train=[], prepare=[],
                finetune=["--max_iters=100"], sft=["--max_iters=160"],   # sft: ~one epoch of the 5,000 examples
                attack=["--max_prompts=40", "--batch_size=256", "--beam_width=2", "--max_new_tokens=72"],
                # make study's budget: the template and suffix attacks after sft in a step of their own that only the
                # core grid runs (the pre-registered rule of results/2026-12-06-v3)
                attacks_sft="direct,prefill,suppress", attacks_sft_more="template,suffix",
                attacks_nostop="direct,prefill,suppress",
                gcg=["--gcg_steps=10", "--gcg_batch=64", "--gcg_prompts=16"],   # the loss flattens by ~10 steps here
                scale={"2x64": ["--n_layer=2", "--n_head=2", "--n_embd=64"], "base": [],
                       "6x192": ["--n_layer=6", "--n_head=6", "--n_embd=192"]},
                budgets={"1x": [], "2x": ["--max_iters=1400"]}),
    # gpu: one H200, the core + curriculum cells (gpu_cells) x 3 seeds in 7 minutes; sized in GPU_SIZING below.
    # 20,000 documents (4.2M tokens, 2 epochs of a run's 8.2M); finetunes uncompiled (seconds long) at a third of
    # pretraining's peak rate, as the toy's; attacks in batches of 512 prompts (decoding is launch-bound: a batch
    # costs about what a prompt does); GCG on the toy's settings, twice the steps; `gpu_jobs` steps at once.
    "gpu": dict(config="config/gpu.py", train=[], prepare=["--num_docs=20000"],
                finetune=["--max_iters=100", "--compile=False", "--learning_rate=7e-4", "--min_lr=7e-5"],
                sft=["--max_iters=160"], attack=["--max_prompts=40", "--batch_size=512", "--beam_width=2", "--max_new_tokens=72"],
                attacks_sft="direct,prefill,template,suffix,suppress", attacks_nostop="direct,prefill,suppress",
                gcg=["--gcg_steps=20", "--gcg_batch=64", "--gcg_prompts=16"], scale={"base": []}, budgets={"1x": []},
                gpu_jobs=16),
}
PREFIX_STARTS = (0.2, 0.6)   # the safe prefixes the filter run (and any later start) continues: see prefix_steps()
# the worlds (prepare.py flags): v3, answers that reason (the default); v2, answers of two sentences; v1, v2 without
# the stated safety definition; harms16, v3 with 16 harm effects
WORLDS = {"v3": [], "v2": ["--reasoning=False"], "v1": ["--reasoning=False", "--harm_facts=False"],
          "harms16": ["--num_harms=16"]}
# the reflect cell's segmenter per world (reflect.py --segment_tokens): one reflection per sentence in v3, where an
# answer has room for the mechanism; 32 tokens in v2 and v1, as their committed reports ran
REFLECT_SEGMENT = {"v3": 0, "harms16": 0}
DECODINGS = "greedy,topk,safebeam,reflect_halt"   # attack.py skips a decoding a model cannot use (no tag, no reflection)
# post-training stages: sft (with the stop examples), sft-nostop (the same sft without them), then benign
# finetuning and the harmful finetuning attack, both after sft
STAGES = ("base", "sft", "sft-nostop", "benign", "harmful")


def cell(intervention, start=0.0, chat="auto", world="v3", model="base", budget="1x", stages=STAGES, dose=1.0,
         segment=None):
    """One cell of a grid: a pretraining run (intervention, start, world, model, budget; dose < 1: the dose-matched
    control's data, reflect.py --dose; segment: a reflect stream's segmenter other than the world's) and its
    post-training (chat: auto, or plain / reflect for the cross ablations), at the given stages."""
    data = intervention + (f"-dose{round(100 * dose):02d}" if dose < 1 else "") + (
        f"-seg{segment}" if segment is not None else "")
    c = dict(intervention=intervention, start=start, chat=chat, world=world, model=model, budget=budget,
             stages=list(stages), dose=dose, data=data,
             segment=segment if segment is not None else REFLECT_SEGMENT.get(world, 32))
    c["run"] = f"{data}-start{round(start * 100):02d}"
    c["label"] = {"plain": f"{intervention} pt + plain sft", "reflect": f"{intervention} pt + reflection sft"}.get(
        chat, f"{intervention} dose-matched" if dose < 1 else
        intervention if intervention in ("none", "filter", "strict_filter") or start == 0
        else f"{intervention} @{round(start * 100)}%")
    if segment is not None:
        c["label"] += f", {segment_name(segment)}" + (f" ({world})" if world != "v3" else "")
    c["name"] = f"{world}/{model}-{budget}/{c['run']}" + ("" if chat == "auto" else f"/{chat}-sft")
    return c


def segment_name(tokens):
    return "one reflection per sentence" if tokens == 0 else f"{tokens}-token segments"


INTERVENTIONS = ("none", "filter", "strict_filter", "rewrite", "safety_pretraining", "reflect")


def core_cells(world="v3", stages=STAGES, more_attacks=True):
    """The interventions, and the two cross ablations: reflect-pretrained + plain sft (what the pretraining adds) and
    raw-pretrained + reflection sft (what the post-training format adds). more_attacks: the sft models also get the
    profile's costlier attacks (attacks_sft_more)."""
    cells = [cell(iv, world=world, stages=stages) for iv in INTERVENTIONS] + [
        cell("reflect", chat="plain", world=world, stages=stages), cell("none", chat="reflect", world=world, stages=stages)]
    return [dict(c, more_attacks=more_attacks) for c in cells]


GRIDS = {
    # make study: the interventions and the cross ablations through sft and benign finetuning, the cells and stages
    # the claims read (the core grid's own steps: --grid=core into the same out_dir runs only what it adds)
    "main": lambda P: core_cells(stages=("base", "sft", "benign"), more_attacks=False),
    # the main grid with the sft without stop examples beside every sft, and the harmful finetuning attack
    "core": lambda P: core_cells(),
    # how often a model reflects: reflect at one reflection per sentence (the core grid's), per 16 and per 32 tokens
    # on v3, and per sentence on v2 (whose committed reports reflect per 32 tokens)
    "sweep": lambda P: [cell("reflect", stages=STAGES[:3])] + [cell("reflect", segment=n, stages=STAGES[:3])
                                                                for n in (16, 32)]
                       + [cell("reflect", world="v2", segment=0, stages=STAGES[:3])],
    # reflect vs filter at three model sizes x two token budgets: where, if anywhere, the paper's effect appears
    "scale": lambda P: [cell(iv, model=m, budget=b, stages=("base", "sft")) for m in P["scale"] for b in P["budgets"]
                        for iv in ("filter", "reflect")],
    # the world ablations: v3 beside v2, v1 (no stated safety definition) and 16 harm effects
    "ablations": lambda P: [cell(iv, world=w, stages=("base", "sft")) for w in WORLDS for iv in ("filter", "reflect")],
    # the safety curriculum (2601.07087): starts at 0, 20 and 60% of the token budget, the safe-only control (the
    # filter run: a 100% start reads exactly its windows), and a dose-matched control per intervention: a 0% start
    # whose stream holds the intervention tokens a 60% start reads (when vs how much). Its claims read base, sft and
    # benign finetuning.
    "curriculum": lambda P: [cell(iv, s, stages=("base", "sft", "benign")) for iv in ("safety_pretraining", "reflect")
                             for s in (0.0,) + PREFIX_STARTS]
                            + [cell("filter", stages=("base", "sft", "benign"))]
                            + [cell(iv, dose=1 - PREFIX_STARTS[-1], stages=("base", "sft", "benign"))
                               for iv in ("safety_pretraining", "reflect")],
}


def stage_dir(c, stage):
    return stage if stage == "base" or c["chat"] == "auto" else f"{stage}-{c['chat']}"


def plan(P, root, cells, n_seeds):
    """Every step of the cells: {name: (command, dependencies)} (dependencies first), and the run directories
    {(cell name, seed, stage): dir}. Commands are the stage scripts' own CLIs; steps shared by cells (a pretraining
    run with two post-trainings, a world with many interventions) appear once."""
    py = sys.executable
    steps, dirs = {}, {}

    def add(name, cmd, deps):
        steps.setdefault(name, (cmd, deps))

    for c in cells:
        for k in range(n_seeds):
            wk = f"{c['world']}-seed{k}"
            data = os.path.join(root, "data", wk)
            add(f"prepare-{wk}", [py, "prepare.py", f"--out_dir={data}", f"--world_seed={world_seed + k}"]
                + P["prepare"] + WORLDS[c["world"]], [])
            model = P["scale"][c["model"]] + P["budgets"][c["budget"]]
            group = f"{wk}-{c['model']}-{c['budget']}"
            runs = os.path.join(root, "runs", wk, f"{c['model']}-{c['budget']}")
            train_cmd = [py, "train.py", P["config"], f"--seed={1337 + k}"] + P["train"] + model
            branch = prefix_steps(add, c, wk, data, runs, group, train_cmd,   # (step, run) or None: from scratch
                                  max_iters(P["config"], P["train"] + model))
            # a reflect stream's segmenter, when it is not reflect.py's default (32 tokens), and its own directory
            # name when it is not the world's
            seg = [f"--segment_tokens={c['segment']}"] if c["segment"] != 32 else []
            add(f"reflect-{wk}-{c['data']}", [py, "reflect.py", f"--data_root={data}",
                                               f"--intervention={c['intervention']}"]
                + ([f"--dose={c['dose']}"] if c["dose"] < 1 else [])
                + (seg if c["intervention"] == "reflect" else [])
                + ([f"--out_name={c['data']}"] if "-seg" in c["data"] else []), [f"prepare-{wk}"])
            pre = f"{group}-{c['run']}"
            base = os.path.join(runs, c["run"], "base")
            add(f"train-{pre}", train_cmd + [f"--data={data}/medsafety/{c['data']}", f"--out_dir={base}",
                                             f"--intervention_start={c['start']}"]
                + ([f"--init_from={branch[1]}"] if branch else []),
                [f"reflect-{wk}-{c['data']}"] + ([branch[0]] if branch else []))
            add(f"probe-{pre}", [py, "probe.py", f"--ckpt={base}"], [f"train-{pre}"])
            stage_steps(add, dirs, P, c, k, runs, pre, seg)
    return steps, dirs


def prefix_steps(add, c, wk, data, runs, group, train_cmd, iters):
    """The shared safe prefixes a cell's pretraining continues; -> (step, run directory) of the prefix it branches
    from (None: from scratch).
    Every intervention's safe stream is the filtered corpus, which is also the filter run's stream, and a stream's
    order depends only on the seed: so a run started at s > 0 and the filter run read the same windows until
    s x max_iters. Prefix runs at PREFIX_STARTS train that far once; a run started at s branches from the prefix at
    s, the filter run from the last one (train.py --init_from=<prefix> checks that this is exact). A fixed chain,
    whatever the grid: a step's command never depends on which other cells were asked for."""
    if not (c["intervention"] == "filter" or c["start"] > 0):
        return None
    chain = [s for s in PREFIX_STARTS if c["intervention"] == "filter" or s <= c["start"]]
    if c["intervention"] != "filter" and c["start"] not in PREFIX_STARTS:
        fail(f"start {c['start']} is not one of the prefix starts {PREFIX_STARTS}")
    py, prev = sys.executable, None     # prev: (step, run directory) of the prefix before
    for s in chain:
        tag = f"start{round(s * 100):02d}"
        step, out = f"train-prefix-{group}-{tag}", f"{runs}/prefix-{tag}"
        add(step, train_cmd + [f"--data={data}/medsafety/filter", f"--out_dir={out}", f"--stop_iter={round(s * iters)}"]
            + ([f"--init_from={prev[1]}"] if prev else []),
            [f"reflect-{wk}-filter"] + ([prev[0]] if prev else []))
        add(f"reflect-{wk}-filter", [py, "reflect.py", f"--data_root={data}", "--intervention=filter"],
            [f"prepare-{wk}"])
        prev = step, out
    return prev


def stage_steps(add, dirs, P, c, k, runs, pre, seg):
    """A pretrained cell's post-training and attacks, stage by stage, and each stage's run directory in dirs."""
    py, base = sys.executable, os.path.join(runs, c["run"], "base")
    # a raw model's reflection sft writes its reflections with the world's reflect segmenter
    chat = [] if c["chat"] == "auto" else [f"--chat={c['chat']}"] + (seg if c["chat"] == "reflect" else [])
    for stage in c["stages"]:
        d = os.path.join(runs, c["run"], stage_dir(c, stage))
        dirs[(c["name"], k, stage)] = d
        if stage in ("sft", "sft-nostop"):
            add(f"finetune-{pre}-{stage_dir(c, stage)}", [py, "finetune.py", f"--init_from={base}", "--task=sft",
                                                          f"--out_dir={d}", f"--seed={1337 + k}"]
                + P["finetune"] + P["sft"] + chat + (["--stop_examples=False"] if stage == "sft-nostop" else []),
                [f"train-{pre}"])
        elif stage != "base":
            sft = os.path.join(runs, c["run"], stage_dir(c, "sft"))
            add(f"finetune-{pre}-{stage_dir(c, stage)}", [py, "finetune.py", f"--init_from={sft}",
                                                          f"--task={stage}", f"--out_dir={d}",
                                                          f"--seed={1337 + k}"] + P["finetune"],
                [f"finetune-{pre}-{stage_dir(c, 'sft')}"])
        # per stage, never per grid: grids share this step (run into one out_dir), so a grid-dependent attack set
        # would make each grid rerun, and overwrite, the other's
        attacks = {"sft": P["attacks_sft"], "sft-nostop": P["attacks_nostop"]}.get(stage, "direct")
        dep = f"train-{pre}" if stage == "base" else f"finetune-{pre}-{stage_dir(c, stage)}"
        add(f"attack-{pre}-{stage_dir(c, stage)}", [py, "attack.py", f"--ckpt={d}", f"--attacks={attacks}",
                                                    f"--decoding={DECODINGS}"] + P["attack"]
            + (P["gcg"] if "suffix" in attacks else []), [dep])
        # the sft model's costlier attacks, in a step of their own that only the core grid holds (make study's
        # budget); attack.py merges its passes into the same attack.json
        more = P.get("attacks_sft_more")
        if stage == "sft" and more and c.get("more_attacks"):
            add(f"attack-{pre}-{stage_dir(c, stage)}-more", [py, "attack.py", f"--ckpt={d}", f"--attacks={more}",
                                                             f"--decoding={DECODINGS}"]
                + P["attack"] + ["--reflection_eval=False"] + (P["gcg"] if "suffix" in more else []),
                [f"attack-{pre}-{stage_dir(c, stage)}"])


def max_iters(config_file, flags):
    """A pretraining run's max_iters: its last --max_iters flag, else the profile's (every profile sets it)."""
    given = [f.split("=", 1)[1] for f in flags if f.startswith("--max_iters=")]
    value = int(given[-1]) if given else read_file(config_file).get("max_iters")
    if value is None:
        fail(f"{config_file} sets no max_iters; the safe prefixes are a share of it")
    return value


# ----------------------------------------------------------------------------- the GPU profile's size
# The GPU profile's whole grid, gpu_cells (14 cells, 405 steps with 3 seeds), must end within 7 minutes on one H200
# (6 before world v3 added the strict filter and the sft without stop examples beside every sft):
# `study.py --profile=gpu --seeds=3 --grid=core`, then --grid=curriculum into the same out_dir (report.py writes a
# report per grid; the steps they share run once). Both as one, and the two invocations one after the other (each
# with its own phases, the second's prep_s counted again), fit (tests/test_gpu_profile.py). Sized from
# FLOPs (6 N per token trained, 2 N per token of a forward pass, model.py's attention term) and these assumptions;
# gpu_check.py measures each of them (replace them with its numbers):
#   bf16_flops: 90 TFLOP/s for the 8 x 256 models' bf16 training, all steps together: ~9% of the 989 TFLOP/s peak
#     (model.PEAK_FLOPS). An iteration is 16k tokens x 45 MFLOP = 0.74 TFLOP: its matmuls (16k rows, <= 704 columns)
#     take ~3 ms at a third of the 790 TFLOP/s KINDS.md measured for large bf16 products on an H200, its ~500
#     uncompiled memory-bound kernels (norms, RoPE, SwiGLU, casts) ~5 ms at their ~10 us floors: ~8 ms. Steps run at
#     once take turns on the GPU (no MPS): they add no GPU throughput, they hide each other's CPU time.
#   fp32_flops: 25 TFLOP/s for attack.py and probe.py, which run the model in fp32: ~40% of the 67 TFLOP/s fp32 peak.
#   step_s: a step's seconds besides its FLOPs, on one core: Python + torch + CUDA start-up (~3 s), data, checkpoints,
#     decoding token by token (~2 ms a token, launch-bound, batches of 512 prompts), the oracle. attack_sft: the 5
#     attacks x 2-3 decodings on ~3,000 prompts, and GCG; attack: direct on ~420 prompts.
#   prep_s: prepare (20,000 documents: ~20 s on one core), then the 21 reflects (~10 s each) on 16 cores: ~40 s.
#   Three phases: prepare + reflect (the seeds side by side), pretraining (GPU-bound), then finetunes, attacks and
#   probes (CPU-bound, `jobs` at once, their FLOPs hidden under their CPU time):
#     wall = prep_s + train FLOPs / bf16_flops + train step_s / jobs + max(rest's FLOP time, rest's step_s / jobs)
# The FLOP counts besides training: finetune rows of row_tokens (a benign/harmful batch padded to its longest row;
# sft rows counted at block_size, an upper bound: only the quarter replaying pretraining windows is that long),
# attack tokens = prompts x decodings x 100 (30 prompt + 72 new), GCG rows = its prompts x 50 tokens, probe:
# probe.jsonl + request and contra prompts x 120 tokens.
GPU_SIZING = dict(bf16_flops=90e12, fp32_flops=25e12, jobs=16, prep_s=40, limit_s=420, vocab=287,   # vocab: v3's
                  step_s={"train": 6, "finetune": 6, "attack": 5, "attack_sft": 20, "probe": 6},
                  finetune_batch=32, row_tokens=64, attack_tokens={"attack": 420 * 100, "attack_sft": 3000 * 2.5 * 100},
                  gcg_tokens=16 * 50, probe_tokens=3300 * 120)
# what gpu_sizing gives for gpu_cells x 3 seeds (tests/test_gpu_profile.py recomputes it): 31.2 pretraining runs'
# worth of iterations (the shared safe prefixes save 4.8 of 36) of 8.19M tokens; training FLOPs within 150 s of GPU;
# 362 s as one invocation, 402 s as the core grid and then the curriculum's new cells
GPU_PLAN = dict(steps=405, train_steps=42, train_tokens=255_590_400, train_flops_max=150 * 90e12, wall_s_max=380)


def gpu_cells(P):
    """The GPU profile's whole grid: the core cells and the curriculum's (starts 0/20/60%, the dose-matched
    controls), each once (both grids hold the 0% starts and the filter run)."""
    cells = {}
    for c in GRIDS["core"](P) + GRIDS["curriculum"](P):
        cells.setdefault(c["name"], c)
    return list(cells.values())


def model_flops(cfg, vocab):
    """(parameters N, training FLOPs per token at block_size) of a config's model, as model.GPT counts them."""
    L, C = cfg["n_layer"], cfg["n_embd"]
    H = cfg.get("mlp_hidden") or 64 * -(-8 * C // (3 * 64))          # GPTConfig's default SwiGLU width
    n = vocab * C + L * (4 * C * C + 3 * C * H + 2 * C) + C          # tied embedding, blocks, their norms, final norm
    return n, 6 * n + 12 * L * C * cfg["block_size"]


def gpu_sizing(P, steps, S=GPU_SIZING):
    """The estimate above for planned steps {name: (command, deps)}: counts, tokens, FLOPs and wall seconds."""
    cfg = read_file(P["config"])
    flag = lambda cmd, key, default: next((type(default)(c.split("=", 1)[1]) for c in reversed(cmd)
                                           if c.startswith(f"--{key}=")), default)
    n, per_token = model_flops(cfg, S["vocab"])
    iters = max_iters(P["config"], P["train"])
    out = {"steps": len(steps), "kinds": {}, "train_tokens": 0, "train_flops": 0.0, "bf16_flops": 0.0,
           "fp32_flops": 0.0, "train_s": 0.0, "rest_s": 0.0}
    for name, (cmd, _) in steps.items():
        kind = name.split("-")[0]
        if kind == "attack" and "--attacks=direct" not in cmd:
            kind = "attack_sft"
        out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
        if kind in ("prepare", "reflect"):          # prep_s
            continue
        if kind == "train":
            src = flag(cmd, "init_from", "")       # a safe prefix, or the scratch start
            start = round(int(src.rsplit("start", 1)[1]) / 100 * iters) if "prefix-start" in src else 0
            stop = flag(cmd, "stop_iter", -1)
            tokens = ((stop if stop >= 0 else iters) - start) * cfg["batch_size"] * cfg["block_size"]
            out["train_tokens"] += tokens
            out["train_flops"] += tokens * per_token
            out["train_s"] += S["step_s"][kind]
            continue
        if kind == "finetune":
            T = cfg["block_size"] if "--task=sft" in cmd else S["row_tokens"]
            tokens = flag(cmd, "max_iters", 150) * S["finetune_batch"] * T
            out["bf16_flops"] += tokens * (6 * n + 12 * cfg["n_layer"] * cfg["n_embd"] * T)
        elif kind.startswith("attack"):
            out["fp32_flops"] += 2 * n * S["attack_tokens"][kind]
            if "suffix" in flag(cmd, "attacks", ""):   # per GCG step: the swaps' forward passes, one backward
                passes = flag(cmd, "gcg_batch", 128) * 2 + 6
                out["fp32_flops"] += flag(cmd, "gcg_steps", 100) * passes * n * S["gcg_tokens"]
        elif kind == "probe":
            out["fp32_flops"] += 2 * n * S["probe_tokens"]
        out["rest_s"] += S["step_s"][kind]
    rest_gpu = out["bf16_flops"] / S["bf16_flops"] + out["fp32_flops"] / S["fp32_flops"]
    out["wall_s"] = (S["prep_s"] + out["train_flops"] / S["bf16_flops"] + out["train_s"] / S["jobs"]
                     + max(rest_gpu, out["rest_s"] / S["jobs"]))
    out["params"], out["flops_per_token"] = n, per_token
    return out


def same_command(a, b):
    """The same stage script with the same flags (the interpreter's path may differ: make study vs python)."""
    return bool(a) and a[1:] == b[1:]


def priority(name):
    """The steps that unlock pretraining first (prepare and reflect are short), then the long steps on a cell's
    critical path (pretraining, then the sft finetune and its attack), so that the short steps fill the other core
    at the end instead of a lone long step ending the study."""
    if name.startswith(("prepare-", "reflect-")):
        return -1
    if name.startswith("train-"):
        return 0
    if "-sft" in name:
        return 1 if name.startswith("finetune-") else 2
    return 3


def output_dir(cmd):
    """The --out_dir a train/finetune command writes (None for other steps)."""
    return next((c.split("=", 1)[1] for c in cmd if c.startswith("--out_dir=")), None)


def step_outputs(cmd):
    """The files a step leaves when it succeeds, read from its command: a marker counts only while they exist."""
    flag = lambda key: next((c.split("=", 1)[1] for c in reversed(cmd) if c.startswith(f"--{key}=")), None)
    script = os.path.basename(cmd[1])
    if script == "prepare.py":
        docs = os.path.join(flag("out_dir"), "medsafety", "docs")
        return [os.path.join(docs, "world.json"), os.path.join(docs, "summary.json")]
    if script == "reflect.py":      # reflect.py's directory for an intervention (and a dose-matched control)
        dose = flag("dose")
        d = os.path.join(flag("data_root"), "medsafety", flag("intervention")
                         + (f"-dose{round(100 * float(dose)):02d}" if dose else ""))
        return [os.path.join(d, f) for f in ("meta.json", "safe_train.bin", "safe_val.bin", "mix_train.bin",
                                            "mix_val.bin")]
    if script in ("train.py", "finetune.py"):
        return [os.path.join(flag("out_dir"), "ckpt.pt")]
    return [os.path.join(flag("ckpt"), {"attack.py": "attack.json", "probe.py": "probe.json"}[script])]


STOP = []   # a Ctrl-C or SIGTERM, set by the handlers main installs


def finished_steps(steps, marker):
    """The steps a rerun skips: marked done with the same command, their outputs still there, and every step they
    depend on finished. A lost output is said in one line, and that step runs again with the steps after it."""
    finished, grew, lost = set(), True, {}
    while grew:     # to a fixed point: plan order may list a step before one it depends on
        grew = False
        for name, (cmd, deps) in steps.items():
            m = name not in finished and name not in lost and load_json(marker(name))
            if not (m and same_command(m.get("command"), cmd)):
                continue
            missing = [p for p in step_outputs(cmd) if not os.path.exists(p)]
            if missing:
                lost[name] = missing[0]
            elif all(d in finished for d in deps):
                finished.add(name)
                grew = True
    for name, path in lost.items():
        print(f"study: {name} is marked done but '{path}' is gone: it runs again, with the steps after it")
    return finished


def run_steps(steps, root, n_jobs, heartbeat=lambda: None):
    """Run the steps in dependency order, n_jobs at a time; skip finished ones; stop at the first failure.
    A step is finished when its marker holds the same command, its outputs exist and every step it depends on is
    finished, so a changed flag or a lost output reruns that step and everything after it. A train or finetune step
    that was interrupted resumes from its checkpoint if it was started with the same command; otherwise its output
    directory is cleared first (a checkpoint of other flags must not be continued)."""
    done_dir = os.path.join(root, "done")
    os.makedirs(done_dir, exist_ok=True)
    marker = lambda name: os.path.join(done_dir, name + ".json")
    finished = finished_steps(steps, marker)
    todo = sorted((n for n in steps if n not in finished), key=priority)
    print(f"study: {len(steps)} steps, {len(finished)} already done, {len(todo)} to run, {n_jobs} at a time")
    threads = str(max(1, (os.cpu_count() or 1) // n_jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    running, t_start, log_path = {}, time.time(), os.path.join(root, "study.log")
    try:
        while todo or running:
            if STOP:     # a signal, acted on here: never between a step's Popen and its entry in `running`
                raise Stopped(STOP[0])
            for name in list(todo):
                if len(running) >= n_jobs:
                    break
                planned, deps = steps[name]
                if all(d in finished for d in deps):
                    todo.remove(name)
                    cmd, out, started = list(planned), output_dir(planned), marker(name)[:-5] + ".started"
                    if out and os.path.exists(os.path.join(out, "ckpt.pt")):
                        if same_command((load_json(started) or {}).get("command"), planned):
                            cmd.append("--init_from=resume")   # an interrupted run continues from its checkpoint
                        else:
                            shutil.rmtree(out)
                    write_json(started, {"step": name, "command": planned})
                    logf = open(os.path.join(done_dir, name + ".log"), "w")
                    running[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), cmd,
                                     logf, time.time(), planned)
                    print(f"[{time.time() - t_start:7.1f}s] start {name}", flush=True)
            time.sleep(0.2)
            heartbeat()
            for name, (proc, cmd, logf, t0, planned) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[name]
                dt = time.time() - t0
                with open(os.path.join(done_dir, name + ".log")) as f:
                    output = f.read()
                with open(log_path, "a") as f:
                    f.write(f"$ {shlex.join(cmd)}\n# {name}: exit {proc.returncode} after {dt:.1f}s\n{output}\n")
                if proc.returncode != 0 and STOP:     # killed with the study (a kill of the process group)
                    raise Stopped(STOP[0])
                if proc.returncode != 0:
                    tail = "\n".join(output.strip().splitlines()[-5:])
                    fail(f"step {name} failed (exit {proc.returncode}); its output ends:\n{tail}\n"
                         f"fix it and rerun: finished steps are kept")
                write_json(marker(name), {"step": name, "command": planned, "seconds": dt})
                finished.add(name)
                print(f"[{time.time() - t_start:7.1f}s] done  {name} ({dt:.1f}s, {len(todo) + len(running)} left)",
                      flush=True)
    finally:   # a failure, Ctrl-C or SIGTERM: stop the steps still running (their checkpoints stay for the rerun)
        for proc, *_ in running.values():
            proc.terminate()
        for proc, *_ in running.values():
            proc.wait()


def main():
    globals().update(configure(defaults_of(globals()), sys.argv[1:]))
    if profile not in PROFILES:
        fail(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    if grid not in GRIDS:
        fail(f"unknown grid '{grid}' (choose from {', '.join(GRIDS)})")
    if seeds < 1:
        fail("seeds must be at least 1")
    P = PROFILES[profile]
    root = out_dir or ("out/study" if profile == "toy" else f"out/study-{profile}")
    every = GRIDS[grid](P)
    keys = [k for k in only.split(",") if k]
    cells = [c for c in every if not keys or any(k in c["name"] or k in c["label"] for k in keys)]
    if not cells:
        fail(f"--only={only} matches no cell (cells: {', '.join(c['name'] for c in every)})")
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    # a GPU: the profile's gpu_jobs steps at once (small models leave the GPU idle between their launches; one core
    # each), else one
    n_jobs = jobs or (min(P.get("gpu_jobs", 1), os.cpu_count() or 1) if gpu else 2)
    os.makedirs(os.path.join(root, "grids"), exist_ok=True)
    steps, dirs = plan(P, root, cells, seeds)
    # the grid as report.py reads it: cells, their run directories per seed and stage, and the setting
    manifest = {"grid": grid, "profile": profile, "config": P["config"], "seeds": seeds, "world_seed": world_seed,
                "worlds": {w: WORLDS[w] for w in sorted({c["world"] for c in cells})},
                "models": {f"{c['model']}-{c['budget']}": P["scale"][c["model"]] + P["budgets"][c["budget"]]
                           for c in cells},
                "attacks_sft": P["attacks_sft"] + (f",{P['attacks_sft_more']}" if P.get("attacks_sft_more") and any(
                    c.get("more_attacks") for c in cells) else ""), "decodings": DECODINGS,
                "cells": [dict(c, runs={stage: [dirs[(c["name"], k, stage)] for k in range(seeds)]
                                        for stage in c["stages"]}) for c in cells]}
    lock_dir(root)       # one study at a time in a directory (a second one would start the same steps again)
    t0 = time.time()
    # one line per invocation, interrupted or not, rewritten every 10 s (a kill -9 loses at most that): a grid's
    # wall time is the sum of its lines
    wall_path = os.path.join(root, f"wall-{grid}.jsonl")
    earlier = open(wall_path).readlines() if os.path.exists(wall_path) else []
    beat = [0.0]

    def heartbeat(force=False):
        if force or time.time() - beat[0] > 10:
            beat[0] = time.time()
            line = json.dumps({"seconds": time.time() - t0, "jobs": n_jobs, "steps": len(steps)}) + "\n"
            write_atomic(wall_path, lambda f: f.writelines(earlier + [line]))
    # a Ctrl-C or kill stops the study at the scheduler's next turn (the finally blocks stop the children); exiting
    # inside the handler could strike while a step is being started and leave that step running, unknown to the study
    on_stop(f"the finished steps are kept (their markers in {os.path.join(root, 'done')}) and an interrupted "
            f"training resumes from its checkpoint: rerun the same command to continue")
    raising = {s: signal.signal(s, lambda signum, _: STOP.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_steps(steps, root, n_jobs, heartbeat)
    finally:
        heartbeat(force=True)
        for s, handler in raising.items():
            signal.signal(s, handler)
    if STOP:
        raise Stopped(STOP[0])
    write_json(os.path.join(root, "grids", f"{grid}.json"), manifest, indent=1)
    r = subprocess.run([sys.executable, "report.py", root, f"--grid={grid}"])
    if r.returncode:
        fail(f"report.py {root} --grid={grid} failed (exit {r.returncode}); the runs are kept")
    print(f"study: {len(steps)} steps in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    run_stage(main)

# The GPU study profile, planned with study.plan and sized without running anything: `study.py --profile=gpu
# --seeds=3 --grid=core`, then --grid=curriculum, has the steps, tokens and FLOPs study.GPU_PLAN states, fits the
# 6 minutes under study.GPU_SIZING's assumptions, and trains models of at least 8 layers x 256.

import pytest

import study
from safety.configurator import read_file
from model import GPT, GPTConfig

P = study.PROFILES["gpu"]
SEEDS = 3


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("plan"))      # plan() only names directories; nothing is written
    steps, dirs = study.plan(P, root, study.gpu_cells(P), SEEDS)
    return steps, dirs


def flag(cmd, key):
    return next((c.split("=", 1)[1] for c in reversed(cmd) if c.startswith(f"--{key}=")), None)


def test_model_is_at_least_8_by_256_and_its_flops_are_model_py_s():
    cfg = read_file(P["config"])
    assert cfg["n_layer"] >= 8 and cfg["n_embd"] >= 256
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["block_size"], vocab_size=study.GPU_SIZING["vocab"]))
    assert study.model_flops(cfg, study.GPU_SIZING["vocab"]) == (model.num_params(), model.flops_per_token())


def test_grid_is_every_core_and_curriculum_cell_once():
    cells = study.gpu_cells(P)
    names = [c["name"] for c in cells]
    assert len(names) == len(set(names)) == 14
    assert set(names) == {c["name"] for g in ("core", "curriculum") for c in study.GRIDS[g](P)}
    assert {c["intervention"] for c in cells} == {"none", "filter", "strict_filter", "rewrite", "safety_pretraining",
                                                  "reflect"}
    for iv in ("safety_pretraining", "reflect"):
        assert {c["start"] for c in cells if c["intervention"] == iv and c["dose"] == 1} == {0.0, 0.2, 0.6}
        assert any(c["intervention"] == iv and c["dose"] < 1 for c in cells)
    assert {c["world"] for c in cells} == {"v3"}
    assert {c["chat"] for c in cells} == {"auto", "plain", "reflect"}


def test_steps_and_tokens_are_the_stated_ones(planned):
    steps, _ = planned
    assert len(steps) == study.GPU_PLAN["steps"]
    trains = {n: cmd for n, (cmd, _) in steps.items() if n.startswith("train-")}
    assert len(trains) == study.GPU_PLAN["train_steps"] == SEEDS * (12 + len(study.PREFIX_STARTS))
    # each run's iterations, from its own command: it starts where the run it continues stopped (that run's
    # --stop_iter, found by its --out_dir), and ends at its --stop_iter or max_iters
    cfg = read_file(P["config"])
    stop_of = {flag(cmd, "out_dir"): int(flag(cmd, "stop_iter") or cfg["max_iters"]) for cmd in trains.values()}
    tokens = 0
    for cmd in trains.values():
        start = stop_of[flag(cmd, "init_from")] if flag(cmd, "init_from") else 0
        end = int(flag(cmd, "stop_iter") or cfg["max_iters"])
        assert 0 <= start < end <= cfg["max_iters"]
        tokens += (end - start) * cfg["batch_size"] * cfg["block_size"]
    assert tokens == study.GPU_PLAN["train_tokens"] == study.gpu_sizing(P, steps)["train_tokens"]
    # the prefixes stop at whole iterations, and the grid reads 31.2 runs' worth instead of 36
    assert all(abs(s * cfg["max_iters"] - round(s * cfg["max_iters"])) < 1e-9 for s in study.PREFIX_STARTS)
    run = cfg["max_iters"] * cfg["batch_size"] * cfg["block_size"]
    assert tokens / run == pytest.approx(31.2)


def test_flops_and_wall_time_fit_the_budget(planned):
    steps, _ = planned
    S, plan = study.GPU_SIZING, study.GPU_PLAN
    cfg = read_file(P["config"])
    model = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["block_size"], vocab_size=S["vocab"]))
    train_flops = plan["train_tokens"] * model.flops_per_token()    # 6 N + attention per token trained
    assert train_flops <= plan["train_flops_max"] == 150 * S["bf16_flops"]
    est = study.gpu_sizing(P, steps)
    assert est["train_flops"] == pytest.approx(train_flops)
    # the estimate's arithmetic, redone from its parts: the three phases
    kinds = est["kinds"]
    assert sum(kinds.values()) == len(steps)
    rest_s = sum(S["step_s"][k] * n for k, n in kinds.items() if k not in ("prepare", "reflect", "train"))
    assert est["rest_s"] == rest_s and est["train_s"] == S["step_s"]["train"] * kinds["train"]
    rest_gpu = est["bf16_flops"] / S["bf16_flops"] + est["fp32_flops"] / S["fp32_flops"]
    wall = S["prep_s"] + train_flops / S["bf16_flops"] + est["train_s"] / S["jobs"] + max(rest_gpu, rest_s / S["jobs"])
    assert est["wall_s"] == pytest.approx(wall)
    assert wall <= plan["wall_s_max"] <= S["limit_s"] == 420
    # post-training's FLOPs stay near half of pretraining's (world v3 post-trains every core cell twice, with and
    # without the stop examples): the wall time hangs on pretraining and the steps' CPU time
    assert est["bf16_flops"] + est["fp32_flops"] < 0.6 * train_flops


def test_core_then_curriculum_fits_too(tmp_path):
    # study.py runs one grid per invocation: core, then curriculum's new cells (the shared steps are done)
    core, _ = study.plan(P, str(tmp_path), study.GRIDS["core"](P), SEEDS)
    curriculum, _ = study.plan(P, str(tmp_path), study.GRIDS["curriculum"](P), SEEDS)
    new = {n: s for n, s in curriculum.items() if n not in core}
    assert len(core) + len(new) == study.GPU_PLAN["steps"]
    walls = [study.gpu_sizing(P, s)["wall_s"] for s in (core, new)]
    assert sum(walls) <= study.GPU_SIZING["limit_s"], walls


def test_gpu_runs_the_sized_number_of_steps_at_once():
    assert P["gpu_jobs"] == study.GPU_SIZING["jobs"]
    assert study.max_iters(P["config"], P["train"]) == read_file(P["config"])["max_iters"]

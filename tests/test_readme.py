# Every command the README documents must run as written: each `python <stage>.py ...` / `torchrun ... <stage>.py`
# line of its code blocks and inline code names a script that exists, config files that exist and only flags that script knows (read
# from the script's own --help), and the CPU DDP example is run for real on a tiny stream.
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """(line, script, args) for each command line in the README's ``` blocks (continuations joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    inline = [m for m in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text) if m.startswith(("python ", "torchrun "))]
    for block in re.findall(r"```\n(.*?)```", text, re.S) + inline:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            words = shlex.split(line) if line else []
            script = next((w for w in words if w.endswith(".py")), None)
            if script and (words[0] in ("python", "torchrun") or words[0].endswith("python")):
                out.append((line, script, words[words.index(script) + 1:]))
    return out


_known = {}


def known_flags(script):
    if script not in _known:
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        # the stages list their settings one per line; report.py's usage line names its flags
        _known[script] = set(re.findall(r"^  --(\w+)=", p.stdout, re.M)) or set(re.findall(r"--(\w+)=", p.stdout + p.stderr))
        assert _known[script], p.stdout + p.stderr
    return _known[script]


def test_the_readme_has_commands_for_every_stage():
    scripts = {s for _, s, _ in readme_commands()}
    assert {"train.py"} <= scripts, scripts


@pytest.mark.parametrize("line, script, args", readme_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_readme_command_names_real_files_and_known_flags(line, script, args):
    assert os.path.isfile(os.path.join(ROOT, script)), line
    flags = known_flags(script)
    for a in args:
        if a.startswith("--"):
            key = a[2:].split("=", 1)[0]
            assert key in flags, f"README: `{line}`: {script} has no --{key}"
        elif a.endswith(".py"):
            assert os.path.isfile(os.path.join(ROOT, a)), f"README: `{line}`: no config file {a}"


def test_the_readme_cpu_ddp_example_runs_as_written(tmp_path):
    line = next(l for l, s, a in readme_commands() if l.startswith("torchrun") and "config/smoke.py" in l)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 8000), ("val", 2000)):
        rng.integers(1, 64, n).astype(np.uint16).tofile(data / f"{split}.bin")
    json.dump({"vocab_size": 64, "dtype": "uint16", "tokenizer": "test"}, open(data / "meta.json", "w"))
    words = shlex.split(line.replace("<dir>", str(data)))
    assert words[0] == "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run"] + words[1:] + [
        "--max_iters=3", "--eval_interval=3", f"--out_dir={tmp_path / 'out'}"]    # short, and out of the repo
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert os.path.exists(tmp_path / "out" / "ckpt.pt")

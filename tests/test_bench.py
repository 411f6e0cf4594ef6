"""The benches' scripts that a GPU session runs unchanged: here on the CPU, with tiny settings.

Its own file, early in the suite's order: on a clean checkout (no classifiers cached) this is one of the
longest tests, and the two pytest-xdist workers take files in order, so it runs beside the rest of the
suite instead of after it.
"""

import json
import os
import re
import sys
from pathlib import Path

from procs import run

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.pop("WANDB_MODE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_the_gpu_scale_script_runs_on_the_cpu_with_tiny_settings(tmp_path, data_root, mnist):
    """bench/gpu_scale.sh, the GPU session's prepared check of the large committee (the benches, short training
    runs, configs/scale/suite.yaml through launch/reproduce.py), with SMOKE=1 on the CPU: every command runs
    as it will on the first GPU, only smaller, and every output it promises is written."""
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "DEVICE": "cpu", "SMOKE": "1", "DATA_ROOT": data_root,
           "PYTHON": sys.executable}
    r = run(["bash", "bench/gpu_scale.sh"], cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "step.json").read_text())
    assert re.search(r"^routed \d+\.\d+x$", (out / "routed.txt").read_text(), re.M)
    assert "largest committee that ran: 4 experts" in (out / "routed.txt").read_text()
    assert len(re.findall(r"ms per iteration", (out / "train.txt").read_text())) == 3
    for name in ("paper", "scale", "scale_routed"):
        assert json.loads((out / name / "summary.json").read_text())["iterations"] == 3
    routed = json.loads((out / "scale_routed" / "summary.json").read_text())["routing"]
    assert routed["routed_steps"] == 2 and 0 < routed["pass_share"] < 1
    for name in ("full", "routed"):
        assert json.loads((out / "suite" / name / "seed0" / "summary.json").read_text())["iterations"] == 2

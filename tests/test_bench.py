"""The benches' scripts that a GPU session runs unchanged: here on the CPU, with tiny settings."""

import json
import os
import re
import sys
from pathlib import Path

from procs import run

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_scale_script_runs_on_the_cpu_with_tiny_settings(tmp_path, data_root, mnist):
    """bench/gpu_scale.sh, the GPU session's prepared check of the large committee (the benches, short training
    runs, configs/scale/suite.yaml through launch/reproduce.py), with SMOKE=1 on the CPU: every command runs
    as it will on the first GPU, only smaller, and every output it promises is written."""
    out = tmp_path / "out"
    # The script sets PYTHONUNBUFFERED and WANDB_MODE itself (conftest.py drops an inherited WANDB_MODE too).
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "SMOKE": "1", "DATA_ROOT": data_root,
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

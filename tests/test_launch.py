"""Real launches as subprocesses: python, torchrun and accelerate launch on the CPU (gloo).

Each test checks the run directory (summary.json's world size, the checkpoint), not only the exit code.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent


def _env():
    env = dict(os.environ)
    env.pop("WANDB_MODE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd, timeout=240):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _overrides(tmp_path, data_root, *more):
    return ["--config", "configs/tiny.yaml", f"run.out_dir={tmp_path / 'run'}", f"data.root={data_root}",
            "threads=1", *more]


def _check_run(run: Path, world: int):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == world
    assert summary["iterations"] == 20
    assert 0 <= summary["accuracy"]["restored"] <= 1
    latest = (run / "checkpoints" / "latest").read_text().strip()
    ckpt = run / "checkpoints" / latest
    assert json.loads((ckpt / "manifest.json").read_text())["world_size"] == world
    assert sorted(p.name for p in ckpt.glob("expert_*.safetensors")) == [f"expert_{i:03d}.safetensors" for i in range(3)]
    return summary


def test_torchrun_two_processes(tmp_path, data_root, mnist):
    r = _run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port=29631", TRAIN, *_overrides(tmp_path, data_root)])
    assert r.returncode == 0, r.stderr[-3000:]
    _check_run(tmp_path / "run", 2)


def test_accelerate_multi_process_on_cpu(tmp_path, data_root, mnist):
    r = _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29632",
              TRAIN, *_overrides(tmp_path, data_root)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "launcher accelerate" in r.stdout
    _check_run(tmp_path / "run", 2)


def test_more_ranks_than_experts_fails_on_every_rank(tmp_path, data_root, mnist):
    r = _run([str(BIN / "torchrun"), "--nproc_per_node=4", "--master_port=29633", TRAIN,
              *_overrides(tmp_path, data_root)], timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("error: 4 ranks but only 3 experts") == 4, r.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_ranks_with_different_configs_fail_on_every_rank(tmp_path, data_root, mnist):
    # A launcher script that gives each rank a different seed, as a mistaken multi-node launch might.
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import os, runpy, sys\n"
        f"sys.argv = [{TRAIN!r}] + sys.argv[1:] + ['seed=' + os.environ['RANK']]\n"
        f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    r = _run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port=29634", str(script),
              *_overrides(tmp_path, data_root)], timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("ranks were started with different configs") == 2, r.stderr[-3000:]


def test_bad_config_is_one_line(tmp_path, data_root):
    r = _run([sys.executable, TRAIN, *_overrides(tmp_path, data_root, "train.iteratons=5")], timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'train.iteratons' (did you mean 'train.iterations'?)"

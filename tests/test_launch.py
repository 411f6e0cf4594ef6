"""Real launches as subprocesses: python, torchrun and accelerate launch on the CPU (gloo).

Each test checks the run directory (summary.json's world size, the checkpoint), not only the exit code.
"""

import json
import os
import re
import sys
from pathlib import Path

from procs import free_port, run

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent


def _env():
    env = dict(os.environ)
    env.pop("WANDB_MODE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd, timeout=240):
    return run(cmd, cwd=REPO, env=_env(), timeout=timeout)


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
    expected = [f"expert_{i:03d}.safetensors" for i in range(3)]
    assert sorted(p.name for p in ckpt.glob("expert_*.safetensors")) == expected
    return summary


def test_torchrun_two_processes(tmp_path, data_root, mnist):
    r = _run([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", TRAIN,
              *_overrides(tmp_path, data_root)])
    assert r.returncode == 0, r.stderr[-3000:]
    _check_run(tmp_path / "run", 2)


def test_accelerate_multi_process_on_cpu(tmp_path, data_root, mnist):
    r = _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), TRAIN, *_overrides(tmp_path, data_root)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "launcher accelerate" in r.stdout
    _check_run(tmp_path / "run", 2)


def test_ranks_with_different_configs_fail_on_every_rank(tmp_path, data_root, mnist):
    # A launcher script that gives each rank a different seed, as a mistaken multi-node launch might.
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import os, runpy, sys\n"
        f"sys.argv = [{TRAIN!r}] + sys.argv[1:] + ['seed=' + os.environ['RANK']]\n"
        f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    r = _run([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", str(script),
              *_overrides(tmp_path, data_root)], timeout=120)
    assert r.returncode != 0
    # Each rank prints what it found (a rank's view of the mismatch is its own), and the report quotes them.
    assert r.stderr.count("error: ranks were started with different configs") >= 2, r.stderr[-3000:]


def test_bad_config_is_one_line(tmp_path, data_root):
    r = _run([sys.executable, TRAIN, *_overrides(tmp_path, data_root, "train.iteratons=5")], timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'train.iteratons' (did you mean 'train.iterations'?)"


# The shipped launch files: launch/accelerate/*.yaml and launch/torchrun.sh.
ACCEL = REPO / "launch" / "accelerate"
TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
PROBE = (  # joins the group as the trainer does and reports it, without training (a few seconds)
    "import os, sys\n"
    f"sys.path.insert(0, {str(REPO)!r})\n"
    "import torch.distributed as dist\n"
    "from icm_dist.config import load_config\n"
    "from icm_dist.dist import init_distributed\n"
    f"d = init_distributed(load_config({str(REPO / 'configs' / 'tiny.yaml')!r}, ['threads=1']))\n"
    "print(f'probe rank {d.rank} world {d.world_size} launcher {d.launcher} '\n"
    "      f'backend {dist.get_backend() if d.enabled else None}', flush=True)\n"
    "d.close()\n")


def test_shipped_cpu_accelerate_config_starts_gloo_processes(tmp_path):
    # The trap this file avoids: MULTI_CPU (and `--cpu --num_processes N`) start one process.
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    r = _run([str(BIN / "accelerate"), "launch", "--config_file", str(ACCEL / "cpu_multi_process.yaml"),
              "--main_process_port", str(free_port()), str(probe)], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    # Two processes share the pipe, so their lines may interleave: find the reports, not the lines.
    report = r"probe rank \d+ world \d+ launcher (?:accelerate|torchrun|python) backend (?:gloo|nccl|None)"
    lines = sorted(re.findall(report,
                              r.stdout))
    assert lines == [f"probe rank {i} world 2 launcher accelerate backend gloo" for i in range(2)], r.stdout[-2000:]


def test_torchrun_wrapper_builds_the_rendezvous():
    def dry(args, **env):
        e = {**_env(), "DRY_RUN": "1", **env}
        for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "RDZV_ID", "SLURM_JOB_ID"):
            if k not in env:
                e.pop(k, None)
        r = run(["bash", TORCHRUN_SH, *args], cwd=REPO, env=e, timeout=30)
        return r.returncode, r.stderr

    rc, err = dry(["2", "--config", "configs/tiny.yaml", "threads=1"])
    assert rc == 0 and "--nproc_per_node=2" in err and "--standalone" in err and "OMP_NUM_THREADS=" in err, err
    assert err.rstrip().endswith(f"{TRAIN} --config configs/tiny.yaml threads=1"), err
    rc, err = dry(["4", "--config", "configs/paper.yaml"], NNODES="2", NODE_RANK="1", MASTER_ADDR="node0",
                  MASTER_PORT="29700", OMP_NUM_THREADS="3")
    assert rc == 0, err
    for part in ("OMP_NUM_THREADS=3", "--nproc_per_node=4", "--nnodes=2", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=node0:29700", "--rdzv_conf=is_host=0"):
        assert part in err, (part, err)
    rc, err = dry(["--nnodes", "2", "--node-rank", "0", "--master-addr", "h", "4", "--config", "c.yaml"])
    assert rc == 0 and "--rdzv_endpoint=h:29500" in err and "--rdzv_conf=is_host=1" in err, err
    rc, err = dry(["4"], NNODES="2")
    assert rc == 2 and "needs MASTER_ADDR" in err, err
    rc, err = dry(["--config", "configs/tiny.yaml"])
    assert rc == 2 and "NPROC" in err, err

"""Checkpoints under real launches (issue #4): a worker SIGKILLed mid-run under torchrun --max-restarts,
and a checkpoint saved by 2 ranks resumed by 3 and by 1.

One uninterrupted 2-rank run is the reference for both. The kill uses the trainer's test hook
(ICM_DIST_TEST_KILL_AT, ICM_DIST_TEST_KILL_RANK): on torchrun's first attempt, rank 0 (the one that logs to
wandb; a killed rank 1 is test_multinode.py's) SIGKILLs itself after iteration 13, between the checkpoints of
iterations 10 and 15; torchrun restarts the group, which resumes from iteration 10 by itself (resume is left
unset: a restart resumes as resume=auto).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inproc import same_tensors
from procs import run

from icm_dist.precision import resolve_precision, world_size_promise

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")


def _args(out: Path, data_root: str, *more: str) -> list[str]:
    return [TRAIN, "--config", "configs/tiny.yaml", f"run.out_dir={out}", f"data.root={data_root}", "threads=1",
            "checkpoint.every=5", "checkpoint.keep=10", "eval.final_examples=200", *more]


def _torchrun(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", *args]


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "ICM_DIST_TEST_", "WANDB_SERVICE"))}
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env})
    r = run(cmd, cwd=REPO, env=e, timeout=180)
    # A plain string, not a tuple: pytest prints a string message whole, where it cuts a tuple's repr to
    # one line. The killed run's stderr holds attempt 1's expected traceback before anything that went
    # wrong after the restart, so keep all of it.
    assert r.returncode == 0, (f"exit {r.returncode}: {' '.join(cmd)}\n--- stdout ---\n{r.stdout[-6000:]}"
                               f"\n--- stderr ---\n{r.stderr[-20000:]}")
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root, mnist):
    out = tmp_path_factory.mktemp("launch") / "ref"
    _run(_torchrun(2, *_args(out, data_root)))
    return out


# Starts a wandb service the way any wandb user's process does (it exports WANDB_SERVICE), then runs the
# command it is given, which inherits that variable.
_WANDB_PARENT = """
import os, subprocess, sys, wandb
run = wandb.init(project="parent", dir=sys.argv[1], mode="offline", settings=wandb.Settings(console="off"))
run.finish()
assert os.environ.get("WANDB_SERVICE"), "wandb.init exported no WANDB_SERVICE"
sys.exit(subprocess.run(sys.argv[2:]).returncode)
"""


def test_rank0_killed_under_an_inherited_wandb_service_restarts_and_resumes_its_wandb_run(reference, tmp_path,
                                                                                      data_root):
    """Rank 0 (the one that logs to wandb and writes the run directory) SIGKILLed after iteration 13: torchrun
    restarts the group, which resumes from iteration 10 and ends bitwise equal to an uninterrupted run, with
    each metrics row once. With a wandb service inherited from torchrun's parent (CI's pytest, a notebook,
    a sweep script), which would keep the run id "in use" and refuse the restart's resume of it; the tracker
    does not join an inherited service (icm_dist/tracking.py). A killed worker that is not rank 0:
    test_multinode.py."""
    out = tmp_path / "killed0"
    cmd = [sys.executable, "-c", _WANDB_PARENT, str(tmp_path),
           *_torchrun(2, *_args(out, data_root, "tracking.wandb.mode=offline"), restarts=1)]
    r = _run(cmd, ICM_DIST_TEST_KILL_AT="13", ICM_DIST_TEST_KILL_RANK="0", WANDB_MODE="offline", WANDB_SILENT="true")
    log = r.stdout + r.stderr
    assert "test hook: rank 0 SIGKILLs itself after iteration 13" in log
    cpu = torch.device("cpu")  # the start-up line says what `auto` picked here and what that promises
    assert f"world size 2, experts per rank [2, 1], {world_size_promise(resolve_precision('auto', cpu), cpu)}" in log
    assert "failed (exitcode:" in log  # torchrun saw the group fail
    assert f"torchrun restart 1: resuming from {out / 'checkpoints' / 'iter_0000010'}" in log
    assert json.loads((out / "summary.json").read_text())["iterations"] == 20
    assert same_tensors(reference / "checkpoints/iter_0000020", out / "checkpoints/iter_0000020") == []
    # The restarted run rewrote iterations 11-13: metrics.jsonl holds each training row once.
    its = [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()
           if "d_loss" in json.loads(x)]
    assert its == sorted(set(its)) and its[-1] == 20
    # Both attempts logged to one wandb run: the killed one and the restart that resumed it.
    rid = (out / "wandb_run_id").read_text().strip()
    assert len(list((out / "wandb").glob(f"offline-run-*-{rid}"))) == 2


@pytest.mark.parametrize("world", [3])
def test_checkpoint_of_two_ranks_resumes_on_three_and_one(reference, tmp_path, data_root, world):
    """Resume iteration 10 of the 2-rank run under torchrun on 3 ranks with train.iterations=10: the run
    loads (each rank its own experts), evaluates and saves iteration 10 again on the new world size; every
    tensor is unchanged. (Training on after a reshard, on 1 and 3 ranks: test_checkpoint_ranks.py.)"""
    src = reference / "checkpoints" / "iter_0000010"
    out = tmp_path / f"w{world}"
    args = _args(out, data_root, f"resume={src}", "train.iterations=10")
    r = _run(_torchrun(world, *args) if world > 1 else [sys.executable, *args])
    assert f"world size {world}" in r.stdout
    saved = json.loads((out / "checkpoints/iter_0000010/manifest.json").read_text())
    assert saved["world_size"] == world and json.loads((src / "manifest.json").read_text())["world_size"] == 2
    assert same_tensors(src, out / "checkpoints/iter_0000010") == []

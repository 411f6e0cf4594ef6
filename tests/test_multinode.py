"""A multi-node launch rehearsed on one machine: two torchrun agents started by launch/torchrun.sh as two
nodes (NNODES=2, NODE_RANK 0 and 1, a c10d rendezvous on 127.0.0.1), one worker each, exactly as
docs/distributed.md tells users to start two real nodes. The run directory must show one run of world
size 2 with one wandb run; and when the worker of one node is SIGKILLed, both agents restart the group
(torchrun --max-restarts), which resumes from the last checkpoint and ends bitwise where the uninterrupted
two-node run ends.

The second case caught a real bug: torchrun counts a restart only on the node whose worker failed, so
rank 0 on the other node saw a first launch and would have started the run afresh.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from inproc import same_tensors
from procs import free_port, run_together

REPO = Path(__file__).resolve().parents[1]


def _two_nodes(out: Path, data_root: str, *more: str, restarts: int = 0, **env) -> tuple[str, str]:
    port, rdzv = free_port(), f"icm-test-{uuid.uuid4().hex[:8]}"
    args = ["launch/torchrun.sh", "1", "--config", "configs/tiny.yaml", f"run.out_dir={out}", f"data.root={data_root}",
            "checkpoint.every=5", "checkpoint.keep=10", "eval.final_examples=200", "tracking.wandb.mode=offline", *more]
    skip = ("TORCHELASTIC_", "ICM_DIST_TEST_", "WANDB_SERVICE")
    base = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    base.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NNODES": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": rdzv, "MAX_RESTARTS": str(restarts),
                 "WANDB_SILENT": "true", "LOGLEVEL": "INFO", **env})  # INFO: the agents log their ranks
    envs = [{**base, "NODE_RANK": str(n)} for n in (0, 1)]
    results = run_together([["bash", *args]] * 2, timeout=420, envs=envs, cwd=REPO)
    logs = []
    for n, r in enumerate(results):
        log = r.stdout + r.stderr
        assert r.returncode == 0, f"node {n} exited {r.returncode}\n{log[-12000:]}"
        logs.append(log)
    return logs[0], logs[1]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, data_root, mnist):
    out = tmp_path_factory.mktemp("nodes") / "run"
    return out, _two_nodes(out, data_root)


def test_two_nodes_train_one_run(two_node_run):
    out, (log0, log1) = two_node_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 20
    manifest = json.loads((out / "checkpoints" / "iter_0000020" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints" / "iter_0000020").glob("expert_*")) == \
        [f"expert_{g:03d}.safetensors" for g in range(3)]
    # Each agent ran one worker of the one group: global ranks 0 and 1 between them, one per node.
    assert "torchrun.sh: OMP_NUM_THREADS=1" in log0 and "--nnodes=2" in log0 and "--rdzv_conf=is_host=1" in log0
    assert "--rdzv_conf=is_host=0" in log1
    assert sorted(x for lg in (log0, log1) for x in ("global_ranks=[0]", "global_ranks=[1]") if x in lg) == \
        ["global_ranks=[0]", "global_ranks=[1]"]
    assert "experts per rank [2, 1]" in log0 + log1
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs


def test_a_killed_node_worker_restarts_the_group_and_resumes_bitwise(two_node_run, tmp_path, data_root):
    ref = two_node_run[0]
    out = tmp_path / "killed"
    log0, log1 = _two_nodes(out, data_root, restarts=1, ICM_DIST_TEST_KILL_AT="13")
    log = log0 + log1
    assert "test hook: rank 1 SIGKILLs itself after iteration 13" in log
    assert f"torchrun restart 1: resuming from {out / 'checkpoints' / 'iter_0000010'}" in log
    assert json.loads((out / "summary.json").read_text())["iterations"] == 20
    assert same_tensors(ref / "checkpoints/iter_0000020", out / "checkpoints/iter_0000020") == []

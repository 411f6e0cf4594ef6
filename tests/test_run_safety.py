"""A run never mixes, loses or overwrites (issue #29), through the real command and a real kill -9.

One tiny run is killed with SIGKILL after iteration 17 (checkpoints at 5, 10 and 15; the trainer's test
hook ICM_DIST_TEST_KILL_AT), and one runs to its end uninterrupted: the reference. Each test copies
what it damages. The refusals themselves (a changed experiment, a directory that holds another run, an
output icm-dist did not write) are rows of tests/test_bad_inputs.py's table, which checks that each one
exits with one line and changes nothing; here are the runs that must go on: with the metrics restored,
from ``latest``, over a run deleted on request, and the keys that may change on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from warm import run_warm

from icm_dist.config import RESUMABLE_KEYS, Config, _matches, resume_changes, to_dict
from icm_dist.utils import flatten

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
CLI = [sys.executable, "-m", "icm_dist.commands.cli"]


def train_args(out: Path, data_root: str, *more: str) -> list[str]:
    return [sys.executable, TRAIN, "--config", "configs/tiny.yaml", f"run.out_dir={out}", f"data.root={data_root}",
            "threads=1", "train.iterations=30", "checkpoint.every=5", "checkpoint.keep=10", "eval.final_examples=200",
            *more]


def sh(cmd: list[str], **env) -> subprocess.CompletedProcess:
    """``cmd`` in a process of its own, forked from a warm interpreter (tests/warm.py): these are the
    trainer's and the commands' own behaviours, not the interpreter's start-up."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "ICM_DIST_TEST_"))}
    return run_warm(cmd, cwd=REPO, env={**e, "OMP_NUM_THREADS": "1", **env}, timeout=240)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-4000:]}\n"
                               f"--- stderr ---\n{r.stderr[-4000:]}")
    return r


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def bits(ckpt: Path) -> dict:
    return {f.name: {k: v.view(-1).view(torch.uint8).numpy().tobytes() for k, v in load_file(str(f)).items()}
            for f in sorted(ckpt.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """(the uninterrupted run, the run killed after iteration 17)."""
    base = tmp_path_factory.mktemp("safety")
    ok(sh(train_args(base / "ref", data_root)))
    killed = sh(train_args(base / "killed", data_root), ICM_DIST_TEST_KILL_AT="17", ICM_DIST_TEST_KILL_RANK="0")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (base / "killed/checkpoints/latest").read_text() == "iter_0000015\n"
    return base / "ref", base / "killed"


@pytest.mark.parametrize("cut", ["last_line", "to_40_percent"])
def test_metrics_cut_after_a_kill_are_restored_from_the_checkpoint(runs, tmp_path, data_root, cut):
    """metrics.jsonl cut short (its last line, or to 40% of the file) after a kill -9: the resumed run says
    how many rows it restored and ends with every row the uninterrupted run has, equal where deterministic."""
    ref, killed = runs
    run_dir = shutil.copytree(killed, tmp_path / "run")
    text = (run_dir / "metrics.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]) if cut == "last_line" else text[:int(len(text) * 0.4)])
    r = ok(sh(train_args(run_dir, data_root, "resume=auto")))
    assert "restored the other" in r.stdout and "up to iteration 15" in r.stdout, r.stdout

    def losses(d):
        return [(x["iteration"], x.get("d_loss"), x.get("eval/accuracy/restored")) for x in rows(d)]
    assert losses(run_dir) == losses(ref)
    assert bits(run_dir / "checkpoints/iter_0000030") == bits(ref / "checkpoints/iter_0000030")


def test_an_intact_history_resumes_without_a_word(runs, tmp_path, data_root):
    ref, killed = runs
    run_dir = shutil.copytree(killed, tmp_path / "run")
    r = ok(sh(train_args(run_dir, data_root, "resume=auto")))
    assert "restored the other" not in r.stdout and "warning" not in r.stdout, r.stdout
    assert [x["iteration"] for x in rows(run_dir)] == [x["iteration"] for x in rows(ref)]


def test_resume_follows_latest_not_a_newer_checkpoint_of_another_run(runs, tmp_path, data_root):
    """A checkpoint newer than the one ``latest`` names (planted here: the reference run's iteration 20) is
    never resumed from: the run continues from ``latest`` and ends as the uninterrupted run does."""
    ref, killed = runs
    run_dir = shutil.copytree(killed, tmp_path / "run")
    shutil.copytree(ref / "checkpoints/iter_0000030", run_dir / "checkpoints/iter_0000020")
    r = ok(sh(train_args(run_dir, data_root, "resume=auto")))
    assert f"resuming from {run_dir / 'checkpoints/iter_0000015'}" in r.stdout
    assert "ignoring checkpoint iter_0000020" in r.stdout
    assert bits(run_dir / "checkpoints/iter_0000030") == bits(ref / "checkpoints/iter_0000030")


def test_overwrite_deletes_the_old_run_and_only_it(runs, tmp_path, data_root):
    """run.overwrite=true: the old run's files go before the new run starts; the user's own files stay; the
    new run's history and checkpoints are its own."""
    ref, _ = runs
    run_dir = shutil.copytree(ref, tmp_path / "run")
    (run_dir / "notes.txt").write_text("mine")
    ok(sh(train_args(run_dir, data_root, "train.iterations=5", "run.overwrite=true")))
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_0000005", "latest"]
    assert max(x["iteration"] for x in rows(run_dir)) == 5
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 5


def test_a_resume_may_change_the_cadence_and_the_length(runs, tmp_path, data_root):
    """The keys outside the experiment change on resume and the run ends bitwise as the uninterrupted one."""
    ref, killed = runs
    run_dir = shutil.copytree(killed, tmp_path / "run")
    ok(sh(train_args(run_dir, data_root, "resume=auto", "eval.every=5", "tracking.log_every=3", "checkpoint.every=7",
                     "checkpoint.keep=2", "run.name=again", "dist.timeout_s=100", "run.progress=true")))
    assert bits(run_dir / "checkpoints/iter_0000030") == bits(ref / "checkpoints/iter_0000030")


def test_every_key_outside_the_resumable_ones_is_compared():
    """resume_changes sees a change of every config key except RESUMABLE_KEYS (a new key is covered from
    the day it is added), and a saved config without a key compares as its default."""
    base = to_dict(Config())
    for key in flatten(base):
        changed = json.loads(json.dumps(base))
        *path, last = key.split(".")
        d = changed
        for p in path:
            d = d[p]
        d[last] = ["<changed>"]  # differs from any value the key can hold
        found = [k for k, _, _ in resume_changes(changed, Config())]
        assert found == ([] if _matches(key, RESUMABLE_KEYS) else [key]), key
    old = json.loads(json.dumps(base))
    del old["expert"]["norm"]
    assert resume_changes(old, Config()) == []


def test_apply_and_export_replace_their_own_outputs_and_others_only_when_forced(runs, tmp_path):
    ref, _ = runs
    x = tmp_path / "x.safetensors"
    save_file({"images": torch.rand(3, 1, 32, 32)}, str(x))
    for cmd in (["export", str(ref), "--expert", "0"], ["apply", str(ref), str(x)]):
        out = tmp_path / f"{cmd[0]}.safetensors"
        ok(sh([*CLI, *cmd, "--out", str(out)]))
        ok(sh([*CLI, *cmd, "--out", str(out)]))  # its own file: replaced without asking
        theirs = tmp_path / f"{cmd[0]}.txt"
        theirs.write_text("the user's")
        ok(sh([*CLI, *cmd, "--out", str(theirs), "--force"]))
        assert theirs.read_bytes() != b"the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apply.safetensors", "apply.txt", "export.safetensors",
                                                          "export.txt", "x.safetensors"]  # no temporary file left

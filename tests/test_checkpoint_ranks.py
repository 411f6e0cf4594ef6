"""Checkpoints across real ranks (issue #20): a 2-rank run's checkpoint trained on by 1 and by 3 ranks,
and the committee evaluated by 1, 2 and 3 ranks with real gloo groups.

One launch of three processes (tests/ranks_worker.py) runs, each phase in a process group of its
own on a port picked at run time: ranks 0-1 train the reference (2 ranks, iterations 0 to 20,
checkpoints at 10 and 20) with ``icm-dist train`` under the "python" launcher (env://), then all
three train on from its iteration 10 to 20, then evaluate its iteration 20 as a world of 3, then
ranks 0-1 as a world of 2. One rank trains on in this process. Every launch has a timeout, and a
failure shows every rank's output. Everything runs in fp32 (train.precision=fp32): bf16 autocast
would add rounding that depends on how a batch is cut between ranks, which is not what these tests
are about.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from procs import free_port
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
WORKER = str(REPO / "tests" / "ranks_worker.py")
TIMEOUT_S = 300
LR = 1e-3  # train.lr_expert = train.lr_discriminator (the defaults)
EVAL_N = 120  # two evaluation batches of eval.batch_size=64


def launch_ranks(world: int, argv: list[str], what: str, timeout: float = TIMEOUT_S) -> list[str]:
    """Start ``world`` processes of ``argv`` (RANK=0..world-1), each in a session of its own, and wait for
    all of them, at most ``timeout`` seconds in all. A rank that fails or a timeout kills every rank's
    process tree at once (no rank is left waiting for a dead peer) and fails the test with every rank's
    output. Returns each rank's output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "ICM_DIST_TEST_", "WANDB_SERVICE",
                                                                   "ACCELERATE_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world)})
    logs = [tempfile.TemporaryFile("w+") for _ in range(world)]  # files, not pipes: no rank blocks on a full pipe
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]  # every rank's, each time (no short-circuit)
        if None not in codes or any(c not in (None, 0) for c in codes) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    timed_out = None in codes and not any(c not in (None, 0) for c in codes)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if any(p.returncode != 0 for p in procs):
        codes = ", ".join(f"rank {r}: {p.returncode}" for r, p in enumerate(procs))
        text = "\n".join(f"--- rank {r} ---\n{o[-8000:]}" for r, o in enumerate(outputs))
        how = f"timed out after {timeout:.0f}s" if timed_out else "failed"
        pytest.fail(f"{what} on {world} ranks {how} (exit codes {codes}; -9: killed by this test)\n{text}",
                    pytrace=False)
    return outputs


def overrides(out: Path, data_root: str, *more: str) -> list[str]:
    return [f"run.out_dir={out}", f"data.root={data_root}", "threads=1", "train.precision=fp32", "train.iterations=20",
            "checkpoint.every=10", "checkpoint.keep=10", "eval.every=10", "eval.examples=50",
            f"eval.final_examples={EVAL_N}", "identity_init.max_steps=5", "data.transformed_examples=1000",
            "tracking.log_every=1", *more]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data_root, mnist):
    """The one launch (see the module's docstring). Returns its base directory: ``ref`` (the 2-rank run),
    ``w3`` (3 ranks from ref's iteration 10) and ``eval`` (the 3- and 2-rank evaluations of ref's iteration 20)."""
    base = tmp_path_factory.mktemp("ranks")
    (base / "eval").mkdir()
    ref, ports = base / "ref", [free_port() for _ in range(4)]
    phases = [
        {"world": 2, "port": ports[0], "train": ["--config", TINY, *overrides(ref, data_root)]},
        {"world": 3, "port": ports[1],
         "train": ["--config", TINY, *overrides(base / "w3", data_root, f"resume={ref / 'checkpoints/iter_0000010'}")]},
        *({"world": w, "port": port, "eval": {"ckpt": str(ref / "checkpoints/iter_0000020"), "out": str(base / "eval"),
                                              "n": EVAL_N}} for w, port in ((3, ports[2]), (2, ports[3]))),
    ]
    outputs = launch_ranks(3, [sys.executable, WORKER, json.dumps({"phases": phases})],
                           "train 2 ranks, train on with 3, evaluate with 3 and 2")
    assert "world size 2" in outputs[0] and "world size 3" in outputs[0], outputs[0]
    assert "precision fp32 (the same winners at every world size)" in outputs[0], outputs[0]  # what these tests pin
    return base


@pytest.fixture(scope="module")
def ref(launched):
    return launched / "ref"


@pytest.fixture(scope="module")
def proto(ref):
    """The reference run's protocol (its transformed test digits)."""
    from icm_dist.commands import reuse
    from icm_dist.protocol import build_protocol

    return build_protocol(reuse.open_source(ref / "checkpoints/iter_0000020", verify=False).cfg)


# ----------------------------------------------------------------------------- resharding that trains on
#
# Tolerances. The resumed run loads exactly the saved state (tests/test_checkpoint.py and
# test_resume_launch.py check that bit for bit); from there, the only difference between world sizes
# is the float summation order of D's gradient (DDP's all-reduce over ranks vs one pass over the whole
# batch) and of the grouped convolutions (E experts per bank), so D's scores differ at float-noise
# level, every step picks the same winners (checked: the win shares of every iteration 11..20 are
# equal) and every tensor drifts by float noise only. Measured on an AVX512 CPU in fp32, 10 steps
# after the resume: parameters 1.2e-6 apart at most, Adam's moments and BatchNorm's running
# statistics 4e-5 of the tensor's largest magnitude at most.
# - parameters (the rule of tests/test_competition.py for Adam in two summation orders): every element
#   within steps * lr (Adam moves a coordinate by about lr per step at most, whatever its gradient, so
#   only a gross error gets further), and 98% of them within 1e-5 + 1e-4 |x| (Adam divides by each
#   coordinate's own gradient scale, so a few coordinates whose gradient is at noise level may move by
#   more than noise);
# - Adam's moments and BatchNorm's running statistics: within 1e-3 of the tensor's largest magnitude;
#   an optimizer state not loaded, reset or taken from another expert is off by the order of the
#   tensor itself;
# - step counters (each expert's Adam steps: the iterations it won something) and
#   num_batches_tracked: exactly equal.
MOMENT_RTOL = 1e-3


def _assert_adam_close(a: torch.Tensor, b: torch.Tensor, steps: int, name: str) -> None:
    diff = (a - b).abs()
    assert float(diff.max()) <= steps * LR, (name, float(diff.max()))
    assert float((diff <= 1e-5 + 1e-4 * b.abs()).float().mean()) >= 0.98, (name, float(diff.max()))


def _compare_checkpoints(ref: Path, got: Path, steps: int) -> None:
    files = sorted(p.name for p in ref.glob("*.safetensors"))
    assert sorted(p.name for p in got.glob("*.safetensors")) == files and len(files) == 4, files
    for f in files:
        a, b = load_file(str(got / f)), load_file(str(ref / f))
        assert sorted(a) == sorted(b), f"{f}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in sorted(b):
            x, y, name = a[k], b[k], f"{got.parent.parent.name} {f}:{k}"
            assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
            if k.endswith((".step", "num_batches_tracked")):
                assert torch.equal(x, y), (name, x, y)
            elif k.startswith("optim.") or "running_" in k:
                err, scale = float((x - y).abs().max()), float(y.abs().max())
                assert err <= MOMENT_RTOL * scale, (name, err, scale)
            else:
                _assert_adam_close(x, y, steps, name)
    # Length by length: each expert file holds exactly an expert's state (weights, buffers, Adam's two moments
    # per parameter and its step), and D's file one {step, exp_avg, exp_avg_sq} per parameter of D.
    from icm_dist.config import config_from_dict
    from icm_dist.experts import LocalExperts
    from icm_dist.models import make_discriminator

    cfg = config_from_dict(json.loads((got / "manifest.json").read_text())["config"])
    template = sorted(LocalExperts(cfg, [0], torch.device("cpu")).state(0).flat())
    assert all(sorted(load_file(str(got / f))) == template for f in files if f.startswith("expert_"))
    with safe_open(str(got / "discriminator.safetensors"), "pt") as fd:
        names = json.loads(fd.metadata()["optim_params"])
        keys = set(fd.keys())
    assert names == [n for n, _ in make_discriminator(cfg).named_parameters()], names
    assert all(f"model.{n}" in keys for n in names), names
    assert {k for k in keys if k.startswith("optim.")} == {f"optim.{i}.{s}" for i in range(len(names))
                                                          for s in ("step", "exp_avg", "exp_avg_sq")}


def _train_rows(run: Path) -> dict:
    """Iteration -> the win shares logged for it (tracking.log_every=1: each iteration's own winners)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("win_share/")} for r in rows if "d_loss" in r}


@pytest.mark.parametrize("world", [1, 3])
def test_two_rank_checkpoint_trains_on_at_another_world_size(launched, ref, data_root, tmp_path, world):
    """2 ranks to iteration 10, then 1 or 3 ranks to 20, against the 2 ranks' own iteration 20."""
    if world == 3:
        out = launched / "w3"
    else:  # one rank needs no process group: train in this process (as icm-dist train does)
        from icm_dist.config import load_config
        from icm_dist.trainer import train

        out = tmp_path / "w1"
        threads = torch.get_num_threads()
        try:
            train(load_config(TINY, overrides(out, data_root, f"resume={ref / 'checkpoints/iter_0000010'}")))
        finally:
            torch.set_num_threads(threads)
    ckpt, want = out / "checkpoints" / "iter_0000020", ref / "checkpoints" / "iter_0000020"
    m, m_ref = (json.loads((c / "manifest.json").read_text()) for c in (ckpt, want))
    assert (m["world_size"], m_ref["world_size"], m["iteration"]) == (world, 2, 20)
    assert m["trainer_state"] == m_ref["trainer_state"]
    rows, rows_ref = _train_rows(out), _train_rows(ref)
    assert sorted(rows) == sorted(rows_ref) == list(range(1, 21))
    assert rows == rows_ref, [t for t in rows if rows[t] != rows_ref[t]]  # same winners at every iteration
    _compare_checkpoints(want, ckpt, steps=10)


# ----------------------------------------------------------------------------- evaluation across ranks


def test_evaluation_on_two_and_three_ranks_equals_one_rank(launched, ref, proto):
    """The committee of the reference's iteration 20 evaluated by 1 rank (in this process, as icm-dist
    apply does), by 3 ranks (one expert each) and by 2 (experts [0, 1] and [2]) with real gloo groups:
    the same winners, win matrix and accuracies; scores and restored outputs equal up to float noise
    (the grouped convolutions of a bank of 3, 2 or 1 experts sum in other orders; measured 2e-6 on
    logits up to ~13 and 1.2e-7 on outputs in [0, 1], against a winning margin above 1)."""
    from icm_dist.commands import reuse
    from icm_dist.evaluate import evaluate, run_committee, train_classifier

    src = reuse.open_source(ref / "checkpoints" / "iter_0000020")
    experts, disc, _, plan, dist = reuse.load_committee(src)
    n = EVAL_N
    ev = evaluate(experts, disc, proto, train_classifier(src.cfg, proto, dist.device), plan, dist, src.cfg, n)
    res = run_committee(experts, disc, proto.test_x[:n], plan, dist, src.cfg)
    assert torch.equal(ev["winners"], res["winners"]) and len(set(res["winners"].tolist())) >= 2  # not trivial
    keep = ("accuracy", "accuracy_per_mechanism", "captured", "mechanisms_captured", "inactive_experts")
    for world, blocks in ((3, [[0], [1], [2]]), (2, [[0, 1], [2]])):
        for rank in range(world):
            path = launched / "eval" / f"w{world}_r{rank}.safetensors"
            got = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                assert json.loads(f.metadata()["experts"]) == blocks[rank], (world, rank)
            # Every rank holds the whole committee's scores and winners, and (by the all-reduce) its outputs.
            assert torch.equal(got["winners"], res["winners"]), (world, rank)
            torch.testing.assert_close(got["scores"], res["scores"], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got["restored"], res["restored"], rtol=0, atol=1e-5)
        rank0 = load_file(str(launched / "eval" / f"w{world}_r0.safetensors"))
        assert torch.equal(rank0["ev.win_matrix"], ev["win_matrix"]) and torch.equal(rank0["ev.winners"], ev["winners"])
        torch.testing.assert_close(rank0["ev.mean_scores"], ev["mean_scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank0["ev.restored"], ev["restored"], rtol=0, atol=1e-5)
        metrics = json.loads((launched / "eval" / f"w{world}_metrics.json").read_text())
        assert metrics == json.loads(json.dumps({k: ev[k] for k in keep})), world
    # The 2-rank run's own final evaluation (the trainer's, on the state it then saved) agrees too.
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["accuracy"] == ev["accuracy"] and summary["captured"] == ev["captured"]
    assert summary["win_matrix"] == [[round(float(v), 4) for v in r] for r in ev["win_matrix"]]


# ----------------------------------------------------------------------------- icm-dist apply, checked by hand


def _standalone_loader():
    """``load_expert`` of docs/checkpoint-format.md's snippet (safetensors and torch only), run as written."""
    import re

    doc = (REPO / "docs" / "checkpoint-format.md").read_text()
    code = re.search(r"<!-- snippet: load-expert -->\s*```python\n(.*?)```", doc, re.S).group(1)
    assert "icm_dist" not in code
    ns: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), ns)
    return ns["load_expert"]


def _winners_by_hand(scores_BN: torch.Tensor) -> torch.Tensor:
    """The argmax of each row, ties to the lowest expert id, one example at a time."""
    rows = scores_BN.tolist()
    return torch.tensor([min(g for g, s in enumerate(row) if s == max(row)) for row in rows])


def _apply_by_hand(ckpt: Path, x: torch.Tensor):
    """Scores, winners and restored images of the committee in ``ckpt``, computed without icm_dist's
    committee code: every expert through the standalone loader, D (models.Discriminator) with the weights of
    discriminator.safetensors, winners by hand."""
    from icm_dist.config import DiscriminatorConfig
    from icm_dist.models import Discriminator

    load_expert = _standalone_loader()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    outs = [load_expert(str(ckpt / name))(x) for name in manifest["experts"]]  # [B, 1, H, W] each
    d = load_file(str(ckpt / "discriminator.safetensors"))
    disc = Discriminator(DiscriminatorConfig(**manifest["config"]["discriminator"])).eval()
    disc.load_state_dict({k[len("model."):]: v for k, v in d.items() if k.startswith("model.")})
    with torch.no_grad():
        scores = torch.stack([disc(o) for o in outs], dim=1)  # [B, N] logits
    winners = _winners_by_hand(scores)
    restored = torch.stack([outs[int(w)][i] for i, w in enumerate(winners)])
    return scores, winners, restored


def _icm_dist_apply(source: Path, x: torch.Tensor, tmp_path: Path, name: str) -> dict:
    from safetensors.torch import save_file

    from icm_dist.commands.cli import main

    save_file({"images": x.contiguous()}, str(tmp_path / f"{name}_in.safetensors"))
    out = tmp_path / f"{name}_out.safetensors"
    assert main(["apply", str(source), str(tmp_path / f"{name}_in.safetensors"), "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    return {**load_file(str(out)), "meta": meta}


def test_apply_writes_the_winners_computed_by_hand(ref, proto, tmp_path):
    """`icm-dist apply RUN x.safetensors` (the committee, fp32 run) on transformed test digits: the winners
    it writes are the argmax (ties to the lowest id) of D's scores of each expert's output, computed
    without icm_dist's committee, and the images it writes are those winners' outputs. Then the same with
    expert 2 a copy of expert 0 (exact ties): every tie goes to expert 0."""
    from icm_dist.utils import sha256_file

    ckpt = ref / "checkpoints" / "iter_0000020"
    x = proto.test_x[:EVAL_N]  # two batches of eval.batch_size
    scores, winners, restored = _apply_by_hand(ckpt, x)
    assert len(set(winners.tolist())) >= 2, winners  # a choice was made

    got = _icm_dist_apply(ref, x, tmp_path, "run")
    assert json.loads(got["meta"]["checkpoint"]) == str(ckpt) and json.loads(got["meta"]["mode"]) == "committee"
    assert torch.equal(got["winners"], winners), (got["winners"] != winners).nonzero().flatten().tolist()
    # Float noise only (a bank's grouped convolutions vs the snippet's one conv per expert; D on another batch).
    torch.testing.assert_close(got["scores"], scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["images"], restored, rtol=0, atol=1e-5)

    # Exact ties: expert 2 replaced by a copy of expert 0 (manifest updated to match, as a real save would).
    tied = tmp_path / "tied" / "iter_0000020"
    shutil.copytree(ckpt, tied)
    shutil.copyfile(tied / "expert_000.safetensors", tied / "expert_002.safetensors")
    m = json.loads((tied / "manifest.json").read_text())
    m["files"]["expert_002.safetensors"] = {"sha256": sha256_file(tied / "expert_002.safetensors"),
                                            "bytes": (tied / "expert_002.safetensors").stat().st_size}
    (tied / "manifest.json").write_text(json.dumps(m))
    x = x[:40]
    scores, winners, _ = _apply_by_hand(tied, x)
    assert torch.equal(scores[:, 0], scores[:, 2]) and int((winners == 0).sum()) > 0 and 2 not in winners.tolist()
    got = _icm_dist_apply(tied, x, tmp_path, "tied")
    assert torch.equal(got["scores"][:, 0], got["scores"][:, 2]), "the bank did not score equal experts equally"
    assert torch.equal(got["winners"], winners)

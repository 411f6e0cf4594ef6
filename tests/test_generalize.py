"""Out-of-domain symbols and ``icm-dist generalize`` (the paper's Figures 7 and 8).

The measurement is checked with exact inverse functions standing in for experts (shift back, 1 - x,
an oracle denoiser), where the answer is known; the command end to end on a real tiny run.
"""

import json
import sys
from pathlib import Path

import procs
import pytest
import torch

from icm_dist.commands.cli import main
from icm_dist.commands.generalize import expert_fn, measure_composition, measure_generalization, per_example_mse
from icm_dist.config import ExpertConfig
from icm_dist.data.mechanisms import SHIFT_PIXELS, get_mechanism, shift
from icm_dist.data.symbols import MARGIN, _stroke_estimate, load_symbols, render_symbols, symbols
from icm_dist.errors import DataError
from icm_dist.families.conv import Expert
from icm_dist.families.stn import STNExpert
from icm_dist.families.unet import UNetExpert

REPO = Path(__file__).resolve().parents[1]
S = SHIFT_PIXELS
TRANSLATIONS = ("up", "down", "left", "right", "up_left", "up_right", "down_left", "down_right")


# ----------------------------------------------------------------------------- symbols


def test_symbols_are_deterministic_distinct_mnist_like_and_stay_in_frame():
    a = symbols(40)
    assert a.shape == (40, 1, 46, 46) and a.dtype == torch.float32
    assert torch.equal(a, symbols(40)), "same arguments, same symbols"
    assert torch.equal(a[:15], symbols(15)), "the first k symbols do not depend on n"
    assert not torch.equal(a[:10], symbols(10, seed=1)), "the seed picks other symbols"
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.max()) == 1.0, "white strokes on black, like MNIST"

    flat = a.flatten(1)
    diff = (flat[:, None, :] - flat[None, :, :]).abs().amax(-1) + torch.eye(40) * 9
    assert float(diff.min()) > 0.5, "every two symbols differ somewhere by a whole stroke"

    ink = a > 0.5
    assert (ink.flatten(1).sum(1) >= 40).all(), "every symbol has strokes"
    # Nothing within MARGIN (> SHIFT_PIXELS) of the edge, so a 4-pixel shift loses no ink ...
    assert MARGIN > S
    assert float(a[..., :MARGIN, :].abs().max()) == 0 and float(a[..., -MARGIN:, :].abs().max()) == 0
    assert float(a[..., :MARGIN].abs().max()) == 0 and float(a[..., -MARGIN:].abs().max()) == 0
    for name in TRANSLATIONS:
        moved = get_mechanism(name)(a, torch.arange(40), 0)
        assert torch.allclose(moved.sum((1, 2, 3)), a.sum((1, 2, 3))), name
    # ... but they fill most of the frame inside it (MNIST: ~20 of 32 pixels, i.e. ~29 of 46).
    rows, cols = ink.any(-1).squeeze(1), ink.any(-2).squeeze(1)
    extent = torch.maximum(rows.sum(1), cols.sum(1))
    assert (extent >= 22).all() and float(extent.float().mean()) >= 26, extent
    # Stroke width comparable to MNIST's (2 * area / perimeter of the pixels above 0.5: ~1.95 on MNIST).
    widths = torch.tensor([_stroke_estimate(m[0]) for m in ink])
    assert 1.5 <= float(widths.median()) <= 2.5, widths


def test_symbols_span_scripts_and_no_digits():
    s = render_symbols(24)
    scripts = {lab.split()[0] for lab in s.labels}
    assert len(scripts) >= 10, scripts
    chars = "".join(lab.split()[2] for lab in s.labels)
    assert not any(c.isdigit() or c.isascii() for c in chars), chars


def test_load_symbols_sources(tmp_path):
    from PIL import Image, ImageDraw

    # Omniglot absent: auto falls back to rendered symbols, omniglot says where it looked and how to get it.
    got = load_symbols(tmp_path, n=5, source="auto")
    assert got.source == "fonts" and torch.equal(got.images, symbols(5))
    assert load_symbols(None, n=3).source == "fonts"
    with pytest.raises(DataError, match="omniglot-py.*images_background.*torchvision.datasets.Omniglot"):
        load_symbols(tmp_path, n=5, source="omniglot")
    with pytest.raises(DataError, match="source='fonts'"):
        load_symbols(None, n=5, source="omniglot")
    with pytest.raises(DataError, match="unknown symbol source"):
        load_symbols(None, n=5, source="emnist")
    (tmp_path / "omniglot-py").mkdir()
    (tmp_path / "omniglot-py" / "images_background.zip").write_bytes(b"")
    with pytest.raises(DataError, match="extract"):
        load_symbols(tmp_path, n=5, source="omniglot")

    # A stand-in for torchvision's files: black strokes on white 105x105 -> white on black 46x46.
    for k in range(3):
        d = tmp_path / "omniglot-py" / "images_background" / "Alphabet" / f"character{k + 1:02d}"
        d.mkdir(parents=True)
        img = Image.new("L", (105, 105), 255)
        ImageDraw.Draw(img).line((20, 20 + 10 * k, 85, 85), fill=0, width=6)
        img.save(d / f"0001_{k:02d}.png")
    o = load_symbols(tmp_path, n=3, source="auto")
    assert o.source == "omniglot" and o.images.shape == (3, 1, 46, 46)
    assert float(o.images[:, :, 0, -1].max()) == 0.0 and float(o.images.max()) > 0.9
    with pytest.raises(DataError, match="holds 3"):
        load_symbols(tmp_path, n=4, source="omniglot")


# ----------------------------------------------------------------------------- measurement


def _inverse(name):
    """The exact inverse of a mechanism (None for noise)."""
    if name == "invert":
        return lambda x: 1.0 - x
    if name == "noise":
        return None
    dy, dx = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1), "up_left": (-1, -1),
              "up_right": (-1, 1), "down_left": (1, -1), "down_right": (1, 1)}[name]
    return lambda x: shift(x, -dy * S, -dx * S)


def _inputs():
    # Symbols, plus full-frame random images whose border ink a translation really loses.
    g = torch.Generator().manual_seed(0)
    return torch.cat([symbols(6), torch.rand(4, 1, 46, 46, generator=g)])


def test_exact_inverses_score_zero_on_the_central_crop_and_beat_doing_nothing():
    names = ["up", "invert", "noise", "down_right", "left"]
    identity = lambda x: x  # noqa: E731
    experts = [_inverse("up"), _inverse("invert"), identity, _inverse("down_right"), _inverse("left")]
    captured = {"up": 0, "invert": 1, "noise": None, "down_right": 3, "left": 4}
    x = _inputs()
    r = measure_generalization(experts, names, x, seed=3, captured=captured, batch=4)
    assert r["num_symbols"] == 10 and r["num_experts"] == 5 and r["crop"] == S
    assert len(r["mse"]) == 5 and all(len(row) == 5 for row in r["mse"])
    for name in ("up", "invert", "down_right", "left"):
        p = r["per_mechanism"][name]
        assert p["captured_mse"] < 1e-12, (name, p)
        assert p["captured_is_best"] and p["best_expert"] == captured[name]
        assert p["captured_beats_input"] == 1.0 and p["input_mse"] > 0.01
        assert p["captured_error_reduction"] == pytest.approx(1.0)
    for m in range(len(names)):  # doing nothing is the identity expert, exactly
        assert r["mse"][m][2] == pytest.approx(r["input_mse"][m], abs=1e-7)
    noise = r["per_mechanism"]["noise"]
    assert noise["captured_by"] is None and noise["captured_mse"] is None and noise["captured_beats_input"] is None
    assert noise["best_mse"] <= noise["input_mse"] + 1e-7
    # An expert for another mechanism does worse than the right one (translations don't commute into identity).
    assert r["mse"][0][4] > 0.01

    # The crop is what makes the exact inverse exact: without it, the lost border of the random images counts.
    full = measure_generalization(experts, names, x, seed=3, captured=captured, crop=0)
    assert full["per_mechanism"]["up"]["captured_mse"] > 1e-3
    assert full["per_mechanism"]["invert"]["captured_mse"] < 1e-12
    # On symbols alone (ink only inside the margin) nothing is lost, crop or not.
    sym = measure_generalization(experts, names, x[:6], seed=3, captured=captured, crop=0)
    assert sym["per_mechanism"]["up"]["captured_mse"] < 1e-12


def test_noise_is_keyed_by_symbol_index_and_seed():
    x = symbols(4)
    a = measure_generalization([lambda v: v], ["noise"], x, seed=1)["input_mse"][0]
    assert a == measure_generalization([lambda v: v], ["noise"], x, seed=1, batch=1)["input_mse"][0]
    assert a != measure_generalization([lambda v: v], ["noise"], x, seed=2)["input_mse"][0]


def test_composition_with_exact_inverses_recovers_the_symbols():
    x = _inputs()
    ids = torch.arange(x.shape[0])
    before_noise = get_mechanism("invert")(get_mechanism("up_left")(x, ids, 5), ids, 5)
    oracle_denoiser = lambda v: before_noise  # noqa: E731  (whole batch at once: batch=None)
    undo = [oracle_denoiser, _inverse("invert"), _inverse("up_left")]
    r, images = measure_composition(["up_left", "invert", "noise"], undo, x, seed=5, batch=None,
                                    labels=["denoise", "invert", "shift"], keep=3)
    assert [st["stage"] for st in r["stages"]] == ["input (up_left then invert then noise)", "denoise", "invert",
                                                   "shift"]
    assert r["input_mse"] > 0.3 and r["final_mse"] < 1e-12 and r["final_beats_input"] == 1.0
    assert all(st["target_mse"] < 1e-12 for st in r["stages"])
    assert r["stages"][2]["mse"] > 0.01, "after undoing noise and inversion the shift is still there"
    assert len(images) == 5 and all(im.shape == (3, 1, 46, 46) for im in images)
    assert torch.equal(images[-1], x[:3]) and per_example_mse(images[-2], images[-1]).max() < 1e-12

    # Identity "experts" undo nothing: the final error is the input's.
    same, _ = measure_composition(["up_left", "invert"], [lambda v: v] * 2, x, seed=5)
    assert same["final_mse"] == pytest.approx(same["input_mse"]) and same["stages"][1]["target_mse"] > 0.1
    with pytest.raises(ValueError, match="one inverse per mechanism"):
        measure_composition(["up", "invert"], [lambda v: v], x, seed=0)


def test_expert_fn_runs_pooled_experts_on_46x46():
    for pool in (0, 1, 2):
        e = Expert(ExpertConfig(num=1, width=4, depth=4, pool=pool)).eval()
        with torch.no_grad():
            y = expert_fn(e)(symbols(2))
        assert y.shape == (2, 1, 46, 46) and float(y.min()) >= 0 and float(y.max()) <= 1
    for e in (UNetExpert(1, width=4, levels=2).eval(), STNExpert(1, width=4, depth=1, loc_width=4).eval()):
        with torch.no_grad():
            y = expert_fn(e)(symbols(2))  # unet halves the sides twice: 46 is padded to 48 and cropped back
        assert y.shape == (2, 1, 46, 46) and float(y.min()) >= 0 and float(y.max()) <= 1


# ----------------------------------------------------------------------------- the command


def test_generalize_command_on_a_tiny_run(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    r = procs.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                   str(REPO / "configs" / "tiny.yaml"), f"run.out_dir={run}", f"data.root={data_root}",
                   "threads=1"], cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())

    assert main(["generalize", str(run), "--n", "12"]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "generalization.json").read_text())
    assert set(res) >= {"run_dir", "checkpoint", "iteration", "seed", "symbols", "captured", "generalization",
                        "composition", "figures", "notes"}
    assert res["iteration"] == summary["iterations"] and res["captured"] == summary["captured"]
    assert res["symbols"]["source"] == "fonts" and res["symbols"]["n"] == 12
    g = res["generalization"]
    assert g["mechanisms"] == summary["mechanisms"] and g["num_experts"] == summary["num_experts"]
    assert len(g["mse"]) == len(g["mechanisms"]) and all(len(row) == g["num_experts"] for row in g["mse"])
    for name, p in g["per_mechanism"].items():
        assert set(p) >= {"input_mse", "captured_by", "captured_mse", "best_expert", "best_mse",
                          "captured_is_best", "captured_beats_input"}
        assert p["captured_by"] == summary["captured"][name]
        assert (p["captured_mse"] is None) == (p["captured_by"] is None)
        assert name in out
    # The tiny run has no up_left: Figure 8 is skipped with the reason.
    assert "'up_left' is not a mechanism of this run" in res["composition"]["skipped"]
    assert (run / "figures" / "generalization.png").stat().st_size > 1000
    assert res["figures"]["composition"] is None and "skipped" in out

    # With every mechanism captured (summary edited), the chain runs and the strip is drawn.
    summary["captured"] = {n: i for i, n in enumerate(summary["mechanisms"])}
    (run / "summary.json").write_text(json.dumps(summary))
    other = tmp_path / "g.json"
    assert main(["generalize", str(run), "--n", "6", "--chain", "up,invert,noise", "--out", str(other)]) == 0
    res = json.loads(other.read_text())
    c = res["composition"]
    assert c["chain"] == ["up", "invert", "noise"] and len(c["stages"]) == 4
    assert c["experts"] == [summary["captured"]["noise"], summary["captured"]["invert"], summary["captured"]["up"]]
    assert all(set(st) == {"stage", "mse", "target_mse"} for st in c["stages"])
    assert (run / "figures" / "composition.png").stat().st_size > 1000

    # Bad input ends in one line.
    capsys.readouterr()
    assert main(["generalize", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generalize", str(run), "--chain", "up,twist"]) == 2
    assert "unknown mechanism 'twist'" in capsys.readouterr().err
    assert main(["generalize", str(run), "--source", "omniglot", "--n", "3"]) == 2
    assert "--symbols-root" in capsys.readouterr().err
    assert main(["generalize", str(run), "--source", "omniglot", "--symbols-root", str(tmp_path)]) == 2
    assert "no Omniglot background set under" in capsys.readouterr().err

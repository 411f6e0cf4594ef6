"""Bring your own data and mechanisms, end to end: training from an RGB image folder (at 16x16, with a
parameterized, a colour, a composed and a user mechanism), from torchvision files and from the symbols;
checkpoints, figures, apply and the standalone loader on colour experts; bad mechanisms and bad inputs
stopped with one line."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_images import fashion_mnist_files

from icm_dist import checkpoint as ck
from icm_dist.commands import reuse
from icm_dist.commands.cli import main
from icm_dist.config import load_config
from icm_dist.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")

USER_MODULE = '''
import torch

def darken(x, ids, seed):
    return x * 0.5

def bright(x, ids, seed):
    return x * 255
'''

COLOUR_MECHANISMS = ("[{name: shift, dx: 3, dy: 0}, {name: hue, shift: 0.33, label: hue}, "
                     "{name: compose, of: [invert, {name: flip, axis: h}]}, usermech:darken]")


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("usermod")
    (d / "usermech.py").write_text(USER_MODULE)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def _overrides(out: Path, root: Path, *more: str) -> list[str]:
    return [f"run.out_dir={out}", f"data.root={root}", "threads=1", "train.iterations=4", "checkpoint.every=4",
            "eval.every=2", "eval.examples=40", "eval.final_examples=60", "identity_init.max_steps=3",
            "data.transformed_examples=null", "tracking.log_every=2", *more]


def _train(cfg):
    from icm_dist.trainer import train

    threads = torch.get_num_threads()
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)


def blob_folder(root: Path, n_train=24, n_test=8, size=16) -> None:
    """Four classes of coloured squares at seeded places: a small RGB data set in ImageFolder layout."""
    rng = np.random.default_rng(0)
    colours = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (220, 210, 30)}
    for part, n in (("train", n_train), ("test", n_test)):
        for name, rgb in colours.items():
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.zeros((size, size, 3), np.uint8)
                y, x = rng.integers(3, size - 7, 2)
                a[y:y + 5, x:x + 5] = rgb
                Image.fromarray(a).save(root / part / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory, user_module):
    tmp = tmp_path_factory.mktemp("rgb")
    blob_folder(tmp / "blobs")
    out = tmp / "run"
    cfg = load_config(TINY, _overrides(out, tmp / "cache", f"data.dataset=folder:{tmp / 'blobs'}",
                                       "data.image_size=16", f"data.mechanisms={COLOUR_MECHANISMS}",
                                       "expert.num=4"))
    summary = _train(cfg)
    return out, summary, cfg


def test_rgb_folder_trains_with_every_kind_of_mechanism(rgb_run):
    out, summary, _ = rgb_run
    assert summary["data"] == {"dataset": f"folder:{out.parent / 'blobs'}", "channels": 3, "image_size": 16,
                               "classes": 4}
    assert summary["mechanisms"] == ["shift(dx=3,dy=0)", "hue", "invert+flip(axis=h)", "usermech:darken"]
    psnr = summary["psnr"]
    assert set(psnr) == {"all", *summary["mechanisms"]}
    assert all(np.isfinite(v) for row in psnr.values() for v in row.values())
    assert set(summary["accuracy"]) == {"transformed", "restored", "original"}
    manifest = ck.read_manifest(ck.locate(out))
    assert manifest["channels"] == 3
    e0 = load_file(str(ck.locate(out) / "expert_000.safetensors"))
    assert tuple(e0["model.convs.0.weight"].shape[:2]) == (8, 3) and tuple(e0["model.out.weight"].shape[:2]) == (3, 8)
    for fig in ("win_matrix.png", "samples.png", "scores.png", "accuracy.png"):
        assert (out / "figures" / fig).is_file(), fig
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/psnr/restored" in r for r in rows)
    assert any("score/invert+flip(axis=h)/e0" in r for r in rows)


def test_rgb_run_resumes_and_applies_in_colour(rgb_run, tmp_path):
    out, _, cfg = rgb_run
    src = reuse.open_source(out)
    x = torch.rand(5, 3, 16, 16)
    (tmp_path / "in").mkdir()
    for i, a in enumerate((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(a).save(tmp_path / "in" / f"{i}.png")
    res = reuse.apply(out, tmp_path / "in", tmp_path / "restored")
    assert res["restored"].shape == (5, 3, 16, 16)
    with Image.open(tmp_path / "restored" / "0.png") as im:
        assert im.mode == "RGB" and im.size == (16, 16)
    # An exported colour expert, through the standalone loader of docs/checkpoint-format.md.
    exported = reuse.export_expert(out, tmp_path / "e1.safetensors", "1")
    text = (REPO / "docs" / "checkpoint-format.md").read_text()
    code = re.search(r"<!-- snippet: load-expert -->\s*```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), ns)
    with torch.no_grad():
        torch.testing.assert_close(ns["load_expert"](str(exported))(x), reuse.load_expert(src, 1)(x))
    module, meta = reuse.load_module_file(exported)
    assert meta["channels"] == "3" and module.channels == 3
    # Training on from the checkpoint: the data, channels and size must match, and do.
    more = load_config(TINY, _overrides(out, Path(cfg.data.root), f"data.dataset={cfg.data.dataset}",
                                        "data.image_size=16", f"data.mechanisms={COLOUR_MECHANISMS}",
                                        "expert.num=4", "train.iterations=6", "resume=auto"))
    assert _train(more)["iterations"] == 6


@pytest.mark.parametrize("bad,message", [
    ("range", "expected images in [0, 1] (0..255 pixel values? divide by 255)"),
    ("nan", "holds NaN or infinite values"),
    ("name", "has no tensor 'images' (it holds ['pixels']); name one with --key"),
    ("int", "is torch.int32; expected float images in [0, 1]"),
    ("channels", "expected [N, 3, H, W]"),
])
def test_apply_refuses_what_cannot_be_right(rgb_run, tmp_path, bad, message):
    out = rgb_run[0]
    x = torch.rand(2, 3, 16, 16)
    with_nan = x.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    tensors = {"range": {"images": x * 255}, "nan": {"images": with_nan}, "name": {"pixels": x},
               "int": {"images": (x * 255).int()}, "channels": {"images": x[:, :1].contiguous()}}[bad]
    save_file(tensors, str(tmp_path / "in.safetensors"))
    with pytest.raises(CheckpointError) as e:
        reuse.apply(out, tmp_path / "in.safetensors", tmp_path / "o.safetensors")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_apply_converts_uint8_and_says_so(rgb_run, tmp_path):
    notes = []
    x8 = (torch.rand(2, 3, 16, 16) * 255).round().to(torch.uint8)
    save_file({"images": x8}, str(tmp_path / "in.safetensors"))
    x, _ = reuse.read_inputs(tmp_path / "in.safetensors", channels=3, log=notes.append)
    assert torch.equal(x, x8.float() / 255) and "uint8: divided by 255" in notes[0]


def test_torchvision_files_train_end_to_end(tmp_path):
    fashion_mnist_files(tmp_path / "tv", n_train=240, n_test=60)
    cfg = load_config(TINY, _overrides(tmp_path / "run", tmp_path / "tv", "data.dataset=torchvision:FashionMNIST",
                                       "data.mechanisms=[up, {name: rotate, degrees: 90}, invert]"))
    s = _train(cfg)
    assert s["data"]["channels"] == 1 and s["data"]["classes"] == 10 and s["eval_examples"] == 60
    assert s["mechanisms"] == ["up", "rotate(degrees=90)", "invert"]


def test_symbols_train_end_to_end_under_the_cli(tmp_path):
    rc = main(["train", "--config", TINY, *_overrides(tmp_path / "run", tmp_path / "cache", "data.dataset=symbols",
                                                      "data.symbol_classes=3", "data.transformed_examples=2000")])
    assert rc == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["data"] == {"dataset": "symbols", "channels": 1, "image_size": 32, "classes": 3}


def test_a_bad_mechanism_stops_before_training_with_one_line(tmp_path, user_module, capsys):
    symbols = ("data.dataset=symbols", "data.symbol_classes=2")
    rc = main(["train", "--config", TINY, *_overrides(tmp_path / "run", tmp_path / "cache", *symbols,
                                                      "data.mechanisms=[up, usermech:bright]")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: mechanism 'usermech:bright' on a probe batch") and "outside [0, 1]" in err[0]
    assert not (tmp_path / "run").exists()  # nothing written: the run never started
    rc = main(["train", "--config", TINY, *_overrides(tmp_path / "run", tmp_path / "cache", *symbols,
                                                      "data.mechanisms=[{name: hue, shift: 0.2}]")])
    assert rc == 2 and "hue needs RGB images (3 channels), got 1" in capsys.readouterr().err

"""A short end-to-end training run on real MNIST that must learn, the run-directory contract, the start-up line."""

import json
import math
from pathlib import Path

import pytest
import torch

from icm_dist.config import load_config
from icm_dist.dist import Dist
from icm_dist.errors import TrainingError
from icm_dist.precision import resolve_precision
from icm_dist.trainer import Trainer, train

LEARN = ["data.mechanisms=[invert,noise]", "data.transformed_examples=6000", "expert.num=2", "expert.width=16",
         "expert.depth=3", "discriminator.widths=[8,16,32]", "discriminator.hidden=128", "identity_init.max_steps=60",
         "train.iterations=150", "train.batch_size=32", "eval.every=75", "eval.examples=300",
         "eval.final_examples=400", "eval.classifier_epochs=1", "checkpoint.every=0", "tracking.log_every=25",
         "tracking.figures_every=0",
         "tracking.wandb.mode=disabled", "run.progress=false"]

# Word for word what the README says each precision promises across world sizes on a CPU.
STARTUP_PROMISES = {
    "fp32": "precision fp32 (the same winners at every world size)",
    "bf16": "precision bf16 (winners may differ across world sizes where scores are within bf16 rounding; "
            "train.precision=fp32 for world-size invariance)",
}


def test_short_run_learns_and_writes_the_contract(tmp_path, data_root, mnist):
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.root={data_root}", f"run.out_dir={out}", *LEARN])
    summary = train(cfg)
    acc = summary["accuracy"]
    # Inverted digits fool the classifier; once an expert inverts them back, restored accuracy rises.
    assert acc["restored"] >= acc["transformed"] + 0.15, acc
    assert acc["original"] >= 0.9
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("iterations", "wall_seconds", "world_size", "num_experts", "mechanisms", "accuracy", "win_matrix",
                "captured", "mechanisms_captured"):
        assert key in on_disk, key
    assert on_disk["iterations"] == 150 and on_disk["world_size"] == 1 and on_disk["num_experts"] == 2
    assert on_disk["mechanisms"] == ["invert", "noise"]
    assert all(math.isclose(sum(r), 1.0, abs_tol=1e-3) for r in on_disk["win_matrix"])
    assert (out / "config.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy/restored" in r for r in rows) and any("d_loss" in r for r in rows)
    for fig in ("win_matrix", "samples", "scores", "accuracy"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000150" and (out / "checkpoints" / latest / "manifest.json").is_file()


def test_nan_loss_stops_with_a_message_and_keeps_what_was_written(tmp_path, data_root, mnist):
    out = tmp_path / "run"
    # A learning rate of 1e6 blows the discriminator up within a few steps.
    cfg = load_config(None, [f"data.root={data_root}", f"run.out_dir={out}", *LEARN, "train.lr_discriminator=1e6",
                             "train.iterations=60", "checkpoint.every=1", "tracking.log_every=1",
                             "identity_init.enabled=false", "train.precision=fp32"])
    with pytest.raises(TrainingError, match="non-finite discriminator scores at iteration") as e:
        train(cfg)
    failed_at = int(str(e.value).split("at iteration ")[1].split()[0].rstrip(";"))
    assert failed_at >= 2, "the blow-up should take a step or more"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["iteration"] == failed_at - 1, "metrics written before the failure stay readable"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{failed_at - 1:07d}" and (out / "checkpoints" / latest / "manifest.json").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_start_up_line_names_the_precision_and_what_it_promises(tmp_path, data_root, mnist, capsys, precision):
    """The line every run starts with says what the number of processes can change (the README's words):
    fp32 picks the same winners at every world size, bf16 may not. ``auto`` says what it picked on this CPU
    (fp32 without native bf16)."""
    cfg = load_config("configs/tiny.yaml", [f"data.root={data_root}", f"run.out_dir={tmp_path / 'run'}", "threads=1",
                                            f"train.precision={precision}"])
    Trainer(cfg, Dist(0, 1, 0, torch.device("cpu"))).tracker.finish()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("icm-dist: launcher"))
    picked = resolve_precision(precision, torch.device("cpu"))
    promise = STARTUP_PROMISES[picked]
    assert f"world size 1, experts per rank [3], {promise}, device cpu" in line, line
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert promise in readme, "the README quotes the start-up line's promise word for word"

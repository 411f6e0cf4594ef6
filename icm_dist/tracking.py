"""Metric sinks: a local JSONL file always, wandb when asked, nothing on other ranks.

Metrics are gathered to rank 0 by the trainer before they get here; every other rank holds a
:class:`NullTracker`, so logging calls need no ``if rank == 0`` around them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, to_dict


def _jsonable(v: Any):
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() != 1 else v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class NullTracker:
    """The tracker of every rank but 0: accepts everything, writes nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_images(self, images: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_wandb_mode(mode: str) -> str:
    """``WANDB_MODE`` wins; ``auto`` is online with a login (API key or netrc entry), else offline."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class Tracker(NullTracker):
    """Rank 0's tracker: appends to ``metrics.jsonl`` and mirrors to wandb unless disabled."""

    def __init__(self, cfg: Config, out_dir: Path, resume: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if resume else "w")
        self.wandb = None
        self.mode = resolve_wandb_mode(cfg.tracking.wandb.mode)
        if self.mode != "disabled":
            import wandb

            w = cfg.tracking.wandb
            self.wandb = wandb.init(
                project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                name=cfg.run.name or Path(cfg.run.out_dir).name, config=to_dict(cfg), dir=str(out_dir),
                mode=self.mode, resume="allow" if resume else None, id=_run_id(out_dir, resume),
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            # Everything is plotted against the training iteration, also figures logged at evaluations.
            self.wandb.define_metric("iteration")
            self.wandb.define_metric("*", step_metric="iteration")

    def log(self, metrics: dict, step: int) -> None:
        row = {"iteration": step, **_jsonable(metrics)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({"iteration": step, **{k: v for k, v in _flatten(metrics).items() if v is not None}})

    def log_images(self, images: dict, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"iteration": step, **{k: wandb.Image(str(p)) for k, p in images.items()}})

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"iteration": step, name: wandb.Table(columns=columns, data=rows)})

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in _flatten(_jsonable(values)).items():
                self.wandb.summary[k] = v

    def finish(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _run_id(out_dir: Path, resume: bool) -> str:
    """A wandb run id stored in the run directory, so a resumed run continues the same wandb run."""
    p = Path(out_dir) / "wandb_run_id"
    if resume and p.is_file():
        return p.read_text().strip()
    import wandb

    rid = wandb.util.generate_id()
    p.write_text(rid)
    return rid


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def make_tracker(cfg: Config, is_main: bool, resume: bool = False):
    return Tracker(cfg, Path(cfg.run.out_dir), resume=resume) if is_main else NullTracker()

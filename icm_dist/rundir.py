"""The run directory: every path in it, its one writer and its readers.

A run writes everything under ``run.out_dir`` (DESIGN.md, "The user-facing contract")::

    config.yaml          the resolved config
    metrics.jsonl        one JSON object per logged iteration (identity-init progress at iteration 0)
    summary.json         the final evaluation
    figures/*.png        the paper's figures
    checkpoints/         iter_NNNNNNN/ and latest (their insides belong to checkpoint.py)
    generalization.json  written by ``icm-dist generalize``
    wandb_run_id         the wandb run a resumed run continues

Only rank 0 writes. Commands that read a run (compare, ownership, generalize, reuse) read it here,
so a file's name and format live in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .config import Config, dump_yaml

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FIGURES = "figures"
CHECKPOINTS = "checkpoints"
GENERALIZATION = "generalization.json"
WANDB_RUN_ID = "wandb_run_id"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL file, one per line. A line cut short by a crash, or anything that is
    not a JSON object, is skipped: the rest of the file is still good."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


class MetricsLog:
    """The run's one metrics history: ``metrics.jsonl`` on disk and the same rows in memory.

    Rank 0's tracker appends to it; the trainer hands its rows to checkpoints (so that a run resumed
    into another directory keeps its history) and to the figures.
    """

    def __init__(self, path: Path, rows: list[dict]):
        self.path = Path(path)
        self.rows = rows
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a")

    @classmethod
    def fresh(cls, path: Path) -> "MetricsLog":
        return cls(path, [])

    @classmethod
    def resumed(cls, path: Path, iteration: int, saved: list | None) -> "MetricsLog":
        """The history up to ``iteration``: rows after it are dropped, since the resumed run writes them
        again. A directory without metrics (resuming into a new run.out_dir) starts from ``saved``,
        the rows the checkpoint carries."""
        if path.is_file():
            rows = [r for r in read_jsonl(path) if r.get("iteration", 0) <= iteration]
        else:
            rows = [r for r in (saved if isinstance(saved, list) else []) if isinstance(r, dict)]
        return cls(path, rows)

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.rows.append(row)

    def close(self) -> None:
        self._file.close()


class RunDir:
    """The paths of one run directory, and reading and writing its files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def generalization_file(self) -> Path:
        return self.path / GENERALIZATION

    @property
    def wandb_run_id_file(self) -> Path:
        return self.path / WANDB_RUN_ID

    # -- writing (rank 0) -----------------------------------------------------------------

    def create(self, cfg: Config) -> None:
        """The directory, its figures folder and the resolved config."""
        self.figures.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(dump_yaml(cfg))

    def metrics_log(self, resume_iteration: int | None = None, saved: list | None = None) -> MetricsLog:
        """The metrics history to append to: a new one, or the one a resumed run continues."""
        self.path.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            return MetricsLog.fresh(self.metrics_file)
        return MetricsLog.resumed(self.metrics_file, resume_iteration, saved)

    def write_summary(self, summary: dict) -> None:
        self.summary_file.write_text(json.dumps(summary, indent=1))

    def write_generalization(self, result: dict, path: Path | None = None) -> Path:
        path = Path(path) if path else self.generalization_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        return path

    # -- reading --------------------------------------------------------------------------

    def read_config(self) -> dict | None:
        """config.yaml as a plain dict; None if there is none. Raises yaml.YAMLError if unreadable."""
        if not self.config_file.is_file():
            return None
        return yaml.safe_load(self.config_file.read_text()) or {}

    def read_summary(self) -> dict | None:
        """summary.json; None if there is none. Raises json.JSONDecodeError if unreadable."""
        if not self.summary_file.is_file():
            return None
        return json.loads(self.summary_file.read_text())

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl ([] if there is none), skipping a line cut short by a crash."""
        return read_jsonl(self.metrics_file) if self.metrics_file.is_file() else []

    def read_generalization(self) -> dict | None:
        """generalization.json; None if there is none. Raises json.JSONDecodeError if unreadable."""
        if not self.generalization_file.is_file():
            return None
        return json.loads(self.generalization_file.read_text())

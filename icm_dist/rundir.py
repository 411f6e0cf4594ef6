"""The run directory: every path in it, its one writer and its readers.

A run writes everything under ``run.out_dir`` (the README, "What a run gives you")::

    config.yaml          the resolved config
    metrics.jsonl        one JSON object per logged iteration (identity-init progress at iteration 0)
    summary.json         the final evaluation
    figures/*.png        the paper's figures
    checkpoints/         iter_NNNNNNN/ and latest (their insides belong to checkpoint.py)
    generalization.json  written by ``icm-dist generalize``
    wandb_run_id         the wandb run a resumed run continues
    wandb/               wandb's own files (offline runs)

A directory holds at most one run: a fresh run starts only where there is none (or, with
``run.overwrite``, deletes the one there first), and a resume continues the run whose checkpoints
are there (:meth:`RunDir.claim`). Only rank 0 writes. Commands that read a run (compare, ownership,
generalize, reuse) read it here, so a file's name and format live in one place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from .config import Config, describe_changes, dump_yaml, resume_changes
from .errors import OutputError
from .utils import atomic_write, check_writable_folder

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FIGURES = "figures"
CHECKPOINTS = "checkpoints"
GENERALIZATION = "generalization.json"
WANDB_RUN_ID = "wandb_run_id"
WANDB_DIR = "wandb"
RUN_FILES = (CONFIG, METRICS, SUMMARY, FIGURES, CHECKPOINTS, GENERALIZATION, WANDB_RUN_ID, WANDB_DIR)


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
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(self.path, lambda f: f.write(text))  # a crash now leaves the old history, not half of it
        self._file = open(self.path, "a")

    @classmethod
    def fresh(cls, path: Path) -> "MetricsLog":
        return cls(path, [])

    @classmethod
    def resumed(cls, path: Path, iteration: int, saved: list | None, log=print) -> "MetricsLog":
        """The history up to ``iteration``, which the checkpoint carries (``saved``): metrics.jsonl's rows up to
        it where the file still holds every one of the checkpoint's (it may hold more: the final evaluation of
        a finished run that is now taken further), else the checkpoint's rows with the file's others among
        them, and a line saying how many were restored. Rows after ``iteration`` are dropped, since the
        resumed run writes them again."""
        on_disk = [r for r in read_jsonl(path) if r.get("iteration", 0) <= iteration] if path.is_file() else []
        if not isinstance(saved, list):
            log(f"warning: the checkpoint carries no metrics history: the {len(on_disk)} rows metrics.jsonl holds up "
                f"to iteration {iteration} are all there is, and rows lost from it cannot be restored")
            return cls(path, on_disk)
        saved = [r for r in saved if isinstance(r, dict)]
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731 (NaN-safe equality of rows)
        have = {key(r) for r in on_disk}
        missing = sum(key(r) not in have for r in saved)
        if not missing:
            return cls(path, on_disk)
        known = {key(r) for r in saved}
        rows = sorted(saved + [r for r in on_disk if key(r) not in known], key=lambda r: r.get("iteration", 0))
        log(f"warning: {path} held {len(saved) - missing} of the {len(saved)} metric rows the checkpoint carries "
            f"up to iteration {iteration}: restored the other {missing} from the checkpoint")
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

    def run_files(self) -> list[str]:
        """The names of a run's files that this directory holds ([] for a new or empty directory)."""
        return [n for n in RUN_FILES if (self.path / n).exists()] if self.path.is_dir() else []

    def check_writable(self) -> None:
        """The directory, or the nearest folder above it that exists, must be a folder this process can write
        in; nothing is created."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"run.out_dir '{self.path}' is a file, not a directory: choose another run.out_dir")
        check_writable_folder(self.path, f"run.out_dir '{self.path}'")

    def claim(self, cfg: Config, resuming_from: Path | None, restarted: bool) -> list[str]:
        """May this run write here? The run files of another run that it must delete first (``run.overwrite``),
        [] if none; an OutputError when the directory cannot be written or holds another run.

        A run continues the run here when it resumes from a checkpoint of this directory or is a torchrun
        restart (of itself); ``resume=auto`` that found no checkpoint starts the run here over only if its
        config.yaml is of the same experiment (a run killed before its first checkpoint)."""
        self.check_writable()
        held = self.run_files()
        if not held or restarted or (resuming_from is not None and self._holds(resuming_from)):
            return []
        if resuming_from is None and cfg.resume == "auto":
            try:
                saved = self.read_config()
            except yaml.YAMLError:
                saved = None
            changes = resume_changes(saved, cfg) if isinstance(saved, dict) else None
            if changes == []:
                return []
            if changes:
                raise OutputError(f"run.out_dir '{self.path}' holds a run of another experiment (no checkpoint to "
                                  f"resume): it was {describe_changes(changes)}; use a new run.out_dir, or "
                                  "run.overwrite=true to delete that run first")
        if cfg.run.overwrite:
            return held
        what = "resume this checkpoint into it" if resuming_from is not None else "start a fresh run in it"
        raise OutputError(f"run.out_dir '{self.path}' holds another run ({', '.join(held)}); refusing to {what}: "
                          "continue that run with resume=auto, use a new run.out_dir, or pass run.overwrite=true "
                          "to delete that run first")

    def _holds(self, checkpoint: Path) -> bool:
        try:
            return Path(checkpoint).resolve().parent == self.checkpoints.resolve()
        except OSError:
            return False

    def clear(self, names: list[str]) -> None:
        """Delete these run files (``run.overwrite``): another run's, before a new one starts here."""
        for n in names:
            p = self.path / n
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def metrics_log(self, resume_iteration: int | None = None, saved: list | None = None, log=print) -> MetricsLog:
        """The metrics history to append to: a new one, or the one a resumed run continues."""
        self.path.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            return MetricsLog.fresh(self.metrics_file)
        return MetricsLog.resumed(self.metrics_file, resume_iteration, saved, log=log)

    def write_summary(self, summary: dict) -> None:
        self.summary_file.write_text(json.dumps(summary, indent=1))

    def write_generalization(self, result: dict) -> Path:
        self.generalization_file.write_text(json.dumps(result, indent=1) + "\n")
        return self.generalization_file

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

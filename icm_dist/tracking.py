"""Metric sinks: the run's metrics history always, wandb when asked, nothing on other ranks.

Metrics are gathered to rank 0 by the trainer before they get here; every other rank holds a
:class:`NullTracker`, so logging calls need no ``if rank == 0`` around them, and only rank 0 ever
imports wandb or creates a wandb run.

What reaches wandb (see docs/tracking.md): every JSONL row (losses, win shares, the Figure 4 scores
``score/<mechanism>/e<j>``, the Figure 6 accuracies ``eval/accuracy/*``, identity-init progress,
iterations/s and step time) against the ``iteration`` axis; at figure intervals the win matrix
(image and table), inputs beside the winners' outputs, and one line chart per mechanism with every
expert's score on it; the final evaluation in the run summary; the whole resolved config (nested,
so the UI can filter and group by any field) plus ``experiment``, a hash that the seeds of one
experiment share.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any

import torch

from .config import Config, experiment_hash, to_dict
from .errors import IcmError
from .rundir import MetricsLog, RunDir
from .utils import flatten


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

    @property
    def rows(self) -> list[dict]:
        return []

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_images(self, images: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        pass

    def log_charts(self, step: int) -> None:
        pass

    def log_win_matrix(self, wm_MN, names: list[str], step: int) -> None:
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


def default_group(cfg: Config) -> str:
    """The wandb group when ``tracking.wandb.group`` is unset: the experiment name, taken from the run
    directory with a seed part removed, so that ``runs/abl/seed3`` and ``runs/abl_seed4`` both land
    in group ``abl``. Name the group explicitly when the directories don't follow that pattern."""
    p = Path(cfg.run.out_dir)
    if re.fullmatch(r"(seed|s)[-_]?\d+", p.name) and p.parent.name:
        return p.parent.name
    name = cfg.run.name or p.name
    return re.sub(r"[-_.]?seed[-_]?\d+$", "", name) or name


def wandb_config(cfg: Config) -> dict:
    """What goes into wandb's run config: the whole resolved config, nested (the UI shows it as
    ``train.batch_size`` etc. and can filter and group by any of it), plus ``experiment``: a hash
    of the config without seed, run directory and tracking settings (see config.IGNORED_KEYS),
    shared by all seeds of one experiment, for grouping in the UI when groups were named loosely."""
    d = to_dict(cfg)
    return {**d, "experiment": experiment_hash(d)}


class TrackingError(IcmError):
    """wandb could not start in the requested mode."""


# History keys drawn together as one chart each (see Tracker.log_charts): a regex whose first group
# names the chart, and the chart's title.
_CHARTS = (
    (re.compile(r"score/(.+)/e(\d+)$"), "figure4/{}", "Figure 4: mean D score of each expert on {}"),
    (re.compile(r"eval/accuracy/(?:transformed|restored|original)$"), "figure6/accuracy",
     "Figure 6: classifier accuracy"),
)


class Tracker(NullTracker):
    """Rank 0's tracker: appends to the run's :class:`MetricsLog` and mirrors to wandb unless disabled."""

    def __init__(self, cfg: Config, metrics: MetricsLog, resume: bool = False):
        self.metrics = metrics  # on resume, already cut back to the checkpoint: the history so far
        out_dir = Path(cfg.run.out_dir)
        self.wandb = None
        self.mode = resolve_wandb_mode(cfg.tracking.wandb.mode)
        if self.mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise TrackingError(f"wandb is not importable ({e}); install it or set "
                                    "tracking.wandb.mode=disabled") from None

            drop_inherited_wandb_service()
            w = cfg.tracking.wandb
            try:
                self.wandb = wandb.init(
                    project=w.project, entity=w.entity, group=w.group or default_group(cfg),
                    tags=list(w.tags) or None, name=cfg.run.name or Path(cfg.run.out_dir).name,
                    config=wandb_config(cfg), dir=str(out_dir), mode=self.mode,
                    resume="allow" if resume else None, id=_run_id(out_dir, resume), job_type="train",
                    settings=wandb.Settings(console="off", x_disable_stats=True),
                )
            except Exception as e:  # wandb raises many types (auth, network, usage); all mean the same here
                self.metrics.close()
                raise TrackingError(
                    f"wandb.init failed in mode {self.mode!r}: {type(e).__name__}: {e}; log in with `wandb login`, "
                    "or train with tracking.wandb.mode=offline (and `wandb sync` later) or disabled") from None
            # Everything is plotted against the training iteration, also figures logged at evaluations
            # (wandb's own _step counts log calls, which is meaningless across resumes and cadences).
            self.wandb.define_metric("iteration")
            # Identity init happens before iteration 1: its progress gets its own x axis.
            self.wandb.define_metric("identity/step")
            for e in range(cfg.expert.num):
                self.wandb.define_metric(f"identity/mse/e{e}", step_metric="identity/step")
            self.wandb.define_metric("*", step_metric="iteration")

    @property
    def rows(self) -> list[dict]:
        return self.metrics.rows

    def log(self, metrics: dict, step: int) -> None:
        self.metrics.append({"iteration": step, **_jsonable(metrics)})
        if self.wandb is not None:
            self.wandb.log({"iteration": step, **{k: v for k, v in flatten(metrics, sep="/").items() if v is not None}})

    def log_images(self, images: dict, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"iteration": step, **{k: wandb.Image(str(p)) for k, p in images.items()}})

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({"iteration": step, name: wandb.Table(columns=columns, data=rows)})

    def log_win_matrix(self, wm_MN, names: list[str], step: int) -> None:
        """The win matrix as a wandb table: one row per mechanism, one column per expert."""
        rows = [[names[m]] + [round(float(v), 4) for v in wm_MN[m]] for m in range(len(names))]
        self.log_table("win_matrix_table", ["mechanism"] + [f"e{e}" for e in range(wm_MN.shape[1])], rows, step)

    def log_charts(self, step: int) -> None:
        """One line chart per mechanism with every expert's mean D score on it (Figure 4), and one with
        the three accuracies (Figure 6), drawn from the history so far.

        Why custom charts: wandb draws one auto panel per key. The keys ``score/<mechanism>/e<j>``
        put all of them in one "score" section, but one line per panel, never the committee on one
        set of axes as in the paper. wandb.plot.line_series puts all experts of a mechanism on one
        chart, with no workspace editing. The scalar keys stay too, for summaries, filters and
        custom panels. Called at figure intervals (a chart is a table; logging it at every
        ``log_every`` would store the history quadratically).
        """
        if self.wandb is None:
            return
        import wandb

        series: dict[str, dict[str, list]] = {}
        titles: dict[str, str] = {}
        for row in self.metrics.rows:
            for k, v in row.items():
                if v is None:
                    continue
                for rx, key_fmt, title_fmt in _CHARTS:
                    m = rx.match(k)
                    if m:
                        arg = m.group(1) if m.groups() else ""
                        chart = key_fmt.format(arg)
                        titles[chart] = title_fmt.format(arg)
                        line = f"E{m.group(2)}" if m.groups() and m.lastindex >= 2 else k.rsplit("/", 1)[-1]
                        series.setdefault(chart, {}).setdefault(line, []).append((row.get("iteration", 0), v))
                        break
        charts = {}
        for chart, lines in series.items():
            names = sorted(lines, key=lambda n: (len(n), n))
            charts[chart] = wandb.plot.line_series(
                xs=[[p[0] for p in lines[n]] for n in names], ys=[[p[1] for p in lines[n]] for n in names],
                keys=names, title=titles[chart], xname="iteration")
        if charts:
            self.wandb.log({"iteration": step, **charts})

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in flatten(_jsonable(values), sep="/").items():
                self.wandb.summary[k] = v

    def finish(self) -> None:
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def drop_inherited_wandb_service() -> None:
    """Forget a wandb service this process inherited (``WANDB_SERVICE`` from a parent: a notebook, a sweep
    script, the shell that ran torchrun, pytest), so that wandb.init starts one of this process's own.

    An inherited service outlives this process. If the process dies before wandb.finish (SIGKILL, the
    OOM killer, torchrun's SIGTERM after another rank failed), that service keeps the run id "in use",
    and the resume of the run, which reuses the id (a torchrun restart does so by itself), is refused.
    A service of its own dies with the process. wandb's sweep agent drops the variable for the
    commands it starts for the same reason. The token names the pid of the process that started the
    service ("3-PID-unix-..."); one this process started itself (an earlier wandb.init here) is kept.
    """
    token = os.environ.get("WANDB_SERVICE")
    m = re.match(r"\d+-(\d+)-", token or "")
    if token and not (m and int(m.group(1)) == os.getpid()):
        del os.environ["WANDB_SERVICE"]


def _run_id(out_dir: Path, resume: bool) -> str:
    """A wandb run id stored in the run directory, so a resumed run continues the same wandb run."""
    p = RunDir(out_dir).wandb_run_id_file
    if resume and p.is_file():
        return p.read_text().strip()
    # wandb's own id helper moved between releases; its format (8 lowercase letters and digits) is simple.
    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    p.write_text(rid)
    return rid


def make_tracker(cfg: Config, metrics: MetricsLog | None, resume: bool = False):
    """Rank 0 (the rank that holds the run's ``metrics``) gets a Tracker; every other rank a NullTracker."""
    return Tracker(cfg, metrics, resume=resume) if metrics is not None else NullTracker()

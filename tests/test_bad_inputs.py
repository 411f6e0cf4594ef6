"""Every bad input a user can give, through the real entry points, as one table (issue #29).

Each row is a command (``python launch/train.py ...`` or ``icm-dist ...``), what the test prepares for it,
the paths it must leave alone and a piece of the one error line it must print. For each row: a non-zero
exit, exactly one line on stderr, starting with ``error:`` and naming the culprit, no traceback, and every
guarded path (the run directory, the ``--out`` target) byte for byte and mtime as before (a path that did
not exist still does not). A new entry point, or a new refusal, is a new row.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from inproc import train_here
from PIL import Image
from procs import run
from safetensors.torch import save_file
from warm import run_warm

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = [sys.executable, str(REPO / "launch" / "train.py")]
TRAIN = [*TRAIN_PY, "--config", "configs/tiny.yaml"]
TORCHRUN = [str(REPO / "launch" / "torchrun.sh")]
CLI = [sys.executable, "-m", "icm_dist.commands.cli"]
SHORT = ["threads=1", "train.iterations=4", "checkpoint.every=2", "eval.every=2", "eval.examples=50",
         "eval.final_examples=50", "identity_init.max_steps=2", "data.transformed_examples=300"]


@dataclass
class Case:
    """One bad input. ``argv`` and ``guarded`` may name {run} (a finished run, copied per case), {folder_run}
    (a finished run on an image folder, copied), {images} (that folder), {tmp} and {data}; ``prepare(paths)``
    makes what the case needs (``paths``: those names, as Paths)."""

    name: str
    argv: list[str]
    message: str
    guarded: list[str] = field(default_factory=list)
    prepare: Callable[[dict], None] | None = None
    preamble: str | None = None  # a launcher's own line before the run's, starting with this, is allowed
    cold: bool = False  # a fresh interpreter; the others fork from a warm one (tests/warm.py)


def _write(path: Path, text: str) -> Callable[[dict], None]:
    def prepare(paths: dict) -> None:
        (paths["tmp"] / path).parent.mkdir(parents=True, exist_ok=True)
        (paths["tmp"] / path).write_text(text)
    return prepare


def _tensor(name: str, x: torch.Tensor) -> Callable[[dict], None]:
    return lambda paths: save_file({"images": x}, str(paths["tmp"] / name))


_IMAGES = torch.rand(2, 1, 32, 32)
_X = _tensor("x.safetensors", _IMAGES)  # two images for the committee to restore


def _all(*prepares: Callable[[dict], None]) -> Callable[[dict], None]:
    def prepare(paths: dict) -> None:
        for p in prepares:
            p(paths)
    return prepare


def _read_only(path: str) -> Callable[[dict], None]:
    """Make ``{tmp}/path`` unwritable, for root too (an immutable directory), else by its mode."""
    def prepare(paths: dict) -> None:
        p = paths["tmp"] / path
        if os.geteuid() == 0:
            r = subprocess.run(["chattr", "+i", str(p)], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make a directory read-only for root here: {r.stderr.decode().strip()}")
        else:
            p.chmod(0o555)
    return prepare


# User mechanisms that pass the probe batch (example ids 0-7 of the training part) and go wrong beyond it,
# or are not deterministic; the test puts {tmp} on PYTHONPATH.
_MECHANISMS = """
import torch

def late_255(x, ids, seed):
    y = 1 - x
    y[ids >= 8] *= 255
    return y

def late_nan(x, ids, seed):
    y = 1 - x
    y[ids >= 8] = float("nan")
    return y

def unseeded(x, ids, seed):
    return (x + 0.1 * torch.rand_like(x)).clamp(0, 1)
"""


def _one_class_folder(paths: dict) -> None:
    g = np.random.default_rng(0)
    (paths["tmp"] / "one" / "cats").mkdir(parents=True)
    for i in range(8):
        Image.fromarray((g.random((16, 16)) * 255).astype(np.uint8)).save(paths["tmp"] / "one" / "cats" / f"{i}.png")


def _repaint_one_image(paths: dict) -> None:
    p = sorted(paths["images"].rglob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(p))).save(p)


CASES = [
    # Config and data, refused before any work.
    Case("unknown key", [*TRAIN, "run.out_dir={tmp}/new", "train.iteratons=5"], "train.iteratons",
         ["{tmp}/new"], cold=True),
    Case("wrong type", [*TRAIN, "run.out_dir={tmp}/new", "train.batch_size=many"], "train.batch_size", ["{tmp}/new"]),
    Case("unknown mechanism", [*TRAIN, "run.out_dir={tmp}/new", "data.mechanisms=[invert,sideways]"], "sideways",
         ["{tmp}/new"]),
    Case("invalid YAML", [*TRAIN_PY, "--config", "{tmp}/bad.yaml"], "line 3, column 1", ["{tmp}/new"],
         _write(Path("bad.yaml"), "run:\n  out_dir: [runs/a,\n")),
    Case("an image size that cannot fit", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}",
                                           "data.image_size=1000"], "data.image_size=1000", ["{tmp}/new"]),
    Case("one class", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", "data.dataset=folder:{tmp}/one",
                       "data.image_size=16", *SHORT], "has one class ('cats')", ["{tmp}/new"], _one_class_folder),
    # Mechanisms: every transformed example is checked (item 5).
    Case("mechanism out of range beyond the probe", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", *SHORT,
                                                     "data.mechanisms=[invert,usermech:late_255]"],
         "mechanism 'usermech:late_255' on the training split returned values in [0.996, 255] on example 42621",
         ["{tmp}/new"], _write(Path("usermech.py"), _MECHANISMS)),
    Case("mechanism NaN beyond the probe", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", *SHORT,
                                            "data.mechanisms=[invert,usermech:late_nan]"],
         "mechanism 'usermech:late_nan' on the training split returned NaN", ["{tmp}/new"],
         _write(Path("usermech.py"), _MECHANISMS)),
    Case("mechanism that is not deterministic", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", *SHORT,
                                                 "data.mechanisms=[invert,usermech:unseeded]"],
         "'usermech:unseeded' on a probe batch (8, 1, 32, 32) is not deterministic", ["{tmp}/new"],
         _write(Path("usermech.py"), _MECHANISMS)),
    Case("a shift that leaves nothing", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", *SHORT,
                                         "data.mechanisms=[invert, {{name: shift, dx: 100}}]"],
         "mechanism 'shift(dx=100)' on a probe batch (8, 1, 32, 32) leaves nothing of 8 of 8 images", ["{tmp}/new"]),
    Case("an expert family's arguments that do not fit", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", *SHORT,
                                                          "expert.arch=stn", "expert.arch_args={{own_scale: false}}"],
         "expert.arch 'stn' raised ValueError when built: own_scale: false", ["{tmp}/new"]),
    # The launcher: a refusal every rank makes is printed once, without torchrun's report (item 7).
    Case("torchrun with more ranks than experts", [*TORCHRUN, "3", "--config", "configs/tiny.yaml", "expert.num=2",
                                                   "run.out_dir={tmp}/new", "data.root={data}"],
         "3 ranks but only 2 experts", ["{tmp}/new"], preamble="torchrun.sh: "),
    Case("missing image folder", [*TRAIN, "run.out_dir={tmp}/new", "data.root={data}", "data.dataset=folder:{tmp}/nope",
                                  *SHORT], "nope", ["{tmp}/new"]),
    # The run directory (issue #29, items 1, 3, 7).
    Case("resume with other mechanisms", [*TRAIN, "run.out_dir={run}", "data.root={data}", *SHORT, "resume=auto",
                                          "train.iterations=8", "data.mechanisms=[invert,up,left]"],
         "data.mechanisms=['invert', 'up', 'noise'] but this run has data.mechanisms=['invert', 'up', 'left']",
         ["{run}"]),
    Case("resume with another seed", [*TRAIN, "run.out_dir={run}", "data.root={data}", *SHORT, "resume=auto",
                                      "seed=1"], "seed=0 but this run has seed=1", ["{run}"]),
    Case("resume with another learning rate and precision",
         [*TRAIN, "run.out_dir={run}", "data.root={data}", *SHORT, "resume=auto", "train.lr_expert=0.01",
          "train.precision=fp32"], "train.lr_expert=0.001, train.precision='auto'", ["{run}"]),
    Case("resume on images that changed", [*TRAIN, "run.out_dir={folder_run}", "data.root={data}", *SHORT,
                                           "data.dataset=folder:{images}", "data.image_size=16",
                                           "data.mechanisms=[invert,up]", "expert.num=2", "resume=auto"],
         "was trained on other images", ["{folder_run}"], _repaint_one_image),
    Case("fresh run into a finished run", [*TRAIN, "run.out_dir={run}", "data.root={data}", *SHORT],
         "holds another run", ["{run}"]),
    Case("another run's checkpoint into a finished run",
         [*TRAIN, "run.out_dir={tmp}/other", "data.root={data}", *SHORT, "resume={run}"], "holds another run",
         ["{tmp}/other", "{run}"], _write(Path("other/config.yaml"), "seed: 0\n")),
    Case("resume=auto into another experiment's killed run",
         [*TRAIN, "run.out_dir={tmp}/killed", "data.root={data}", *SHORT, "resume=auto"],
         "holds a run of another experiment", ["{tmp}/killed"], _write(Path("killed/config.yaml"), "seed: 5\n")),
    Case("run.out_dir is a file", [*TRAIN, "run.out_dir={tmp}/afile", "data.root={data}", *SHORT],
         "is a file, not a directory", ["{tmp}/afile"], _write(Path("afile"), "mine")),
    Case("read-only run directory", [*TRAIN, "run.out_dir={tmp}/ro", "data.root={data}", *SHORT, "resume=auto"],
         "cannot be written", ["{tmp}/ro"],
         _all(_write(Path("ro/notes.txt"), "mine"), _read_only("ro"))),
    # --out of the commands (items 4, 7).
    Case("apply over a user's file", [*CLI, "apply", "{run}", "{tmp}/x.safetensors", "--out", "{tmp}/existing.txt"],
         "did not write", ["{tmp}/existing.txt", "{run}"],
         _all(_write(Path("existing.txt"), "mine"), _X)),
    Case("apply to a folder", [*CLI, "apply", "{run}", "{tmp}/x.safetensors", "--out", "{tmp}/adir"], "is a folder",
         ["{tmp}/adir"], _all(_write(Path("adir/keep.txt"), "mine"), _X)),
    Case("apply into an unwritable folder", [*CLI, "apply", "{run}", "{tmp}/x.safetensors", "--out",
                                             "{tmp}/ro/y.safetensors"], "cannot be written", ["{tmp}/ro"],
         _all(_write(Path("ro/keep.txt"), "mine"), _X, _read_only("ro"))),
    Case("apply a bad tensor", [*CLI, "apply", "{run}", "{tmp}/x.safetensors", "--out", "{tmp}/y.safetensors"],
         "expected images in [0, 1]", ["{tmp}/y.safetensors"], _tensor("x.safetensors", 255 * _IMAGES)),
    Case("export over a user's file", [*CLI, "export", "{run}", "--expert", "0", "--out", "{tmp}/notes.safetensors"],
         "did not write", ["{tmp}/notes.safetensors"], _write(Path("notes.safetensors"), "mine")),
    Case("export to a folder", [*CLI, "export", "{run}", "--expert", "0", "--out", "{tmp}/adir"], "is a folder",
         ["{tmp}/adir"], _write(Path("adir/keep.txt"), "mine")),
    Case("export into an unwritable folder", [*CLI, "export", "{run}", "--expert", "0", "--out",
                                              "{tmp}/ro/e.safetensors"], "cannot be written", ["{tmp}/ro"],
         _all(_write(Path("ro/keep.txt"), "mine"), _read_only("ro"))),
    Case("compare over a user's PNG", [*CLI, "compare", "{run}", "--out", "{tmp}/plot.png"], "did not write",
         ["{tmp}/plot.png"], lambda paths: Image.new("L", (4, 4)).save(paths["tmp"] / "plot.png")),
    Case("compare into an unwritable folder", [*CLI, "compare", "{run}", "--out", "{tmp}/ro/plot.png"],
         "cannot be written", ["{tmp}/ro"], _all(_write(Path("ro/keep.txt"), "mine"), _read_only("ro"))),
    Case("generalize over a user's file", [*CLI, "generalize", "{run}", "--out", "{tmp}/g.json"], "did not write",
         ["{tmp}/g.json", "{run}"], _write(Path("g.json"), '{"mine": 1}')),
    Case("surgery into a run", [*CLI, "surgery", "{run}", "--add", "1", "--out", "{run}"], "already holds checkpoints",
         ["{run}"]),
    Case("surgery into an unwritable folder", [*CLI, "surgery", "{run}", "--add", "1", "--out", "{tmp}/ro/s"],
         "cannot be written", ["{tmp}/ro"], _all(_write(Path("ro/keep.txt"), "mine"), _read_only("ro"))),
    Case("surgery adding fewer than none", [*CLI, "surgery", "{run}", "--add", "-2", "--out", "{tmp}/s"],
         "argument --add: -2 is below 0", ["{tmp}/s", "{run}"]),
    Case("ownership every 0 iterations", [*CLI, "ownership", "{run}", "--every", "0"],
         "argument --every: 0 is below 1", ["{run}"], cold=True),
]


def _snapshot(path: Path) -> dict | None:
    """Every file under ``path`` (or ``path`` itself): its sha256 and mtime; None when there is nothing."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in files}


def _train(out: Path, data_root: str, *more: str) -> None:
    train_here(REPO / "configs/tiny.yaml", [f"run.out_dir={out}", f"data.root={data_root}", *SHORT,
                                            "run.progress=false", *more])


def _image_folder(root: Path) -> None:
    """Two classes of 30 random 16x16 grey images each."""
    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(30):
            Image.fromarray((g.random((16, 16)) * 255).astype(np.uint8)).save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    """(a finished tiny run on MNIST, a finished run on an image folder, that folder)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    _train(base / "run", data_root)
    _image_folder(base / "images")
    _train(base / "folder_run", data_root, f"data.dataset=folder:{base / 'images'}", "data.image_size=16",
           "data.mechanisms=[invert,up]", "expert.num=2")
    return base / "run", base / "folder_run", base / "images"


def _unlock(tmp: Path) -> None:
    for p in tmp.rglob("*"):
        if p.is_dir() and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        elif p.is_dir():
            p.chmod(0o755)


def _attempt(case: Case, tmp: Path, finished, data_root: str) -> dict:
    """Prepare one case in its own folder ``tmp``, run it, and snapshot its guarded paths before and after."""
    run_src, folder_run_src, images = finished
    tmp.mkdir(parents=True)
    paths = {"tmp": tmp, "data": Path(data_root), "run": tmp / "run", "folder_run": tmp / "folder_run",
             "images": images}
    fill = {k: str(v) for k, v in paths.items()}
    if "{run}" in " ".join(case.argv + case.guarded):
        shutil.copytree(run_src, tmp / "run")
    if "{folder_run}" in " ".join(case.argv + case.guarded):
        shutil.copytree(folder_run_src, tmp / "folder_run")
    if case.prepare is not None:
        case.prepare(paths)
    guarded = [Path(g.format(**fill)) for g in case.guarded]
    before = [_snapshot(g) for g in guarded]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "ICM_DIST_TEST_"))}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp), env.get("PYTHONPATH")])))
    argv = [a.format(**fill) for a in case.argv]
    try:
        if case.cold or argv[0] != sys.executable:
            r = run(argv, cwd=REPO, env=env, timeout=180)
        else:
            r = run_warm(argv, cwd=REPO, env=env, timeout=180)
    finally:
        _unlock(tmp)
    return {"r": r, "fill": fill, "before": before, "after": [_snapshot(g) for g in guarded]}


@pytest.fixture(scope="module")
def outcomes(finished, data_root, tmp_path_factory) -> dict:
    """Every case, two at a time (a case is mostly one process on one of the two cores)."""
    base = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {c.name: pool.submit(_attempt, c, base / f"case_{i}", finished, data_root) for i, c in enumerate(CASES)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_stops_with_one_line_and_changes_nothing(case, outcomes):
    out = outcomes[case.name].result()  # re-raises what preparing the case raised (a skip, too)
    r, fill = out["r"], out["fill"]
    lines = r.stderr.strip().splitlines()
    if case.preamble is not None:
        lines = [x for x in lines if not x.startswith(case.preamble)]
    assert r.returncode != 0, (case.name, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert case.message.format(**fill) in lines[0], lines[0]
    assert out["after"] == out["before"], case.name

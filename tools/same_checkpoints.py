"""Do two versions of icm-dist train bit for bit the same? Train both, compare every checkpoint tensor.

    python tools/same_checkpoints.py BASE [HEAD]          # commits, branches or tags; HEAD defaults to the work tree
    python tools/same_checkpoints.py ce739ff --variants tiny --worlds 1

Each version is checked out into its own git worktree (the work tree itself for ``HEAD=.``) and
runs every variant below with ``threads=1`` on one process (``python launch/train.py``) and on two
torchrun ranks. The runs share ``data.root`` (MNIST cache, classifiers), so only the code differs.
Then every checkpoint of every run is compared with its twin: the same checkpoint directories,
the same files, the same tensor names, dtypes, shapes and bytes, and the same trainer state.
Exits 1 and lists the differences if there is any.

A refactor that claims "no change to what training computes" passes this on the machine it runs
on (float results depend on the CPU's kernels, so both versions must run on the same machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]

# Variants reach the step's branches: the plain step, splits with divisions, the capacity cap,
# the winners-only backward and the pooled experts.
VARIANTS = {
    "tiny": [],
    "split-capacity": ["train.split_every=3", "train.split_steps=2", "train.split_idle_share=0.9",
                       "train.split_donor_share=1.05", "train.capacity_factor=1.5", "train.capacity_iterations=8"],
    "winners-pool": ["train.expert_backward=winners", "expert.pool=1", "train.precision=fp32"],
    # configs/quick.yaml (compiled, ten experts, splits), shortened.
    "quick": ["--config", "configs/quick.yaml", "train.iterations=24", "eval.every=12", "checkpoint.every=12",
              "eval.examples=100", "eval.final_examples=200", "identity_init.max_steps=20", "train.split_every=8",
              "train.split_steps=4", "tracking.figures_every=0", "data.transformed_examples=2000"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout(ref: str, root: Path) -> Path:
    """A directory holding ``ref``'s tree: the work tree itself for ``.``, else a detached worktree."""
    if ref == ".":
        return REPO
    dest = root / "src" / ref.replace("/", "_")
    if not dest.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), ref], check=True,
                       capture_output=True)
    return dest


def train(src: Path, out: Path, overrides: list[str], world: int, data_root: str) -> None:
    config = ["--config", "configs/tiny.yaml"]
    if overrides[:1] == ["--config"]:  # a variant on another config
        config, overrides = overrides[:2], overrides[2:]
    args = ["launch/train.py", *config, "threads=1", f"run.out_dir={out}",
            f"data.root={data_root}", "tracking.wandb.mode=disabled", *overrides]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={_free_port()}", *args]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"training failed in {src} ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes: bitwise equality, NaN payloads and signed zeros included."""
    return t.contiguous().view(-1).view(torch.uint8)


def _state(manifest: Path) -> dict:
    state = json.loads(manifest.read_text())["trainer_state"]
    if isinstance(state.get("identity"), dict):
        state["identity"].pop("seconds", None)  # wall time, not training
    return state


def compare_runs(a: Path, b: Path) -> list[str]:
    """Every difference between the checkpoints of two run directories (empty: bitwise the same)."""
    diffs = []
    ca, cb = a / "checkpoints", b / "checkpoints"
    dirs_a = sorted(p.name for p in ca.iterdir() if p.name.startswith("iter_"))
    dirs_b = sorted(p.name for p in cb.iterdir() if p.name.startswith("iter_"))
    if dirs_a != dirs_b:
        return [f"checkpoint directories differ: {dirs_a} vs {dirs_b}"]
    for name in dirs_a:
        files_a = sorted(p.name for p in (ca / name).glob("*.safetensors"))
        files_b = sorted(p.name for p in (cb / name).glob("*.safetensors"))
        if files_a != files_b:
            diffs.append(f"{name}: files differ: {files_a} vs {files_b}")
            continue
        for f in files_a:
            ta, tb = _tensors(ca / name / f), _tensors(cb / name / f)
            if sorted(ta) != sorted(tb):
                diffs.append(f"{name}/{f}: tensor names differ: {sorted(set(ta) ^ set(tb))}")
                continue
            for k in ta:
                x, y = ta[k], tb[k]
                if x.dtype != y.dtype or x.shape != y.shape:
                    diffs.append(f"{name}/{f}:{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
                elif not torch.equal(_bytes(x), _bytes(y)):
                    diffs.append(f"{name}/{f}:{k}: values differ (max |a-b| "
                                 f"{(x.double() - y.double()).abs().max().item():.3g})")
        sa, sb = _state(ca / name / "manifest.json"), _state(cb / name / "manifest.json")
        if sa != sb:
            diffs.append(f"{name}/manifest.json: trainer_state differs: {sa} vs {sb}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the version to compare against (commit, branch, tag, or . for the work tree)")
    p.add_argument("head", nargs="?", default=".", help="the version under test (default: the work tree)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--data-root", default=str(REPO / "data"), help="shared MNIST cache and classifiers")
    p.add_argument("--keep", help="keep the runs under this directory (default: a temporary one, removed)")
    args = p.parse_args(argv)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="icm-same-"))
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    try:
        srcs = {side: checkout(ref, root) for side, ref in (("base", args.base), ("head", args.head))}
        for variant in args.variants:
            for world in args.worlds:
                outs = {}
                for side, src in srcs.items():
                    outs[side] = root / side / f"{variant}-w{world}"
                    shutil.rmtree(outs[side], ignore_errors=True)
                    train(src, outs[side], VARIANTS[variant], world, args.data_root)
                diffs = compare_runs(outs["base"], outs["head"])
                n = len(list((outs["base"] / "checkpoints").glob("iter_*/*.safetensors")))
                print(f"{variant:16s} world {world}: " + ("bitwise identical" if not diffs else "DIFFERENT")
                      + f" ({n} files)", flush=True)
                for line in diffs[:20]:
                    print("    " + line)
                failed += bool(diffs)
    finally:
        if (root / "src").is_dir():
            for wt in (root / "src").iterdir():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

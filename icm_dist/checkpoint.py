"""Checkpoints: safetensors files, atomic writes, verified loads, any world size.

Layout of ``checkpoints/iter_NNNNNNN/`` (docs/checkpoint-format.md has the full description):

- ``expert_NNN.safetensors`` per global expert: ``model.*`` (an ``Expert`` state dict: weights and
  BatchNorm buffers), ``optim.*.exp_avg`` / ``optim.*.exp_avg_sq`` / ``optim.step`` (its Adam);
- ``discriminator.safetensors``: ``model.*`` and ``optim.<i>.{exp_avg,exp_avg_sq,step}``;
- ``manifest.json``: format version, iteration, world size at save, the config, the sha256 of
  every file, trainer state and the latest metrics.

Every rank writes its own experts into ``.tmp_iter_NNNNNNN``; rank 0 then writes D and the
manifest, fsyncs, and renames the directory into place, then replaces ``latest``. A crash at any
moment leaves either the previous complete checkpoint or the new one, never half of one. No pickle
is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import Config, to_dict
from .errors import CheckpointError

FORMAT_VERSION = 1
EXPERT_FORMAT = "icm-dist-expert/1"


def expert_filename(gid: int) -> str:
    return f"expert_{gid:03d}.safetensors"


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(tensors: dict, path: Path, metadata: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def expert_metadata(cfg: Config, gid: int, extra: dict | None = None) -> dict:
    meta = {"format": EXPERT_FORMAT, "expert_id": str(gid), "expert_config": json.dumps(to_dict(cfg)["expert"])}
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    return meta


# ----------------------------------------------------------------------------- save


def save_checkpoint(run_dir: Path, iteration: int, cfg: Config, experts, disc_module, d_opt, d, plan,
                    trainer_state: dict, metrics: dict, keep: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    root = Path(run_dir) / "checkpoints"
    name = iter_dirname(iteration)
    tmp, final = root / f".tmp_{name}", root / name
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    d.barrier()  # the directory exists before anyone writes into it

    for j, gid in enumerate(experts.ids):
        tensors = {f"model.{k}": v for k, v in experts.bank.expert_state(j).items()}
        tensors.update({f"optim.{k}": v for k, v in experts.opt.expert_state(j).items()})
        _save(tensors, tmp / expert_filename(gid), expert_metadata(cfg, gid))
    d.barrier()  # every expert file is complete and synced

    if d.is_main:
        tensors = {f"model.{k}": v for k, v in disc_module.state_dict().items()}
        for i, st in d_opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        _save(tensors, tmp / "discriminator.safetensors", {"format": "icm-dist-discriminator/1"})
        files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
        manifest = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "world_size": d.world_size,
            "num_experts": plan.num_experts,
            "config": to_dict(cfg),
            "files": {f: sha256_file(tmp / f) for f in files},
            "trainer_state": trainer_state,
            "metrics": metrics,
        }
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same iteration (e.g. after a restart) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        _prune(root, keep, protect=name)
    d.barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    for p in done[:-keep]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- verify and find


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' has no manifest.json (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest '{path}' is not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{ckpt}' has format version {manifest.get('format_version')!r}; "
                              f"this icm-dist reads version {FORMAT_VERSION}")
    return manifest


def verify_checkpoint(ckpt: Path, files: list[str] | None = None) -> dict:
    """Check the manifest and the sha256 of ``files`` (all by default); raise CheckpointError naming the file."""
    manifest = read_manifest(ckpt)
    wanted = manifest["files"] if files is None else {f: manifest["files"].get(f) for f in files}
    for f, digest in wanted.items():
        p = Path(ckpt) / f
        if digest is None:
            raise CheckpointError(f"checkpoint '{ckpt}': manifest lists no file '{f}'")
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{ckpt}': file '{f}' is missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint '{ckpt}': file '{f}' fails its sha256 check (corrupt or truncated)")
    return manifest


def check_compatible(manifest: dict, cfg: Config, ckpt: Path) -> None:
    """The checkpoint's shapes must fit the run: same committee and networks (world size may differ)."""
    saved = manifest["config"]
    now = to_dict(cfg)
    for section, key in [("expert", "num"), ("expert", "width"), ("expert", "depth"), ("expert", "pool"),
                         ("discriminator", "widths"), ("discriminator", "hidden")]:
        if saved[section][key] != now[section][key]:
            raise CheckpointError(f"checkpoint '{ckpt}' was saved with {section}.{key}={saved[section][key]!r} but "
                                  f"this run has {section}.{key}={now[section][key]!r}; use a matching config")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")), reverse=True)


def find_resumable(run_dir: Path, cfg: Config, log=print) -> Path | None:
    """The newest checkpoint in ``run_dir`` that verifies and fits; says so when it skips a newer one."""
    for ckpt in list_checkpoints(run_dir):
        try:
            manifest = verify_checkpoint(ckpt)
            check_compatible(manifest, cfg, ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"warning: skipping checkpoint: {e}; falling back to an older one")
    return None


# ----------------------------------------------------------------------------- load


def _split(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_expert_file(path: Path) -> tuple[dict, dict, dict]:
    """(model state dict, optimizer state, metadata) of one expert file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"cannot read expert file '{path}': {e}") from None
    return _split(tensors, "model."), _split(tensors, "optim."), meta


def load_into(ckpt: Path, cfg: Config, experts, disc_module, d_opt, verify: bool = True) -> dict:
    """Load the experts this rank owns now, D and its optimizer. Returns the manifest."""
    ckpt = Path(ckpt)
    own = [expert_filename(g) for g in experts.ids]
    manifest = verify_checkpoint(ckpt, own + ["discriminator.safetensors"]) if verify else read_manifest(ckpt)
    check_compatible(manifest, cfg, ckpt)
    for j, gid in enumerate(experts.ids):
        model, optim, _ = load_expert_file(ckpt / expert_filename(gid))
        try:
            experts.bank.load_expert_state(j, model)
            experts.opt.load_expert_state(j, optim)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}': {expert_filename(gid)} does not fit the config ({e})") from None
    try:
        tensors = load_file(str(ckpt / "discriminator.safetensors"))
        disc_module.load_state_dict(_split(tensors, "model."))
    except Exception as e:
        raise CheckpointError(f"checkpoint '{ckpt}': discriminator.safetensors does not fit the config ({e})") from None
    opt_tensors = _split(tensors, "optim.")
    sd = d_opt.state_dict()
    state = {}
    for i in range(len(sd["param_groups"][0]["params"])):
        st = {k: opt_tensors[f"{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq") if f"{i}.{k}" in opt_tensors}
        if st:
            state[i] = st
    sd["state"] = state
    d_opt.load_state_dict(sd)
    return manifest

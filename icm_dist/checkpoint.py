"""Checkpoints: safetensors files, atomic writes, verified loads, any world size.

Layout of ``checkpoints/iter_NNNNNNN/`` (docs/checkpoint-format.md has the full description):

- ``expert_NNN.safetensors`` per global expert: ``model.*`` (an ``Expert`` state dict: weights and
  BatchNorm buffers), ``optim.<param>.exp_avg`` / ``optim.<param>.exp_avg_sq`` / ``optim.step``
  (its Adam);
- ``discriminator.safetensors``: ``model.*`` and ``optim.<i>.{exp_avg,exp_avg_sq,step}``;
- ``router.safetensors`` (runs with ``train.route_k``): the router, in D's layout, its running recall in the
  metadata;
- ``manifest.json``: format version, iteration, world size at save, the config, the sha256 and size
  of every file, trainer state and the metrics so far.

Every rank writes its own experts into ``.tmp_iter_NNNNNNN``; rank 0 then writes D and the
manifest, fsyncs, and renames the directory into place, then replaces ``latest``. A crash at any
moment leaves either the previous complete checkpoint or the new one, never half of one. No pickle
is involved anywhere: tensors are safetensors, everything else is JSON.

The save is split into three phases (:func:`begin_checkpoint`, :func:`write_experts`,
:func:`finish_checkpoint`) that :func:`save_checkpoint` runs with barriers between them; tests run
the phases for several simulated ranks in one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import Config, describe_changes, expert_config, expert_parts, resume_changes, to_dict
from .dist import Dist
from .errors import CheckpointError
from .experts import ExpertState, LocalExperts
from .rundir import RunDir
from .utils import sha256_file, strip_prefix

FORMAT_VERSION = 1
EXPERT_FORMAT = "icm-dist-expert/1"
DISCRIMINATOR_FORMAT = "icm-dist-discriminator/1"
DISCRIMINATOR_FILE = "discriminator.safetensors"
ROUTER_FORMAT = "icm-dist-router/1"
ROUTER_FILE = "router.safetensors"
MANIFEST_FILE = "manifest.json"

def channels_of(manifest: dict) -> int:
    """The image channels of a checkpoint's networks (manifests from before colour data: MNIST's one)."""
    return int(manifest.get("channels", 1))


def expert_filename(gid: int) -> str:
    return f"expert_{gid:03d}.safetensors"


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict, path: Path, metadata: dict) -> None:
    """Write a safetensors file and fsync it (metadata values must be strings)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def expert_metadata(cfg: Config, gid: int, extra: dict | None = None) -> dict:
    # The config of the expert's own part: an expert file of a committee of several families loads alone.
    ecfg = expert_config(cfg.expert, gid)
    meta = {"format": EXPERT_FORMAT, "expert_id": str(gid), "expert_config": json.dumps(dataclasses.asdict(ecfg))}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def module_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A replicated module (D, the router) and its torch Adam: ``model.*`` and ``optim.<i>.*``."""
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return tensors


def module_metadata(module: torch.nn.Module, fmt: str = DISCRIMINATOR_FORMAT) -> dict:
    # optim.<i> is the i-th parameter of the module, in this order.
    return {"format": fmt, "optim_params": json.dumps([n for n, _ in module.named_parameters()])}


# ----------------------------------------------------------------------------- save


def begin_checkpoint(run_dir: Path, iteration: int) -> Path:
    """Rank 0: an empty temporary directory for the checkpoint of ``iteration`` (stale ones removed)."""
    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    _undo_interrupted_swap(root)
    for p in root.iterdir():  # debris of a save that crashed halfway
        if p.is_dir() and (p.name.startswith(".tmp_") or p.name.startswith(".old_")):
            shutil.rmtree(p, ignore_errors=True)
    tmp = root / f".tmp_{iter_dirname(iteration)}"
    tmp.mkdir()
    return tmp


def write_experts(tmp: Path, cfg: Config, experts: LocalExperts, iteration: int) -> None:
    """Every rank: one file per expert it owns, each complete and fsynced when this returns."""
    for j, gid in enumerate(experts.ids):
        save_tensors(experts.state(j).flat(), tmp / expert_filename(gid),
                     expert_metadata(cfg, gid, {"iteration": str(iteration), "channels": experts.channels}))


def finish_checkpoint(tmp: Path, iteration: int, cfg: Config, disc_module, disc_opt, world_size: int,
                      trainer_state: dict, metrics, keep: int, extra: dict | None = None, router=None) -> Path:
    """Rank 0, after every rank's experts are written: D (and ``router``, if any), the manifest, the rename,
    ``latest``, pruning."""
    root = tmp.parent
    name = iter_dirname(iteration)
    final = root / name
    num = cfg.expert.num
    missing = [expert_filename(g) for g in range(num) if not (tmp / expert_filename(g)).is_file()]
    if missing:  # a bug in the caller, not a user error: never publish a checkpoint without its experts
        raise RuntimeError(f"checkpoint {tmp}: expert files {missing} were not written")
    save_tensors(module_tensors(disc_module, disc_opt), tmp / DISCRIMINATOR_FILE, module_metadata(disc_module))
    if router is not None:
        save_tensors(module_tensors(router.module, router.opt), tmp / ROUTER_FILE,
                     {**module_metadata(router.module, ROUTER_FORMAT), "recall": json.dumps(float(router.recall)),
                      "recall_k": json.dumps([float(r) for r in router.recall_K])})
    files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
    manifest = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "world_size": world_size,
        "num_experts": num,
        "experts": [expert_filename(g) for g in range(num)],
        "config": to_dict(cfg),
        "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files},
        "trainer_state": trainer_state,
        "metrics": metrics,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        **(extra or {}),
    }
    write_json(tmp / MANIFEST_FILE, manifest)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same iteration (after a restart): swap; a crash between the two
        # renames leaves the old one whole in .old_, which _undo_interrupted_swap puts back
        old = root / f".old_{name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    with open(latest_tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    _prune(root, keep, protect=name)
    return final


def save_checkpoint(run_dir: Path, iteration: int, cfg: Config, experts: LocalExperts, disc_module, disc_opt,
                    dist: Dist, trainer_state: dict, metrics, keep: int, router=None,
                    data_sha256: str | None = None) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory. ``router``: rank 0's
    router of the routed competition (anything with its ``module``, ``opt`` and ``recall``), or None;
    ``data_sha256``: the digest of the images trained on (rank 0's), which a resume checks."""
    root = RunDir(run_dir).checkpoints
    tmp = root / f".tmp_{iter_dirname(iteration)}"
    if dist.is_main:
        begin_checkpoint(run_dir, iteration)
    dist.barrier()  # the directory exists before anyone writes into it
    write_experts(tmp, cfg, experts, iteration)
    dist.barrier()  # every expert file is complete and synced
    if dist.is_main:
        finish_checkpoint(tmp, iteration, cfg, disc_module, disc_opt, dist.world_size, trainer_state, metrics, keep,
                          extra={"channels": experts.channels,
                                 **({"data": {"sha256": data_sha256}} if data_sha256 else {})}, router=router)
    dist.barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return root / iter_dirname(iteration)


def _prune(root: Path, keep: int, protect: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    for p in done[:-keep]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- verify and find


def read_manifest(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint '{ckpt}' does not exist")
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' has no {MANIFEST_FILE} (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest '{path}' is not valid JSON ({_one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint manifest '{path}' has format version {got!r}; "
                              f"this icm-dist reads version {FORMAT_VERSION}")
    for key, tp in (("iteration", int), ("config", dict), ("files", dict), ("num_experts", int)):
        if not isinstance(manifest.get(key), tp):
            raise CheckpointError(f"checkpoint manifest '{path}': field '{key}' is missing or malformed")
    return manifest


def verify_checkpoint(ckpt: Path, files: list[str] | None = None, manifest: dict | None = None) -> dict:
    """Check the manifest (``manifest``, if the caller read it already) and the sha256 of ``files`` (all by
    default); raise CheckpointError naming the file."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt) if manifest is None else manifest
    listed = manifest["files"]
    if files is None:
        needed = [expert_filename(g) for g in range(manifest["num_experts"])] + [DISCRIMINATOR_FILE]
        files = sorted(set(listed) | set(needed))
    for f in files:
        entry = listed.get(f)
        p = ckpt / f
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CheckpointError(f"checkpoint '{ckpt}': {MANIFEST_FILE} lists no file '{f}' (incomplete manifest)")
        if not p.is_file():
            raise CheckpointError(f"checkpoint '{ckpt}': file '{f}' is missing")
        size = p.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise CheckpointError(f"checkpoint '{ckpt}': file '{f}' has {size} bytes but the manifest says "
                                  f"{entry['bytes']} (truncated or overwritten)")
        if sha256_file(p) != entry["sha256"]:
            raise CheckpointError(f"checkpoint '{ckpt}': file '{f}' fails its sha256 check (corrupt: its bytes "
                                  f"changed since the save)")
    return manifest


def check_compatible(manifest: dict, cfg: Config, ckpt: Path) -> None:
    """The checkpoint must belong to this experiment: every key outside ``config.RESUMABLE_KEYS`` as the run
    saved it (so its shapes fit too); the world size may differ."""
    changes = resume_changes(manifest["config"], cfg)
    if all(p.norm != "group" for p in expert_parts(cfg.expert)):  # expert.groups means something only to it
        changes = [c for c in changes if c[0] != "expert.groups"]
    if changes:
        raise CheckpointError(f"checkpoint '{ckpt}' belongs to another experiment: it was {describe_changes(changes)}; "
                              "a resume may change only how long, how often and where the run trains, evaluates, "
                              "logs and checkpoints, and how it is launched (README, 'Resuming'): use a new "
                              "run.out_dir for a new experiment (or icm-dist surgery to change the committee)")
    if manifest["num_experts"] != cfg.expert.num:
        raise CheckpointError(f"checkpoint '{ckpt}': {MANIFEST_FILE} says num_experts={manifest['num_experts']} "
                              f"but its config says expert.num={manifest['config']['expert']['num']}")


def check_data(manifest: dict, data_sha256: str, ckpt: Path) -> None:
    """The images a run trains on must be those its checkpoint was trained on (checkpoints from before the
    digest was recorded are taken on trust)."""
    saved = (manifest.get("data") or {}).get("sha256")
    if saved is not None and saved != data_sha256:
        raise CheckpointError(f"checkpoint '{ckpt}' was trained on other images than data.dataset="
                              f"{manifest['config']['data']['dataset']!r} holds now (sha256 {saved[:12]}... then, "
                              f"{data_sha256[:12]}... now): its files changed; restore them or start a new run")


def _undo_interrupted_swap(root: Path) -> None:
    """A re-save that crashed between its two renames left the old checkpoint, complete, in ``.old_iter_N``
    and nothing in ``iter_N``: rename it back, before checkpoints are listed or debris is removed."""
    for p in root.glob(".old_iter_*"):
        final = root / p.name[len(".old_"):]
        if p.is_dir() and not final.exists():
            try:
                os.replace(p, final)
            except OSError:  # a read-only run directory: it stays unlisted, as before
                pass


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint directories of a run, newest first."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    _undo_interrupted_swap(root)
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")), reverse=True)


def _latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except OSError:
        return None


def find_resumable(run_dir: Path, cfg: Config, log=print) -> Path | None:
    """The checkpoint ``latest`` names, or the newest older one that verifies (saying so when it skips one);
    without ``latest`` (a first save that died before writing it), the newest that verifies.

    A checkpoint newer than ``latest`` is never taken: it is a save that died before its ``latest``, which the
    resumed run saves again, or something that does not belong to this run. None when the run has no
    checkpoint at all; a CheckpointError when it has some but none verifies (starting fresh would silently
    throw that work away and, through pruning, delete it), or when one is of another experiment.
    """
    found = list_checkpoints(run_dir)
    latest = _latest_name(RunDir(run_dir).checkpoints)
    if latest is not None:
        for p in (p for p in found if p.name > latest):
            log(f"warning: ignoring checkpoint {p.name}: it is newer than the one checkpoints/latest names ({latest})")
        found = [p for p in found if p.name <= latest]
    errors = []
    for ckpt in found:
        try:
            manifest = verify_checkpoint(ckpt)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: skipping checkpoint {ckpt.name}: {e}; falling back to an older one")
            continue
        check_compatible(manifest, cfg, ckpt)  # another experiment's: refused, never skipped
        if errors:
            log(f"warning: resuming from {ckpt.name}, the newest checkpoint that verifies "
                f"({len(errors)} newer one(s) skipped)")
        return ckpt
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in '{RunDir(run_dir).checkpoints}' verifies "
                              f"(newest: {errors[0]}); repair or move them away, or use a new run.out_dir")
    return None


def locate(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a ``checkpoints/`` directory or a run directory."""
    p = Path(path)
    for cand in (p, RunDir(p).checkpoints):
        if (cand / "latest").is_file() and not (cand / MANIFEST_FILE).is_file():
            name = (cand / "latest").read_text().strip()
            return cand / name
    return p


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first launch)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def resolve_resume(cfg: Config, log=print, restarts: int | None = None) -> Path | None:
    """The checkpoint this run starts from (rank 0 calls it; the trainer broadcasts the answer).

    - ``resume=auto``: the newest checkpoint in run.out_dir that verifies and fits, or none (fresh start);
    - ``resume=<path>``: that checkpoint (or the ``latest`` of a run or checkpoints directory), strictly;
    - a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) first looks for the newest usable checkpoint in
      run.out_dir whatever ``resume`` says: with ``resume: null`` a restart behaves as ``auto``, and with a
      path it continues from this run's own progress once there is some.
    """
    restarts = restart_count() if restarts is None else restarts
    out = Path(cfg.run.out_dir)
    checkpoints = RunDir(out).checkpoints
    if restarts > 0 or cfg.resume == "auto":
        found = find_resumable(out, cfg, log=log)
        why = f"torchrun restart {restarts}" if restarts > 0 else "resume=auto"
        if found is not None:
            log(f"{why}: resuming from {found}")
            return found
        if cfg.resume in (None, "auto"):
            log(f"{why}: no checkpoint in {checkpoints}, starting fresh")
            return None
    if not cfg.resume:
        return None  # a fresh start: RunDir.claim decides whether it may write into run.out_dir
    p = locate(cfg.resume)
    check_compatible(verify_checkpoint(p), cfg, p)
    return p


# ----------------------------------------------------------------------------- load


def read_tensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a CheckpointError naming the file if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except FileNotFoundError:
        raise CheckpointError(f"file '{path}' does not exist") from None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"cannot read '{path}' as safetensors ({_one_line(e)})") from None


def load_expert_file(path: Path) -> tuple[ExpertState, dict]:
    """(the expert's state, metadata) of one expert file."""
    tensors, meta = read_tensors(path)
    return ExpertState.from_flat(tensors), meta


def check_fits(where: str, got: dict, template: dict) -> None:
    """``got`` must have exactly the keys of ``template`` with the same shapes; the error names the first misfit."""
    missing = sorted(set(template) - set(got))
    extra = sorted(set(got) - set(template))
    if missing or extra:
        parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {extra[:4]}"] if extra else [])
        raise CheckpointError(f"{where} does not fit this run's networks: {', '.join(parts)}")
    for k, t in template.items():
        if tuple(got[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor '{k}' has shape {tuple(got[k].shape)} but this run's config "
                                  f"needs {tuple(t.shape)}")


def load_into(ckpt: Path, cfg: Config, experts: LocalExperts, disc_module, disc_opt, verify: bool = True,
              router=None) -> dict:
    """Load the experts this rank owns now, D and its optimizer (and ``router``'s module, optimizer and
    recall, where the checkpoint has one; without, the router stays fresh). Returns the manifest.

    Experts are addressed by global id, so a checkpoint saved at any world size loads at any other.
    """
    ckpt = Path(ckpt)
    own = [expert_filename(g) for g in experts.ids]
    manifest = read_manifest(ckpt)
    has_router = router is not None and ROUTER_FILE in manifest["files"]
    if verify:
        verify_checkpoint(ckpt, own + [DISCRIMINATOR_FILE] + ([ROUTER_FILE] if has_router else []), manifest)
    check_compatible(manifest, cfg, ckpt)
    if channels_of(manifest) != experts.channels:
        raise CheckpointError(f"checkpoint '{ckpt}' was trained on images of {channels_of(manifest)} channels but "
                              f"this run's data has {experts.channels}; use the same data.dataset and data.tint")
    for j, gid in enumerate(experts.ids):
        fname = expert_filename(gid)
        template = experts.state(j)  # expert j's own family: a committee of several has more than one layout
        state, _ = load_expert_file(ckpt / fname)
        check_fits(f"checkpoint '{ckpt}': {fname} (model)", state.model, template.model)
        check_fits(f"checkpoint '{ckpt}': {fname} (optimizer)", state.optim, template.optim)
        try:
            experts.load_state(j, state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}': {fname} does not fit the config ({_one_line(e)})") from None
    _load_module(ckpt, DISCRIMINATOR_FILE, disc_module, disc_opt)
    if has_router:  # the recall belongs to the router it measured, so it is kept in the router's file
        meta = _load_module(ckpt, ROUTER_FILE, router.module, router.opt)
        router.recall_K = _router_recall(ckpt, meta, manifest, len(router.recall_K))
    return manifest


def _router_recall(ckpt: Path, meta: dict, manifest: dict, num_k: int) -> list[float]:
    """The running recall at each k the router may route with. A router file without ``recall_k`` measured
    only ``train.route_k``: the larger k start unmeasured (0, so they route only once measured); one without
    the recall at all keeps it in its checkpoint's trainer state."""
    key = "recall_k" if "recall_k" in meta else "recall"
    try:
        if key not in meta:
            first = float((manifest.get("trainer_state") or {}).get("route_recall", 0.0))
        elif key == "recall":
            first = float(json.loads(meta["recall"]))
        else:
            recall_K = [float(r) for r in json.loads(meta["recall_k"])]
            if len(recall_K) != num_k:
                raise CheckpointError(f"checkpoint '{ckpt}': {ROUTER_FILE} holds the recall at {len(recall_K)} "
                                      f"values of k, the config routes with {num_k} (train.route_k_max)")
            return recall_K
    except (ValueError, TypeError):
        raise CheckpointError(f"checkpoint '{ckpt}': {ROUTER_FILE} has an unreadable {key} "
                              f"{meta[key]!r} in its metadata") from None
    return [first] + [0.0] * (num_k - 1)


def _load_module(ckpt: Path, fname: str, module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A replicated module and its Adam from ``ckpt / fname`` (written by :func:`module_tensors`); returns the
    file's metadata."""
    tensors, meta = read_tensors(ckpt / fname)
    where = f"checkpoint '{ckpt}': {fname}"
    check_fits(where + " (model)", strip_prefix(tensors, "model."), module.state_dict())
    module.load_state_dict(strip_prefix(tensors, "model."))
    opt_tensors = strip_prefix(tensors, "optim.")
    params = list(module.parameters())
    sd = opt.state_dict()
    state = {}
    for i, p in enumerate(params):
        st = {k: opt_tensors.pop(f"{i}.{k}") for k in ("step", "exp_avg", "exp_avg_sq") if f"{i}.{k}" in opt_tensors}
        if not st:
            continue
        if set(st) != {"step", "exp_avg", "exp_avg_sq"}:
            raise CheckpointError(f"{where}: optimizer state of parameter {i} is incomplete ({sorted(st)})")
        for k in ("exp_avg", "exp_avg_sq"):
            if tuple(st[k].shape) != tuple(p.shape):
                raise CheckpointError(f"{where}: tensor 'optim.{i}.{k}' has shape {tuple(st[k].shape)} but this "
                                      f"run's {fname.split('.')[0]} needs {tuple(p.shape)}")
        state[i] = st
    if opt_tensors:
        raise CheckpointError(f"{where} does not fit this run's {fname.split('.')[0]}: unexpected optimizer tensors "
                              f"{sorted(opt_tensors)[:4]}")
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta

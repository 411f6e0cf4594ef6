"""Reusing a trained committee (the paper's sections 4.2-4.3): ``icm-dist export``, ``apply``, ``surgery``.

- ``export``: one expert as a standalone safetensors file (its weights and BatchNorm buffers, plus
  metadata: its architecture, the mechanism it captured and its win rates from the run's
  summary.json). docs/checkpoint-format.md shows how to use it with nothing but torch.
- ``apply``: restore a folder of PNG images or a safetensors tensor file, either with the committee
  (every input goes to the expert D scores highest, as at test time) or with a chain of experts
  applied one after another (the composition of Figure 8).
- ``surgery``: remove experts (those that win nothing, or named ones), add fresh identity-initialized
  ones, and write a new checkpoint plus config that ``resume=`` continues from with the new
  ``expert.num``.

Every problem ends in a :class:`CheckpointError` with one line; no pickle, no torch.load.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from .. import checkpoint as ck
from ..competition import build_competition
from ..config import Config, ExpertConfig, config_from_dict, config_hash, dump_yaml, expert_config, part_of
from ..data.images import fit_size, pil_to_tensor, to_uint8
from ..data.library import resolve_mechanisms
from ..dist import Dist, ShardPlan
from ..errors import CheckpointError, ConfigError, OutputError
from ..evaluate import run_committee
from ..experts import LocalExperts
from ..families import get_family, size_multiple
from ..identity import identity_init
from ..protocol import build_protocol
from ..rundir import RunDir
from .args import at_least
from .outputs import (
    claim_file,
    claim_folder,
    image_is_ours,
    json_is,
    safetensors_is_ours,
    save_marked_image,
    write_file,
    write_text,
)

MODULE_FORMAT = "icm-dist-expert-module/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what apply reads from a folder, and writes back under the same names
def architecture(ecfg: ExpertConfig) -> str:
    """The expert's network in words, for an exported file's metadata."""
    return get_family(ecfg).describe(ecfg)


# ----------------------------------------------------------------------------- opening a run


@dataclasses.dataclass
class Source:
    ckpt: Path
    manifest: dict
    cfg: Config
    summary: dict | None  # the run's summary.json, when it describes this very checkpoint

    @property
    def names(self) -> list[str]:
        """The mechanisms' labels."""
        return [m.label for m in resolve_mechanisms(self.cfg.data.mechanisms, import_functions=False)]


def open_source(path: str | Path, verify: bool = True) -> Source:
    """A checkpoint (or a run / checkpoints directory: its ``latest``), verified, with its config and summary."""
    ckpt = ck.locate(path)
    manifest = ck.verify_checkpoint(ckpt) if verify else ck.read_manifest(ckpt)
    try:
        cfg = config_from_dict(manifest["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{ckpt}': its config does not load in this icm-dist ({e})") from None
    return Source(ckpt, manifest, cfg, _summary_of(ckpt, manifest))


def _summary_of(ckpt: Path, manifest: dict) -> dict | None:
    """The summary.json of the run that holds ``ckpt``, if it describes this very checkpoint."""
    if ckpt.parent.name != "checkpoints":
        return None
    try:
        s = RunDir(ckpt.parent.parent).read_summary()
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(s, dict) and s.get("iterations") == manifest["iteration"] \
            and s.get("num_experts") == manifest["num_experts"]:
        return s
    return None


def _expert_cfg(meta: dict, where: str) -> ExpertConfig:
    try:
        raw = json.loads(meta["expert_config"])
        known = {f.name for f in dataclasses.fields(ExpertConfig)}
        return ExpertConfig(**{k: v for k, v in raw.items() if k in known})
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: metadata 'expert_config' is missing or malformed ({e})") from None


def _build_expert(ecfg: ExpertConfig, model: dict, where: str, channels: int) -> nn.Module:
    e = get_family(ecfg).expert(ecfg, channels)
    ck.check_fits(where, model, e.state_dict())
    e.load_state_dict(model)
    return e.eval()


def load_expert(src: Source, gid: int) -> nn.Module:
    """Global expert ``gid`` of a checkpoint as its family's standalone module in eval mode."""
    if not 0 <= gid < src.manifest["num_experts"]:
        raise CheckpointError(f"checkpoint '{src.ckpt}' has experts 0..{src.manifest['num_experts'] - 1}, not {gid}")
    path = src.ckpt / ck.expert_filename(gid)
    state, _ = ck.load_expert_file(path)
    return _build_expert(expert_config(src.cfg.expert, gid), state.model, str(path), ck.channels_of(src.manifest))


def load_module_file(path: str | Path) -> tuple[nn.Module, dict]:
    """An exported expert file (or a checkpoint's expert file) as its family's module in eval mode, with its
    metadata."""
    path = Path(path)
    tensors, meta = ck.read_tensors(path)
    model = {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()
             if not k.startswith("optim.")}
    return _build_expert(_expert_cfg(meta, str(path)), model, str(path), _channels(meta, path)), meta


def _channels(meta: dict, path: Path) -> int:
    """The image channels an expert file's module maps (files from before colour data: MNIST's one)."""
    try:
        return int(meta.get("channels", 1))
    except ValueError:
        raise CheckpointError(f"{path}: metadata 'channels' = {meta.get('channels')!r} is not a number") from None


def expert_for(src: Source, name_or_id: str) -> int:
    """An expert id from ``"3"``/``"e3"`` or a mechanism name (the expert that captured it, per summary.json)."""
    s = name_or_id.strip()
    if s.isdigit() or (s[:1] == "e" and s[1:].isdigit()):
        return int(s.lstrip("e"))
    if s not in src.names:
        raise CheckpointError(f"'{s}' is neither an expert id nor a mechanism of this run "
                              f"({', '.join(src.names)})")
    if src.summary is None:
        raise CheckpointError(f"cannot tell which expert captured '{s}': no summary.json for iteration "
                              f"{src.manifest['iteration']} next to '{src.ckpt}'; name the expert by id")
    gid = src.summary.get("captured", {}).get(s)
    if gid is None:
        raise CheckpointError(f"no expert captured mechanism '{s}' in this run (summary.json 'captured'); "
                              f"name an expert by id instead")
    return int(gid)


def win_rates(src: Source, gid: int) -> dict | None:
    """{mechanism: fraction of its test examples expert ``gid`` won}, from summary.json's win matrix."""
    if src.summary is None or "win_matrix" not in src.summary:
        return None
    names = src.summary.get("mechanisms", src.names)
    return {n: float(row[gid]) for n, row in zip(names, src.summary["win_matrix"])}


# ----------------------------------------------------------------------------- export


def export_expert(source: str | Path, out: str | Path, expert: str, force: bool = False) -> Path:
    out = claim_file(out, safetensors_is_ours, force)
    src = open_source(source)
    gid = expert_for(src, expert)
    e = load_expert(src, gid)  # validates shapes
    rates = win_rates(src, gid)
    captured = None
    if src.summary is not None:
        captured = next((m for m, g in src.summary.get("captured", {}).items() if g == gid), None)
    ecfg = expert_config(src.cfg.expert, gid)  # its part's, in a committee of several families
    exp_cfg = dataclasses.asdict(ecfg)
    meta = {
        "format": MODULE_FORMAT,
        "expert_id": str(gid),
        "expert_config": json.dumps({k: exp_cfg[k] for k in ("arch", "arch_args", "width", "depth", "pool", "norm",
                                                             "groups", "weight_standardization")}),
        "channels": str(ck.channels_of(src.manifest)),
        "architecture": architecture(ecfg),
        "mechanism": json.dumps(captured),
        "win_rate": json.dumps(rates[captured] if rates and captured else (max(rates.values()) if rates else None)),
        "win_rates": json.dumps(rates),
        "mechanisms": json.dumps(src.names),
        "source_checkpoint": str(src.ckpt.resolve()),
        "source_sha256": src.manifest["files"][ck.expert_filename(gid)]["sha256"],
        "iteration": str(src.manifest["iteration"]),
        "config_hash": config_hash(src.cfg),
    }
    return write_file(out, lambda tmp: ck.save_tensors(e.state_dict(), tmp, meta))


# ----------------------------------------------------------------------------- inputs and outputs


def read_inputs(path: str | Path, key: str | None = None, channels: int = 1,
                log=print) -> tuple[torch.Tensor, list[str] | None]:
    """``[N, C, H, W]`` float in [0, 1] from a folder of PNG/JPEG images (read as grey or RGB, as ``channels``
    says) and their names, or from a safetensors file's tensor ``key`` (default ``images``).

    What cannot be right is refused with one line: values outside [0, 1], NaN or infinite values, integer
    types other than uint8, the wrong number of channels, a file without an ``images`` tensor and no
    ``--key``. uint8 is converted (divided by 255) and said so. 28x28 inputs (MNIST's size) are
    zero-padded to 32x32, as in training.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CheckpointError(f"input folder '{p}' holds no .png or .jpg files")
        imgs = []
        for f in files:
            try:
                with Image.open(f) as im:
                    imgs.append(pil_to_tensor(im, rgb=channels == 3))
            except OSError as e:
                raise CheckpointError(f"cannot read image '{f}' ({e})") from None
        shapes = {tuple(t.shape) for t in imgs}
        if len(shapes) > 1:
            raise CheckpointError(f"images in '{p}' have different sizes {sorted(shapes)}; use one size")
        x = torch.stack(imgs).float() / 255.0
        names = [f.name for f in files]
    elif p.is_file():
        tensors, _ = ck.read_tensors(p)
        key = key or "images"
        if key not in tensors:
            raise CheckpointError(f"'{p}' has no tensor '{key}' (it holds {sorted(tensors)}); name one with --key")
        x = _as_images(tensors[key], channels, f"tensor '{key}' in '{p}'", log)
        names = None
    else:
        raise CheckpointError(f"input '{p}' does not exist (a folder of .png files or a .safetensors file)")
    if tuple(x.shape[-2:]) == (28, 28):
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.contiguous(), names


def _as_images(x: torch.Tensor, channels: int, where: str, log) -> torch.Tensor:
    """A tensor as ``[N, C, H, W]`` float in [0, 1], or a CheckpointError saying what is wrong with it."""
    if channels == 1 and x.dim() in (2, 3):
        x = x[None, None] if x.dim() == 2 else x[:, None]
    if x.dim() != 4 or x.shape[1] != channels:
        raise CheckpointError(f"{where} has shape {tuple(x.shape)}; expected [N, {channels}, H, W]"
                              + (", [N, H, W] or [H, W]" if channels == 1 else ""))
    if x.dtype == torch.uint8:
        log(f"note: {where} is uint8: divided by 255 to [0, 1]")
        return x.float() / 255.0
    if not x.is_floating_point():
        raise CheckpointError(f"{where} is {x.dtype}; expected float images in [0, 1] (or uint8 in 0..255)")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise CheckpointError(f"{where} holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        hint = " (0..255 pixel values? divide by 255)" if hi > 1.5 else ""
        raise CheckpointError(f"{where} holds values in [{lo:.4g}, {hi:.4g}]; expected images in [0, 1]{hint}")
    return x


APPLY_FORMAT = "icm-dist-apply/1"
APPLY_REPORT = "apply.json"
_apply_report_is_ours = json_is(lambda d: isinstance(d, dict) and d.get("format") == APPLY_FORMAT)


def _apply_output_is_ours(path: Path) -> bool:
    return _apply_report_is_ours(path) if path.name == APPLY_REPORT else image_is_ours(path)


def claim_outputs(out: str | Path, inputs: str | Path, force: bool = False) -> Path:
    """Where ``apply`` will write (a folder of PNGs for a folder of images, else a safetensors file), checked
    before any work: see commands/outputs.py."""
    if Path(inputs).is_dir():
        names = sorted(p.name for p in Path(inputs).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return claim_folder(out, [*names, APPLY_REPORT], _apply_output_is_ours, force)
    return claim_file(out, safetensors_is_ours, force)


def write_outputs(out: str | Path, y: torch.Tensor, names: list[str] | None, extra: dict, info: dict) -> Path:
    """PNGs with the input names into folder ``out`` (input was a folder), else a safetensors file."""
    out = Path(out)
    info = {"format": APPLY_FORMAT, **info}
    if names is not None:
        out.mkdir(parents=True, exist_ok=True)
        u8 = to_uint8(y).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
        for name, img in zip(names, u8):
            im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            write_file(out / name, lambda tmp, im=im, name=name: save_marked_image(im, tmp, Path(name).suffix))
        report = {"inputs": names, **info, **{k: v.tolist() for k, v in extra.items()}}
        write_text(out / APPLY_REPORT, json.dumps(report, indent=1))
    else:
        meta = {k: v if k == "format" else json.dumps(v) for k, v in info.items()}
        write_file(out, lambda tmp: ck.save_tensors({"images": y, **extra}, tmp, meta))
    return out


# ----------------------------------------------------------------------------- apply


def load_committee(src: Source, device: torch.device | None = None):
    """Every expert of the checkpoint in one bank, D and its optimizer: (experts, disc, d_opt, plan, dist)."""
    device = device or torch.device("cpu")
    cfg = src.cfg
    plan, dist = ShardPlan(cfg.expert.num, 1), Dist(0, 1, 0, device)
    comp = build_competition(cfg, dist, channels=ck.channels_of(src.manifest))
    ck.load_into(src.ckpt, cfg, comp.experts, comp.disc_module, comp.disc_opt, verify=False)  # open_source verified it
    return comp.experts, comp.disc_module, comp.disc_opt, plan, dist


@torch.no_grad()
def apply_committee(src: Source, x: torch.Tensor) -> dict:
    """Each input restored by the expert D scores highest: ``restored``, ``winners``, ``scores``."""
    S = src.cfg.data.image_size
    if max(x.shape[-2:]) < S:
        x = fit_size(x, S)  # smaller inputs are zero-padded, as in training
    if tuple(x.shape[-2:]) != (S, S):
        raise CheckpointError(f"the committee's discriminator scores {S}x{S} images but the inputs are "
                              f"{tuple(x.shape[-2:])}; pad them, or apply a --chain of experts (any size)")
    experts, disc, _, plan, d = load_committee(src)
    res = run_committee(experts, disc, x, plan, d, src.cfg)
    return {"restored": res["restored"], "winners": res["winners"], "scores": res["scores"].float()}


@torch.no_grad()
def apply_chain(chain: list[nn.Module], x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``chain[-1](... chain[0](x))``: the composition of Figure 8."""
    for e in chain:
        m = size_multiple(e)
        if x.shape[-1] % m or x.shape[-2] % m:
            raise CheckpointError(f"this expert ({type(e).__name__}) needs sizes divisible by {m}, "
                                  f"got {tuple(x.shape[-2:])}")
        x = torch.cat([e(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return x


def resolve_chain(source: str | Path, items: list[str]) -> tuple[list[nn.Module], list[str], list[int]]:
    """Experts named by id, by captured mechanism (needs a run) or by exported file path, with a label and
    the image channels of each."""
    src = None
    chain, labels, channels = [], [], []
    for it in items:
        if it.endswith(".safetensors") and Path(it).is_file():
            e, meta = load_module_file(it)
            chain.append(e)
            channels.append(_channels(meta, Path(it)))
            try:
                mech = json.loads(meta.get("mechanism", "null"))
            except json.JSONDecodeError:
                mech = None
            labels.append(f"{it} (expert {meta.get('expert_id')}, mechanism {mech})")
            continue
        if src is None:
            src = open_source(source)
        gid = expert_for(src, it)
        chain.append(load_expert(src, gid))
        channels.append(ck.channels_of(src.manifest))
        labels.append(f"expert {gid}" + (f" ({it})" if not it.lstrip("e").isdigit() else ""))
    return chain, labels, channels


def apply(source: str | Path, inputs: str | Path, out: str | Path, chain: list[str] | None = None,
          key: str | None = None, force: bool = False) -> dict:
    claim_outputs(out, inputs, force)
    if chain is None and Path(source).is_file():
        chain = [str(source)]  # an exported expert on its own: apply it
    if chain:
        experts, labels, channels = resolve_chain(source, chain)
        if len(set(channels)) > 1:
            raise CheckpointError(f"the chain mixes experts of {sorted(set(channels))} channels: "
                                  "they cannot be composed")
        x, names = read_inputs(inputs, key, channels[0])
        y = apply_chain(experts, x)
        info = {"mode": "chain", "chain": labels}
        extra = {}
    else:
        src = open_source(source)
        x, names = read_inputs(inputs, key, ck.channels_of(src.manifest))
        res = apply_committee(src, x)
        y = res["restored"]
        captured = (src.summary or {}).get("captured", {})
        by_expert = {g: m for m, g in captured.items() if g is not None}
        info = {"mode": "committee", "checkpoint": str(src.ckpt),
                "winner_mechanisms": [by_expert.get(int(w)) for w in res["winners"]]}
        extra = {"winners": res["winners"].long(), "scores": res["scores"]}
    write_outputs(out, y, names, extra, info)
    return {"restored": y, **extra, **info}


# ----------------------------------------------------------------------------- surgery


def committee_wins(src: Source, examples: int) -> torch.Tensor:
    """How many of the first ``examples`` transformed test digits each expert wins."""
    proto = build_protocol(src.cfg)
    experts, disc, _, plan, d = load_committee(src)
    res = run_committee(experts, disc, proto.test_x[:examples], plan, d, src.cfg, keep_outputs=False)
    return torch.bincount(res["winners"], minlength=src.cfg.expert.num)


def surgery(source: str | Path, out_dir: str | Path, remove: list[int] = (), remove_inactive: bool = False,
            add: int = 0, iterations: int | None = None, probe: int | None = None, seed: int | None = None,
            identity: bool = True, log=print) -> Path:
    """Write ``out_dir/checkpoints/iter_N`` (the committee after surgery) and ``out_dir/config.yaml``."""
    src = open_source(source)
    cfg, N, it0 = src.cfg, src.cfg.expert.num, src.manifest["iteration"]
    if cfg.expert.parts and add:
        raise ConfigError("surgery --add on a committee of several families (expert.parts): which part new experts "
                          "join is not defined; remove only, or raise a part's num in a new run's config")
    out_dir = RunDir(out_dir)
    out_dir.check_writable()
    held = out_dir.run_files()
    if held:
        what = "checkpoints" if "checkpoints" in held else "a run's files"
        raise OutputError(f"--out '{out_dir}' already holds {what} ({', '.join(held)}); surgery writes into a new "
                          "run directory")
    out_dir = out_dir.path
    bad = [g for g in remove if not 0 <= g < N]
    if bad:
        raise CheckpointError(f"--remove names experts {bad}, but the committee has experts 0..{N - 1}")
    drop = set(remove)
    wins = None
    if remove_inactive:
        wins = committee_wins(src, probe or cfg.eval.final_examples)
        inactive = [g for g in range(N) if int(wins[g]) == 0]
        log(f"wins on {int(wins.sum())} transformed test digits: {wins.tolist()}; inactive: {inactive or 'none'}")
        drop |= set(inactive)
    kept = [g for g in range(N) if g not in drop]
    new_n = len(kept) + add
    if new_n < 1:
        raise CheckpointError("surgery would leave no expert: remove fewer or --add some")

    new_cfg = copy.deepcopy(cfg)
    new_cfg.expert.num = new_n
    if cfg.expert.parts:  # the kept experts keep their order, so each part stays one run of ids, only shorter
        nums = [sum(part_of(cfg.expert, g) == p for g in kept) for p in range(len(cfg.expert.parts))]
        if 0 in nums:
            raise CheckpointError(f"surgery would leave part {nums.index(0)} of expert.parts without an expert: "
                                  "remove fewer")
        new_cfg.expert.parts = [{**part, "num": n} for part, n in zip(cfg.expert.parts, nums)]
    new_cfg.run.out_dir = str(out_dir)
    new_cfg.resume = "auto"
    if iterations is not None:
        new_cfg.train.iterations = iterations
    if new_cfg.train.iterations <= it0:
        log(f"note: train.iterations={new_cfg.train.iterations} is not beyond the checkpoint's iteration {it0}; "
            "pass --iterations (or train.iterations=...) to train on")

    old, disc, d_opt, _, _ = load_committee(src)
    C = ck.channels_of(src.manifest)
    new = LocalExperts(new_cfg, list(range(new_n)), torch.device("cpu"), C)
    identity_info = None
    if add:
        # Fresh experts come from their own streams (seed, expert id) with a seed of their own, so they
        # do not repeat the initialization of the experts that once had their ids.
        fresh_cfg = copy.deepcopy(new_cfg)
        fresh_cfg.seed = cfg.seed + 1 if seed is None else seed
        fresh = LocalExperts(fresh_cfg, list(range(len(kept), new_n)), torch.device("cpu"), C)
        if identity and cfg.identity_init.enabled and cfg.identity_init.max_steps > 0:
            proto = build_protocol(cfg)
            identity_info = identity_init(fresh, proto.transformed_x, fresh_cfg, torch.device("cpu"))
            log(f"identity init of the {add} new expert(s): steps {identity_info['steps']}")
        for j in range(add):
            new.load_state(len(kept) + j, fresh.state(j))
    # Kept experts last: the bank's BatchNorm counters (num_batches_tracked, one per layer) go on from the run's.
    for j, g in enumerate(kept):
        new.load_state(j, old.state(g))

    state = dict(src.manifest.get("trainer_state") or {})
    state.update({"stable_evals": 0, "last_probe_winners": None})
    # Splits (train.split_every) count wins and name divisions by expert id: ids change here, so the
    # trained-on run starts that bookkeeping afresh (the source's splits stay in its own summary).
    state.pop("split", None)
    record = {"source": str(src.ckpt.resolve()), "source_iteration": it0, "removed": sorted(drop),
              "kept": {str(j): g for j, g in enumerate(kept)}, "added": list(range(len(kept), new_n)),
              "fresh_seed": (cfg.seed + 1 if seed is None else seed) if add else None,
              "wins": wins.tolist() if wins is not None else None, "identity_init": identity_info}
    tmp = ck.begin_checkpoint(out_dir, it0)
    ck.write_experts(tmp, new_cfg, new, it0)
    final = ck.finish_checkpoint(tmp, it0, new_cfg, disc, d_opt, 1, state, [], keep=new_cfg.checkpoint.keep,
                                 extra={"surgery": record, "channels": C})
    config_file = RunDir(out_dir).config_file
    config_file.write_text(dump_yaml(new_cfg))
    log(f"surgery: kept experts {kept} (now 0..{len(kept) - 1}), removed {sorted(drop) or 'none'}, added {add}; "
        f"wrote {final} and {config_file} (expert.num={new_n}, resume=auto). Train on with: "
        f"python launch/train.py --config {config_file}")
    return final


# ----------------------------------------------------------------------------- command line


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated expert ids, got '{text}'") from None


def _cmd_export(args) -> int:
    path = export_expert(args.source, args.out, args.expert, force=args.force)
    print(f"wrote {path}")
    return 0


def _cmd_apply(args) -> int:
    chain = [c for c in args.chain.split(",") if c.strip()] if args.chain else None
    res = apply(args.source, args.inputs, args.out, chain=chain, key=args.key, force=args.force)
    how = f"chain {res['chain']}" if res["mode"] == "chain" else "the committee"
    print(f"restored {res['restored'].shape[0]} inputs with {how}; wrote {args.out}")
    return 0


def _cmd_surgery(args) -> int:
    if not (args.remove or args.remove_inactive or args.add):
        raise CheckpointError("nothing to do: pass --remove-inactive, --remove IDS and/or --add K")
    surgery(args.source, args.out, remove=args.remove or [], remove_inactive=args.remove_inactive, add=args.add,
            iterations=args.iterations, probe=args.probe, seed=args.seed, identity=not args.no_identity_init)
    return 0


def add_subcommands(sub) -> None:
    """Register ``export``, ``apply`` and ``surgery`` on the ``icm-dist`` subparsers."""
    e = sub.add_parser("export", help="write one expert as a standalone safetensors module with its metadata")
    e.add_argument("source", help="a run directory, its checkpoints/ directory, or one checkpoint directory")
    e.add_argument("--expert", required=True, help="expert id (3 or e3) or the mechanism it captured (e.g. invert)")
    e.add_argument("--out", "-o", required=True, help="output .safetensors file")
    e.add_argument("--force", action="store_true", help="replace --out even if icm-dist did not write it")
    e.set_defaults(func=_cmd_export)

    a = sub.add_parser("apply", help="restore PNG images or a tensor file with the committee or a chain of experts")
    a.add_argument("source", help="a run / checkpoint directory, or an exported expert .safetensors file")
    a.add_argument("inputs", help="a folder of .png/.jpg images or a .safetensors file (tensor 'images' [N,C,H,W])")
    a.add_argument("--out", "-o", required=True, help="output folder (PNG input) or .safetensors file")
    a.add_argument("--chain", help="comma-separated experts applied in order: ids, captured mechanism names or "
                                   "exported .safetensors files (default: the committee picks per input)")
    a.add_argument("--key", help="tensor name in a .safetensors input (default: 'images')")
    a.add_argument("--force", action="store_true", help="replace files in --out even if icm-dist did not write them")
    a.set_defaults(func=_cmd_apply)

    s = sub.add_parser("surgery", help="remove / add experts and write a checkpoint that resume= continues from")
    s.add_argument("source", help="a run / checkpoint directory")
    s.add_argument("--out", "-o", required=True, help="new run directory (receives checkpoints/ and config.yaml)")
    s.add_argument("--remove-inactive", action="store_true",
                   help="remove the experts that win no transformed test digit (of --probe)")
    s.add_argument("--remove", type=_ids, help="comma-separated expert ids to remove")
    s.add_argument("--add", type=at_least(0), default=0, help="number of fresh (identity-initialized) experts to add")
    s.add_argument("--iterations", type=at_least(0), help="train.iterations of the new config (to train on)")
    s.add_argument("--probe", type=at_least(1), help="test digits used by --remove-inactive "
                   "(default eval.final_examples)")
    s.add_argument("--seed", type=at_least(0), help="seed of the new experts' initialization "
                   "(default: the run's seed + 1)")
    s.add_argument("--no-identity-init", action="store_true", help="skip identity initialization of new experts")
    s.set_defaults(func=_cmd_surgery)


__all__ = ["export_expert", "apply", "surgery", "open_source", "load_expert", "load_module_file", "add_subcommands"]

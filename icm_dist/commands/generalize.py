"""``icm-dist generalize RUN_DIR``: do the experts' mechanisms carry over to symbols never seen in training?

The paper's section 5 (Figures 7 and 8), measured instead of only shown:

- **Figure 7** ("the experts learn mechanisms that generalize"): every mechanism ``m`` of the run is
  applied to ``n`` out-of-domain symbols (Omniglot when present, otherwise rendered letters and
  symbols, see :mod:`icm_dist.data.symbols`), and every expert ``e`` of the final checkpoint is
  applied to the result. How close ``E_e(m(s))`` comes to the exact inverse, i.e. to the clean
  symbol ``s``, is its MSE to ``s``; doing nothing (``m(s)`` itself) is the baseline. Per mechanism:
  the capturing expert (summary.json), its MSE, the baseline, the best expert and its MSE (so one
  sees that the expert that captured ``m`` on digits is also the one that inverts it on symbols), and
  the fraction of symbols for which the capturing expert beats doing nothing.
- **Figure 8** ("the learned inverse mechanisms can be combined"): ``up_left``, then ``invert``, then
  ``noise`` applied to the symbols, undone by the experts that captured ``noise``, ``invert`` and
  ``up_left``, in that order, with the MSE to the clean symbols after every stage (and to that stage's
  exact target). Skipped, with the reason, when one of them was not captured.

Every MSE is taken over the central crop ``[c:H-c, c:W-c]`` with ``c = SHIFT_PIXELS``: a translation
fills ``c`` rows or columns with zeros and the ink there is lost for good, so even the exact inverse
(shifting back) cannot restore that border; the crop leaves exactly what any inverse could restore.
(Rendered symbols keep a wider empty margin, so for them the crop changes little.)

The measurement core (:func:`measure_generalization`, :func:`measure_composition`) takes plain
callables, so it is tested with exact inverse functions standing in for experts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from ..checkpoint import channels_of  # noqa: E402
from ..data.library import resolve_mechanism, resolve_mechanisms  # noqa: E402
from ..data.mechanisms import SHIFT_PIXELS, Mechanism  # noqa: E402
from ..data.symbols import load_symbols  # noqa: E402
from ..errors import CheckpointError, ConfigError  # noqa: E402
from ..families import size_multiple  # noqa: E402
from ..rundir import RunDir  # noqa: E402
from .args import at_least  # noqa: E402
from .outputs import claim_file, json_is, write_text  # noqa: E402
from .reuse import load_expert, open_source  # noqa: E402

_json_is_ours = json_is(lambda d: isinstance(d, dict) and {"generalization", "composition"} <= set(d))

Fn = Callable[[Tensor], Tensor]

DEFAULT_CHAIN = ("up_left", "invert", "noise")
FIG7_FILE = "generalization.png"
FIG8_FILE = "composition.png"


# ----------------------------------------------------------------------------- core


def _crop(x: Tensor, c: int) -> Tensor:
    return x[..., c:x.shape[-2] - c, c:x.shape[-1] - c] if c else x


def per_example_mse(a_B1HW: Tensor, b_B1HW: Tensor, crop: int = SHIFT_PIXELS) -> Tensor:
    """``[B]``: mean squared difference of each pair of images over the central crop (``crop`` pixels off
    every side)."""
    d = _crop(a_B1HW.float(), crop) - _crop(b_B1HW.float(), crop)
    return d.pow(2).flatten(1).mean(1)


@torch.no_grad()
def run_batched(fn: Fn, x: Tensor, batch: int | None = None) -> Tensor:
    """``fn`` over ``x`` in chunks of ``batch`` examples (all at once when ``batch`` is None)."""
    if batch is None or x.shape[0] <= batch:
        return fn(x)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def _mechanism(name: str, seed: int,
               table: Mapping[str, Mechanism] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Mechanism ``name``: a run's mechanism by its label (``table``), else a registered name."""
    fn = table[name] if table and name in table else resolve_mechanism(name).fn
    return lambda x, ids: fn(x, ids, seed)


@torch.no_grad()
def measure_generalization(
    experts: Sequence[Fn],
    names: Sequence[str],
    symbols_B1HW: Tensor,
    seed: int,
    captured: Mapping[str, int | None] | None = None,
    crop: int = SHIFT_PIXELS,
    batch: int | None = 100,
    table: Mapping[str, Mechanism] | None = None,
) -> dict:
    """Every expert on every mechanism's transform of the symbols, measured against the clean symbols.

    ``experts[e]`` is called on ``[b, 1, H, W]`` batches (of ``batch`` symbols) and returns the same shape;
    mechanism ``names[m]`` is applied with the symbols' indices as example ids (which key the noise) and
    ``seed``. ``captured`` maps a mechanism to the expert that captured it in training (or None).

    Returns a JSON-ready dict: ``mse[m][e]`` = mean over symbols of MSE(E_e(m(s)), s), ``input_mse[m]`` =
    MSE(m(s), s) (doing nothing), and per mechanism the capturing expert, its MSE, the best expert and
    its MSE, whether they coincide, and the fractions of symbols for which the capturing and the best
    expert beat doing nothing. All MSEs on the central crop (see the module docstring).
    """
    B = symbols_B1HW.shape[0]
    if B == 0:
        raise ValueError("need at least one symbol")
    captured = dict(captured or {})
    ids = torch.arange(B)
    s = symbols_B1HW.float()
    out = {"num_symbols": B, "num_experts": len(experts), "mechanisms": list(names), "crop": crop,
           "mse": [], "input_mse": [], "per_mechanism": {}}
    for name in names:
        x = _mechanism(name, seed, table)(s, ids)
        base_B = per_example_mse(x, s, crop)
        mse_NB = torch.stack([per_example_mse(run_batched(e, x, batch), s, crop) for e in experts]) \
            if experts else torch.zeros(0, B)
        mean_N = mse_NB.mean(1)
        row = {"input_mse": float(base_B.mean())}
        best = int(mean_N.argmin()) if len(experts) else None
        row["best_expert"] = best
        row["best_mse"] = float(mean_N[best]) if best is not None else None
        row["best_beats_input"] = float((mse_NB[best] < base_B).float().mean()) if best is not None else None
        c = captured.get(name)
        row["captured_by"] = c
        if c is not None and 0 <= int(c) < len(experts):
            c = int(c)
            row["captured_mse"] = float(mean_N[c])
            row["captured_is_best"] = c == best
            row["captured_beats_input"] = float((mse_NB[c] < base_B).float().mean())
            row["captured_error_reduction"] = 1.0 - float(mean_N[c]) / max(float(base_B.mean()), 1e-12)
        else:
            row.update(captured_mse=None, captured_is_best=None, captured_beats_input=None,
                       captured_error_reduction=None)
        out["per_mechanism"][name] = row
        out["mse"].append([float(v) for v in mean_N])
        out["input_mse"].append(row["input_mse"])
    return out


@torch.no_grad()
def measure_composition(
    chain: Sequence[str],
    undo: Sequence[Fn],
    symbols_B1HW: Tensor,
    seed: int,
    crop: int = SHIFT_PIXELS,
    batch: int | None = 100,
    labels: Sequence[str] | None = None,
    keep: int = 8,
    table: Mapping[str, Mechanism] | None = None,
) -> tuple[dict, list[Tensor]]:
    """Apply the mechanisms ``chain`` in order to the symbols, then the callables ``undo`` in order (the
    inverse of ``chain[-1]`` first), measuring after each stage.

    Returns (numbers, images): ``stages`` lists, for the input and after each ``undo`` step, the MSE to
    the clean symbols and the MSE to that stage's exact target (the symbols with only the not yet undone
    mechanisms applied); ``images`` are the first ``keep`` symbols at every stage, then the clean ones.
    """
    if len(undo) != len(chain):
        raise ValueError(f"need one inverse per mechanism: {len(chain)} mechanisms, {len(undo)} inverses")
    B = symbols_B1HW.shape[0]
    ids = torch.arange(B)
    s = symbols_B1HW.float()
    partial = [s]  # partial[k]: the first k mechanisms applied
    for name in chain:
        partial.append(_mechanism(name, seed, table)(partial[-1], ids))
    labels = list(labels) if labels is not None else [f"inverse of {n}" for n in reversed(chain)]
    x = partial[-1]
    stages = [{"stage": "input (" + " then ".join(chain) + ")", "mse": float(per_example_mse(x, s, crop).mean()),
               "target_mse": 0.0}]
    images = [x[:keep]]
    for k, fn in enumerate(undo):
        x = run_batched(fn, x, batch)
        target = partial[len(chain) - 1 - k]
        stages.append({"stage": labels[k], "mse": float(per_example_mse(x, s, crop).mean()),
                       "target_mse": float(per_example_mse(x, target, crop).mean())})
        images.append(x[:keep])
    images.append(s[:keep])
    out = {"chain": list(chain), "stages": stages, "input_mse": stages[0]["mse"], "final_mse": stages[-1]["mse"],
           "final_beats_input": float((per_example_mse(x, s, crop) < per_example_mse(partial[-1], s, crop))
                                      .float().mean()),
           "num_symbols": B, "crop": crop}
    return out, images


# ----------------------------------------------------------------------------- experts of a run


def expert_fn(expert: torch.nn.Module) -> Fn:
    """An expert as a callable on any image size: sizes not divisible by what its family needs (46 with
    conv's pool 2, or unet's two levels) are padded by edge replication and cropped back, which only
    touches the outermost pixel rows."""
    m = size_multiple(expert)

    def fn(x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        ph, pw = (-H) % m, (-W) % m
        if not (ph or pw):
            return expert(x)
        y = expert(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate"))
        return y[..., ph // 2:ph // 2 + H, pw // 2:pw // 2 + W]

    return fn


def load_run(run_dir: str | Path):
    """(source, experts): the run's final checkpoint with its config and summary, and every expert as its
    family's standalone module in eval mode."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"run directory '{run}' does not exist")
    if not (run.checkpoints / "latest").is_file():
        raise CheckpointError(f"'{run}' has no checkpoints/latest: not an icm-dist run directory, or a run that "
                              f"has not saved a checkpoint yet")
    src = open_source(run.path)
    experts = [load_expert(src, g) for g in range(src.manifest["num_experts"])]
    return src, experts


# ----------------------------------------------------------------------------- figures


def _tile(ax, img: Tensor, frame: str | None = None) -> None:
    ax.imshow(img.float().squeeze().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_visible(frame is not None)
        if frame is not None:
            sp.set_color(frame)
            sp.set_linewidth(2.5)


@torch.no_grad()
def generalization_png(experts: Sequence[Fn], names: Sequence[str], symbols_B1HW: Tensor, seed: int,
                       result: dict, path: Path, table: Mapping[str, Mechanism] | None = None) -> Path:
    """Figure 7: a column per mechanism (a different symbol each, transformed, on top), a row per expert
    (the capturing experts first, so they form the diagonal), the clean symbol at the bottom. The
    capturing expert's tile is framed red, the best expert's (when it is another) orange."""
    M, N, B = len(names), len(experts), symbols_B1HW.shape[0]
    per = result["per_mechanism"]
    order = []
    for n in names:
        c = per[n]["captured_by"]
        if c is not None and c not in order and 0 <= c < N:
            order.append(c)
    order += [e for e in range(N) if e not in order]
    fig, axes = plt.subplots(N + 2, M, figsize=(0.3 + 0.95 * M, 0.95 * (N + 2)), squeeze=False)
    for m, name in enumerate(names):
        k = m % B
        s = symbols_B1HW[k:k + 1].float()
        x = _mechanism(name, seed, table)(s, torch.tensor([k]))
        _tile(axes[0, m], x)
        axes[0, m].set_title(f"{name}\nin {per[name]['input_mse']:.3f}", fontsize=7)
        for r, e in enumerate(order, start=1):
            y = experts[e](x)
            c, b = per[name]["captured_by"], per[name]["best_expert"]
            _tile(axes[r, m], y, "red" if e == c else ("orange" if e == b else None))
            axes[r, m].set_xlabel(f"{result['mse'][m][e]:.3f}", fontsize=6, labelpad=1)
            if m == 0:
                axes[r, m].set_ylabel(f"E{e}", fontsize=7)
        _tile(axes[N + 1, m], s)
    axes[0, 0].set_ylabel("input", fontsize=7)
    axes[N + 1, 0].set_ylabel("clean", fontsize=7)
    fig.suptitle("experts on unseen symbols\nMSE to the clean symbol under each tile\nred: captured, "
                 "orange: best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def composition_png(images: Sequence[Tensor], row_labels: Sequence[str], path: Path) -> Path:
    """Figure 8: a row per stage (input, after each expert, ground truth), a column per symbol."""
    R, K = len(images), images[0].shape[0]
    fig, axes = plt.subplots(R, K, figsize=(1.6 + 0.8 * K, 0.85 * R), squeeze=False)
    for r in range(R):
        for k in range(K):
            _tile(axes[r, k], images[r][k])
        axes[r, 0].set_ylabel(row_labels[r], fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("combining inverse mechanisms on unseen symbols", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the command


def generalize(run_dir: str | Path, n: int = 200, out: str | Path | None = None,
               chain: Sequence[str] = DEFAULT_CHAIN, source: str = "auto", symbols_root: str | None = None,
               symbol_seed: int = 0, batch: int = 100, log=print, force: bool = False) -> dict:
    """Figures 7 and 8 for a finished run: numbers to ``out`` (default RUN_DIR/generalization.json; a file
    elsewhere that icm-dist did not write is replaced only with ``force``), figures to RUN_DIR/figures/.
    Returns the numbers."""
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if out is not None:
        claim_file(out, _json_is_ours, force)
    run = RunDir(run_dir)
    src, modules = load_run(run.path)
    if channels_of(src.manifest) != 1:
        raise ConfigError(f"run '{run}' was trained on colour images; the symbols of Figures 7 and 8 are grey")
    table = {r.label: r.fn for r in resolve_mechanisms(src.cfg.data.mechanisms)}
    for name in chain:
        if name not in table:
            resolve_mechanism(name)  # an unknown name is a ConfigError listing the known ones
    experts = [expert_fn(e) for e in modules]
    names, seed = src.names, int(src.cfg.seed)
    sym = load_symbols(symbols_root, n=n, source=source, seed=symbol_seed)
    captured = dict(src.summary.get("captured") or {}) if src.summary else {}
    notes = []
    if src.summary is None:
        notes.append(f"no summary.json describing iteration {src.manifest['iteration']}: which expert captured "
                     f"which mechanism is unknown")
    result = {
        "run_dir": str(run), "checkpoint": str(src.ckpt), "iteration": src.manifest["iteration"],
        "seed": seed, "symbols": {"source": sym.source, "n": n, "seed": symbol_seed, "size": sym.images.shape[-1],
                                  "examples": sym.labels[:10]},
        "captured": {nm: captured.get(nm) for nm in names}, "notes": notes,
    }
    result["generalization"] = measure_generalization(experts, names, sym.images, seed, captured, batch=batch,
                                                      table=table)
    figs = run.figures
    figs.mkdir(parents=True, exist_ok=True)
    result["figures"] = {"generalization": str(generalization_png(
        experts, names, sym.images, seed, result["generalization"], figs / FIG7_FILE, table))}
    undo = _undo_experts(src.summary, names, captured, chain)
    result["composition"], result["figures"]["composition"] = _composition(
        chain, undo, names, experts, sym.images, seed, batch, figs / FIG8_FILE, table)
    path = run.write_generalization(result) if out is None else \
        write_text(Path(out), json.dumps(result, indent=1) + "\n")
    result["json"] = str(path)
    _report(result, log)
    return result


def _undo_experts(summary: dict | None, names: Sequence[str], captured: Mapping[str, int | None],
                  chain: Sequence[str]) -> dict[str, tuple[int, str]]:
    """The expert that undoes each mechanism of the chain, with a note for the label: its captor, else its
    top winner. Mechanisms with neither are left out."""
    # A mechanism that was not captured (say, split between two experts) is undone by its top winner on
    # the test digits, as a user would pick it from the win matrix; the result records which was used.
    top = {}
    if summary and summary.get("win_matrix"):
        wm = summary["win_matrix"]
        top = {nm: max(range(len(wm[m])), key=lambda e: wm[m][e]) for m, nm in enumerate(names) if any(wm[m])}
    return {nm: (int(captured[nm]), "") if captured.get(nm) is not None else (top[nm], ", top winner, not captured")
            for nm in chain if captured.get(nm) is not None or nm in top}


def _composition(chain: Sequence[str], undo: dict[str, tuple[int, str]], names: Sequence[str],
                 experts: Sequence[Fn], symbols_B1HW: Tensor, seed: int, batch: int,
                 png: Path, table: Mapping[str, Mechanism] | None = None) -> tuple[dict, str | None]:
    """Figure 8: (numbers, figure path), or the reason it was skipped and None when a mechanism of the
    chain has no expert to undo it."""
    missing = [nm for nm in chain if nm not in undo]
    if missing:
        why = ", ".join(f"'{nm}' " + ("is not a mechanism of this run" if nm not in names else "was not captured")
                        for nm in missing)
        return {"chain": list(chain), "skipped": f"{why}; no expert to undo it"}, None
    undo_ids = [undo[nm][0] for nm in reversed(chain)]
    labels = [f"E{undo[nm][0]} ({nm}{undo[nm][1]})" for nm in reversed(chain)]
    comp, images = measure_composition(chain, [experts[g] for g in undo_ids], symbols_B1HW, seed,
                                       batch=batch, labels=labels, table=table)
    comp["experts"] = undo_ids
    rows = ["input"] + [f"after {lb}" for lb in labels] + ["ground truth"]
    return comp, str(composition_png(images, rows, png))


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def _report(result: dict, log) -> None:
    g = result["generalization"]
    log(f"{g['num_symbols']} {result['symbols']['source']} symbols, {g['num_experts']} experts, "
        f"checkpoint iteration {result['iteration']}; MSE to the clean symbol on the central crop")
    log(f"{'mechanism':<12} {'input':>8} {'captured':>9} {'mse':>8} {'beats in':>8} {'best':>5} {'mse':>8}")
    for name, r in g["per_mechanism"].items():
        c = "-" if r["captured_by"] is None else f"E{r['captured_by']}"
        log(f"{name:<12} {r['input_mse']:>8.4f} {c:>9} {_fmt(r['captured_mse']):>8} "
            f"{_fmt(r['captured_beats_input'], '.2f'):>8} {'E' + str(r['best_expert']):>5} {r['best_mse']:>8.4f}")
    comp = result["composition"]
    if "skipped" in comp:
        log(f"composition {' -> '.join(comp['chain'])}: skipped ({comp['skipped']})")
    else:
        log(f"composition {' -> '.join(comp['chain'])}: " + ", ".join(
            f"{st['stage']} {st['mse']:.4f}" for st in comp["stages"]))
    for note in result["notes"]:
        log(f"note: {note}")
    log(f"wrote {result['json']} and {', '.join(p for p in result['figures'].values() if p)}")


def _run(args) -> int:
    chain = tuple(c.strip() for c in args.chain.split(",") if c.strip())
    generalize(args.run_dir, n=args.n, out=args.out, chain=chain, source=args.source,
               symbols_root=args.symbols_root, symbol_seed=args.symbol_seed, batch=args.batch, force=args.force,
               log=lambda m: print(m, flush=True, file=sys.stdout))
    return 0


def add_parser(sub) -> None:
    """Register ``icm-dist generalize`` on the CLI's subparsers."""
    p = sub.add_parser(
        "generalize", help="the paper's Figures 7 and 8: experts on unseen symbols, alone and combined",
        description="Apply every mechanism of a finished run to out-of-domain symbols (Omniglot when present "
                    "under --symbols-root, otherwise letters and symbols rendered from matplotlib's DejaVu "
                    "fonts) and every expert of its final checkpoint to the result; report how close each "
                    "comes to the clean symbol, against doing nothing; then undo a chain of mechanisms with "
                    "the experts that captured them. Writes RUN_DIR/generalization.json and "
                    "RUN_DIR/figures/{generalization,composition}.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's run.out_dir")
    p.add_argument("--n", type=at_least(1), default=200, help="number of symbols (default: %(default)s)")
    p.add_argument("--out", "-o", help="JSON with all numbers (default: RUN_DIR/generalization.json)")
    p.add_argument("--force", action="store_true", help="replace --out even if icm-dist did not write it")
    p.add_argument("--chain", default=",".join(DEFAULT_CHAIN),
                   help="mechanisms applied in this order for Figure 8, undone in reverse (default: %(default)s)")
    p.add_argument("--source", choices=("auto", "omniglot", "fonts"), default="auto",
                   help="symbols: Omniglot, rendered fonts, or Omniglot when present (default: %(default)s)")
    p.add_argument("--symbols-root", help="directory holding omniglot-py/images_background (torchvision's layout)")
    p.add_argument("--symbol-seed", type=at_least(0), default=0, help="which symbols (default: %(default)s)")
    p.add_argument("--batch", type=at_least(1), default=100, help="symbols per expert call (default: %(default)s)")
    p.set_defaults(func=_run)

"""The paper's figures as PNG files, drawn from a run's metrics and final evaluation (rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def share_label(v: float) -> str:
    """A share in [0, 1] as a cell label: ``.37``, and ``1`` for a share that rounds to 1 (not ``.00``)."""
    text = f"{v:.2f}"
    return "1" if text == "1.00" else text[1:]


def win_matrix_png(wm_MN: torch.Tensor, names: list[str], path: Path, title: str = "") -> Path:
    """Figure 5: the fraction of each mechanism's test examples won by each expert.

    The canvas grows with the longest label and the committee, and the file is cropped to what was drawn
    (``bbox_inches="tight"``), so long labels and many experts stay whole."""
    M, N = wm_MN.shape
    label_in = 0.07 * max((len(n) for n in names), default=0)
    fig, ax = plt.subplots(figsize=(1.6 + label_in + 0.45 * N, 1.2 + 0.4 * M), layout="constrained")
    im = ax.imshow(wm_MN.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(N), [str(e) for e in range(N)], fontsize=7 if N <= 30 else 5)
    ax.set_yticks(range(M), names, fontsize=8 if M <= 30 else 6)
    ax.set_xlabel("expert")
    for m in range(M):
        for e in range(N):
            v = float(wm_MN[m, e])
            if v >= 0.05:
                ax.text(e, m, share_label(v), ha="center", va="center", fontsize=6,
                        color="black" if v > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title or "share of each mechanism won by each expert", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def image_array(x_CHW: torch.Tensor):
    """An image as matplotlib draws it: [H, W] for grey (with cmap gray), [H, W, 3] for colour."""
    x = x_CHW.float().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def samples_png(inputs_BCHW: torch.Tensor, outputs_BCHW: torch.Tensor, winners_B: torch.Tensor, path: Path,
                n: int = 16) -> Path:
    """Figure 3: transformed inputs (top) and the winning experts' outputs (bottom), grey or in colour."""
    n = min(n, inputs_BCHW.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(n * 0.8, 1.9))
    for i in range(n):
        for row, img in enumerate((inputs_BCHW[i], outputs_BCHW[i])):
            ax = axes[row, i] if n > 1 else axes[row]
            ax.imshow(image_array(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        (axes[1, i] if n > 1 else axes[1]).set_xlabel(f"E{int(winners_B[i])}", fontsize=7)
    fig.suptitle("inputs (top) and winning experts' outputs (bottom)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def scores_png(rows: list[dict], names: list[str], num_experts: int, path: Path) -> Path | None:
    """Figure 4: each expert's mean D score on each mechanism over training."""
    rows = [r for r in rows if any(k.startswith("score/") for k in r)]
    if not rows:
        return None
    its = [r["iteration"] for r in rows]
    cols = min(5, len(names))
    nrows = (len(names) + cols - 1) // cols
    # constrained layout places the shared axis labels (supxlabel, supylabel) beside the tick labels, not on them
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.2 * nrows), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
    for m, name in enumerate(names):
        ax = axes[m // cols][m % cols]
        for e in range(num_experts):
            ys = [r.get(f"score/{name}/e{e}") for r in rows]
            pts = [(i, y) for i, y in zip(its, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], _smooth([p[1] for p in pts], 5), color=cmap(e % 20),
                        lw=1, label=f"E{e}", ls="-" if e < 10 else "--")
        ax.set_title(name if len(name) <= 28 else name[:27] + "…", fontsize=9)
        ax.set_ylim(0, 1)
    for k in range(len(names), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=5, ncol=2)
    fig.supxlabel("iteration")
    fig.supylabel("mean D score")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_png(rows: list[dict], path: Path) -> Path | None:
    """Figure 6: classifier accuracy on transformed, restored and original test digits over training."""
    rows = [r for r in rows if "eval/accuracy/restored" in r]
    if not rows:
        return None
    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(its, [r["eval/accuracy/restored"] for r in rows], "o-", label="restored (winners' outputs)")
    ax.axhline(rows[-1]["eval/accuracy/transformed"], ls="--", color="gray", label="transformed")
    ax.axhline(rows[-1]["eval/accuracy/original"], ls="--", color="black", label="original")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("iteration")
    ax.set_ylabel("classifier accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def final_pngs(ev: dict, test_x_BCHW: torch.Tensor, names: list[str], num_experts: int, rows: list[dict],
               fig_dir: Path) -> list[Path]:
    """The figures of a finished run: Figures 3, 4, 5 and 6 from the final evaluation and the metrics."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        win_matrix_png(ev["win_matrix"], names, fig_dir / "win_matrix.png"),
        samples_png(test_x_BCHW, ev["restored"], ev["winners"], fig_dir / "samples.png"),
        scores_png(rows, names, num_experts, fig_dir / "scores.png"),
        accuracy_png(rows, fig_dir / "accuracy.png"),
    ]
    return [p for p in paths if p is not None]


def latest_pngs(ev: dict, test_x_BCHW: torch.Tensor, names: list[str], fig_dir: Path, iteration: int) -> dict:
    """The win matrix and samples of a periodic evaluation, by wandb key."""
    return {
        "figures/win_matrix": win_matrix_png(ev["win_matrix"], names, fig_dir / "win_matrix_latest.png",
                                             title=f"iteration {iteration}"),
        "figures/samples": samples_png(test_x_BCHW, ev["restored"], ev["winners"], fig_dir / "samples_latest.png"),
    }

"""The paper's figures as PNG files, drawn from a run's metrics and final evaluation (rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def win_matrix_png(wm_MN: torch.Tensor, names: list[str], path: Path, title: str = "") -> Path:
    """Figure 5: the fraction of each mechanism's test digits won by each expert."""
    M, N = wm_MN.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * N, 1.0 + 0.4 * M))
    im = ax.imshow(wm_MN.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(N))
    ax.set_yticks(range(M), names)
    ax.set_xlabel("expert")
    for m in range(M):
        for e in range(N):
            v = float(wm_MN[m, e])
            if v >= 0.05:
                ax.text(e, m, f"{v:.2f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title or "share of each mechanism won by each expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_png(inputs_B1HW: torch.Tensor, outputs_B1HW: torch.Tensor, winners_B: torch.Tensor, path: Path,
                n: int = 16) -> Path:
    """Figure 3: transformed inputs (top) and the winning experts' outputs (bottom)."""
    n = min(n, inputs_B1HW.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(n * 0.8, 1.9))
    for i in range(n):
        for row, img in enumerate((inputs_B1HW[i, 0], outputs_B1HW[i, 0])):
            ax = axes[row, i] if n > 1 else axes[row]
            ax.imshow(img.float().numpy(), cmap="gray", vmin=0, vmax=1)
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
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.2 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
    for m, name in enumerate(names):
        ax = axes[m // cols][m % cols]
        for e in range(num_experts):
            ys = [r.get(f"score/{name}/e{e}") for r in rows]
            pts = [(i, y) for i, y in zip(its, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], _smooth([p[1] for p in pts], 5), color=cmap(e % 20),
                        lw=1, label=f"E{e}", ls="-" if e < 10 else "--")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
    for k in range(len(names), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=5, ncol=2)
    fig.supxlabel("iteration")
    fig.supylabel("mean D score")
    fig.tight_layout()
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


def final_pngs(ev: dict, test_x_B1HW: torch.Tensor, names: list[str], num_experts: int, rows: list[dict],
               fig_dir: Path) -> list[Path]:
    """The figures of a finished run: Figures 3, 4, 5 and 6 from the final evaluation and the metrics."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        win_matrix_png(ev["win_matrix"], names, fig_dir / "win_matrix.png"),
        samples_png(test_x_B1HW, ev["restored"], ev["winners"], fig_dir / "samples.png"),
        scores_png(rows, names, num_experts, fig_dir / "scores.png"),
        accuracy_png(rows, fig_dir / "accuracy.png"),
    ]
    return [p for p in paths if p is not None]


def latest_pngs(ev: dict, test_x_B1HW: torch.Tensor, names: list[str], fig_dir: Path, iteration: int) -> dict:
    """The win matrix and samples of a periodic evaluation, by wandb key."""
    return {
        "figures/win_matrix": win_matrix_png(ev["win_matrix"], names, fig_dir / "win_matrix_latest.png",
                                             title=f"iteration {iteration}"),
        "figures/samples": samples_png(test_x_B1HW, ev["restored"], ev["winners"], fig_dir / "samples_latest.png"),
    }

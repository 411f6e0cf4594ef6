"""Evaluation on the transformed test split: classifier accuracies, PSNR, the win matrix, specialization.

With sharded experts, each rank runs its own experts on the test digits; the D scores are
all-gathered (so every rank knows every winner) and the winners' outputs are assembled by an
all-reduce of masked outputs (each example's output is non-zero on exactly one rank). Only rank 0
holds the classifier and computes accuracies.

Two measures of restoration: the classifier's accuracy on the winners' outputs (the paper's, for data with
labels), and one that needs no labels and no classifier: the PSNR of the winners' outputs against the clean
test images, beside the PSNR of the transformed inputs (what doing nothing gets).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import Config
from .dist import Dist, ShardPlan
from .experts import LocalExperts
from .models import Classifier
from .precision import autocast
from .protocol import Protocol
from .rng import generator, seeded
from .routing import settle_winners

# ----------------------------------------------------------------------------- classifier


def _classifier_path(cfg: Config, proto: Protocol) -> Path:
    # Keyed by everything it learns from (the whole canonical half, its labels, the classes) and the recipe.
    h = hashlib.sha256()
    h.update(proto.classifier_x.numpy().tobytes())
    h.update(proto.classifier_labels.numpy().tobytes())
    h.update(f"{len(proto.classes)}/{cfg.seed}/{cfg.eval.classifier_epochs}/v3".encode())
    return Path(cfg.data.root) / "classifiers" / f"classifier_{h.hexdigest()[:16]}.safetensors"


def train_classifier(cfg: Config, proto: Protocol, device: torch.device, log=print) -> Classifier:
    """The evaluation classifier, trained on the canonical half (cached as safetensors)."""
    path = _classifier_path(cfg, proto)
    shape = (proto.channels, cfg.data.image_size, len(proto.classes))
    model = Classifier(*shape)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()
    with seeded(cfg.seed, "classifier-init"):
        model = Classifier(*shape)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = proto.classifier_x, proto.classifier_labels
    n, bs = x.shape[0], 128
    steps_per_epoch = max(1, n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3,
                                                total_steps=steps_per_epoch * cfg.eval.classifier_epochs)
    for epoch in range(cfg.eval.classifier_epochs):
        perm = torch.randperm(n, generator=generator(cfg.seed, "classifier-epoch", epoch))
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs] if n >= bs else perm
            # No augmentation: a standard MNIST classifier, as in the paper, so that 4-pixel shifts
            # fool it and the transformed accuracy is comparable with the paper's ~40%.
            xb = x[idx].to(device)
            with autocast(device, cfg.train.precision):
                loss = F.cross_entropy(model(xb).float(), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{cfg.eval.classifier_epochs}: loss {loss.item():.4f}")
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model


@torch.no_grad()
def classify(model: Classifier, x_BCHW: torch.Tensor, device: torch.device, batch: int = 1000) -> torch.Tensor:
    preds = []
    for i in range(0, x_BCHW.shape[0], batch):
        preds.append(model(x_BCHW[i:i + batch].to(device).float()).argmax(1).cpu())
    return torch.cat(preds)


# ----------------------------------------------------------------------------- committee


@torch.no_grad()
def run_committee(experts: LocalExperts, disc_module: torch.nn.Module, x_BCHW: torch.Tensor, plan: ShardPlan,
                  dist: Dist, cfg: Config, keep_outputs: bool = True) -> dict:
    """Score every expert on ``x`` (eval mode), settle winners, assemble the winners' outputs.

    Returns ``scores`` [B, N] (logits), ``winners`` [B], and on rank 0 ``restored`` [B, C, H, W].
    """
    experts.bank.eval()
    disc_module.eval()
    amp = autocast(dist.device, cfg.train.precision)
    E, first = experts.num, plan.starts[dist.rank]
    scores, winners, restored = [], [], []
    for i in range(0, x_BCHW.shape[0], cfg.eval.batch_size):
        xb = x_BCHW[i:i + cfg.eval.batch_size].to(dist.device)
        B, C, H, W = xb.shape
        with amp:
            out = experts.outputs(experts.bank(experts.inputs(xb))).float()  # [B, E, C, H, W]
            logits = disc_module(out.reshape(B * E, C, H, W)).float().view(B, E)
        s = dist.gather_scores(logits, plan)
        w = settle_winners(s)
        if keep_outputs:
            local = w - first
            mine = (local >= 0) & (local < E)
            mixed = torch.zeros(B, C, H, W, device=dist.device)
            rows = torch.nonzero(mine).squeeze(1)
            mixed[rows] = out[rows, local[mine]]
            # Each example's winner lives on exactly one rank: a sum assembles the winners' outputs.
            dist.all_reduce_sum(mixed)
            restored.append(mixed.cpu())
        scores.append(s.cpu())
        winners.append(w.cpu())
    experts.bank.train()
    disc_module.train()
    out = {"scores": torch.cat(scores), "winners": torch.cat(winners)}
    if keep_outputs:
        out["restored"] = torch.cat(restored)
    return out


def win_matrix(winners_B: torch.Tensor, mech_B: torch.Tensor, num_mech: int, num_experts: int) -> torch.Tensor:
    """[M, N]: the fraction of each mechanism's examples won by each expert (Figure 5)."""
    counts = torch.zeros(num_mech, num_experts)
    counts.index_put_((mech_B, winners_B), torch.ones(len(winners_B)), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def mean_scores(scores_BN: torch.Tensor, mech_B: torch.Tensor, num_mech: int) -> torch.Tensor:
    """[M, N]: each expert's mean D score (probability) on each mechanism's examples (Figure 4)."""
    p = torch.sigmoid(scores_BN.float())
    out = torch.zeros(num_mech, p.shape[1])
    cnt = torch.zeros(num_mech, 1)
    out.index_add_(0, mech_B, p)
    cnt.index_add_(0, mech_B, torch.ones(len(mech_B), 1))
    return out / cnt.clamp(min=1)


def psnr(mse: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error, for images in [0, 1]."""
    return round(float(10 * torch.log10(1 / mse.clamp(min=1e-10))), 3)


def psnr_per_mechanism(restored_BCHW, transformed_BCHW, clean_BCHW, mech_B, names: list[str]) -> dict:
    """The label-free measure: PSNR against the clean images of the winners' outputs (``restored``) and of the
    inputs (``transformed``: doing nothing), over all examples (``all``) and per mechanism."""
    def mse_B(x):
        return (x.float() - clean_BCHW.float()).pow(2).flatten(1).mean(1)

    per = {"restored": mse_B(restored_BCHW), "transformed": mse_B(transformed_BCHW)}
    out = {"all": {k: psnr(v.mean()) for k, v in per.items()}}
    for m, name in enumerate(names):
        sel = mech_B == m
        if bool(sel.any()):
            out[name] = {k: psnr(v[sel].mean()) for k, v in per.items()}
    return out


def specialization(wm_MN: torch.Tensor, names: list[str], threshold: float) -> dict:
    """Which expert captured each mechanism.

    A mechanism is captured by expert e when e wins at least ``threshold`` of its examples and e is
    the top winner of no other mechanism (so one expert that wins two mechanisms captures neither).
    """
    M, N = wm_MN.shape
    top = wm_MN.argmax(1)
    captured = {}
    for m, name in enumerate(names):
        e = int(top[m])
        others = [k for k in range(M) if k != m and int(top[k]) == e]
        captured[name] = e if float(wm_MN[m, e]) >= threshold and not others else None
    won_any = (wm_MN.sum(0) > 0).tolist()
    return {
        "captured": captured,
        "mechanisms_captured": sum(v is not None for v in captured.values()),
        "inactive_experts": [e for e in range(N) if not won_any[e]],
    }


def evaluate(experts: LocalExperts, disc_module, proto: Protocol, classifier, plan: ShardPlan, dist: Dist, cfg: Config,
             n: int, fixed: dict | None = None) -> dict | None:
    """Evaluate on the first ``n`` transformed test digits. Returns the metrics on rank 0, None elsewhere.

    ``fixed``: a dict the caller keeps across evaluations with the same classifier; the classifier's
    verdicts on the transformed and original digits, which training cannot change, are cached there
    by ``n`` instead of recomputed at every periodic evaluation.
    """
    n = min(n, proto.test_x.shape[0])
    x, clean = proto.test_x[:n], proto.test_clean[:n]
    mech, labels = proto.test_mech[:n], proto.test_labels[:n]
    res = run_committee(experts, disc_module, x, plan, dist, cfg)
    if not dist.is_main:
        return None
    M, N = len(proto.mechanisms), plan.num_experts
    wm = win_matrix(res["winners"], mech, M, N)
    fixed = {} if fixed is None else fixed
    if n not in fixed:
        fixed[n] = {"transformed": classify(classifier, x, dist.device) == labels,
                    "original": classify(classifier, clean, dist.device) == labels}
    right = {
        "transformed": fixed[n]["transformed"],
        "restored": classify(classifier, res["restored"], dist.device) == labels,
        "original": fixed[n]["original"],
    }
    acc = {k: float(v.float().mean()) for k, v in right.items()}
    # Per mechanism: a mechanism counts as learned when its restored accuracy nears the original's,
    # whichever expert did it (the measure that still means something for a single network).
    per_mech = {name: {k: round(float(v[mech == m].float().mean()), 4) if bool((mech == m).any()) else None
                       for k, v in right.items()} for m, name in enumerate(proto.mechanisms)}
    spec = specialization(wm, proto.mechanisms, cfg.eval.capture_threshold)
    return {
        "examples": n,
        "accuracy": acc,
        "accuracy_per_mechanism": per_mech,
        "psnr": psnr_per_mechanism(res["restored"], x, clean, mech, proto.mechanisms),
        "win_matrix": wm,
        "mean_scores": mean_scores(res["scores"], mech, M),
        "winners": res["winners"],
        "restored": res["restored"],
        **spec,
    }


def eval_metrics(ev: dict) -> dict:
    """The metrics an evaluation adds to the history (and to wandb)."""
    return {
        "eval/accuracy/transformed": ev["accuracy"]["transformed"],
        "eval/accuracy/restored": ev["accuracy"]["restored"],
        "eval/accuracy/original": ev["accuracy"]["original"],
        "eval/mechanisms_captured": ev["mechanisms_captured"],
        "eval/psnr/restored": ev["psnr"]["all"]["restored"],
        "eval/psnr/transformed": ev["psnr"]["all"]["transformed"],
    }

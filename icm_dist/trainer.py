"""The training loop, top to bottom: set-up, identity init, Algorithm 1, evaluation, checkpoints, logging.

The same function runs one process or many: the shard plan gives each rank its block of experts,
and world size 1 is simply one block.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt_lib
from . import figures
from .competition import LocalExperts, competition_step, copy_expert, identity_init
from .config import Config, config_hash, dump_yaml
from .data.protocol import build_protocol
from .data.mnist import load_mnist
from .errors import CheckpointError, TrainingError
from .evaluate import evaluate, train_classifier
from .models import make_discriminator
from .parallel import Dist, ShardPlan, init_distributed, plan_splits
from .rng import sample_indices
from .tracking import make_tracker
from .utils import read_metrics


def _resolve_resume(cfg: Config, d: Dist, log) -> Path | None:
    """Rank 0 picks the checkpoint (verifying it) and tells the others, so all ranks agree."""
    choice, error = None, None
    if d.is_main:
        try:  # resume=auto, a path, or a torchrun restart (which resumes as auto): see checkpoint.resolve_resume
            choice = ckpt_lib.resolve_resume(cfg, log=log)
        except CheckpointError as e:
            error = str(e)
    choice, error = d.broadcast_object((str(choice) if choice else None, error))
    if error:
        raise CheckpointError(error)
    return Path(choice) if choice else None


def _truncate_metrics(path: Path, iteration: int, saved: list | None = None) -> list[dict]:
    """On resume, drop metric rows written after the checkpoint (the resumed run writes them again).
    Resuming into a new run.out_dir starts its metrics.jsonl from the rows the checkpoint carries."""
    if not path.is_file():
        rows = [r for r in (saved if isinstance(saved, list) else []) if isinstance(r, dict)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows
    # read_metrics skips a last line cut short by the crash being resumed from.
    rows = [r for r in read_metrics(path) if r.get("iteration", 0) <= iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def train(cfg: Config) -> dict | None:
    """Run the whole experiment. Returns the summary on rank 0 (None on other ranks)."""
    d = init_distributed(cfg)
    try:
        return _train(cfg, d)
    finally:
        d.close()


def _train(cfg: Config, d: Dist) -> dict | None:
    t_start = time.time()
    log = print if d.is_main else (lambda *a, **k: None)
    plan = ShardPlan(cfg.expert.num, d.world_size)  # more ranks than experts stops here, on every rank
    out = Path(cfg.run.out_dir)
    names = list(cfg.data.mechanisms)
    M, N, B, T = len(names), cfg.expert.num, cfg.train.batch_size, cfg.train.iterations

    # Data: rank 0 may have to build the safetensors cache; the others wait and then read it.
    if d.is_main:
        mnist = load_mnist(cfg.data.root, cfg.data.source)
    d.barrier()
    if not d.is_main:
        mnist = load_mnist(cfg.data.root, cfg.data.source)
    proto = build_protocol(cfg, mnist)
    fake_x = proto.transformed_x.to(d.device)
    real_x = proto.canonical_x.to(d.device)
    fake_mech = proto.transformed_mech

    experts = LocalExperts(cfg, list(plan.block(d.rank)), d.device)
    disc_module = make_discriminator(cfg).to(d.device)
    if cfg.train.channels_last:
        disc_module = disc_module.to(memory_format=torch.channels_last)
    d_opt = torch.optim.Adam(disc_module.parameters(), lr=cfg.train.lr_discriminator, betas=tuple(cfg.train.betas),
                             eps=cfg.train.eps)
    disc = d.wrap_discriminator(disc_module)

    resume_from = _resolve_resume(cfg, d, log)
    start, state = 0, {"stable_evals": 0, "last_probe_winners": None, "identity": None}
    if resume_from is not None:
        manifest = ckpt_lib.load_into(resume_from, cfg, experts, disc_module, d_opt)
        start, state = manifest["iteration"], manifest["trainer_state"]

    rows: list[dict] = []
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        rows = _truncate_metrics(out / "metrics.jsonl", start, manifest.get("metrics")) if resume_from else []
        log(f"icm-dist: launcher {d.launcher}, world size {d.world_size}, experts per rank {plan.sizes}, device {d.device}, "
            f"config {config_hash(cfg)}, out_dir {out}")
    tracker = make_tracker(cfg, d.is_main, resume=resume_from is not None)
    classifier = train_classifier(cfg, proto, d.device, log=log) if d.is_main else None
    fixed_verdicts: dict = {}  # the classifier on the transformed and original probe digits, computed once

    try:
        if resume_from is None and cfg.identity_init.enabled and cfg.identity_init.max_steps > 0:
            t0 = time.time()

            def on_id_step(step, mse_E):
                if (step + 1) % max(1, cfg.identity_init.max_steps // 25) == 0:  # ~25 points of progress
                    # Rank 0 reports its own experts' progress; the final numbers cover all ranks.
                    tracker.log({"identity/step": step + 1,
                                 **{f"identity/mse/e{g}": float(v) for g, v in zip(experts.ids, mse_E)}}, 0)

            st = identity_init(experts, fake_x, cfg, d.device, on_step=on_id_step)
            gathered = d.all_gather_object(st)
            steps = [s for g in gathered for s in g["steps"]]
            mses = [m for g in gathered for m in g["mse"]]
            state["identity"] = {"steps": steps, "mse": mses, "seconds": time.time() - t0}
            log(f"identity init: {time.time() - t0:.1f}s, steps per expert {steps}")
            tracker.log({"identity/seconds": time.time() - t0, "identity/max_steps_used": max(steps),
                         **{f"identity/final_mse/e{e}": m for e, m in enumerate(mses)}}, 0)

        progress = None
        if d.is_main and cfg.run.progress:
            from tqdm import tqdm

            progress = tqdm(total=T, initial=start, desc="train", dynamic_ncols=True)
        win_counts = torch.zeros(N)
        # Splits (train.split_every): the wins since the last check, the divisions under way and a log of
        # every split. Kept in the trainer state so that a resumed run splits exactly as an unbroken one.
        split = state.setdefault("split", {"wins": [0] * N, "active": [], "log": []})
        # The premise of a split (an idle expert means another holds two mechanisms) needs N <= M: with
        # more experts than mechanisms idle experts are expected, and a split would only halve a mechanism.
        splitting = cfg.train.split_every > 0 and N <= M
        if cfg.train.split_every and not splitting:
            log(f"splits off: {N} experts for {M} mechanisms (with more experts than mechanisms, idle experts "
                "are expected)")
        score_sum = torch.zeros(M, N)
        score_cnt = torch.zeros(M, 1)
        t_window, steps_window = time.time(), 0
        stopped_early = False
        last_acc = None
        t = start
        for t in range(start, T):
            idx_fake = sample_indices(fake_x.shape[0], B, cfg.seed, "fake-batch", t)
            idx_real = sample_indices(real_x.shape[0], B, cfg.seed, "real-batch", t)
            capacity = None
            if cfg.train.capacity_factor is not None and t < cfg.train.capacity_iterations:
                capacity = math.ceil(cfg.train.capacity_factor * B / N)
            # _split_experts drops a division once its last step is done, so what is left is under way.
            divisions = [(donor, copy) for donor, copy, _ in split["active"]]
            res = competition_step(experts, disc, d_opt, fake_x[idx_fake.to(d.device)], real_x[idx_real.to(d.device)],
                                   plan, d, capacity=capacity, divisions=divisions)
            # The score matrix is identical on every rank, so every rank stops at the same step.
            if not bool(torch.isfinite(res.scores_BN).all()):
                raise TrainingError(f"non-finite discriminator scores at iteration {t + 1} (NaN or inf loss); "
                                    f"metrics and checkpoints written so far in {out} are intact; try a lower "
                                    "learning rate or train.precision=fp32")
            steps_window += 1
            mech_B = fake_mech[idx_fake]
            wins_N = torch.bincount(res.winners_B.cpu(), minlength=N)
            win_counts += wins_N.float()
            it = t + 1
            if splitting:
                _split_experts(cfg, split, wins_N, it, experts, plan, d, log)
            score_sum.index_add_(0, mech_B, torch.sigmoid(res.scores_BN.float().cpu()))
            score_cnt.index_add_(0, mech_B, torch.ones(B, 1))

            if it % cfg.tracking.log_every == 0 or it == T:
                d_loss = d.all_reduce_sum(res.d_loss_local.clone().float()).item()
                e_losses = [x for g in d.all_gather_object(res.expert_loss_E.cpu().tolist()) for x in g]
                elapsed = time.time() - t_window
                metrics = {
                    "d_loss": d_loss,
                    "iter_per_s": steps_window / max(elapsed, 1e-9),
                    "step_ms": 1000 * elapsed / max(steps_window, 1),
                    **{f"expert_loss/e{e}": (None if math.isnan(v) else v) for e, v in enumerate(e_losses)},
                    **{f"win_share/e{e}": float(v) for e, v in enumerate(win_counts / win_counts.sum())},
                }
                if splitting:
                    metrics["splits"] = len(split["log"])
                avg = score_sum / score_cnt.clamp(min=1)
                for m, name in enumerate(names):
                    if score_cnt[m] > 0:
                        metrics.update({f"score/{name}/e{e}": float(avg[m, e]) for e in range(N)})
                if d.is_main:
                    row = {"iteration": it, **metrics}
                    rows.append(row)
                tracker.log(metrics, it)
                win_counts.zero_()
                score_sum.zero_()
                score_cnt.zero_()
                t_window, steps_window = time.time(), 0

            if cfg.eval.every and it % cfg.eval.every == 0 and it != T:
                ev = evaluate(experts, disc_module, proto, classifier, plan, d, cfg, cfg.eval.examples, fixed_verdicts)
                stable = None
                if d.is_main:
                    metrics = _eval_metrics(ev)
                    rows.append({"iteration": it, **metrics})
                    tracker.log(metrics, it)
                    last_acc = ev["accuracy"]["restored"]
                    prev = state["last_probe_winners"]
                    same = prev is not None and prev == ev["winners"].tolist()
                    state["stable_evals"] = state["stable_evals"] + 1 if same else 0
                    state["last_probe_winners"] = ev["winners"].tolist()
                    if cfg.tracking.figures_every and it % cfg.tracking.figures_every == 0:
                        _log_figures(tracker, ev, proto, names, out, it)
                    stable = state["stable_evals"]
                stable = d.broadcast_object(stable)
                if cfg.train.stop_when_stable and stable >= cfg.train.stop_when_stable:
                    log(f"assignments stable for {stable} evaluations: stopping at iteration {it}")
                    stopped_early = True
            if progress is not None:
                progress.update(1)
                if last_acc is not None:
                    progress.set_postfix(restored_acc=f"{last_acc:.3f}", refresh=False)
            if cfg.checkpoint.every and it % cfg.checkpoint.every == 0 and it != T and not stopped_early:
                ckpt_lib.save_checkpoint(out, it, cfg, experts, disc_module, d_opt, d, plan, state,
                                         rows, cfg.checkpoint.keep)
            # TEST HOOK (tests/test_resume_launch.py): on torchrun's first launch, rank ICM_DIST_TEST_KILL_RANK
            # (default 1) SIGKILLs itself after iteration ICM_DIST_TEST_KILL_AT, so the test can watch torchrun
            # restart the group and resume.
            if (os.environ.get("ICM_DIST_TEST_KILL_AT") == str(it) and ckpt_lib.restart_count() == 0
                    and str(d.rank) == os.environ.get("ICM_DIST_TEST_KILL_RANK", "1")):
                print(f"test hook: rank {d.rank} SIGKILLs itself after iteration {it}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if stopped_early:
                break
        if progress is not None:
            progress.close()
        final_it = t + 1 if T > start else start

        # Final evaluation on the full test budget, then the summary, figures and a last checkpoint.
        ev = evaluate(experts, disc_module, proto, classifier, plan, d, cfg, cfg.eval.final_examples)
        ckpt_lib.save_checkpoint(out, final_it, cfg, experts, disc_module, d_opt, d, plan, state,
                                 rows, cfg.checkpoint.keep)
        if not d.is_main:
            return None
        metrics = _eval_metrics(ev)
        rows.append({"iteration": final_it, **metrics})
        tracker.log(metrics, final_it)
        summary = {
            "iterations": final_it,
            "wall_seconds": time.time() - t_start,
            "world_size": d.world_size,
            "num_experts": N,
            "mechanisms": names,
            "seed": cfg.seed,
            "config_hash": config_hash(cfg),
            "eval_examples": ev["examples"],
            "accuracy": ev["accuracy"],
            "accuracy_per_mechanism": ev["accuracy_per_mechanism"],
            "win_matrix": [[round(float(v), 4) for v in r] for r in ev["win_matrix"]],
            "captured": ev["captured"],
            "mechanisms_captured": ev["mechanisms_captured"],
            "inactive_experts": ev["inactive_experts"],
            "stopped_early": stopped_early,
            "identity_init": state.get("identity"),
            "splits": state["split"]["log"],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        paths = _write_figures(ev, proto, names, N, rows, out)
        tracker.log_images({f"figures/{p.stem}": p for p in paths}, final_it)
        _log_win_table(tracker, ev, names, final_it)
        tracker.log_charts(final_it)
        tracker.summary({k: summary[k] for k in ("iterations", "world_size", "accuracy", "mechanisms_captured",
                                                 "captured", "win_matrix", "stopped_early", "wall_seconds")})
        log(f"done: {final_it} iterations in {summary['wall_seconds']:.0f}s; accuracy transformed "
            f"{ev['accuracy']['transformed']:.3f} restored {ev['accuracy']['restored']:.3f} original "
            f"{ev['accuracy']['original']:.3f}; mechanisms captured {ev['mechanisms_captured']}/{M}")
        return summary
    finally:
        tracker.finish()


def _split_experts(cfg: Config, split: dict, wins_N: torch.Tensor, it: int, experts, plan: ShardPlan, d: Dist,
                   log) -> None:
    """train.split_every: count the step's wins; at a check, copy each busy expert into an idle one."""
    split["wins"] = [a + int(b) for a, b in zip(split["wins"], wins_N)]
    split["active"] = [a for a in split["active"] if a[2] > it]
    if it % cfg.train.split_every or it > cfg.train.split_iterations:
        return
    # Winners are identical on every rank, so every rank plans the same splits and joins the same
    # copies in the same order.
    wins, total = split["wins"], max(sum(split["wins"]), 1)
    for donor, idle in plan_splits(wins, cfg.train.split_idle_share, cfg.train.split_donor_share):
        copy_expert(experts, plan, d, donor, idle)
        split["active"].append([donor, idle, it + cfg.train.split_steps])
        split["log"].append({"iteration": it, "donor": donor, "copy": idle, "donor_share": wins[donor] / total,
                             "copy_share": wins[idle] / total})
        log(f"split at iteration {it}: expert {idle} (won {wins[idle] / total:.1%} since the last check) is now "
            f"a copy of expert {donor} (won {wins[donor] / total:.1%})")
    split["wins"] = [0] * len(wins)


def _eval_metrics(ev: dict) -> dict:
    return {
        "eval/accuracy/transformed": ev["accuracy"]["transformed"],
        "eval/accuracy/restored": ev["accuracy"]["restored"],
        "eval/accuracy/original": ev["accuracy"]["original"],
        "eval/mechanisms_captured": ev["mechanisms_captured"],
    }


def _write_figures(ev: dict, proto, names: list[str], N: int, rows: list[dict], out: Path) -> list[Path]:
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    paths = [
        figures.win_matrix_png(ev["win_matrix"], names, fig_dir / "win_matrix.png"),
        figures.samples_png(proto.test_x, ev["restored"], ev["winners"], fig_dir / "samples.png"),
        figures.scores_png(rows, names, N, fig_dir / "scores.png"),
        figures.accuracy_png(rows, fig_dir / "accuracy.png"),
    ]
    return [p for p in paths if p is not None]


def _log_figures(tracker, ev: dict, proto, names: list[str], out: Path, it: int) -> None:
    fig_dir = out / "figures"
    p1 = figures.win_matrix_png(ev["win_matrix"], names, fig_dir / "win_matrix_latest.png", title=f"iteration {it}")
    p2 = figures.samples_png(proto.test_x, ev["restored"], ev["winners"], fig_dir / "samples_latest.png")
    tracker.log_images({"figures/win_matrix": p1, "figures/samples": p2}, it)
    _log_win_table(tracker, ev, names, it)
    tracker.log_charts(it)


def _log_win_table(tracker, ev: dict, names: list[str], it: int) -> None:
    rows = [[names[m]] + [round(float(v), 4) for v in ev["win_matrix"][m]] for m in range(len(names))]
    tracker.log_table("win_matrix_table", ["mechanism"] + [f"e{e}" for e in range(ev["win_matrix"].shape[1])], rows, it)

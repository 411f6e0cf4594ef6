"""The trainer: set-up, identity init, Algorithm 1, evaluation, checkpoints, the summary.

The same object runs one process or many: the shard plan gives each rank its block of experts, and
world size 1 is simply one block. :meth:`Trainer.run` is the whole loop on one screen; each of its
steps is a short method below it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import checkpoint as ckpt_lib
from . import figures
from .competition import batch_indices, build_competition
from .config import Config, config_hash, part_of
from .data.images import load_images
from .dist import Dist, ShardPlan, init_distributed
from .errors import IcmError, TrainingError, on_every_rank
from .evaluate import eval_metrics, evaluate, train_classifier
from .experts import copy_expert
from .identity import identity_init
from .precision import resolve_precision, world_size_promise
from .protocol import build_protocol
from .router import Proposer
from .routing import plan_splits
from .rundir import RunDir
from .step import StepResult, competition_step
from .tracking import make_tracker

# ----------------------------------------------------------------------------- state


@dataclass
class Division:
    """After a split: until iteration ``until``, ``copy`` takes half of what ``donor`` would win."""

    donor: int
    copy: int
    until: int


@dataclass
class SplitState:
    """The splits' bookkeeping: wins since the last check, divisions under way, every split so far."""

    wins: list[int]
    active: list[Division] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)


@dataclass
class TrainerState:
    """What a checkpoint must carry besides tensors for a resumed run to continue exactly."""

    split: SplitState
    stable_evals: int = 0  # evaluations in a row whose probe winners did not change
    last_probe_winners: list[int] | None = None
    identity: dict | None = None  # identity init's steps, final MSE and seconds per expert
    routed_steps: int = 0  # iterations that ran as routed competitions
    routed_passes: float | None = 0.0  # their expert passes, in full competitions' worth (None: not recorded)

    def to_json(self) -> dict:
        out = {"stable_evals": self.stable_evals, "last_probe_winners": self.last_probe_winners,
               "identity": self.identity,
               "split": {"wins": self.split.wins, "active": [[a.donor, a.copy, a.until] for a in self.split.active],
                         "log": self.split.log}}
        if self.routed_steps:  # runs without routing carry no routing fields
            out.update(routed_steps=self.routed_steps, routed_passes=self.routed_passes)
        return out

    @classmethod
    def from_json(cls, d: dict, num_experts: int) -> "TrainerState":
        s = d.get("split") or {"wins": [0] * num_experts, "active": [], "log": []}
        split = SplitState(list(s["wins"]), [Division(*a) for a in s["active"]], list(s["log"]))
        routed = d.get("routed_steps", 0)
        return cls(split, d.get("stable_evals", 0), d.get("last_probe_winners"), d.get("identity"), routed,
                   d.get("routed_passes", None if routed else 0.0))


class MetricWindow:
    """What the training metrics average over: the steps since the last logged iteration."""

    def __init__(self, num_mech: int, num_experts: int):
        self.num_mech, self.num_experts = num_mech, num_experts
        self.reset()

    def reset(self) -> None:
        self.route_loss, self.route_recall, self.routed_k, self.passes = [], [], [], 0.0
        self.win_counts = torch.zeros(self.num_experts)
        self.score_sum = torch.zeros(self.num_mech, self.num_experts)
        self.score_cnt = torch.zeros(self.num_mech, 1)
        self.t0, self.steps = time.time(), 0

    def add(self, res: StepResult, wins_N: torch.Tensor, mech_B: torch.Tensor, full: bool = True) -> None:
        """A step's wins; its scores too when every expert scored every example (not in a routed step)."""
        self.steps += 1
        self.win_counts += wins_N.float()
        if not full:
            return
        self.score_sum.index_add_(0, mech_B, torch.sigmoid(res.scores_BN.float().cpu()))
        self.score_cnt.index_add_(0, mech_B, torch.ones(len(mech_B), 1))

    def add_route(self, learned: tuple[float, float | None] | None, k: int | None, passes: float) -> None:
        """The router after a step: its loss if the step taught it, its recall if it was a full competition, the
        step's k (None: a full competition) and its expert passes in full competitions' worth."""
        self.passes += passes
        if k is not None:
            self.routed_k.append(k)
        if learned is not None:
            self.route_loss.append(learned[0])
            if learned[1] is not None:
                self.route_recall.append(learned[1])

    def metrics(self, names: list[str]) -> dict:
        """Speed, win shares and each expert's mean D score per mechanism; then starts a new window."""
        elapsed = time.time() - self.t0
        N = self.num_experts
        out = {"iter_per_s": self.steps / max(elapsed, 1e-9), "step_ms": 1000 * elapsed / max(self.steps, 1),
               **{f"win_share/e{e}": float(v) for e, v in enumerate(self.win_counts / self.win_counts.sum())}}
        if self.route_loss or self.routed_k:
            out["route/routed_share"] = len(self.routed_k) / max(self.steps, 1)
            out["route/pass_share"] = self.passes / max(self.steps, 1)
        if self.routed_k:
            out["route/k"] = sum(self.routed_k) / len(self.routed_k)
        if self.route_loss:
            out["route/loss"] = sum(self.route_loss) / len(self.route_loss)
        if self.route_recall:
            out["route/recall"] = sum(self.route_recall) / len(self.route_recall)
        avg = self.score_sum / self.score_cnt.clamp(min=1)
        for m, name in enumerate(names):
            if self.score_cnt[m] > 0:
                out.update({f"score/{name}/e{e}": float(avg[m, e]) for e in range(N)})
        self.reset()
        return out


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run on this rank. ``after_iteration`` callbacks get ``(trainer, iteration)``."""

    def __init__(self, cfg: Config, dist: Dist, after_iteration: list[Callable] = ()):
        self.cfg, self.dist, self.after_iteration = cfg, dist, list(after_iteration)
        self.t_start = time.time()
        self.log = print if dist.is_main else (lambda *a, **k: None)
        self.plan = ShardPlan(cfg.expert.num, dist.world_size)  # more ranks than experts stops here, on every rank
        self.run_dir = RunDir(cfg.run.out_dir)
        self.resumed_from, take_over = self._resolve_resume()  # before the data: a refusal costs no loading
        self._setup_data()
        self.names = self.proto.mechanisms  # the mechanisms' labels
        self._setup_models()
        self.start, self.state = 0, TrainerState(SplitState([0] * cfg.expert.num))
        manifest = {}
        if self.resumed_from is not None:
            manifest = ckpt_lib.load_into(self.resumed_from, cfg, self.experts, self.disc_module, self.disc_opt,
                                          router=self.proposer)
            self._on_main(lambda: ckpt_lib.check_data(manifest, self.data_sha256, self.resumed_from))
            self.start = manifest["iteration"]
            self.state = TrainerState.from_json(manifest["trainer_state"], cfg.expert.num)
        metrics_log = None
        if dist.is_main:
            if take_over:  # run.overwrite, and everything that could refuse this run has run
                self.log(f"run.overwrite: deleting the run in {self.run_dir} ({', '.join(take_over)})")
                self.run_dir.clear(take_over)
            self.run_dir.create(cfg)
            metrics_log = self.run_dir.metrics_log(self.start if self.resumed_from else None, manifest.get("metrics"),
                                                   log=self.log)
            promise = world_size_promise(resolve_precision(cfg.train.precision, dist.device), dist.device)
            self.log(f"icm-dist: launcher {dist.launcher}, world size {dist.world_size}, experts per rank "
                     f"{self.plan.sizes}, {promise}, device {dist.device}, config {config_hash(cfg)}, "
                     f"out_dir {self.run_dir}")
        self.tracker = make_tracker(cfg, metrics_log, resume=self.resumed_from is not None)
        self.classifier = train_classifier(cfg, self.proto, dist.device, log=self.log) if dist.is_main else None
        self.fixed_verdicts: dict = {}  # the classifier on the transformed and original probe digits, computed once
        # The premise of a split is that an idle expert means another holds two mechanisms. With more experts
        # than mechanisms, N - M idle experts are expected: only the idle ones beyond those count.
        self.splitting = cfg.train.split_every > 0
        self.spare = max(0, cfg.expert.num - len(self.names))
        if self.splitting and self.spare:
            self.log(f"splits: {cfg.expert.num} experts for {len(self.names)} mechanisms, so {self.spare} idle "
                     "experts are expected and only the idle ones beyond them become copies")

    def _setup_data(self) -> None:
        # Rank 0 may have to build the safetensors cache; the others wait and then read it.
        if self.dist.is_main:
            images = load_images(self.cfg.data)
            self.log(images.describe())
        self.dist.barrier()
        if not self.dist.is_main:
            images = load_images(self.cfg.data)
        self.proto = build_protocol(self.cfg, images)
        self.data_sha256 = images.sha256() if self.dist.is_main else None  # recorded in checkpoints, checked on resume
        self.fake_x = self.proto.transformed_x.to(self.dist.device)
        self.real_x = self.proto.canonical_x.to(self.dist.device)

    def _setup_models(self) -> None:
        cfg, dist = self.cfg, self.dist
        C = self.proto.channels
        comp = build_competition(cfg, dist, self.plan.block(dist.rank), C)
        self.experts, self.disc_module, self.disc_opt, self.disc = (comp.experts, comp.disc_module, comp.disc_opt,
                                                                    comp.disc)
        # The routed competition's router: rank 0 proposes, every rank runs what it proposed.
        self.proposer = Proposer(cfg, C, dist.device) if cfg.train.route_k is not None and dist.is_main else None

    def _resolve_resume(self) -> tuple[Path | None, list[str]]:
        """Rank 0 picks the checkpoint (verifying it) and checks that this run may write into run.out_dir, and
        tells the others, so all ranks agree. Returns the checkpoint and the files of another run to delete
        first (run.overwrite)."""
        # A restart of a multi-node group restarts every node's workers, but torchrun counts it only on the
        # node whose worker failed (the others restart for the new rendezvous and keep their count): the
        # group's restart count is the largest any rank sees.
        self.restarts = max(self.dist.all_gather_object(ckpt_lib.restart_count()))

        def decide():  # resume=auto, a path, or a torchrun restart (which resumes as auto): see resolve_resume
            choice = ckpt_lib.resolve_resume(self.cfg, log=self.log, restarts=self.restarts)
            return (str(choice) if choice else None), self.run_dir.claim(self.cfg, choice, self.restarts > 0)

        choice, take_over = self._on_main(decide)
        return (Path(choice) if choice else None), take_over

    def _on_main(self, fn: Callable):
        """``fn()`` on rank 0, its result on every rank; a user error it raises is raised on every rank."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except IcmError as e:
                error = (type(e), str(e))  # the class travels by name, pickled
        result, error = self.dist.broadcast_object((result, error))
        if error:
            raise on_every_rank(error[0](error[1]))
        return result

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict | None:
        """Train to ``train.iterations`` (or an early stop). Returns the summary on rank 0, None elsewhere."""
        cfg, T = self.cfg, self.cfg.train.iterations
        try:
            if self.resumed_from is None and cfg.identity_init.enabled and cfg.identity_init.max_steps > 0:
                self.identity_init()
            progress = tqdm(total=T, initial=self.start, desc="train", dynamic_ncols=True) \
                if self.dist.is_main and cfg.run.progress else None
            window = MetricWindow(len(self.names), cfg.expert.num)
            it, stop = self.start, False
            for t in range(self.start, T):
                it = t + 1
                res, mech_B, passes = self.step(t)
                routed = passes < 1
                wins_N = torch.bincount(res.winners_B.cpu(), minlength=cfg.expert.num)
                window.add(res, wins_N, mech_B, full=not routed)
                if self.proposer is not None:
                    window.add_route(self.proposer.learn(res.winners_B, res.scores_BN), self.proposer.k, passes)
                if self.splitting:  # routed wins count too: routing runs only while they are the full ones
                    self.split(wins_N, it)
                if it % cfg.tracking.log_every == 0 or it == T:
                    self.log_metrics(res, window, it)
                if cfg.eval.every and it % cfg.eval.every == 0 and it != T:
                    stop = self.evaluate(it, progress)
                if progress is not None:
                    progress.update(1)
                if cfg.checkpoint.every and it % cfg.checkpoint.every == 0 and it != T and not stop:
                    self.checkpoint(it)
                for callback in self.after_iteration:
                    callback(self, it)
                if stop:
                    break
            if progress is not None:
                progress.close()
            return self.finish(it, stopped_early=stop)
        finally:
            self.tracker.finish()

    def step(self, t: int) -> tuple[StepResult, torch.Tensor, float]:
        """Iteration ``t + 1`` of Algorithm 1; returns its result, the mechanism of each fake example, and its
        expert passes in full competitions' worth (below 1: a routed competition)."""
        cfg, B, N = self.cfg, self.cfg.train.batch_size, self.cfg.expert.num
        idx_fake, idx_real = batch_indices(cfg, self.fake_x.shape[0], self.real_x.shape[0], t)
        capacity = None
        if cfg.train.capacity_factor is not None and t < cfg.train.capacity_iterations:
            capacity = math.ceil(cfg.train.capacity_factor * B / N)
        divisions = [(a.donor, a.copy) for a in self.state.split.active]  # split() drops finished ones
        device = self.dist.device
        x_fake = self.fake_x[idx_fake.to(device)]
        candidates, passes = None, 1.0
        if cfg.train.route_k is not None:  # rank 0 decides; all True is a full competition
            mask = (self.proposer.candidates(x_fake, t + 1, divisions) if self.dist.is_main
                    else torch.zeros(B, N, dtype=torch.bool, device=device))
            mask = self.dist.broadcast_mask(mask)
            if not bool(mask.all()):
                candidates, passes = mask, int(mask.sum()) / mask.numel()
                self.state.routed_steps += 1
                if self.state.routed_passes is not None:
                    self.state.routed_passes += passes
        res = competition_step(self.experts, self.disc, self.disc_opt, x_fake, self.real_x[idx_real.to(device)],
                               self.plan, self.dist, capacity=capacity, divisions=divisions,
                               candidates_BN=candidates)
        # The score matrix is identical on every rank, so every rank stops at the same step. In a routed
        # step only the candidates were scored (the others hold -inf).
        scored = res.scores_BN if candidates is None else res.scores_BN[candidates]
        if not bool(torch.isfinite(scored).all()):
            raise TrainingError(f"non-finite discriminator scores at iteration {t + 1} (NaN or inf loss); "
                                f"metrics and checkpoints written so far in {self.run_dir} are intact; try a lower "
                                "learning rate or train.precision=fp32")
        return res, self.proto.transformed_mech[idx_fake], passes

    def identity_init(self) -> None:
        """Approximate identity initialization of this rank's experts; progress and results to the tracker."""
        cfg, t0 = self.cfg, time.time()
        experts, tracker = self.experts, self.tracker
        every = max(1, cfg.identity_init.max_steps // 25)  # ~25 points of progress

        def on_step(step: int, mse_E: torch.Tensor) -> None:
            if (step + 1) % every == 0:  # rank 0 reports its own experts; the final numbers cover all ranks
                tracker.log({"identity/step": step + 1,
                             **{f"identity/mse/e{g}": float(v) for g, v in zip(experts.ids, mse_E)}}, 0)

        st = identity_init(experts, self.fake_x, cfg, self.dist.device, on_step=on_step)
        gathered = self.dist.all_gather_object(st)
        steps = [s for g in gathered for s in g["steps"]]
        mses = [m for g in gathered for m in g["mse"]]
        self.state.identity = {"steps": steps, "mse": mses, "seconds": time.time() - t0}
        self.log(f"identity init: {time.time() - t0:.1f}s, steps per expert {steps}")
        tracker.log({"identity/seconds": time.time() - t0, "identity/max_steps_used": max(steps),
                     **{f"identity/final_mse/e{e}": m for e, m in enumerate(mses)}}, 0)

    def split(self, wins_N: torch.Tensor, it: int) -> None:
        """train.split_every: count the step's wins; at a check, copy each busy expert into an idle one.

        A routed step's wins count as a full one's: the gate lets routing run only while the router's
        candidates hold the full competition's winner (``train.route_min_recall``), and counting only the
        full competitions among them (every ``route_full_every``-th) would leave a check a handful of
        examples per expert, where chance alone makes experts look idle or merged.

        Winners are identical on every rank, so every rank plans the same splits and joins the same
        copies in the same order.
        """
        cfg, split = self.cfg, self.state.split
        split.wins = [a + int(b) for a, b in zip(split.wins, wins_N)]
        split.active = [a for a in split.active if a.until > it]
        if it % cfg.train.split_every or it > cfg.train.split_iterations:
            return
        wins, total = split.wins, max(sum(split.wins), 1)
        merged = None if cfg.train.split_merged_share is None else cfg.train.split_merged_share / len(self.names)
        niches = self.experts.niches() if cfg.train.split_keeps_niches else None
        if niches is not None:  # every rank's, in global id order (the blocks are consecutive)
            niches = [n for block in self.dist.all_gather_object(niches) for n in block]
        kinds = [part_of(cfg.expert, g) for g in range(cfg.expert.num)] if cfg.expert.parts else None
        for donor, idle in plan_splits(wins, cfg.train.split_idle_share, cfg.train.split_donor_share, self.spare,
                                       merged, niches, kinds):
            copy_expert(self.experts, self.plan, self.dist, donor, idle)
            split.active.append(Division(donor, idle, it + cfg.train.split_steps))
            split.log.append({"iteration": it, "donor": donor, "copy": idle, "donor_share": wins[donor] / total,
                              "copy_share": wins[idle] / total})
            self.log(f"split at iteration {it}: expert {idle} (won {wins[idle] / total:.1%} since the last check) is "
                     f"now a copy of expert {donor} (won {wins[donor] / total:.1%})")
        split.wins = [0] * len(wins)

    def log_metrics(self, res: StepResult, window: MetricWindow, it: int) -> None:
        """Losses gathered from every rank, and the window's speed, win shares and scores."""
        disc_loss = self.dist.all_reduce_sum(res.disc_loss_local.clone().float()).item()
        e_losses = [x for g in self.dist.all_gather_object(res.expert_loss_E.cpu().tolist()) for x in g]
        metrics = {"d_loss": disc_loss, **window.metrics(self.names),
                   **{f"expert_loss/e{e}": (None if math.isnan(v) else v) for e, v in enumerate(e_losses)}}
        if self.splitting:
            metrics["splits"] = len(self.state.split.log)
        self.tracker.log(metrics, it)

    def evaluate(self, it: int, progress=None) -> bool:
        """A periodic evaluation on the probe set. Returns whether to stop early (the same on every rank)."""
        cfg = self.cfg
        ev = evaluate(self.experts, self.disc_module, self.proto, self.classifier, self.plan, self.dist, cfg,
                      cfg.eval.examples, self.fixed_verdicts)
        stable = None
        if self.dist.is_main:
            self.tracker.log(self._eval_metrics(ev), it)
            if progress is not None:
                progress.set_postfix(restored_acc=f"{ev['accuracy']['restored']:.3f}", refresh=False)
            same = self.state.last_probe_winners == ev["winners"].tolist()
            self.state.stable_evals = self.state.stable_evals + 1 if same else 0
            self.state.last_probe_winners = ev["winners"].tolist()
            if cfg.tracking.figures_every and it % cfg.tracking.figures_every == 0:
                pngs = figures.latest_pngs(ev, self.proto.test_x, self.names, self.run_dir.figures, it)
                self.tracker.log_images(pngs, it)
                self.tracker.log_win_matrix(ev["win_matrix"], self.names, it)
                self.tracker.log_charts(it)
            stable = self.state.stable_evals
        stable = self.dist.broadcast_object(stable)
        stop = bool(cfg.train.stop_when_stable and stable >= cfg.train.stop_when_stable)
        if stop:
            self.log(f"assignments stable for {stable} evaluations: stopping at iteration {it}")
        return stop

    def _eval_metrics(self, ev: dict) -> dict:
        """An evaluation's metrics, and the router's recall on its test examples (which it never learns from)."""
        out = eval_metrics(ev)
        if self.proposer is not None:
            x = self.proto.test_x[:ev["examples"]].to(self.dist.device)
            out["eval/route_recall"] = self.proposer.heldout_recall(x, ev["winners"])
        return out

    def checkpoint(self, it: int) -> None:
        ckpt_lib.save_checkpoint(self.run_dir.path, it, self.cfg, self.experts, self.disc_module, self.disc_opt,
                                 self.dist, self.state.to_json(), self.tracker.rows, self.cfg.checkpoint.keep,
                                 router=self.proposer, data_sha256=self.data_sha256)

    def finish(self, final_it: int, stopped_early: bool) -> dict | None:
        """The final evaluation on the full test budget, a last checkpoint, then (rank 0) summary and figures."""
        cfg = self.cfg
        ev = evaluate(self.experts, self.disc_module, self.proto, self.classifier, self.plan, self.dist, cfg,
                      cfg.eval.final_examples)
        self.checkpoint(final_it)
        if not self.dist.is_main:
            return None
        self.tracker.log(self._eval_metrics(ev), final_it)
        summary = self._summary(ev, final_it, stopped_early)
        self.run_dir.write_summary(summary)
        paths = figures.final_pngs(ev, self.proto.test_x, self.names, cfg.expert.num, self.tracker.rows,
                                   self.run_dir.figures)
        self.tracker.log_images({f"figures/{p.stem}": p for p in paths}, final_it)
        self.tracker.log_win_matrix(ev["win_matrix"], self.names, final_it)
        self.tracker.log_charts(final_it)
        self.tracker.summary({k: summary[k] for k in ("iterations", "world_size", "accuracy", "psnr",
                                                      "mechanisms_captured", "captured", "win_matrix",
                                                      "stopped_early", "wall_seconds")})
        acc = ev["accuracy"]
        self.log(f"done: {final_it} iterations in {summary['wall_seconds']:.0f}s; accuracy transformed "
                 f"{acc['transformed']:.3f} restored {acc['restored']:.3f} original {acc['original']:.3f}; "
                 f"mechanisms captured {ev['mechanisms_captured']}/{len(self.names)}")
        return summary

    def _summary(self, ev: dict, final_it: int, stopped_early: bool) -> dict:
        return {
            "iterations": final_it,
            "wall_seconds": time.time() - self.t_start,
            "world_size": self.dist.world_size,
            "num_experts": self.cfg.expert.num,
            "mechanisms": self.names,
            "seed": self.cfg.seed,
            "config_hash": config_hash(self.cfg),
            "eval_examples": ev["examples"],
            "accuracy": ev["accuracy"],
            "accuracy_per_mechanism": ev["accuracy_per_mechanism"],
            "psnr": ev["psnr"],
            "data": {"dataset": self.cfg.data.dataset, "channels": self.proto.channels,
                     "image_size": self.cfg.data.image_size, "classes": len(self.proto.classes)},
            "win_matrix": [[round(float(v), 4) for v in r] for r in ev["win_matrix"]],
            "captured": ev["captured"],
            "mechanisms_captured": ev["mechanisms_captured"],
            "inactive_experts": ev["inactive_experts"],
            "stopped_early": stopped_early,
            "identity_init": self.state.identity,
            "splits": self.state.split.log,
            **({"routing": self._routing_summary(final_it)} if self.cfg.train.route_k is not None else {}),
        }

    def _routing_summary(self, final_it: int) -> dict:
        """What routing ran: its k, the routed iterations, the recall, and the run's expert passes as a share
        of a full competition at every iteration (what routing saved)."""
        st, t = self.state, self.cfg.train
        out = {"k": t.route_k, "routed_steps": st.routed_steps, "recall": self.proposer.recall}
        if t.route_k_max is not None:
            out.update(k_max=t.route_k_max, recall_k=dict(zip(self.proposer.ks, self.proposer.recall_K)))
        if st.routed_passes is not None:
            out["pass_share"] = (final_it - st.routed_steps + st.routed_passes) / max(final_it, 1)
        return out


def train(cfg: Config, after_iteration: list[Callable] = ()) -> dict | None:
    """Run the whole experiment. Returns the summary on rank 0 (None on other ranks)."""
    dist = init_distributed(cfg)
    try:
        return Trainer(cfg, dist, after_iteration).run()
    finally:
        dist.close()

"""One step of Algorithm 1 with the experts sharded across ranks, and its plain reference.

The contract (DESIGN.md, "The step"): every rank sees the same global batches; each rank runs its
own experts on all of them; the scores are all-gathered into ``[B, N']`` so every rank knows every
winner; D (replicated, DDP) learns equation (3) from every expert's output; each expert learns only
from the examples it won, through D as it was when the scores were taken; an expert that won
nothing stays bitwise unchanged (weights, BatchNorm buffers, Adam moments and step).

:func:`competition_step` is the fast path (batched experts, one D pass that both scores and trains,
D's backward for the experts only on the winners' outputs). :func:`reference_step` is the slow,
obviously correct path: a loop over ``Expert`` modules, one ``torch.optim.Adam`` each, a dense
backward, a separate D update. Tests hold the two to the same winners and updates.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .models import Expert, ExpertBank
from .parallel import Dist, ShardPlan, divide_wins, real_slice, settle_winners, settle_winners_capped
from .rng import sample_indices


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX), else fp32. Elsewhere bf16 autocast is emulated and slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MaskedAdam:
    """Adam over a bank's stacked parameters, stepping only the experts in a mask.

    ``torch.optim.Adam`` on the stacked tensors would move every expert every step (zero gradient
    still moves the weights through the first moment), so a loser would drift. Here each expert has
    its own step count and the update is written back only where the mask is set, bitwise leaving
    the others alone. The arithmetic follows torch.optim.Adam's single-tensor path.
    """

    def __init__(self, bank: ExpertBank, lr: float, betas, eps: float):
        self.bank, self.lr, self.eps = bank, lr, eps
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.names = [n for n, _ in bank.named_parameters()]
        self.params = [p for _, p in bank.named_parameters()]
        E = bank.num
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step_E = torch.zeros(E, dtype=torch.float32, device=self.params[0].device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, mask_E: torch.Tensor) -> None:
        E = self.bank.num
        if not bool(mask_E.any()):
            return
        self.step_E += mask_E.to(self.step_E.dtype)
        step = self.step_E.double().clamp(min=1)
        bc1 = 1 - self.beta1 ** step
        bc2_sqrt = (1 - self.beta2 ** step).sqrt()
        step_size = (self.lr / bc1).to(self.params[0].dtype)
        bc2_sqrt = bc2_sqrt.to(self.params[0].dtype)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            # Split only the leading dim into [E, ...]: a view under any memory format (channels_last too).
            g = p.grad.unflatten(0, (E, -1))
            pv, mv, vv = p.unflatten(0, (E, -1)), m.unflatten(0, (E, -1)), v.unflatten(0, (E, -1))
            bshape = (E,) + (1,) * (pv.dim() - 1)
            keep = mask_E.view(bshape)
            m_new = mv.lerp(g, 1 - self.beta1)
            v_new = vv.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v_new.sqrt() / bc2_sqrt.view(bshape)).add_(self.eps)
            p_new = pv.addcdiv(m_new * step_size.view(bshape), denom, value=-1.0)
            mv.copy_(torch.where(keep, m_new, mv))
            vv.copy_(torch.where(keep, v_new, vv))
            pv.copy_(torch.where(keep, p_new, pv))

    # -- per-expert state, for checkpoints -------------------------------------------------
    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        E = self.bank.num
        out = {}
        views = self.bank.expert_tensors()
        for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            shape = views[n].shape[1:]
            out[f"{n}.exp_avg"] = m.view(E, *shape)[j].clone()
            out[f"{n}.exp_avg_sq"] = v.view(E, *shape)[j].clone()
        out["step"] = self.step_E[j:j + 1].clone()
        return out

    @torch.no_grad()
    def load_expert_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        E = self.bank.num
        views = self.bank.expert_tensors()
        for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            shape = views[n].shape[1:]
            m.view(E, *shape)[j].copy_(state[f"{n}.exp_avg"])
            v.view(E, *shape)[j].copy_(state[f"{n}.exp_avg_sq"])
        self.step_E[j] = state["step"].reshape(())


class LocalExperts:
    """A rank's block of experts: the bank, its masked Adam, and BatchNorm buffer bookkeeping."""

    def __init__(self, cfg: Config, ids: list[int], device: torch.device):
        self.cfg = cfg
        self.ids = list(ids)
        self.bank = ExpertBank.create(cfg.expert, cfg.seed, self.ids).to(device)
        if cfg.train.channels_last:
            self.bank = self.bank.to(memory_format=torch.channels_last)
        self.opt = self.new_optimizer()
        # The training-mode pass over all experts: the dense step and identity initialization call it
        # with the same [B, E, H, W] shape, so one compiled graph serves both. Evaluation (eval-mode
        # BatchNorm, other batch sizes) and the winners mode (shapes change every step) stay eager.
        # The compiled module shares the bank's parameters and buffers: checkpoints see no difference.
        self.train_forward = torch.compile(self.bank, dynamic=False) if cfg.train.compile else self.bank

    def new_optimizer(self) -> MaskedAdam:
        t = self.cfg.train
        return MaskedAdam(self.bank, t.lr_expert, t.betas, t.eps)

    @property
    def num(self) -> int:
        return len(self.ids)

    def buffers(self) -> list[torch.Tensor]:
        return [b for n, b in self.bank.named_buffers() if not n.endswith("num_batches_tracked")]

    def snapshot_buffers(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.buffers()]

    @torch.no_grad()
    def restore_buffers(self, saved: list[torch.Tensor], restore_E: torch.Tensor) -> None:
        """Put back the running statistics of the experts in ``restore_E`` (the losers of a step)."""
        E = self.num
        for b, s in zip(self.buffers(), saved):
            bv, sv = b.view(E, -1), s.view(E, -1)
            bv.copy_(torch.where(restore_E.view(E, 1), sv, bv))

    def expand_input(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x_B1HW.shape
        x = x_B1HW.expand(B, self.num, H, W)
        if self.cfg.train.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


def _fmt(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x


@dataclass
class StepResult:
    winners_B: torch.Tensor  # global expert id of each example's winner (same on every rank)
    scores_BN: torch.Tensor  # D logits of every expert's output, [B, N'] (same on every rank)
    d_loss_local: torch.Tensor  # this rank's share of equation (3) (the shares sum to the loss)
    expert_loss_E: torch.Tensor  # per local expert: mean -log D over the examples it won (nan if none)
    won_E: torch.Tensor  # examples won by each local expert


def competition_step(experts: LocalExperts, disc, d_opt: torch.optim.Optimizer, x_fake_B1HW: torch.Tensor,
                     x_real_B1HW: torch.Tensor, plan: ShardPlan, d: Dist, capacity: int | None = None,
                     divisions: tuple | list = ()) -> StepResult:
    """One iteration of Algorithm 1 on this rank (the fast path). ``disc`` may be wrapped in DDP.

    ``capacity``: if set, no expert wins more than this many examples of the batch (see
    :func:`settle_winners_capped`); None is the paper's plain argmax. ``divisions``: ``(donor, copy)``
    pairs of global ids that divide the donor's wins after a split (:func:`divide_wins`).
    """
    cfg = experts.cfg
    B, _, H, W = x_fake_B1HW.shape
    E, N = experts.num, plan.num_experts
    first = plan.starts[d.rank]
    disc_module = getattr(disc, "module", disc)
    amp = autocast(d.device, cfg.train.precision)

    saved = experts.snapshot_buffers()
    experts.bank.train()
    # dense: the experts' graph is kept over the whole batch, as in the paper's formulation, where
    #   BatchNorm's batch statistics carry gradient from every example.
    # winners: the full pass needs no graph; each winner later re-runs on just its examples with the
    #   batch statistics of this pass held fixed (same outputs, backward only where a loss exists).
    sparse = cfg.train.expert_backward == "winners"
    stats: list | None = [] if sparse else None
    with amp, torch.set_grad_enabled(not sparse):
        x_BEHW = experts.expand_input(x_fake_B1HW)
        out_BEHW = experts.bank(x_BEHW, collect_stats=stats) if sparse else experts.train_forward(x_BEHW)
    # Example-major rows: row i*E + j is local expert j's output for example i.
    fakes = out_BEHW.detach().float().reshape(B * E, 1, H, W)
    reals = x_real_B1HW[real_slice(B, d.world_size, d.rank)]
    R = reals.shape[0]

    # One D pass both scores the experts and builds D's update: its outputs, taken before D's step,
    # are the scores c_j of Algorithm 1. Going through the DDP wrapper here is what arms its hooks.
    with amp:
        logits = disc(torch.cat([reals, fakes], dim=0)).float()
    real_logits, fake_logits_BE = logits[:R], logits[R:].view(B, E)
    scores_BN = d.gather_scores(fake_logits_BE.detach(), plan)
    winners_B = settle_winners(scores_BN) if capacity is None else settle_winners_capped(scores_BN, capacity)
    # Divisions after the cap: donor and copy each held at most `capacity`, and a division only
    # halves what the two held, so the cap still holds (tests/test_parallel.py checks it).
    for donor, copy in divisions:
        winners_B = divide_wins(winners_B, scores_BN, donor, copy)

    # Equation (3), this rank's share: its slice of the real batch and its experts' fakes. DDP averages
    # gradients over ranks, so the share is scaled by W to make the average the single-process gradient.
    d_loss_local = F.softplus(-real_logits).sum() / B + F.softplus(fake_logits_BE).sum() / (B * N)

    # Experts: each winner maximizes log D on the examples it won, through D before its update. D is
    # called as the plain module (not the DDP wrapper) and backward is restricted to the experts'
    # parameters, so D takes no gradient and DDP's hooks never fire for this pass.
    local_B = winners_B - first
    mine_B = (local_B >= 0) & (local_B < E)
    won_E = torch.bincount(local_B[mine_B], minlength=E)
    expert_loss_E = torch.full((E,), float("nan"), device=d.device)
    experts.opt.zero_grad()
    if bool(mine_B.any()):
        rows = torch.nonzero(mine_B).squeeze(1)
        cols = local_B[mine_B]
        if sparse:
            parts, part_cols = [], []
            for j in torch.unique(cols).tolist():
                sel = rows[cols == j]
                with amp:
                    parts.append(experts.bank.forward_one(j, _fmt(x_fake_B1HW[sel], cfg), stats))
                part_cols.append(torch.full((len(sel),), j, device=d.device, dtype=torch.long))
            won_out, cols = torch.cat(parts), torch.cat(part_cols)
        else:
            won_out = out_BEHW[rows, cols].unsqueeze(1)  # [k, 1, H, W]
        with amp:
            won_logits = disc_module(won_out.float()).float()
        per_example = F.softplus(-won_logits)  # -log sigmoid
        sum_E = torch.zeros(E, device=d.device).index_add(0, cols, per_example)
        mean_E = sum_E / won_E.clamp(min=1)
        mean_E.sum().backward(inputs=list(experts.bank.parameters()))
        expert_loss_E = torch.where(won_E > 0, mean_E.detach(), expert_loss_E)

    d_opt.zero_grad(set_to_none=True)
    (d_loss_local * d.world_size).backward()  # DDP all-reduces D's gradients here
    d_opt.step()

    won_any_E = won_E > 0
    experts.opt.step(won_any_E)
    experts.restore_buffers(saved, ~won_any_E)
    return StepResult(winners_B, scores_BN, d_loss_local.detach(), expert_loss_E, won_E)


@torch.no_grad()
def copy_expert(experts: LocalExperts, plan: ShardPlan, d: Dist, src: int, dst: int) -> None:
    """Make global expert ``dst`` a copy of global expert ``src``: weights, BatchNorm buffers, Adam moments
    and step count. Every rank must call it with the same ids (a collective when the owners differ)."""
    src_rank, dst_rank = plan.owner(src), plan.owner(dst)
    payload = None
    if d.rank == src_rank:
        j = src - plan.starts[src_rank]
        # On the CPU so that the pickled broadcast never carries device tensors (NCCL or not, the
        # receiving rank puts them on its own device when it loads them).
        payload = ({k: v.cpu() for k, v in experts.bank.expert_state(j).items()},
                   {k: v.cpu() for k, v in experts.opt.expert_state(j).items()})
    if src_rank != dst_rank:
        # A broadcast from the owner over the whole group, not a send to one rank: every rank takes part
        # in the same collectives in the same order, which keeps the group's sequence numbers aligned.
        payload = d.broadcast_object(payload, src=src_rank)
    if d.rank == dst_rank:
        j = dst - plan.starts[dst_rank]
        experts.bank.load_expert_state(j, payload[0])
        experts.opt.load_expert_state(j, payload[1])


def identity_init(experts: LocalExperts, data_BCHW: torch.Tensor, cfg: Config, device: torch.device,
                  on_step=None) -> dict:
    """Approximate identity initialization of a rank's experts, all in parallel.

    Expert ``j`` trains on its own batches, keyed by (seed, its global id, step), to reproduce its
    input, until its batch MSE falls below ``identity_init.mse`` or ``max_steps`` pass. An expert that
    is done is frozen (masked), so each expert's result depends only on its id, never on its rank
    neighbours. Uses its own Adam; the competition starts with fresh optimizer state.
    """
    ic = cfg.identity_init
    E = experts.num
    opt = experts.new_optimizer()
    active_E = torch.ones(E, dtype=torch.bool, device=device)
    steps_E = torch.zeros(E, dtype=torch.long)
    last_mse_E = torch.full((E,), float("nan"))
    experts.bank.train()
    amp = autocast(device, cfg.train.precision)
    n = data_BCHW.shape[0]
    for step in range(ic.max_steps):
        idx = torch.stack([sample_indices(n, ic.batch_size, cfg.seed, "identity", gid, step) for gid in experts.ids], 1)
        x_BEHW = data_BCHW[idx.to(data_BCHW.device).view(-1)].view(ic.batch_size, E, *data_BCHW.shape[2:]).to(device)
        if cfg.train.channels_last:
            x_BEHW = x_BEHW.contiguous(memory_format=torch.channels_last)
        saved = experts.snapshot_buffers()
        with amp:
            out = experts.train_forward(x_BEHW)
        mse_E = (out.float() - x_BEHW).pow(2).mean(dim=(0, 2, 3))
        last_mse_E = torch.where(active_E.cpu(), mse_E.detach().cpu(), last_mse_E)
        active_E &= mse_E.detach() >= ic.mse
        if not bool(active_E.any()):
            experts.restore_buffers(saved, torch.ones_like(active_E))
            break
        opt.zero_grad()
        (mse_E * active_E).sum().backward()
        opt.step(active_E)
        experts.restore_buffers(saved, ~active_E)
        steps_E += active_E.cpu().long()
        if on_step is not None:
            on_step(step, last_mse_E)
    experts.opt = experts.new_optimizer()
    return {"steps": steps_E.tolist(), "mse": last_mse_E.tolist()}


# ----------------------------------------------------------------------------- reference path


def _batch_stats_hooks(expert: Expert, store: list):
    """Forward hooks that record each BatchNorm layer's batch mean and (biased) variance."""

    def hook(module, inputs, output):
        var, mean = torch.var_mean(inputs[0].detach(), dim=(0, 2, 3), unbiased=False)
        store.append((mean, var))

    return [m.register_forward_hook(hook) for m in expert.norms]


def _with_batch_stats(expert: Expert, x: torch.Tensor, stats: list) -> torch.Tensor:
    """The expert on ``x`` with each BatchNorm using the given batch statistics as constants.

    Plainly: eval mode, with the running statistics temporarily replaced by the batch statistics
    (eval-mode BatchNorm divides by sqrt(running_var + eps), so the biased batch variance reproduces
    the training-mode normalization), then the running statistics put back.
    """
    # Swap the buffer tensors rather than copying into them: eval-mode batch_norm saves them for
    # backward, so they must not be modified in place afterwards.
    saved = [(n.running_mean, n.running_var) for n in expert.norms]
    for n, (mean, var) in zip(expert.norms, stats):
        n.running_mean, n.running_var = mean.clone(), var.clone()
    expert.eval()
    try:
        return expert(x)
    finally:
        expert.train()
        for n, (mean, var) in zip(expert.norms, saved):
            n.running_mean, n.running_var = mean, var


def reference_step(experts: list[Expert], expert_opts: list[torch.optim.Optimizer], disc: torch.nn.Module,
                   d_opt: torch.optim.Optimizer, x_fake_B1HW: torch.Tensor, x_real_B1HW: torch.Tensor,
                   expert_backward: str = "dense") -> StepResult:
    """Algorithm 1 written plainly, one process, fp32: a loop over experts and a dense backward.

    ``expert_backward="winners"`` trains each winner on a second forward of just its examples with the
    scoring pass's batch statistics held fixed (what the fast path's ``winners`` mode computes).
    """
    N = len(experts)
    saved = [[b.clone() for n, b in e.named_buffers() if not n.endswith("num_batches_tracked")] for e in experts]
    for e in experts:
        e.train()
    stats: list[list] = [[] for _ in experts]
    hooks = [h for e, st in zip(experts, stats) for h in _batch_stats_hooks(e, st)]
    outs = [e(x_fake_B1HW) for e in experts]  # N x [B, 1, H, W], graph kept
    for h in hooks:
        h.remove()
    scores_BN = torch.stack([disc(o) for o in outs], dim=1)  # D logits, graph through D and the experts
    winners_B = settle_winners(scores_BN.detach())

    # Experts: -log D(E_w(x)) for each example and its winner, averaged per expert.
    won_E = torch.bincount(winners_B, minlength=N)
    losses = []
    expert_loss_E = torch.full((N,), float("nan"))
    for j in range(N):
        mask = winners_B == j
        if mask.any():
            if expert_backward == "winners":
                logits = disc(_with_batch_stats(experts[j], x_fake_B1HW[mask], stats[j]))
            else:
                logits = scores_BN[mask, j]
            loss_j = F.softplus(-logits).mean()
            losses.append(loss_j)
            expert_loss_E[j] = loss_j.detach()
    for opt in expert_opts:
        opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()  # through every expert's graph and through D
    for j in range(N):
        if won_E[j] > 0:
            expert_opts[j].step()
        else:  # a loser keeps its running statistics too
            with torch.no_grad():
                bufs = [b for n, b in experts[j].named_buffers() if not n.endswith("num_batches_tracked")]
                for b, s in zip(bufs, saved[j]):
                    b.copy_(s)

    # D: equation (3) on the canonical batch and on every expert's output (losers punished too).
    d_opt.zero_grad(set_to_none=True)
    d_loss = F.softplus(-disc(x_real_B1HW)).mean()
    for o in outs:
        d_loss = d_loss + F.softplus(disc(o.detach())).mean() / N
    d_loss.backward()
    d_opt.step()
    return StepResult(winners_B, scores_BN.detach(), d_loss.detach(), expert_loss_E, won_E)

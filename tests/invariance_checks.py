"""What the step-invariance tests record and the rules they compare by (not a test module).

The tests (``test_distributed.py``: world sizes 1-4; ``test_competition.py``: the fast step against
the plain reference) hold two computations of one step, from the same state, to one another:
winners exactly, and scores, losses and gradients within the tolerances derived below.

Every difference between the two is float32 rounding, almost all of it in another order: DDP's all-reduce adds W
partial gradients where one process adds them all at once, a lone expert runs a plain convolution
where a bank of two or more runs a grouped one (oneDNN picks another kernel: 2e-7 apart in one
forward pass), D runs over batches of other sizes, the fast path runs one D pass over
[reals; fakes] where the reference runs one per expert.

- Losses are means of positive terms (softplus). For a sum of n positive terms any order is within
  (n - 1) u of the sum itself (u = 2**-24, float32's unit roundoff), so two orders are within
  2 n u L of each other; each term moves by at most as much as its logit (softplus is 1-Lipschitz),
  so the logits' tolerance adds to it. Hence ``loss_tol``.
- A score is one image's D logit, computed per image: chains of dot products of at most
  144 (convolutions) and 256 (the first linear layer) terms. Reordering a k-term dot product moves
  it by about sqrt(k) u of the sum of its terms' magnitudes, 16 u for k = 256, per layer; over
  D's 8 layers and the expert's 4 in front of it, with the last layer's terms cancelling (a logit is
  a small difference of large sums), that is up to a few hundred u of the largest score. Measured
  (AVX512 EPYC): 1.1e-6 (18 u) of the step's largest score between world sizes, 3.5e-6 (60 u)
  between the fast path and the reference, whose experts use torch's ELU where the fast path's
  exp-based ELU is exact to 1 u absolute, not relative. SCORE_TOL = 3e-5 (500 u) of the largest score.
- A gradient element is a sum over the batch and the image, n <= 96 * 32 * 32 ~ 1e5 terms for D's
  first convolution (1.6e4 for an expert's). Rounding in another order moves it by about
  sqrt(n) u = 2e-5 of the sum of its terms' magnitudes (rounding errors add like a random walk;
  the worst case, n u, is never approached). That sum is not the gradient: the real and the fake
  examples pull D in opposite directions, and an expert's examples pull its BatchNorm shift both
  ways, so the terms cancel. Measured on this setup (the sum of |terms| of each element's last
  accumulation, from hooks on every layer, over the tensor's largest gradient): up to 400 for D's
  biases, 80 for the experts' parameters. The model then allows 2e-5 * 400 = 8e-3 of the tensor's
  largest element: GRAD_TOL = 1e-2. Measured: 4.2e-4 between world sizes, 3.5e-4 between the fast
  path and the reference (the fp32 reference is itself up to 1.9e-4 from the same step in float64).
  The bugs these tests are for move a gradient by half of its largest element or more (D's share
  without the world-size factor: by 1 - 1/W; an expert trained on another expert's examples: by
  all of it). BatchNorm's running statistics are sums over the batch too and get the same rule
  (measured: 7e-5 between the fast path and the reference).
- A tensor whose reference is exactly zero (an expert that won nothing) must be exactly zero.

Why both computations start every step from the same state: so that each step is compared on its
own. Left to run freely, differences accumulate (here the score differences between world sizes
grow fivefold over six steps), and Adam divides each coordinate's step by that coordinate's own
gradient scale: a coordinate whose gradient is rounding noise moves by up to lr in a direction the
noise picks, after which no later step could be held to a rounding tolerance (not seen in these six
steps; nothing in the setup rules it out).
"""

from __future__ import annotations

import torch

U = 2.0 ** -24  # float32 unit roundoff
SCORE_TOL = 3e-5  # of the largest |score| (module docstring)
GRAD_TOL = 1e-2  # of the tensor's largest |element| (module docstring)


# ----------------------------------------------------------------------------- recording a step


def expert_grads(experts) -> dict[int, dict[str, torch.Tensor]]:
    """The bank's gradients per expert (global id -> Expert-layout name -> tensor); zeros where none."""
    out = {g: {} for g in experts.ids}
    for first, part in experts.bank.parts():  # a committee of several families: part by part
        E, views = part.num, part.expert_tensors()
        for name, p in part.expert_params():
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            for j, g in enumerate(experts.ids[first:first + E]):
                out[g][name] = grad.detach().reshape(E, *views[name].shape[1:])[j].clone()  # the expert's shape
    return out


class StepRecorder:
    """Clones the experts' and D's gradients at the moment their optimizers step (D's after DDP's
    all-reduce), by wrapping ``experts.opt.step`` and ``disc_opt.step``; icm_dist is not changed.
    Wrap after identity initialization, which replaces ``experts.opt``."""

    def __init__(self, experts, disc, disc_opt):
        self.expert_grads: dict = {}
        self.disc_grads: dict = {}
        expert_step, disc_step = experts.opt.step, disc_opt.step

        def record_experts(mask_E):
            self.expert_grads = expert_grads(experts)
            return expert_step(mask_E)

        def record_disc(*args, **kwargs):
            self.disc_grads = {n: p.grad.detach().clone() for n, p in disc.named_parameters()}
            return disc_step(*args, **kwargs)

        experts.opt.step, disc_opt.step = record_experts, record_disc

    def take(self) -> tuple[dict, dict]:
        out = self.expert_grads, self.disc_grads
        self.expert_grads, self.disc_grads = {}, {}
        return out


def lowest_id_among_maxima(scores_BN: torch.Tensor) -> torch.Tensor:
    """The paper's winner with ties to the lowest id, written apart from routing.settle_winners:
    scan the experts upwards and move only on a strictly higher score."""
    best, win = scores_BN[:, 0].clone(), torch.zeros(scores_BN.shape[0], dtype=torch.long)
    for j in range(1, scores_BN.shape[1]):
        better = scores_BN[:, j] > best
        win[better], best[better] = j, scores_BN[better, j]
    return win


def exact_ties(scores_BN: torch.Tensor) -> int:
    """Rows whose maximum is held by two or more experts (bitwise)."""
    return int(((scores_BN == scores_BN.max(dim=1, keepdim=True).values).sum(dim=1) > 1).sum())


def margin(scores_BN: torch.Tensor, row: int) -> float:
    top = scores_BN[row].topk(2).values
    return float(top[0] - top[1])


# ----------------------------------------------------------------------------- comparing two steps


def score_tol(want_BN: torch.Tensor) -> float:
    return SCORE_TOL * float(want_BN.abs().max())


def loss_tol(want: torch.Tensor, terms: int, scores_BN: torch.Tensor) -> float:
    return 2 * terms * U * float(want.abs()) + score_tol(scores_BN)


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = float((got - want).abs().max())
    assert diff <= score_tol(want), f"{what}: scores differ by {diff:.3g} > {SCORE_TOL} x max |score|"


def assert_batch_sum_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """A tensor of sums over the batch (a gradient, BatchNorm's running statistics): every element within
    GRAD_TOL of the reference tensor's largest element; exactly zero stays exactly zero."""
    scale, diff = float(want.abs().max()), float((got - want).abs().max())
    assert diff <= GRAD_TOL * scale, f"{what}: max |diff| {diff:.3g} > {GRAD_TOL} x max |grad| {scale:.3g}"


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for name in want:
        assert_batch_sum_close(got[name], want[name], f"{what} {name}")


def assert_loss_close(got: torch.Tensor, want: torch.Tensor, terms: int, scores_BN: torch.Tensor, what: str):
    if torch.isnan(want):
        assert torch.isnan(got), f"{what}: {float(got)} where the reference has no loss (nan)"
        return
    diff, tol = abs(float(got) - float(want)), loss_tol(want, terms, scores_BN)
    assert diff <= tol, f"{what}: {float(got)} vs {float(want)} (diff {diff:.3g} > {tol:.3g})"


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    """An expert that won nothing: weights, BatchNorm buffers and Adam state bitwise as before.

    ``num_batches_tracked`` is left out: the bank shares one counter per layer among its experts, and
    BatchNorm with a momentum never reads it."""
    changed = [k for k in before if not k.endswith("num_batches_tracked") and not torch.equal(before[k], after[k])]
    assert not changed, f"{what} won nothing but changed: {changed}"

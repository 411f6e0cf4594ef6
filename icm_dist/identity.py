"""Approximate identity initialization of a rank's experts (appendix B), all in parallel."""

from __future__ import annotations

import torch

from .config import Config
from .experts import LocalExperts
from .precision import autocast
from .rng import sample_indices


def identity_init(experts: LocalExperts, data_BCHW: torch.Tensor, cfg: Config, device: torch.device,
                  on_step=None) -> dict:
    """Train every expert of the rank towards the identity, all in parallel.

    Expert ``j`` trains on its own batches, keyed by (seed, its global id, step), to reproduce its
    input, until its batch MSE falls below ``identity_init.mse`` or ``max_steps`` pass (an expert whose part
    says ``expert.train_identity: false`` is left as it was built). An expert that
    is done is frozen (masked), so each expert's result depends only on its id, never on its rank
    neighbours. Uses its own Adam; the competition starts with fresh optimizer state.
    """
    ic = cfg.identity_init
    E = experts.num
    opt = experts.new_optimizer()
    active_E = experts.train_identity_E.clone()
    steps_E = torch.zeros(E, dtype=torch.long)
    last_mse_E = torch.full((E,), float("nan"))
    experts.bank.train()
    amp = autocast(device, cfg.train.precision)
    n = data_BCHW.shape[0]
    for step in range(ic.max_steps):
        idx = torch.stack([sample_indices(n, ic.batch_size, cfg.seed, "identity", gid, step) for gid in experts.ids], 1)
        C, H, W = data_BCHW.shape[1:]
        x_BECHW = data_BCHW[idx.to(data_BCHW.device).view(-1)].view(ic.batch_size, E, C, H, W).to(device)
        saved = experts.snapshot_buffers()
        with amp:
            out_BECHW = experts.outputs(experts.train_forward(experts.inputs(x_BECHW)))
        mse_E = (out_BECHW.float() - x_BECHW).pow(2).mean(dim=(0, 2, 3, 4))
        # Every expert's MSE at the start, the trained ones' as they go.
        last_mse_E = torch.where(active_E.cpu() | (step == 0), mse_E.detach().cpu(), last_mse_E)
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


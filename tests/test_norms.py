"""Per-example norms (expert.norm): the winners-only backward is the exact gradient, and every norm
survives checkpoints, resharding and the standalone loader (losers stay bitwise unchanged with a
per-example norm too: test_competition.py::test_losers_stay_bitwise_unchanged).

With BatchNorm a winner's loss depends on every example of the batch (the batch statistics), so the
winners-only backward is an approximation; with a norm that looks at one example at a time it is
the gradient itself. The dense step (every expert's graph over the whole batch) is the reference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from icm_dist import checkpoint as ck
from icm_dist.commands.reuse import load_module_file
from icm_dist.competition import build_competition
from icm_dist.config import load_config, to_dict
from icm_dist.dist import Dist, ShardPlan
from icm_dist.experts import LocalExperts
from icm_dist.families.conv import Expert, ExpertBank, make_expert
from icm_dist.models import make_discriminator
from icm_dist.protocol import build_protocol
from icm_dist.rng import sample_indices
from icm_dist.step import competition_step, expert_backward

REPO = Path(__file__).resolve().parents[1]
NORMS = [["expert.norm=group", "expert.groups=4"], ["expert.norm=instance"], ["expert.norm=layer"],
         ["expert.norm=none"], ["expert.norm=group", "expert.groups=2", "expert.weight_standardization=true"]]
IDS = ["group", "instance", "layer", "none", "group-ws"]


def _cfg(data_root, *over):
    return load_config(None, [f"data.root={data_root}", "expert.num=4", "expert.width=8", "expert.depth=3",
                              "discriminator.widths=[8,16,16]", "discriminator.hidden=64", "train.precision=fp32",
                              "data.mechanisms=[invert,up,noise,left]", "data.transformed_examples=2000", *over])


@pytest.fixture(scope="module")
def proto(data_root, mnist):
    return build_protocol(_cfg(data_root), mnist)


def _record_grads(experts: LocalExperts, log: list) -> None:
    """Wrap the masked Adam's step so that every step's expert gradients (before the update) are kept."""
    step = experts.opt.step

    def recording(mask_E):
        log.append([None if p.grad is None else p.grad.clone() for p in experts.opt.params])
        step(mask_E)

    experts.opt.step = recording


def _batches(proto, t: int):
    f = proto.transformed_x[sample_indices(len(proto.transformed_x), 16, 0, "fake-batch", t)]
    r = proto.canonical_x[sample_indices(len(proto.canonical_x), 16, 0, "real-batch", t)]
    return f, r


def _one_step(cfg, proto, t: int, states, disc_state, candidates=None, disc_grads: dict | None = None):
    """Step ``t`` from the given expert and D states (D's optimizer fresh): (result, expert gradients).
    ``candidates``: a routed step's mask; ``disc_grads``, if given, receives D's gradients by name."""
    dist, plan = Dist(0, 1, 0, torch.device("cpu")), ShardPlan(cfg.expert.num, 1)
    comp = build_competition(cfg, dist)
    experts, disc, opt = comp.experts, comp.disc, comp.disc_opt
    for j, st in enumerate(states):
        experts.load_state(j, st)
    disc.load_state_dict(disc_state)
    grads: list = []
    _record_grads(experts, grads)
    if disc_grads is not None:
        opt.register_step_pre_hook(
            lambda *_: disc_grads.update({n: p.grad.clone() for n, p in disc.named_parameters()}))
    res = competition_step(experts, disc, opt, *_batches(proto, t), plan, dist, candidates_BN=candidates)
    return res, grads[0], experts, disc


@pytest.mark.parametrize("norm", NORMS, ids=IDS)
def test_winners_only_backward_is_the_dense_gradient(data_root, proto, norm):
    """At every step of a dense run, a winners-only step from the same state gives the same winners and
    scores, and expert gradients and losses within float noise of the dense step's.

    The two paths differ only in float order: the winners re-run on a smaller batch (other conv kernels)
    and the dense backward sums over every expert's graph. A weight gradient sums B*H*W = 16384 products
    per entry; summed in another order, fp32 rounding drifts like sqrt(16384) * 6e-8 ~ 1e-5 of the
    largest entry, so each gradient tensor must agree to 1e-4 of its largest entry (a wrong example, a
    missing factor or a wrong sign is off by O(1)). Comparing from the same state at each step keeps
    Adam, which turns float noise in tiny gradients into full-size steps, out of the comparison.
    """
    cfg_w, cfg_d = _cfg(data_root, *norm), _cfg(data_root, *norm, "train.expert_backward=dense")
    assert expert_backward(cfg_w, False) == "winners" and expert_backward(cfg_d, False) == "dense"
    ed = LocalExperts(cfg_d, list(range(4)), torch.device("cpu"))
    disc = make_discriminator(cfg_d)
    won = 0
    for t in range(4):
        states, disc_state = [ed.state(j) for j in range(4)], {k: v.clone() for k, v in disc.state_dict().items()}
        rd, gd, ed, disc = _one_step(cfg_d, proto, t, states, disc_state)
        rw, gw, _, _ = _one_step(cfg_w, proto, t, states, disc_state)
        won += int((rd.won_E > 0).sum())
        assert torch.equal(rw.winners_B, rd.winners_B), t
        torch.testing.assert_close(rw.scores_BN, rd.scores_BN, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rw.expert_loss_E, rd.expert_loss_E, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(rw.disc_loss_local, rd.disc_loss_local, rtol=1e-5, atol=1e-6)
        for name, a, b in zip(ed.opt.names, gw, gd):
            assert (a is None) == (b is None), (t, name)
            if a is not None:
                scale = float(b.abs().max()) or 1.0
                assert float((a - b).abs().max()) <= 1e-4 * scale, (t, name, float((a - b).abs().max()), scale)
    assert won >= 4, "too few winners to compare"


@pytest.mark.parametrize("norm", NORMS, ids=IDS)
def test_every_norm_checkpoints_reshards_and_loads_standalone(data_root, tmp_path, norm):
    """Saved by two ranks' blocks, loaded into one bank and into the standalone snippet of
    docs/checkpoint-format.md: the same expert, bitwise in the bank, to float order standalone."""
    cfg = _cfg(data_root, *norm, f"run.out_dir={tmp_path}")
    blocks = [LocalExperts(cfg, ids, torch.device("cpu")) for ids in ([0, 1], [2, 3])]
    disc = make_discriminator(cfg)
    opt = torch.optim.Adam(disc.parameters())
    tmp = ck.begin_checkpoint(tmp_path, 3)
    for b in blocks:
        b.opt.step_E += 1  # something other than a fresh optimizer to carry over
        ck.write_experts(tmp, cfg, b, 3)
    final = ck.finish_checkpoint(tmp, 3, cfg, disc, opt, 2, {"stable_evals": 0}, [], keep=3)
    comp = build_competition(cfg, Dist(0, 1, 0, torch.device("cpu")))
    one = comp.experts
    ck.load_into(final, cfg, one, comp.disc_module, comp.disc_opt)
    for j in range(4):
        src = blocks[j // 2].state(j % 2)
        got = one.state(j)
        assert got.model.keys() == src.model.keys() and got.optim.keys() == src.optim.keys()
        assert all(torch.equal(got.model[k], v) for k, v in src.model.items()), j
        assert all(torch.equal(got.optim[k], v) for k, v in src.optim.items()), j

    doc = (REPO / "docs" / "checkpoint-format.md").read_text()
    code = re.search(r"<!-- snippet: load-expert -->\s*```python\n(.*?)```", doc, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "checkpoint-format.md", "exec"), ns)
    x = torch.rand(5, 1, 32, 32)
    expert = Expert(cfg.expert)
    expert.load_state_dict(one.state(2).model)
    with torch.no_grad():
        torch.testing.assert_close(ns["load_expert"](str(final / "expert_002.safetensors"))(x), expert.eval()(x),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", NORMS, ids=IDS)
def test_bank_equals_lone_experts_and_forward_one(norm):
    cfg = load_config(None, ["expert.width=8", "expert.depth=4", "expert.pool=1", *norm]).expert
    bank = ExpertBank.create(cfg, 0, [3, 5, 7])
    x = torch.rand(6, 1, 32, 32)
    with torch.no_grad():
        out = bank(x.expand(6, 3, 32, 32).contiguous())
        for j, gid in enumerate([3, 5, 7]):
            lone = make_expert(cfg, 0, gid)(x)[:, 0]
            # The lone Expert uses torch's ELU, the bank an exp-and-clamp form: equal to float rounding.
            torch.testing.assert_close(out[:, j], lone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bank.forward_one(j, x[1:3], [])[:, 0], out[1:3, j], rtol=1e-5, atol=1e-6)


def test_old_checkpoints_without_a_norm_key_are_batch_norm(data_root, tmp_path):
    cfg = _cfg(data_root)
    manifest = {"config": to_dict(cfg), "num_experts": 4}
    for key in ("norm", "groups", "weight_standardization"):
        del manifest["config"]["expert"][key]
    ck.check_compatible(manifest, cfg, tmp_path)  # fits a batch-norm run
    with pytest.raises(ck.CheckpointError, match="expert.norm='batch' but this run has expert.norm='layer'"):
        ck.check_compatible(manifest, _cfg(data_root, "expert.norm=layer"), tmp_path)
    path = tmp_path / "old.safetensors"
    e = make_expert(cfg.expert, 0, 0)
    save_file({f"model.{k}": v.contiguous() for k, v in e.state_dict().items()}, str(path),
              metadata={"expert_config": json.dumps({"width": 8, "depth": 3, "pool": 0})})
    loaded, _ = load_module_file(path)
    assert loaded.cfg.norm == "batch"

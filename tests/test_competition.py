"""The fast step against the plain reference, and the rule that losers stay bitwise unchanged."""

import copy

import pytest
import torch

from icm_dist.config import load_config
from icm_dist.data.protocol import build_protocol
from icm_dist.dist import Dist, ShardPlan
from icm_dist.experts import LocalExperts
from icm_dist.identity import identity_init
from icm_dist.models import make_discriminator
from icm_dist.reference import reference_step
from icm_dist.rng import sample_indices
from icm_dist.step import competition_step


def small_cfg(data_root, *over):
    return load_config(None, [f"data.root={data_root}", "expert.num=4", "expert.width=8", "expert.depth=3",
                              "discriminator.widths=[8,16,16]", "discriminator.hidden=64",
                              "data.mechanisms=[invert,up,noise,left]", "data.transformed_examples=2000",
                              "train.precision=fp32",
                              *over])


@pytest.fixture(scope="module")
def proto_cache():
    return {}


def get_proto(cfg, mnist, cache):
    key = cfg.seed
    if key not in cache:
        cache[key] = build_protocol(cfg, mnist)
    return cache[key]


def batches(proto, cfg, t, B=16):
    f = proto.transformed_x[sample_indices(proto.transformed_x.shape[0], B, cfg.seed, "fake-batch", t)]
    r = proto.canonical_x[sample_indices(proto.canonical_x.shape[0], B, cfg.seed, "real-batch", t)]
    return f, r


@pytest.mark.parametrize("mode", ["dense", "winners", "dense-compiled"])
def test_fast_path_matches_reference(data_root, mnist, proto_cache, mode):
    """fp32: same winners every step; parameters equal to float tolerance after several steps.

    ``dense-compiled``: the dense step with the experts' pass under torch.compile (train.compile),
    whose fused BatchNorm/ELU kernels sum in yet another order, held to the same tolerances.

    Tolerance: grouped vs separate convolutions and one D pass over [real; fakes] vs separate passes
    sum in different orders (~1e-7 relative per op); Adam's normalized steps keep differences at the
    level of lr * (relative gradient error), far below 1e-4 after 5 steps.
    """
    mode, _, compiled = mode.partition("-")
    cfg = small_cfg(data_root, f"train.expert_backward={mode}", f"train.compile={bool(compiled)}")
    proto = get_proto(cfg, mnist, proto_cache)
    dist = Dist(0, 1, 0, torch.device("cpu"))
    plan = ShardPlan(cfg.expert.num, 1)
    fast = LocalExperts(cfg, list(range(4)), dist.device)
    assert (fast.train_forward is not fast.bank) == bool(compiled)
    ref = fast.bank.to_experts()
    ref_opts = [torch.optim.Adam(e.parameters(), lr=1e-3) for e in ref]
    D1 = make_discriminator(cfg)
    D2 = copy.deepcopy(D1)
    o1, o2 = torch.optim.Adam(D1.parameters(), lr=1e-3), torch.optim.Adam(D2.parameters(), lr=1e-3)
    for t in range(5):
        f, r = batches(proto, cfg, t)
        a = competition_step(fast, D1, o1, f, r, plan, dist)
        b = reference_step(ref, ref_opts, D2, o2, f, r, expert_backward=mode)
        assert torch.equal(a.winners_B, b.winners_B), f"step {t}"
        torch.testing.assert_close(a.scores_BN, b.scores_BN, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.disc_loss_local, b.disc_loss_local, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.won_E, b.won_E)
    for j, e in enumerate(ref):
        for k, v in e.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                assert_adam_close(fast.bank.expert_state(j)[k], v, steps=5, name=k)
    for p1, p2 in zip(D1.parameters(), D2.parameters()):
        assert_adam_close(p1.detach(), p2.detach(), steps=5, name="D")


def assert_adam_close(a, b, steps, name, lr=1e-3):
    """Parameters after ``steps`` Adam steps from the same start, computed in two summation orders.

    Adam divides each coordinate's step by its own gradient scale, so a coordinate whose gradient is
    at float-noise level can step differently by up to lr per step: bound every element by
    steps * lr, and require almost all elements (98%) to agree to 1e-5. (98%, not more: the first
    conv of a small expert has only 72-288 weights, and in dense mode BatchNorm's statistics feed the
    float noise of every example into every weight's gradient, so a handful can sit near zero.)
    """
    diff = (a - b).abs()
    assert float(diff.max()) <= steps * lr, (name, float(diff.max()))
    assert float((diff <= 1e-5 + 1e-4 * b.abs()).float().mean()) >= 0.98, (name, float(diff.max()))


def test_winners_mode_gradient_differs_from_dense_only_through_batch_statistics(data_root, mnist, proto_cache):
    """Both modes pick the same winners from the same state (the forward is the same)."""
    cfg_w = small_cfg(data_root, "train.expert_backward=winners")
    cfg_d = small_cfg(data_root, "train.expert_backward=dense")
    proto = get_proto(cfg_w, mnist, proto_cache)
    dist, plan = Dist(0, 1, 0, torch.device("cpu")), ShardPlan(4, 1)
    f, r = batches(proto, cfg_w, 0)
    res = []
    for cfg in (cfg_w, cfg_d):
        ex = LocalExperts(cfg, list(range(4)), dist.device)
        D = make_discriminator(cfg)
        res.append(competition_step(ex, D, torch.optim.Adam(D.parameters()), f, r, plan, dist))
    assert torch.equal(res[0].winners_B, res[1].winners_B)
    torch.testing.assert_close(res[0].scores_BN, res[1].scores_BN)


@pytest.mark.parametrize("mode", ["dense", "winners", "dense-compiled"])
def test_losers_stay_bitwise_unchanged(data_root, mnist, proto_cache, mode):
    mode, _, compiled = mode.partition("-")
    cfg = small_cfg(data_root, f"train.expert_backward={mode}", f"train.compile={bool(compiled)}")
    proto = get_proto(cfg, mnist, proto_cache)
    dist, plan = Dist(0, 1, 0, torch.device("cpu")), ShardPlan(4, 1)
    ex = LocalExperts(cfg, list(range(4)), dist.device)
    D = make_discriminator(cfg)
    opt = torch.optim.Adam(D.parameters())
    losers_seen = 0
    for t in range(6):
        f, r = batches(proto, cfg, t)
        before = [ex.bank.expert_state(j) for j in range(4)]
        opt_before = [ex.opt.expert_state(j) for j in range(4)]
        res = competition_step(ex, D, opt, f, r, plan, dist)
        for j in range(4):
            after = ex.bank.expert_state(j)
            changed = [k for k in after
                       if not k.endswith("num_batches_tracked") and not torch.equal(before[j][k], after[k])]
            opt_changed = [k for k, v in ex.opt.expert_state(j).items() if not torch.equal(opt_before[j][k], v)]
            if res.won_E[j] == 0:
                losers_seen += 1
                assert not changed and not opt_changed, (t, j, changed, opt_changed)
            else:
                assert changed and opt_changed, (t, j)
    assert losers_seen > 0, "the test needs at least one step with a loser"


def test_identity_init_reaches_the_threshold_and_is_keyed_by_id(data_root, mnist, proto_cache):
    cfg = small_cfg(data_root, "identity_init.max_steps=400", "identity_init.mse=0.01")
    proto = get_proto(cfg, mnist, proto_cache)
    dev = torch.device("cpu")
    both = LocalExperts(cfg, [0, 1], dev)
    st = identity_init(both, proto.transformed_x, cfg, dev)
    assert all(m < 0.01 for m in st["mse"]), st
    alone = LocalExperts(cfg, [1], dev)
    st1 = identity_init(alone, proto.transformed_x, cfg, dev)
    assert st1["steps"][0] == st["steps"][1]
    for k, v in alone.bank.expert_state(0).items():
        torch.testing.assert_close(both.bank.expert_state(1)[k], v, rtol=1e-5, atol=1e-6, msg=k)

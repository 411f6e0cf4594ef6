"""The routed competition (train.route_k): candidates, the routed step against the full one, and training.

The full competition is the reference. With every expert a candidate, a routed step is the full step
computed expert by expert: the same winners and scores, D's loss and every gradient within float noise,
with BatchNorm (each expert's batch is then the whole batch) and with a per-example norm. With fewer
candidates and a per-example norm, an expert's output on an example does not depend on which other
examples it ran on, so the routed scores are the full step's scores at the candidates, the winner is
the best candidate, and D's loss is the mean over the candidates' outputs. Through the trainer: rank 0
proposes, two ranks decide what one decides, and a resumed routed run ends bitwise where an
uninterrupted one does (the router is in the checkpoint).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from inproc import same_tensors
from safetensors import safe_open
from safetensors.torch import save_file
from test_checkpoint import _train as train_tiny
from test_norms import _batches, _cfg, _one_step
from test_policies import _train as train_ranks

from icm_dist import checkpoint as ck
from icm_dist.experts import LocalExperts
from icm_dist.models import make_discriminator
from icm_dist.protocol import build_protocol
from icm_dist.rng import generator
from icm_dist.router import RECALL_WEIGHT, Proposer
from icm_dist.routing import explore_candidates, plan_splits, route_candidates, routed_iteration


@pytest.fixture(scope="module")
def proto(data_root, mnist):
    return build_protocol(_cfg(data_root), mnist)


def test_candidates_are_the_top_k_with_ties_to_the_lower_id_and_divisions_run_together():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.9],
                           [3.0, 2.0, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0]])
    assert route_candidates(logits, 2).tolist() == [[False, True, False, True],
                                                     [True, True, False, False],
                                                     [True, True, False, False]]
    assert route_candidates(logits, 1).tolist() == [[False, True, False, False],
                                                    [True, False, False, False],
                                                    [True, False, False, False]]
    assert route_candidates(logits, 4).all()
    # Expert 2 is a fresh copy of expert 0: where either is a candidate, both run.
    c = route_candidates(logits, 1, divisions=[(0, 2)])
    assert c.tolist() == [[False, True, False, False], [True, False, True, False], [True, False, True, False]]


def test_routed_iterations_follow_the_warm_up_and_the_full_every():
    routed = [it for it in range(1, 21) if routed_iteration(it, 2, warmup=5, full_every=4)]
    assert routed == [6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19]
    assert not any(routed_iteration(it, None, 0, 1) for it in range(1, 10))


def _step(cfg, proto, t, states, disc_state, candidates=None):
    disc_grads: dict = {}
    res, grads, experts, _ = _one_step(cfg, proto, t, states, disc_state, candidates, disc_grads)
    return res, grads, disc_grads, experts


def _assert_grads_close(a_list, b_list, names, what):
    for name, a, b in zip(names, a_list, b_list):
        assert (a is None) == (b is None), (what, name)
        if a is not None:
            # Float order differs (one expert at a time, and BatchNorm's statistics summed otherwise): within
            # 1e-3 of the largest entry; a wrong example, a missing factor or a wrong sign is off by O(1).
            scale = float(b.abs().max()) or 1.0
            assert float((a - b).abs().max()) <= 1e-3 * scale, (what, name, float((a - b).abs().max()), scale)


def test_every_expert_a_candidate_is_the_full_step(data_root, proto):
    for norm in (["expert.norm=batch"], ["expert.norm=layer"]):
        cfg = _cfg(data_root, *norm)
        ex = LocalExperts(cfg, list(range(4)), torch.device("cpu"))
        disc = make_discriminator(cfg)
        for t in range(3):
            states, d_state = [ex.state(j) for j in range(4)], {k: v.clone() for k, v in disc.state_dict().items()}
            full, g_full, dg_full, ex_full = _step(cfg, proto, t, states, d_state)
            routed, g_routed, dg_routed, ex_routed = _step(cfg, proto, t, states, d_state,
                                                           torch.ones(16, 4, dtype=torch.bool))
            assert torch.equal(routed.winners_B, full.winners_B), (norm, t)
            torch.testing.assert_close(routed.scores_BN, full.scores_BN, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(routed.disc_loss_local, full.disc_loss_local, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(routed.expert_loss_E, full.expert_loss_E, rtol=1e-5, atol=1e-6,
                                       equal_nan=True)
            _assert_grads_close(g_routed, g_full, ex.opt.names, (norm, t, "experts"))
            _assert_grads_close([dg_routed[n] for n in dg_full], list(dg_full.values()), list(dg_full),
                                (norm, t, "D"))
            # BatchNorm's running statistics move the same way (each expert's batch is the whole batch); a
            # variance summed in another order differs in its last bits.
            for a, b in zip(ex_routed.buffers(), ex_full.buffers()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            ex, disc = ex_full, make_discriminator(cfg)
            disc.load_state_dict(d_state)


def test_fewer_candidates_score_as_in_the_full_step_and_the_best_candidate_wins(data_root, proto):
    """layer norm, 2 of 4 candidates: scores at the candidates as in the full step, -inf elsewhere; the
    winner is the best candidate; D's loss is the mean over the candidates' outputs; experts that were no
    winner's stay bitwise unchanged, weights, Adam and running buffers alike."""
    cfg = _cfg(data_root, "expert.norm=layer")
    ex = LocalExperts(cfg, list(range(4)), torch.device("cpu"))
    states = [ex.state(j) for j in range(4)]
    d_state = make_discriminator(cfg).state_dict()
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        cand = route_candidates(torch.rand(16, 4, generator=gen), 2)
        full, _, _, _ = _step(cfg, proto, t, states, d_state)
        routed, _, _, ex_after = _step(cfg, proto, t, states, d_state, cand)
        torch.testing.assert_close(routed.scores_BN[cand], full.scores_BN[cand], rtol=1e-5, atol=1e-6)
        assert torch.isneginf(routed.scores_BN[~cand]).all()
        best = torch.where(cand, full.scores_BN, torch.tensor(float("-inf"))).argmax(dim=1)
        assert torch.equal(routed.winners_B, best), t
        # Equation (3) over the candidates: real term from the full step (D and reals are the same).
        real_term = full.disc_loss_local - F.softplus(full.scores_BN).sum() / full.scores_BN.numel()
        want = real_term + F.softplus(full.scores_BN[cand]).sum() / int(cand.sum())
        torch.testing.assert_close(routed.disc_loss_local, want, rtol=1e-5, atol=1e-6)
        for j in range(4):
            if routed.won_E[j] == 0:
                after = ex_after.state(j)
                assert all(torch.equal(after.model[k], states[j].model[k]) for k in after.model
                           if not k.endswith("num_batches_tracked")), (t, j)
                assert all(torch.equal(after.optim[k], states[j].optim[k]) for k in after.optim), (t, j)


def test_a_routed_step_moves_only_its_winners_with_batchnorm_over_each_experts_routed_batch(data_root, proto):
    """BatchNorm, dense, expert 3 no candidate anywhere: it stays bitwise unchanged; candidates that won
    nothing get their running statistics back bitwise; a winner's statistics are those of one BatchNorm
    pass over exactly its candidate examples; the batch counter moves once."""
    cfg = _cfg(data_root, "expert.norm=batch")
    ex = LocalExperts(cfg, list(range(4)), torch.device("cpu"))
    states = [ex.state(j) for j in range(4)]
    d_state = make_discriminator(cfg).state_dict()
    f = _batches(proto, 0)[0]
    cand = route_candidates(torch.rand(16, 4, generator=torch.Generator().manual_seed(1)), 2)
    cand[:, 0] |= cand[:, 3]
    cand[:, 3] = False
    res, _, _, after = _step(cfg, proto, 0, states, d_state, cand)
    assert res.won_E[3] == 0 and bool(torch.isneginf(res.scores_BN[:, 3]).all())
    for j in range(4):
        a, b = after.state(j), states[j]
        for k in a.model:
            if k.endswith("num_batches_tracked"):
                assert int(a.model[k]) == int(b.model[k]) + 1, (j, k)
            elif "running" in k and res.won_E[j] > 0:
                solo = LocalExperts(cfg, [j], torch.device("cpu"))
                solo.load_state(0, states[j])
                solo.bank.train()
                with torch.no_grad():
                    solo.bank.forward_one(0, f[cand[:, j]].contiguous(memory_format=torch.channels_last), None)
                torch.testing.assert_close(a.model[k], solo.state(0).model[k], rtol=1e-5, atol=1e-6)
            elif res.won_E[j] == 0:
                assert torch.equal(a.model[k], b.model[k]), (j, k)
        if res.won_E[j] == 0:
            assert all(torch.equal(a.optim[k], b.optim[k]) for k in a.optim), j
    assert int((res.won_E > 0).sum()) >= 2, "too few winners to check"


def test_the_routed_gradient_is_each_winners_loss_on_the_examples_it_won(data_root, proto):
    """layer norm, dense, 2 of 4 candidates: the experts' gradients equal those of sum_j mean_{i won by j}
    -log D(expert_j(x_i)), computed expert by expert (what the pairs' bookkeeping must assemble)."""
    cfg = _cfg(data_root, "expert.norm=layer", "train.expert_backward=dense")
    ex = LocalExperts(cfg, list(range(4)), torch.device("cpu"))
    states = [ex.state(j) for j in range(4)]
    disc = make_discriminator(cfg)
    f = _batches(proto, 2)[0]
    cand = route_candidates(torch.rand(16, 4, generator=torch.Generator().manual_seed(2)), 2)
    res, grads, _, _ = _step(cfg, proto, 2, states, disc.state_dict(), cand)
    ref = LocalExperts(cfg, list(range(4)), torch.device("cpu"))
    for j, st in enumerate(states):
        ref.load_state(j, st)
    ref.bank.train()
    loss = 0
    for j in range(4):
        won = res.winners_B == j
        if won.any():
            out = ref.bank.forward_one(j, f[won].contiguous(memory_format=torch.channels_last), None)
            loss = loss + F.softplus(-disc(out)).mean()
    loss.backward()
    _assert_grads_close(grads, [p.grad for p in ref.opt.params], ref.opt.names, "routed gradient")
    assert int((res.won_E > 0).sum()) >= 2


def test_the_router_learns_from_full_competitions_only_and_routes_only_above_its_recall(data_root, proto):
    cfg = _cfg(data_root, "train.route_k=1", "train.route_warmup=2", "train.route_full_every=3",
               "train.route_min_recall=0.5")
    p = Proposer(cfg, 1, torch.device("cpu"))
    x = _batches(proto, 0)[0]
    assert p.candidates(x, 1).all()  # warm-up: a full competition
    scores = torch.zeros(16, 4)
    loss, recall = p.learn(torch.zeros(16, dtype=torch.long), scores)
    assert p.recall == RECALL_WEIGHT * recall and loss > 0
    assert p.candidates(x, 4).all(), "routed by the schedule, but the recall is below route_min_recall"
    p.learn(torch.zeros(16, dtype=torch.long), scores)
    p.recall_K = [0.5]
    before = [q.clone() for q in p.module.parameters()]
    routed = p.candidates(x, 4)
    assert routed.sum(dim=1).tolist() == [1] * 16
    assert p.learn(torch.zeros(16, dtype=torch.long), scores) is None, "a routed step teaches nothing"
    assert all(torch.equal(a, b) for a, b in zip(before, p.module.parameters())) and p.recall == 0.5
    assert p.candidates(x, 6).all()  # every route_full_every-th iteration is a full competition


# route_min_recall=0: route by the schedule alone, so that the tiny runs below do route.
ROUTED = ["train.route_k=2", "train.route_warmup=4", "train.route_full_every=3", "train.route_min_recall=0"]


def test_two_ranks_route_as_one_rank_does(tmp_path, data_root, mnist):
    """Rank 0 proposes and broadcasts: the same candidates, scores and winners at every step on 1 and 2 ranks."""
    runs = {w: train_ranks(tmp_path, w, ["train.precision=fp32", "identity_init.max_steps=10", "train.iterations=10",
                                         "eval.final_examples=100", "train.split_every=0", *ROUTED], data_root)
            for w in (1, 2)}
    one, two = runs[1][0], runs[2][0]
    for t, (a, b) in enumerate(zip(one, two)):
        finite_a = [[v != float("-inf") for v in row] for row in a["scores"]]
        finite_b = [[v != float("-inf") for v in row] for row in b["scores"]]
        assert finite_a == finite_b, t
        routed = routed_iteration(t + 1, 2, 4, 3)
        assert all(sum(row) == (2 if routed else 3) for row in finite_a), (t, finite_a)
        assert a["winners"] == b["winners"], t
    assert any(routed_iteration(t + 1, 2, 4, 3) for t in range(len(one)))


# One candidate of the router's and one drawn at random (of 3 experts), teaching the router at every step.
EXPLORING = ["train.route_k=1", "train.route_explore=1", "train.route_target=scores", "train.route_warmup=4",
             "train.route_full_every=3", "train.route_min_recall=0"]


@pytest.mark.parametrize("routing", [ROUTED, EXPLORING], ids=["routed", "exploring"])
def test_a_resumed_routed_run_ends_bitwise_where_an_uninterrupted_one_does(tmp_path, data_root, routing):
    """The router's weights, Adam state and recall are in the checkpoint, and exploration's draws are keyed
    by the iteration: a resumed run routes, explores and learns as the uninterrupted one."""
    a = train_tiny(tmp_path / "a", data_root, *routing)
    train_tiny(tmp_path / "b", data_root, *routing, "train.iterations=4")
    b = train_tiny(tmp_path / "b", data_root, *routing, "resume=auto")
    k = int(routing[0].split("=")[1])
    assert a["iterations"] == b["iterations"] == 8
    assert a["routing"] == b["routing"] and a["routing"]["k"] == k
    assert a["routing"]["routed_steps"] == sum(routed_iteration(it, k, 4, 3) for it in range(1, 9))
    last = "checkpoints/iter_0000008"
    assert (tmp_path / "a" / last / "router.safetensors").is_file()
    assert same_tensors(tmp_path / "a" / last, tmp_path / "b" / last) == []


def test_a_checkpoint_that_kept_the_recall_in_its_trainer_state_resumes_with_it(tmp_path, data_root):
    """Checkpoints written before the recall moved into router.safetensors' metadata kept it in
    ``trainer_state.route_recall``: resumed, they continue as an uninterrupted run does."""
    a = train_tiny(tmp_path / "a", data_root, *ROUTED)
    train_tiny(tmp_path / "b", data_root, *ROUTED, "train.iterations=4")
    ckpt = tmp_path / "b/checkpoints/iter_0000004"
    router_file = ckpt / "router.safetensors"
    with safe_open(str(router_file), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    recall = json.loads(meta.pop("recall"))
    save_file(tensors, str(router_file), meta)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["trainer_state"]["route_recall"] = recall
    manifest["files"]["router.safetensors"] = {"sha256": ck.sha256_file(router_file),
                                               "bytes": router_file.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    b = train_tiny(tmp_path / "b", data_root, *ROUTED, "resume=auto")
    assert recall > 0 and a["routing"] == b["routing"]


def test_a_routed_run_resumed_without_its_router_starts_a_fresh_one_and_forgets_its_recall(tmp_path, data_root):
    """The recall belongs to the router it measured: a checkpoint without router.safetensors (an older run,
    a surgery) resumes with a fresh router and a recall of 0, which keeps routing off until it is re-learned."""
    a = train_tiny(tmp_path / "a", data_root, *ROUTED, "train.iterations=4")
    assert a["routing"]["recall"] > 0
    ckpt = tmp_path / "a/checkpoints/iter_0000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["router.safetensors"]
    manifest["trainer_state"]["route_recall"] = 0.5  # where the first routed checkpoints kept it: not for a new router
    (ckpt / "router.safetensors").unlink()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    b = train_tiny(tmp_path / "a", data_root, *ROUTED, "train.iterations=4", "resume=auto")
    assert b["iterations"] == 4 and b["routing"]["recall"] == 0.0


def test_exploration_draws_other_experts_and_divisions_still_run_together():
    logits = torch.rand(64, 8, generator=torch.Generator().manual_seed(1))
    top = route_candidates(logits, 2)
    explore = explore_candidates(top, 3, generator(0, "route-explore", 5))
    assert explore.sum(dim=1).tolist() == [3] * 64 and not (explore & top).any()
    assert torch.equal(explore, explore_candidates(top, 3, generator(0, "route-explore", 5)))  # keyed: reproducible
    assert not torch.equal(explore, explore_candidates(top, 3, generator(0, "route-explore", 6)))
    assert explore.any(dim=0).all(), "every expert is drawn for some example"
    cand = route_candidates(logits, 2, divisions=[(0, 7)], explore_BN=explore)
    assert torch.equal(cand[:, 0], cand[:, 7]) and (cand >= (top | explore)).all()
    assert (explore_candidates(route_candidates(logits, 6), 5, generator(0, "e")).sum(1) == 2).all()  # what is left


def _proposer(data_root, *overrides):
    cfg = _cfg(data_root, "train.route_k=1", "train.route_warmup=0", "train.route_full_every=100",
               "train.route_min_recall=0", *overrides)
    return Proposer(cfg, 1, torch.device("cpu"))


def test_a_routed_step_with_exploration_teaches_the_router_over_the_scored_candidates_only(data_root, proto):
    """With exploration, a routed step's loss is the cross-entropy of the best-scored candidate among those
    scored: the router's logits at experts that did not run get no gradient, and learn() returns no recall
    (only full competitions measure it)."""
    x = _batches(proto, 0)[0]
    scores = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    for target in ("winners", "scores"):
        p = _proposer(data_root, "train.route_explore=1", f"train.route_target={target}")
        cand = p.candidates(x, 1)
        assert (cand.sum(dim=1) == 2).all() and p.logits_BN.requires_grad
        p.logits_BN.retain_grad()
        logits = p.logits_BN
        masked = torch.where(cand, scores, torch.tensor(float("-inf")))
        loss, recall = p.learn(masked.argmax(dim=1), masked)
        assert recall is None and p.recall == 0.0 and loss > 0
        assert (logits.grad[~cand] == 0).all() and (logits.grad[cand] != 0).any(), target
        want = F.cross_entropy(torch.where(cand, logits.detach(), torch.tensor(-1e9)), masked.argmax(dim=1)) \
            if target == "winners" else \
            -(torch.softmax(masked, 1) * torch.log_softmax(torch.where(cand, logits.detach(), torch.tensor(-1e9)),
                                                           1)).sum(1).mean()
        assert abs(loss - float(want)) < 1e-5, target
    p = _proposer(data_root)  # no exploration: a routed step keeps no graph and teaches nothing
    assert p.candidates(x, 1).sum() == 16 and p.learn(torch.zeros(16, dtype=torch.long), scores) is None


def test_the_scores_target_learns_the_whole_score_matrix_of_a_full_competition(data_root, proto):
    p = _proposer(data_root, "train.route_target=scores", "train.route_temperature=0.5", "train.route_warmup=5")
    x = _batches(proto, 0)[0]
    assert p.candidates(x, 1).all()
    logits = p.logits_BN.detach().clone()
    scores = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    loss, recall = p.learn(scores.argmax(dim=1), scores)
    want = -(torch.softmax(scores / 0.5, 1) * torch.log_softmax(logits, 1)).sum(1).mean()
    assert abs(loss - float(want)) < 1e-5 and recall is not None


def test_the_heldout_recall_is_the_share_of_winners_among_the_top_k(data_root, proto):
    p = _proposer(data_root, "train.route_k=2")
    x = _batches(proto, 0)[0]
    with torch.no_grad():
        top = route_candidates(p.module(x), 2)
    winners = torch.arange(16) % 4
    want = float(top[torch.arange(16), winners].float().mean())
    assert p.heldout_recall(x, winners) == want == p.heldout_recall(x, winners, batch=5)


def test_an_unsure_router_routes_with_the_fewest_candidates_that_have_the_recall(data_root, proto):
    """train.route_k_max: a full competition measures the recall at every k from route_k to route_k_max (the
    share of winners among the top k, before learning), and a routed step takes the smallest k whose
    running recall reaches route_min_recall; none: a full competition."""
    p = _proposer(data_root, "train.route_k_max=3", "train.route_min_recall=0.6", "train.route_full_every=2")
    x = _batches(proto, 0)[0]
    assert p.ks == [1, 2, 3] and p.candidates(x, 1).all() and p.k is None  # no k measured yet: full
    with torch.no_grad():
        logits = p.module(x)
    winners = torch.arange(16) % 4
    p.candidates(x, 2)  # every 2nd: a full competition, which measures
    want = [RECALL_WEIGHT * float(route_candidates(logits, k)[torch.arange(16), winners].float().mean())
            for k in (1, 2, 3)]
    _, recall = p.learn(winners, torch.zeros(16, 4))
    assert p.recall_K == pytest.approx(want, abs=1e-12) and recall == pytest.approx(want[0] / RECALL_WEIGHT)
    for recall_K, k in (([0.3, 0.7, 0.9], 2), ([0.3, 0.4, 0.5], None), ([0.95, 0.96, 0.97], 1), ([0.1, 0.2, 0.6], 3)):
        p.recall_K = recall_K
        cand = p.candidates(x, 3)
        assert p.k == k and (cand.all() if k is None else cand.sum(1).tolist() == [k] * 16), recall_K


def test_a_router_file_without_the_recall_at_every_k_routes_with_route_k_until_it_measures(tmp_path):
    manifest = {"trainer_state": {}}
    assert ck._router_recall(tmp_path, {"recall": "0.8"}, manifest, 3) == [0.8, 0.0, 0.0]
    assert ck._router_recall(tmp_path, {"recall": "0.8", "recall_k": "[0.8, 0.9]"}, manifest, 2) == [0.8, 0.9]
    with pytest.raises(ck.CheckpointError, match="train.route_k_max"):
        ck._router_recall(tmp_path, {"recall_k": "[0.8, 0.9]"}, manifest, 3)


def test_the_splits_count_routed_wins_as_full_ones(tmp_path, data_root, mnist):
    """Routing runs only while its winners are the full competition's, so a split check counts the wins of
    every step since the last, routed or full: each check makes plan_splits' pairs over all of them (one
    full competition in each window of three after the warm-up), and the routed wins changed a decision."""
    splits = ["train.split_every=3", "train.split_steps=2", "train.split_iterations=15", "train.split_idle_share=0.9",
              "train.split_donor_share=1.05"]
    steps, summary = train_ranks(tmp_path, 1, ["train.precision=fp32", "identity_init.max_steps=10",
                                               "eval.final_examples=100", *splits, *ROUTED], data_root)
    mattered = False
    for c in range(3, 16, 3):
        window = steps[c - 3:c]
        wins = torch.bincount(torch.tensor([w for st in window for w in st["winners"]]), minlength=3)
        made = [(s["donor"], s["copy"]) for s in summary["splits"] if s["iteration"] == c]
        assert made == plan_splits(wins, 0.9, 1.05), (c, wins, made)
        full = [st for t, st in enumerate(window, c - 2) if not routed_iteration(t, 2, 4, 3)]
        full_wins = torch.bincount(torch.tensor([w for st in full for w in st["winners"]]), minlength=3)
        mattered |= plan_splits(full_wins, 0.9, 1.05) != made
    assert summary["splits"] and mattered, summary["splits"]

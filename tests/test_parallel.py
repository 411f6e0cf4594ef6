"""Pure logic of the sharded step, tested without a process group."""

import pytest
import torch

from icm_dist.errors import LaunchError
from icm_dist.parallel import ShardPlan, pad_scores, real_slice, settle_winners, unpad_scores


def test_shard_plan_blocks_differ_by_at_most_one():
    plan = ShardPlan(10, 4)
    assert plan.sizes == [3, 3, 2, 2]
    assert [list(plan.block(r)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert plan.max_block == 3
    assert [plan.owner(g) for g in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    for n in range(1, 13):
        for w in range(1, n + 1):
            sizes = ShardPlan(n, w).sizes
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_ranks_than_experts_is_an_error():
    with pytest.raises(LaunchError, match="4 ranks but only 3 experts"):
        ShardPlan(3, 4)


def test_real_slices_cover_the_batch_once():
    for B in (1, 5, 32):
        for W in (1, 2, 3, 4, 7):
            got = torch.cat([torch.arange(B)[real_slice(B, W, r)] for r in range(W)])
            assert got.tolist() == list(range(B))


def test_pad_and_unpad_restore_global_order():
    plan = ShardPlan(5, 3)  # blocks 2, 2, 1
    full = torch.randn(4, 5)
    blocks = [full[:, list(plan.block(r))] for r in range(3)]
    padded = torch.stack([pad_scores(b, plan.max_block) for b in blocks])
    assert padded.shape == (3, 4, 2)
    assert torch.isinf(padded[2, :, 1]).all()
    assert torch.equal(unpad_scores(padded, plan), full)


def test_winners_argmax_ties_to_lowest_id():
    s = torch.tensor([[0.1, 0.9, 0.9], [2.0, 2.0, 2.0], [-1.0, -3.0, -0.5], [0.0, float("-inf"), 0.0]])
    assert settle_winners(s).tolist() == [1, 0, 2, 0]


def test_capped_winners_respect_capacity_and_prefer_the_argmax():
    from icm_dist.parallel import settle_winners_capped

    s = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.7, 0.0, 0.6], [0.1, 0.9, 0.0]])
    # capacity 2: expert 0 keeps its two highest scores (rows 0, 1); row 2 goes to its next best (2).
    assert settle_winners_capped(s, 2).tolist() == [0, 0, 2, 1]
    # with room for everyone it is the plain argmax
    assert settle_winners_capped(s, 4).tolist() == settle_winners(s).tolist()
    g = torch.Generator().manual_seed(0)
    r = torch.randn(32, 10, generator=g)
    w = settle_winners_capped(r, 4)
    assert torch.bincount(w, minlength=10).max() <= 4
    with pytest.raises(ValueError):
        settle_winners_capped(r, 3)

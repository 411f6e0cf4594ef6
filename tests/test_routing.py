"""Pure logic of the sharded step (the shard plan, score padding, who wins), tested without a process group."""

import pytest
import torch

from icm_dist.dist import ShardPlan, pad_scores, real_slice, unpad_scores
from icm_dist.errors import LaunchError
from icm_dist.routing import divide_wins, plan_splits, settle_winners, settle_winners_capped


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


def test_plan_splits_pairs_the_idlest_with_the_busiest():

    # 100 wins over 10 experts, fair share 10: idle below 2.5 (e1, e9 with 0, then e4 with 1), donors
    # at 15 or more (e0 with 30, then e3 with 20). Two pairs; e4 stays idle for want of a donor.
    wins = [30, 0, 12, 20, 1, 10, 10, 9, 8, 0]
    assert plan_splits(wins, 0.25, 1.5) == [(0, 1), (3, 9)]
    assert plan_splits([10] * 10, 0.25, 1.5) == []  # a fair division: nothing to split
    assert plan_splits([0] * 4, 0.25, 1.5) == []  # no wins counted yet
    assert plan_splits(torch.tensor([5, 0, 5]), 0.25, 1.2) == [(0, 1)]  # equal donors: the lower id
    # With spare experts expected idle (more experts than mechanisms), only the idle ones beyond them pair up.
    assert plan_splits(wins, 0.25, 1.5, spare=1) == [(0, 1), (3, 9)]  # three idle, one spare: still two pairs
    assert plan_splits(wins, 0.25, 1.5, spare=2) == [(0, 1)]
    assert plan_splits(wins, 0.25, 1.5, spare=3) == []
    assert plan_splits(wins, 0.25, 1.5, spare=5) == []
    # 5 mechanisms: e0 won 30 of 100, more than 1.5 mechanisms' shares (30 >= 1.5 / 5 x 100): it is split even
    # though the idle experts are no more than the spares; e3 (20) is below that and waits.
    assert plan_splits(wins, 0.25, 1.5, spare=5, merged=1.5 / 5) == [(0, 1)]
    assert plan_splits(wins, 0.25, 1.5, spare=5, merged=0.2) == [(0, 1), (3, 9)]  # e3 too, at a fifth
    assert plan_splits(wins, 0.25, 1.5, spare=1, merged=1.5 / 5) == [(0, 1), (3, 9)]  # the spare rule allows more
    assert plan_splits(wins, 0.25, 1.5, spare=5, merged=0.35) == []


def test_plan_splits_never_copy_over_the_last_expert_of_a_niche():
    # The same wins; niches as a spread stn's bases. e1 (idlest) is the only expert at 90: passed over, so e0
    # goes with e9 and e3 with e4. Without niches the pairs are those of the test above.
    wins = [30, 0, 12, 20, 1, 10, 10, 9, 8, 0]
    bases = [0, 90, 0, 0, 180, 0, 180, 0, 0, 270]
    assert plan_splits(wins, 0.25, 1.5, niches=[0] * 10) == [(0, 1), (3, 9)]
    # e9 is the last at 270 as well: e0 takes e4 (180 has e6 too), and e3 finds no idle expert left to take.
    assert plan_splits(wins, 0.25, 1.5, niches=bases) == [(0, 4)]
    # Within one check a niche's count follows the copies: e2 and e3 share 180, but once e3 (the idlest) is
    # copied over, e2 is the last at 180 and stays.
    wins = [30, 20, 1, 0, 12, 12, 12, 13]
    assert plan_splits(wins, 0.25, 1.5) == [(0, 3), (1, 2)]
    assert plan_splits(wins, 0.25, 1.5, niches=[0, 0, 180, 180, 0, 0, 0, 0]) == [(0, 3)]


def test_plan_splits_copy_only_within_a_kind():
    """A committee of several families: a copy must be of its donor's kind (part). e0 (part 0) takes the idlest
    expert of part 0 (e4, not e1 or e9 of part 1); e3 (part 1) takes e1; with no idle expert of its kind left a
    donor is passed over and the next one still pairs."""
    wins = [30, 0, 12, 20, 1, 10, 10, 9, 8, 0]
    kinds = [0, 1, 0, 1, 0, 0, 0, 0, 0, 1]
    assert plan_splits(wins, 0.25, 1.5, kinds=kinds) == [(0, 4), (3, 1)]
    assert plan_splits(wins, 0.25, 1.5, kinds=[0, 1, 0, 1, 1, 0, 0, 0, 0, 1]) == [(3, 1)]  # no idle of e0's kind
    assert plan_splits(wins, 0.25, 1.5, kinds=[0] * 10) == plan_splits(wins, 0.25, 1.5)
    # With niches too (a mixed committee's niche is its part with the family's own): the last of a niche stays.
    assert plan_splits(wins, 0.25, 1.5, niches=[(k, None) for k in kinds], kinds=kinds) == [(0, 4), (3, 1)]
    assert plan_splits(wins, 0.25, 1.5, niches=[(k, g == 4) for g, k in enumerate(kinds)], kinds=kinds) == [(3, 1)]


def _divide_reference(winners: list[int], scores: list[list[float]], donor: int, copy: int) -> list[int]:
    pool = sorted((i for i, w in enumerate(winners) if w in (donor, copy)), key=lambda i: (scores[i][donor], i))
    out = list(winners)
    for rank, i in enumerate(pool):
        out[i] = copy if rank < len(pool) // 2 else donor
    return out


def test_divide_wins_gives_the_copy_the_donors_weakest_half():

    s = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.0], [0.5, 0.0, 0.9], [0.7, 0.2, 0.1], [0.3, 0.9, 0.0]])
    w = settle_winners(s)  # [0, 0, 2, 0, 1]: donor 0 won rows 0, 1, 3 (scores 0.9, 0.2, 0.7)
    assert divide_wins(w, s, donor=0, copy=1).tolist() == [0, 1, 2, 0, 1]  # pool rows 0,1,3,4; lowest two: 1, 4
    assert divide_wins(w, s, donor=2, copy=1).tolist() == [0, 0, 2, 0, 1]  # pool rows 2, 4; expert 2 scores row 4 lower
    empty = torch.tensor([1, 1, 1])
    assert divide_wins(empty, torch.zeros(3, 3), donor=0, copy=2).tolist() == [1, 1, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        # Integer scores make ties common, which is where the ordering rule matters.
        scores = torch.randint(0, 4, (32, 6), generator=g).float()
        winners = settle_winners(scores)
        donor, copy = torch.randperm(6, generator=g)[:2].tolist()
        got = divide_wins(winners, scores, donor, copy).tolist()
        assert got == _divide_reference(winners.tolist(), scores.tolist(), donor, copy)


def test_a_division_keeps_a_capped_pair_within_capacity():
    # With train.capacity_factor and splits together, a division runs after the capped settlement.
    # Donor and copy each held at most `cap`, so the pool is at most 2*cap and its halves (floor and
    # ceil of k/2) fit the cap again: a division never breaks the cap.

    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        B, N = 32, 10
        cap = int(torch.randint(4, 9, (1,), generator=g))
        scores = torch.randint(0, 3, (B, N), generator=g).float()
        scores[:, 0] += 3  # one expert wants everything: the cap binds
        winners = settle_winners_capped(scores, cap)
        pairs = plan_splits(torch.bincount(winners, minlength=N), 0.25, 1.5)
        for donor, copy in pairs or [(0, 9)]:
            winners = divide_wins(winners, scores, donor, copy)
        assert torch.bincount(winners, minlength=N).max() <= cap

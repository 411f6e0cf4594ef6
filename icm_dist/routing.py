"""Who wins: winner settlement, the capacity cap and the split policy, as pure functions.

Everything here works on the gathered ``[B, N]`` score matrix (or on win counts), which is the same
on every rank, so every rank computes the same decision without talking to the others. No process
group, no module state: tests call these directly.
"""

from __future__ import annotations

from collections import Counter

import torch


def settle_winners(scores_BN: torch.Tensor) -> torch.Tensor:
    """Winner of each example: the argmax of its row, ties to the lowest global expert id.

    Written out rather than trusting argmax's tie rule: the lowest index among the row maxima.
    """
    row_max = scores_BN.max(dim=1, keepdim=True).values
    is_max = scores_BN == row_max
    ids = torch.arange(scores_BN.shape[1], device=scores_BN.device).expand_as(scores_BN)
    big = torch.full_like(ids, scores_BN.shape[1])
    return torch.where(is_max, ids, big).min(dim=1).values


def settle_winners_capped(scores_BN: torch.Tensor, capacity: int) -> torch.Tensor:
    """Winners when no expert may take more than ``capacity`` examples of the batch.

    Pairs (example, expert) are taken in order of decreasing score (ties: lower example, then lower
    expert id); a pair is assigned when its example is still free and its expert has room. Every
    example whose best expert has room gets that expert, as with :func:`settle_winners`; the rest
    go to their best expert with room. Computed from the gathered score matrix, so every rank
    settles the same winners.
    """
    B, N = scores_BN.shape
    if capacity * N < B:
        raise ValueError(f"capacity {capacity} x {N} experts cannot hold {B} examples")
    order = torch.sort(-scores_BN.detach().float().flatten().cpu(), stable=True).indices.tolist()
    winners = [-1] * B
    load = [0] * N
    free = B
    for k in order:
        i, j = divmod(k, N)
        if winners[i] < 0 and load[j] < capacity:
            winners[i] = j
            load[j] += 1
            free -= 1
            if free == 0:
                break
    return torch.tensor(winners, device=scores_BN.device)


def plan_splits(wins_N: list[int] | torch.Tensor, idle_share: float, donor_share: float,
                spare: int = 0, merged: float | None = None, niches: list | None = None,
                kinds: list | None = None) -> list[tuple[int, int]]:
    """Which experts to split into which, from the examples each won since the last check.

    Returns ``(donor, idle)`` pairs: the idlest expert (won less than ``idle_share`` fair shares) goes
    with the busiest (won at least ``donor_share`` fair shares), the next idlest with the next busiest,
    each expert in at most one pair. Ties go to the lower expert id. Every rank computes the same pairs
    from the same (all-gathered) winners.

    ``spare``: how many idle experts are expected (a committee with more experts than mechanisms has
    ``N' - M``); only the idle experts beyond those are evidence that some expert holds two mechanisms,
    so at most ``len(idle) - spare`` pairs are made.

    ``merged``: a share of all wins (e.g. 1.5 mechanisms' worth, ``1.5 / M``) that only an expert holding
    more than one mechanism reaches. Every donor at or above it is split even when no more than ``spare``
    experts are idle: the spares' scraps (experts that lead nothing still win a little) then do not hide
    a merge.

    ``niches``: what each expert is fixed to (its family's ``niches``; None: nothing). An idle expert that
    is the last of its niche is passed over (a copy would take its donor's niche, and nothing brings the
    lost one back), and the next idle one goes with that donor instead.

    ``kinds``: each expert's kind where a copy can only be of its own kind (the part of a committee of several
    families: one family's expert cannot hold another's state; None: one kind). A donor takes the idlest
    expert of its kind, and a donor with none left is passed over.
    """
    wins = [float(w) for w in (wins_N.tolist() if isinstance(wins_N, torch.Tensor) else wins_N)]
    N, total = len(wins), sum(wins)
    if total <= 0:
        return []
    fair = total / N
    idle = sorted((e for e in range(N) if wins[e] < idle_share * fair), key=lambda e: (wins[e], e))
    donors = sorted((e for e in range(N) if wins[e] >= donor_share * fair), key=lambda e: (-wins[e], e))
    allowed = len(idle) - spare
    if merged is not None:
        allowed = max(allowed, sum(wins[e] >= merged * total for e in donors))
    left, pairs = Counter(niches or []), []
    for donor in donors:
        if len(pairs) >= allowed:
            break
        copy = next((e for e in idle if (kinds is None or kinds[e] == kinds[donor])
                     and (niches is None or left[niches[e]] > 1)), None)
        if copy is None:
            continue
        idle.remove(copy)
        if niches is not None:
            left[niches[copy]] -= 1
            left[niches[donor]] += 1
        pairs.append((donor, copy))
    return pairs


def divide_wins(winners_B: torch.Tensor, scores_BN: torch.Tensor, donor: int, copy: int) -> torch.Tensor:
    """A donor and its fresh copy divide the examples either of them won: the copy takes the
    ``floor(k / 2)`` the donor scores lowest (ties: lower example index), the donor keeps the rest.

    The pool is "won by either" because a copy starts equal to its donor, so argmax ties hand every
    such example to whichever of the two has the lower id. Taking the donor's weakest half sends the
    copy towards what the donor does worst: when the donor holds two mechanisms, mostly one of them.
    """
    pool = torch.nonzero((winners_B == donor) | (winners_B == copy)).squeeze(1)
    out = winners_B.clone()
    if pool.numel() == 0:
        return out
    s = scores_BN[pool, donor].detach().float().cpu()
    order = torch.sort(s, stable=True).indices.to(pool.device)
    k = pool.numel() // 2
    out[pool] = donor
    out[pool[order[:k]]] = copy
    return out



def route_candidates(router_logits_BN: torch.Tensor, k: int, divisions=(), explore_BN: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The routed competition's candidates: a ``[B, N]`` mask with each example's ``k`` highest router
    logits (ties: the lower expert id), or'ed with ``explore_BN`` (:func:`explore_candidates`); for every
    ``(donor, copy)`` division under way, where one of the two is a candidate both are (they divide what
    either wins, so both must have run there).

    Computed once (on rank 0) and broadcast, so every rank runs the same candidates.
    """
    B, N = router_logits_BN.shape
    # A stable sort of the negated logits orders equal logits by expert id: the lower id comes first.
    top_Bk = torch.sort(-router_logits_BN.detach().float(), dim=1, stable=True).indices[:, :k]
    cand_BN = torch.zeros(B, N, dtype=torch.bool, device=router_logits_BN.device)
    cand_BN.scatter_(1, top_Bk, True)
    if explore_BN is not None:
        cand_BN |= explore_BN.to(cand_BN.device)
    for donor, copy in divisions:
        either_B = cand_BN[:, donor] | cand_BN[:, copy]
        cand_BN[:, donor] = either_B
        cand_BN[:, copy] = either_B
    return cand_BN


def explore_candidates(top_BN: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """``r`` experts per example drawn uniformly without replacement from those not in ``top_BN`` (the
    router's own picks), as a ``[B, N]`` mask: candidates the router did not choose, so that what a routed
    step teaches it is not only its own choice confirmed. Drawn on the CPU from ``gen``."""
    B, N = top_BN.shape
    noise_BN = torch.rand(B, N, generator=gen).masked_fill(top_BN.cpu(), 2.0)  # own picks sort last
    pick_Br = torch.sort(noise_BN, dim=1, stable=True).indices[:, :min(r, N - int(top_BN.sum(1).max()))]
    out_BN = torch.zeros(B, N, dtype=torch.bool)
    out_BN.scatter_(1, pick_Br, True)
    return out_BN.to(top_BN.device)


def routed_iteration(it: int, route_k: int | None, warmup: int, full_every: int) -> bool:
    """Whether iteration ``it`` (1-based) is a routed competition: with ``route_k``, after the first
    ``warmup`` iterations, except every ``full_every``-th (those, and the warm-up, are full competitions)."""
    return route_k is not None and it > warmup and it % full_every != 0

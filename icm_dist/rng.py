"""Random streams keyed by global ids, never by rank.

Every random draw in a run (the data split, each iteration's batches, each expert's
initialization and identity-training batches) comes from a generator seeded by a hash of
``(seed, purpose, ids...)``. Any rank can therefore reproduce any stream on its own, which is
what makes the result independent of the world size and makes resume exact without saving any
generator state: iteration ``t``'s batches are a function of ``t``.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def keyed_seed(seed: int, purpose: str, *ids: int) -> int:
    """A 63-bit seed derived from the run seed, a purpose string and integer ids."""
    text = "/".join([str(int(seed)), purpose, *(str(int(i)) for i in ids)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, purpose: str, *ids: int) -> torch.Generator:
    """A CPU generator for one keyed stream (draw on the CPU, then move: CPU and CUDA streams differ)."""
    return torch.Generator().manual_seed(keyed_seed(seed, purpose, *ids))


@contextlib.contextmanager
def seeded(seed: int, purpose: str, *ids: int):
    """Run a block (e.g. building an nn.Module) under a keyed global CPU seed, restoring the RNG after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(keyed_seed(seed, purpose, *ids))
        yield


def sample_indices(n: int, batch: int, seed: int, purpose: str, *ids: int) -> torch.Tensor:
    """``batch`` indices into ``range(n)`` drawn uniformly with replacement from a keyed stream."""
    return torch.randint(n, (batch,), generator=generator(seed, purpose, *ids))

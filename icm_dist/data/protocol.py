"""The paper's data protocol (section 4, appendix C): what the experts, D and the evaluation see.

MNIST is zero-padded to 32x32 in [0, 1] before anything else. The 60,000 training digits are cut
in half by a seeded permutation: one half is the canonical sample D_P (D's "real" data), the other
half is transformed, each digit by one mechanism drawn uniformly, and is all the experts ever see.
No pairing survives: the clean version of a transformed digit is never used in training (it is
kept only for diagnostics). Evaluation uses the 10,000 test digits, transformed the same way.

Noise is keyed by the example's global id: training digit ``i`` has id ``i``, test digit ``i`` has
id ``60000 + i``, so no two examples share a noise pattern and none depends on the rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..rng import generator
from .mechanisms import apply_mechanisms
from .mnist import load_mnist, to_float_32x32

TEST_ID_OFFSET = 60000


@dataclass
class Protocol:
    mechanisms: list[str]
    canonical_x: torch.Tensor  # [Nc, 1, 32, 32] canonical sample D_P (what D sees as real)
    classifier_x: torch.Tensor  # [30000, 1, 32, 32] the whole canonical half: the evaluation classifier's data
    classifier_labels: torch.Tensor  # [30000] (never used by the committee)
    transformed_x: torch.Tensor  # [Nt, 1, 32, 32] D_Q: what the experts see
    transformed_mech: torch.Tensor  # [Nt] mechanism index (logging only: the committee never sees it)
    test_x: torch.Tensor  # [10000, 1, 32, 32] transformed test digits, in the seeded evaluation order
    test_clean: torch.Tensor  # [10000, 1, 32, 32] the same digits untransformed
    test_mech: torch.Tensor  # [10000]
    test_labels: torch.Tensor  # [10000]


def build_protocol(cfg: Config, mnist: dict | None = None) -> Protocol:
    """Everything the run needs, as CPU tensors; the same on every rank for the same seed."""
    if mnist is None:
        mnist = load_mnist(cfg.data.root, cfg.data.source)
    names = list(cfg.data.mechanisms)
    M = len(names)
    train_x = to_float_32x32(mnist["train_images"], mnist["denominator"])
    test_x = to_float_32x32(mnist["test_images"], mnist["denominator"])
    n_train = train_x.shape[0]

    perm = torch.randperm(n_train, generator=generator(cfg.seed, "split"))
    half_ids, transformed_ids = perm[: n_train // 2], perm[n_train // 2:]
    # The 64-example ablation limits what D sees, not the evaluation classifier: that stays the same
    # "pretrained standard MNIST classifier" across ablations, trained on the whole canonical half.
    canonical_ids = half_ids if cfg.data.canonical_examples is None else half_ids[: cfg.data.canonical_examples]
    if cfg.data.transformed_examples is not None:
        transformed_ids = transformed_ids[: cfg.data.transformed_examples]

    t_mech = torch.randint(M, (len(transformed_ids),), generator=generator(cfg.seed, "train-mechanism"))
    transformed = apply_mechanisms(train_x[transformed_ids], t_mech, names, transformed_ids, cfg.seed)

    order = torch.randperm(test_x.shape[0], generator=generator(cfg.seed, "test-order"))
    test_mech = torch.randint(M, (len(order),), generator=generator(cfg.seed, "test-mechanism"))
    test_clean = test_x[order]
    test_t = apply_mechanisms(test_clean, test_mech, names, order + TEST_ID_OFFSET, cfg.seed)

    return Protocol(
        mechanisms=names,
        canonical_x=train_x[canonical_ids].contiguous(),
        classifier_x=train_x[half_ids].contiguous(),
        classifier_labels=mnist["train_labels"][half_ids].long(),
        transformed_x=transformed.contiguous(),
        transformed_mech=t_mech,
        test_x=test_t.contiguous(),
        test_clean=test_clean.contiguous(),
        test_mech=test_mech,
        test_labels=mnist["test_labels"][order].long(),
    )

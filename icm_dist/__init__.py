"""icm-dist: learning independent causal mechanisms with competing experts, sharded across ranks."""

__version__ = "0.1.0"

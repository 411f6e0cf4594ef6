"""The ``icm-dist`` command: ``train`` (the same as launch/train.py) and the tools around a run."""

from __future__ import annotations

import argparse
import sys

from ..config import load_config
from ..errors import IcmError
from ..faults import kill_after_iteration_from_env
from ..trainer import train
from .compare import add_parser as add_compare_parser
from .generalize import add_parser as add_generalize_parser  # Figures 7 and 8 on unseen symbols
from .ownership import add_parser as add_ownership_parser  # who leads which mechanism, over training
from .reuse import add_subcommands as add_reuse_subcommands  # export, apply, surgery


def _train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    hooks = [h for h in (kill_after_iteration_from_env(),) if h is not None]  # tests/test_resume_launch.py
    train(cfg, after_iteration=hooks)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icm-dist", description="Learning independent causal mechanisms, sharded.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a committee (python, torchrun or accelerate launch)")
    t.add_argument("--config", "-c", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.iterations=500 seed=3")
    t.set_defaults(func=_train)
    add_reuse_subcommands(sub)
    add_compare_parser(sub)
    add_generalize_parser(sub)
    add_ownership_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IcmError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

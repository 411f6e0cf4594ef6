"""The ``icm-dist`` command: ``train`` (the same as launch/train.py) and the tools around a run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..config import load_config
from ..errors import USER_ERROR, IcmError
from ..faults import kill_after_iteration_from_env
from ..trainer import train
from .args import Parser
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
    p = Parser(prog="icm-dist", description="Learning independent causal mechanisms, sharded.")
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
        report_user_error(e)
        return USER_ERROR


def report_user_error(e: IcmError) -> None:
    """``error: <message>`` once per launch. Under torchrun the line also goes to the worker's error file,
    where torchrun's failure report (and launch/torchrun_agent.py, which then prints it instead) finds it;
    an error that every rank raises alike is printed by rank 0 alone."""
    line = f"error: {e}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
        if os.environ.get("ICM_DIST_AGENT") == "1":
            return
    if not (e.same_on_every_rank and int(os.environ.get("RANK", "0")) != 0):
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""The command line's parser: a bad argument is one ``error:`` line, like every other user error."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from ..errors import USER_ERROR


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ``error: icm-dist <command>: <what>`` on one line (exit code USER_ERROR),
    with a pointer to ``--help`` instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse

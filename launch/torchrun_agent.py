"""torchrun's launcher (torch.distributed.run) as launch/torchrun.sh runs it.

A worker that stops on a user error (an ``IcmError``) exits with ``icm_dist.errors.USER_ERROR`` and leaves
its one ``error:`` line in torchrun's per-worker error file instead of printing it (``ICM_DIST_AGENT``).
When the launch failed on such errors, this launcher prints each distinct line once and exits with that
code: no ChildFailedError traceback, no copy of the line per rank, however the ranks' exits interleave
(torchrun stops the other workers as soon as the first fails, before they may have printed). A worker that
crashed in any other way keeps torchrun's full failure report: that is a bug, and the report finds it.
"""

import logging
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

from icm_dist.errors import USER_ERROR  # noqa: E402


def _worth_a_line(record: logging.LogRecord) -> bool:
    """torchrun's per-worker log lines that a failure report repeats: a worker's user-error exit, and the
    stopping of the others (the report lists them as SIGTERM)."""
    message = record.getMessage()
    return f"(exitcode: {USER_ERROR})" not in message and "closing signal SIGTERM" not in message


def main() -> int:
    os.environ["ICM_DIST_AGENT"] = "1"  # inherited by the workers: they leave the printing to us
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_worth_a_line)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        failures = [e.failures[r] for r in sorted(e.failures)]
        user = [f for f in failures if f.exitcode == USER_ERROR]
        for message in dict.fromkeys(str(f.message) for f in user):  # distinct, in rank order
            print(message, file=sys.stderr, flush=True)
        # The workers that did not fail themselves were stopped by torchrun (SIGTERM) after the first did.
        if user and all(f.exitcode in (USER_ERROR, -signal.SIGTERM) for f in failures):
            return USER_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults injected on purpose, for the tests that watch a launcher recover from them.

Nothing here runs unless its environment variables are set; the trainer only sees an
``after_iteration`` callback.
"""

from __future__ import annotations

import os
import signal


def kill_after_iteration_from_env():
    """``ICM_DIST_TEST_KILL_AT=K``: on torchrun's first launch of the group, rank ``ICM_DIST_TEST_KILL_RANK``
    (default 1) SIGKILLs itself after iteration K, so that a test can watch torchrun restart the group and resume.
    Returns the callback, or None when the variable is not set."""
    at = os.environ.get("ICM_DIST_TEST_KILL_AT")
    if not at:
        return None
    rank = os.environ.get("ICM_DIST_TEST_KILL_RANK", "1")

    def kill(trainer, iteration: int) -> None:
        if str(iteration) == at and trainer.restarts == 0 and str(trainer.dist.rank) == rank:
            print(f"test hook: rank {trainer.dist.rank} SIGKILLs itself after iteration {iteration}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return kill

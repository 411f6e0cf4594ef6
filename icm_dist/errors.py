"""Errors that stop a run with one readable line.

Every problem a user can cause (a bad config, a missing data set, a broken checkpoint, a
launch that cannot work) is raised as an :class:`IcmError`. The entry points catch it and
print ``error: <message>`` on one line instead of a traceback; anything else is a bug and
keeps its traceback.

Under a launcher every rank runs the same checks, so an error that follows from the config or the world
size alone is raised by every rank at once; it says ``same_on_every_rank`` and only rank 0 prints it.
"""

USER_ERROR = 2  # the exit code of a run stopped by an IcmError (launch/torchrun_agent.py relies on it)


class IcmError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""

    #: Every rank raises this same error (it follows from the config, the world size or rank 0's verdict),
    #: so the other ranks leave the printing to rank 0. False where one rank may see what others do not
    #: (a shard file, a data folder missing on one node).
    same_on_every_rank = False


def on_every_rank(error: IcmError) -> IcmError:
    """``error``, marked as raised identically by every rank."""
    error.same_on_every_rank = True
    return error


def on_this_rank(error: IcmError) -> IcmError:
    """``error``, marked as one this rank may raise alone (an import that fails on one node): it prints it."""
    error.same_on_every_rank = False
    return error


class ConfigError(IcmError):
    """A config key, type or value that cannot work."""

    same_on_every_rank = True  # every rank parses the same command line and files


class DataError(IcmError):
    """A data set that is missing, tampered with or malformed."""


class CheckpointError(IcmError):
    """A checkpoint that is missing, corrupt or does not fit the run."""


class OutputError(IcmError):
    """An output that cannot or may not be written: a run directory holding another run, a file that
    icm-dist did not write, a path that is not writable."""


class LaunchError(IcmError):
    """A launch that cannot work: too many ranks, ranks that disagree."""


class TrainingError(IcmError):
    """Training went wrong in a way the user must look at (a NaN loss)."""

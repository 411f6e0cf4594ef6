"""Errors that stop a run with one readable line.

Every problem a user can cause (a bad config, a missing data set, a broken checkpoint, a
launch that cannot work) is raised as an :class:`IcmError`. The entry points catch it and
print ``error: <message>`` on one line instead of a traceback; anything else is a bug and
keeps its traceback.
"""


class IcmError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ConfigError(IcmError):
    """A config key, type or value that cannot work."""


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

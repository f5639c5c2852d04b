"""The one exception type that carries a message meant for the user.

Entry scripts catch `FerdistError` and print its message as a single line (no traceback), so every message
must say what is wrong, where (file and line, URI, config key), and what to do about it.
"""


class FerdistError(Exception):
    """A problem with the user's input, data or environment, described in one sentence."""

    transient = False
    """Whether trying again can succeed. Most of ferdist's errors are deterministic (a bad key, a missing shard, a
    broken checkpoint): raised in a Ray worker, they end the run at once instead of through Ray's retries. A transient
    one (an object-store outage past its budget) keeps Ray's retries, like a lost node."""


class CorruptDataError(FerdistError):
    """Too many unreadable samples in the shards being read."""


class MissingError(FerdistError):
    """A file or object that was asked for does not exist."""


class Interrupted(FerdistError):
    """The user stopped a job (Ctrl-C); the message says what state it left and how to finish."""

"""The one exception type that carries a message meant for the user.

Entry scripts catch `FerdistError` and print its message as a single line (no traceback), so every message
must say what is wrong, where (file and line, URI, config key), and what to do about it.
"""


class FerdistError(Exception):
    """A problem with the user's input, data or environment, described in one sentence."""


class CorruptDataError(FerdistError):
    """Too many unreadable samples in the shards being read."""


class MissingError(FerdistError):
    """A file or object that was asked for does not exist."""


class Interrupted(FerdistError):
    """The user stopped a job (Ctrl-C); the message says what state it left and how to finish."""

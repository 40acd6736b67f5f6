"""Errors that are the user's to fix.

A :class:`UserError` is shown as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the input (config, files, arguments) with a message that says how to fix it.

    It is a :class:`ValueError`, so Python API callers can catch bad arguments the usual way.
    """


class DataError(UserError):
    """A dataset that is missing, truncated or not what it claims to be."""


class PartitionError(UserError):
    """A partition request that the dataset cannot honour."""

"""Errors the user can act on (reported by main.py as one FATAL line, exit status 2).

A user error is a :class:`UserError`: a bad config value or name, flag, workdir,
teacher or data set is a :class:`ConfigError` (also a ``ValueError``, so callers
that catch ``ValueError`` keep working). ``OSError`` (missing files) counts as a
user error too. Any other exception, a plain ``ValueError`` included, is a bug and
keeps its traceback.
"""


class UserError(Exception):
  """A run stopped for a reason its message explains (not a bug)."""


class ConfigError(UserError, ValueError):
  """A config field, flag or workdir is not valid; the message names it and the accepted values."""


class CorruptCheckpointError(UserError):
  """No intact checkpoint is left where checkpoints existed (corrupt ones were moved aside)."""


class NonFiniteRunError(UserError):
  """Too many non-finite updates in a row: the run stopped without saving them."""


USER_ERRORS = (OSError, UserError)

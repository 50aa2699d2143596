"""Errors the user can act on (reported by main.py as one FATAL line, exit status 2).

``ValueError`` (bad config values, names, shapes, workdirs) and ``OSError``
(missing files) count as user errors too; any other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
  """A run stopped for a reason its message explains (not a bug)."""


class CorruptCheckpointError(UserError):
  """No intact checkpoint is left where checkpoints existed (corrupt ones were moved aside)."""


class NonFiniteRunError(UserError):
  """Too many non-finite updates in a row: the run stopped without saving them."""


USER_ERRORS = (ValueError, OSError, UserError)

"""One trainer per workdir: a lock file holding the trainer's host and pid.

Two trainers on one workdir would interleave their checkpoints and metrics (issue 26:
both ran to the end, ``metrics.jsonl`` held steps twice). The lock is a file created
with ``O_EXCL`` (atomic on local and network file systems that honour it). A lock
left by a trainer that died (kill -9, a crash) is stale when its host is this host
and its pid is no longer alive: the next trainer takes it over. A lock of another
host cannot be checked from here; the message says how to remove it.
"""
import contextlib
import json
import os
import socket
import time

from fdistill.errors import ConfigError

LOCK_NAME = "trainer.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _holder(path):
  """The lock's record, or None if it is unreadable (a trainer killed while writing it)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _stale(holder) -> bool:
  if holder is None:
    return True
  return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


def take(workdir: str) -> str:
  """Creates ``<workdir>/trainer.lock`` for this process; a ValueError naming the holder if a
  live trainer has it. Returns the lock's path."""
  path = os.path.join(workdir, LOCK_NAME)
  record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
  for _ in range(2):  # at most one stale lock to replace
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if _stale(holder):
        os.remove(path)
        continue
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
      raise ConfigError(f"--workdir={workdir!r} is in use by another trainer (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, since {since}); stop it "
                        f"first, or delete {path} if that process no longer runs") from None
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    return path
  raise ConfigError(f"could not take the lock {path}: another trainer took it at the same time")


def release(path: str) -> None:
  """Removes the lock if it is still this process's."""
  holder = _holder(path)
  if holder is not None and holder.get("pid") == os.getpid() and (
      holder.get("host") == socket.gethostname()):
    os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True):
  """The lock of ``workdir`` for the duration of the block (``enabled=False``: a no-op, for the
  other processes of a multi-process run, whose process 0 holds it). A workdir this call
  had to create and that is empty again at the end is removed, so a command that fails
  before writing anything leaves nothing behind."""
  if not enabled:
    yield
    return
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = take(workdir)
  try:
    yield
  finally:
    release(path)
    if created and not os.listdir(workdir):
      os.rmdir(workdir)

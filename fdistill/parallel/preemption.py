"""Preemption notices (SIGTERM, TPU maintenance events) turned into one agreed step to save at.

Multi-process runs use JAX's preemption sync manager (started by
``jax.distributed.initialize``): it catches SIGTERM, and on TPU the
maintenance-event notice, on any process, and every process then learns the
same step at which to save, so the collective checkpoint save cannot
deadlock with half the hosts still training. Its C++ handler owns SIGTERM, so
no Python handler is installed then.

A single process without ``jax.distributed`` installs a Python handler for
the signals it is given (the loop: SIGTERM and SIGINT, i.e. Ctrl-C) that only
sets a flag; the loop saves after the step in flight and exits. A second
SIGINT aborts at once (KeyboardInterrupt), for a user who does not want to wait
for the save. Multi-process runs leave SIGINT to its default.
"""
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


def _multi_controller() -> bool:
  return jax.distributed.is_initialized()


class PreemptionWatch:
  """Context manager; ``reached(step)`` is True at the step where every process should save.

  Call ``reached`` after every step (the sync protocol counts on it).
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous = {}
    self.notified = False

  def _handle(self, signum, frame):
    del frame
    if self.notified and signum == signal.SIGINT:
      raise KeyboardInterrupt("second Ctrl-C: aborting without the checkpoint")
    logging.warning("Received signal %d: saving a checkpoint after this step, then exiting "
                    "(Ctrl-C again aborts at once)", signum)
    self.notified = True

  def __enter__(self):
    on_main_thread = threading.current_thread() is threading.main_thread()
    if not _multi_controller() and on_main_thread:
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    elif not _multi_controller():
      logging.warning("Not on the main thread: SIGTERM will not trigger a preemption checkpoint")
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    return False

  def reached(self, step: int) -> bool:
    if _multi_controller():
      self.notified = multihost_utils.reached_preemption_sync_point(step)
    return self.notified

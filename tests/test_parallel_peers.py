"""fdistill.parallel.peers.watch against an in-memory coordination service (one process stands
in for both; the two-process runs are in test_parallel_multiprocess.py)."""
import threading
import time

import jax

from fdistill.parallel import peers


class FakeService:
  """The key-value calls the watchdog makes, on a dict."""

  def __init__(self):
    self.kv, self.lock = {}, threading.Lock()

  def key_value_increment(self, key, amount):
    with self.lock:
      self.kv[key] = str(int(self.kv.get(key, "0")) + amount)

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      self.kv[key] = value


def test_a_second_watched_block_still_sees_a_dead_peer(monkeypatch):
  """Both processes end a watched block cleanly (each marks itself done); in the next block of
  the same session process 1 dies. Process 0 must report it: before the fix the first block's
  'done' keys still named process 1 as finished, and the watchdog never looked at it."""
  service, fatal, me = FakeService(), [], [1]
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: me[0])
  monkeypatch.setattr(peers, "_client", lambda: service)
  monkeypatch.setattr(peers, "exit_fatal", fatal.append)
  monkeypatch.setattr(peers, "BEAT_SECONDS", 0.02)
  # The block counters of process 1, then of process 0.
  monkeypatch.setattr(peers, "_blocks", iter([0, 0, 1]), raising=False)
  for process in (1, 0):  # block 1 on both: nothing to report
    me[0] = process
    with peers.watch(timeout=5.0):
      pass
  assert not fatal
  with peers.watch(timeout=0.2):  # block 2, process 0: process 1 never beats
    time.sleep(1.0)
  assert fatal and "process 1 stopped responding" in fatal[0], fatal

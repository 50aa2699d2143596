"""A dead peer in a multi-process run ends every other process in bounded time, with one line.

Without this (measured on two local CPU processes, one killed with SIGKILL): the survivor's
next collective fails with a Gloo traceback, then its exit blocks in JAX's shutdown barrier
until the coordination service's heartbeat timeout (100 s by default) and aborts with a C++
stack dump (exit 134). A peer that hangs instead of dying (a stopped process, a host that
dropped off the network) leaves the others blocked in a collective or a checkpoint barrier
until that heartbeat abort.

:func:`watch` does two things while training runs under ``jax.distributed``:

- a watchdog thread per process adds 1 to its own counter in the coordination service's
  key-value store every :data:`BEAT_SECONDS` and reads the others'; a peer whose counter has
  not moved for ``FDISTILL_PEER_TIMEOUT`` seconds (default :data:`PEER_TIMEOUT_SECONDS`,
  below the heartbeat timeout so it acts first), or a coordination service that stopped
  answering (process 0 died), ends this process;
- an error raised by a collective (a closed connection to a peer) ends it too.

Ending means one line ``FATAL: ...`` on stderr and ``os._exit(2)``: the normal exit would
run JAX's shutdown barrier, which waits for the dead peer and then aborts. Nothing is saved
at that point (the checkpoint save is collective); the restart resumes from the last one.
"""
import contextlib
import itertools
import os
import sys
import threading
import time

import jax

BEAT_SECONDS = 1.0
PEER_TIMEOUT_SECONDS = 30.0
_PREFIX = "fdistill/peers"
# Numbers the watched blocks of this process: every process enters them in the same order, so
# block n has the same key prefix on all (a block's "done" keys stay in the service after it).
_blocks = itertools.count()


def peer_timeout() -> float:
  return float(os.environ.get("FDISTILL_PEER_TIMEOUT", PEER_TIMEOUT_SECONDS))


def exit_fatal(message: str) -> None:
  """One FATAL line naming this process, then exit 2 at once (no shutdown barrier)."""
  text = " ".join(message.split())
  print(f"FATAL: process {jax.process_index()} of {jax.process_count()}: {text}; restart all "
        "processes: the run resumes from its last checkpoint", file=sys.stderr, flush=True)
  os._exit(2)


def silent_peers(counts: dict, last_change: dict, now: float, timeout: float):
  """The peers whose counter has not changed for ``timeout`` seconds (updates ``last_change``
  with the counters seen now; a peer not seen yet counts from its first entry there)."""
  silent = []
  for peer, (count, since) in list(last_change.items()):
    seen = counts.get(peer)
    if seen is not None and seen != count:
      last_change[peer] = (seen, now)
    elif now - since > timeout:
      silent.append(peer)
  return silent


class _Watchdog(threading.Thread):

  def __init__(self, client, timeout, prefix):
    super().__init__(name="fdistill-peer-watchdog", daemon=True)
    self.client, self.timeout, self.prefix = client, timeout, prefix
    self.me = jax.process_index()
    self.stopping = threading.Event()

  def run(self):
    start = time.monotonic()
    last_change = {p: (None, start) for p in range(jax.process_count()) if p != self.me}
    while not self.stopping.wait(BEAT_SECONDS):
      try:
        self.client.key_value_increment(f"{self.prefix}/beat/{self.me}", 1)
        counts = {int(k.rsplit("/", 1)[1]): v
                  for k, v in self.client.key_value_dir_get(f"{self.prefix}/beat/")}
        done = {int(k.rsplit("/", 1)[1]) for k, _ in
                self.client.key_value_dir_get(f"{self.prefix}/done/")}
      except Exception as e:  # the coordination service (process 0) no longer answers
        if not self.stopping.is_set():
          exit_fatal(f"lost the coordination service of process 0 ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else ''})")
        return
      silent = [p for p in silent_peers(counts, last_change, time.monotonic(), self.timeout)
                if p not in done]
      if silent and not self.stopping.is_set():
        exit_fatal(f"process {silent[0]} stopped responding (no heartbeat for "
                   f"{self.timeout:.0f} s: it died or hangs; see its log)")


def _client():
  from jax._src import distributed
  return distributed.global_state.client


@contextlib.contextmanager
def watch(timeout=None):
  """Watches the other processes for the duration of the block (a no-op in one process)."""
  if not jax.distributed.is_initialized() or jax.process_count() < 2:
    yield
    return
  client = _client()
  prefix = f"{_PREFIX}/{next(_blocks)}"
  dog = _Watchdog(client, peer_timeout() if timeout is None else timeout, prefix)
  dog.start()
  try:
    yield
  except jax.errors.JaxRuntimeError as e:  # its exit would wait in the shutdown barrier
    exit_fatal(runtime_error_message(e))
  finally:
    dog.stopping.set()
  with contextlib.suppress(Exception):  # a clean end: the others stop watching this process
    client.key_value_set(f"{prefix}/done/{jax.process_index()}", "1", allow_overwrite=True)


_PEER_LOST_MARKS = ("Connection closed by peer", "Connection reset", "heartbeat", "UNAVAILABLE",
                    "Barrier", "barrier", "DEADLINE_EXCEEDED")


def runtime_error_message(error) -> str:
  """The FATAL text for a JAX runtime error of a multi-process run (a lost peer named so)."""
  first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
  if any(mark in str(error) for mark in _PEER_LOST_MARKS):
    return f"a collective with the other processes failed ({first}): another process died or " \
           "lost its connection; see its log"
  return f"JAX runtime error ({first})"

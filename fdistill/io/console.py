"""What a person sees at the terminal: a start line, a progress line, checkpoint lines, a summary.

Process 0 only. On a terminal the progress line is rewritten in place every
``every_seconds``; elsewhere (files, CI, multi-process logs) it is printed as
plain lines at the same interval. Library logs (orbax, absl, TensorFlow, XLA)
are kept at WARNING by ``quiet_libraries`` unless ``--verbosity`` asks for more.
The start line counts the trained parameters; :func:`parameter_overview` gives their table too
(``<workdir>/parameters.txt``).
"""
import contextlib
import contextvars
import logging
import os
import sys
import time

import jax
# clu's parameter table only: clu.metric_writers and clu.periodic_actions import TensorFlow.
from clu import parameter_overview as clu_overview

from fdistill.parallel import mesh as mesh_lib

# Whether runs print their own lines; off inside :func:`silenced` only (a context variable, so
# leaving the block, an exception included, restores it).
_SHOWN = contextvars.ContextVar("fdistill_console_shown", default=True)


@contextlib.contextmanager
def silenced():
  """Runs started inside print none of their own lines (the demo prints one line per stage)."""
  token = _SHOWN.set(False)
  try:
    yield
  finally:
    _SHOWN.reset(token)


def shown() -> bool:
  """Whether this process prints run lines here: process 0, outside :func:`silenced`."""
  return _SHOWN.get() and mesh_lib.is_main_process()

LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jaxlib", "tensorflow", "tensorstore", "etils",
                   "tensorflow_datasets", "matplotlib")


def quiet_libraries(level=logging.WARNING):
  """Third-party loggers at ``level``; TensorFlow's C++ banner off (before TF is imported)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(level)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING if level >= logging.WARNING else
                             absl_logging.INFO)


def _format_eta(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_values(record, limit=4):
  """The main losses of a metric record as ``name=value`` (short names, at most ``limit``)."""
  losses = [(k, v) for k, v in record.items() if k.endswith("loss") and v is not None]
  return "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in losses[:limit])


def format_rate(step, now, first, total):
  """``'12.3 steps/s  ETA 0:01:02'`` (or ``'4.2 s/step'`` below one step per second), the rate
  measured from the first completed step (``first = (time, step)``), so compiling is not
  counted; before a second step completes the rate is unknown."""
  if step <= first[1] or now <= first[0]:
    return "compiling / first step"
  rate = (step - first[1]) / (now - first[0])
  shown = f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step"
  return f"{shown}  ETA {_format_eta((total - step) / rate)}"


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def parameter_overview(state):
  """``(table, total)`` for the trained networks of a training state (each ``state[net]["params"]``;
  EMA copies and optimiser state are not counted): clu's table of every parameter's path
  (``net/...``), shape, dtype, size and sharding (the PartitionSpec), and the total count.
  Reads shapes and shardings only: nothing is transferred, so every process can call it."""
  nets = {name: part["params"] for name, part in state.items()
          if isinstance(part, dict) and "params" in part}
  flat = {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nets)}
  table = clu_overview.get_parameter_overview(flat, include_stats="sharding")
  return table, int(clu_overview.count_parameters(flat))


def say(text):
  """One line for the person at the terminal (process 0; none inside :func:`silenced`)."""
  if shown():
    print(text, flush=True)


class Console:
  """Prints the run's lines on process 0 (``stream`` defaults to stdout)."""

  def __init__(self, total_steps, start_step, every_seconds=10.0, stream=None):
    self.stream = stream or sys.stdout
    self.enabled = shown()
    self.in_place = self.enabled and self.stream.isatty() and jax_process_count() == 1
    self.total, self.start = total_steps, start_step
    self.every = every_seconds
    self.started = self.last_print = time.monotonic()
    self.first = None  # (time, step) of the first completed step: the rate excludes compiling
    self.record = {}
    self._dirty = False

  def line(self, text):
    """A full line (ends an in-place progress line first)."""
    if not self.enabled:
      return
    if self._dirty:
      self.stream.write("\n")
      self._dirty = False
    self.stream.write(text + "\n")
    self.stream.flush()

  def progress(self, step, record=None, force=False):
    """The progress line for ``step`` when ``every_seconds`` have passed (or ``force``)."""
    if record:
      self.record = record
    now = time.monotonic()
    if self.first is None:
      self.first = (now, step)
    if not self.enabled or not (force or now - self.last_print >= self.every):
      return
    self.last_print = now
    text = (f"step {step}/{self.total}  {format_rate(step, now, self.first, self.total)}  "
            f"{summary_values(self.record)}").rstrip()
    if self.in_place:
      self.stream.write("\r\033[K" + text)
      self._dirty = True
    else:
      self.stream.write(text + "\n")
    self.stream.flush()


def jax_process_count():
  import jax
  return jax.process_count()

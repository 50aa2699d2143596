"""Metric writers: TensorBoard event files and a plain ``metrics.jsonl``, on process 0.

TensorBoard files are written with the ``tensorboard`` package's own event
writer (protobuf only), so no run imports TensorFlow for its metrics (that
import costs seconds; TensorFlow loads only for tfds datasets).

``metrics.jsonl`` is strict JSON, one object per logged step: a non-finite
value is written as ``null`` and its name listed under ``"nonfinite"``. A
restarted run first drops the rows after the step it resumes from (rewritten
atomically), so the file holds exactly one row per logged step however often
the run was restarted.
"""
import json
import math
import os
import time

from fdistill.parallel import mesh as mesh_lib


class TensorBoardWriter:
  """Scalars as TensorBoard events (``events.out.tfevents.*`` under ``logdir``)."""

  def __init__(self, logdir):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventFileWriter(logdir)

  def write_scalars(self, step, scalars):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
              for name, value in scalars.items()]
    self._writer.add_event(event_pb2.Event(step=int(step), wall_time=time.time(),
                                           summary=summary_pb2.Summary(value=values)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter:
  """Plain ``metrics.jsonl`` log beside the TensorBoard files (one JSON object per write)."""

  def __init__(self, path, resume_step=None):
    self._path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if resume_step is not None and os.path.exists(path):
      drop_rows_after(path, resume_step)

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    nonfinite = []
    for name, value in scalars.items():
      value = float(value)
      if math.isfinite(value):
        row[name] = value
      else:
        row[name] = None
        nonfinite.append(name)
    if nonfinite:
      row["nonfinite"] = nonfinite
    with open(self._path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  """Writes every record to each of ``writers`` (none on processes other than 0)."""

  def __init__(self, writers):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self):
    for writer in self._writers:
      writer.flush()

  def close(self):
    for writer in self._writers:
      writer.close()


def drop_rows_after(path, step):
  """Rewrites ``path`` (atomically) without the rows logged after ``step`` (and torn lines)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line torn by a crash mid-write
        continue
      if row.get("step", 0) <= step:
        kept.append(json.dumps(row, allow_nan=False) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def make_writer(workdir, resume_step=None):
  """TensorBoard + JSONL on process 0, nothing elsewhere; ``resume_step``: the step this run
  continues from (rows logged after it by an earlier attempt are dropped)."""
  if not mesh_lib.is_main_process():
    return MultiWriter([])
  return MultiWriter([TensorBoardWriter(workdir),
                      JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step)])

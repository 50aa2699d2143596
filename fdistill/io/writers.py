"""Metric writers: TensorBoard (clu) and a plain ``metrics.jsonl`` beside it, on process 0.

``metrics.jsonl`` is strict JSON, one object per logged step: a non-finite
value is written as ``null`` and its name listed under ``"nonfinite"``. A
restarted run first drops the rows after the step it resumes from (rewritten
atomically), so the file holds exactly one row per logged step however often
the run was restarted.
"""
import json
import math
import os

from clu import metric_writers

from fdistill.parallel import mesh as mesh_lib


class JsonlWriter(metric_writers.interface.MetricWriter):
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

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


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
  """TensorBoard + JSONL on process 0, logging only elsewhere; ``resume_step``: the step this
  run continues from (rows logged after it by an earlier attempt are dropped)."""
  if not mesh_lib.is_main_process():
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step),
  ])

"""Metric writers: TensorBoard (clu) and a plain ``metrics.jsonl`` beside it, on process 0."""
import json
import os

from clu import metric_writers

from fdistill.parallel import mesh as mesh_lib


class JsonlWriter(metric_writers.interface.MetricWriter):
  """Plain ``metrics.jsonl`` log beside the TensorBoard files (one JSON object per write)."""

  def __init__(self, path):
    self._path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)

  def write_scalars(self, step, scalars):
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

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


def make_writer(workdir):
  """TensorBoard + JSONL on process 0, logging only elsewhere."""
  if not mesh_lib.is_main_process():
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])

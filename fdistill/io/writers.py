"""Metric writers: TensorBoard event files and a plain ``metrics.jsonl``, on process 0.

TensorBoard files are written here, record by record (TFRecord framing with CRC32C, the
``Event`` protos of the ``tensorboard`` package): the package's own writer imports
TensorFlow through ``tensorboard.compat.tf`` whenever TensorFlow is installed, seconds
of import and two banners at every start. No run imports TensorFlow for its metrics.

``metrics.jsonl`` is strict JSON, one object per logged step: a non-finite
value is written as ``null`` and its name listed under ``"nonfinite"``. A
restarted run first drops the rows after the step it resumes from (rewritten
atomically), so the file holds exactly one row per logged step however often
the run was restarted.
"""
import json
import math
import os
import socket
import struct
import time

from fdistill.parallel import mesh as mesh_lib


def _crc32c_table():
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord files."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the bytes, their masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data +
          struct.pack("<I", _masked_crc(data)))


class TensorBoardWriter:
  """Scalars, text and PNG images as TensorBoard events (``events.out.tfevents.*``)."""

  def __init__(self, logdir):
    from tensorboard.compat.proto import event_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._file = open(os.path.join(logdir, name), "ab")
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add(self, event):
    self._file.write(tfrecord(event.SerializeToString()))

  def _summary(self, step, values):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    self._add(event_pb2.Event(step=int(step), wall_time=time.time(),
                              summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step, scalars):
    from tensorboard.compat.proto import summary_pb2
    self._summary(step, [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
                         for name, value in scalars.items()])

  def write_text(self, step, tag, text):
    """``text`` (markdown) under ``tag``: TensorBoard's text plugin."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
    tensor = tensor_pb2.TensorProto(dtype=7, string_val=[text.encode()],  # DT_STRING
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    self._summary(step, [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

  def write_png(self, step, tag, png: bytes, height: int, width: int):
    """An encoded PNG (e.g. a sample grid) under ``tag``."""
    from tensorboard.compat.proto import summary_pb2
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4,
                                      encoded_image_string=png)
    self._summary(step, [summary_pb2.Summary.Value(tag=tag, image=image)])

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


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
  """Writes every record to each of ``writers`` (none on processes other than 0); text and
  images go to the writers that take them (TensorBoard)."""

  def __init__(self, writers):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def _tensorboard(self):
    return [w for w in self._writers if isinstance(w, TensorBoardWriter)]

  def write_tensorboard(self, step, scalars):
    """Scalars for TensorBoard only (the learning rate, steps/s: not run metrics)."""
    for writer in self._tensorboard():
      writer.write_scalars(step, scalars)

  def write_text(self, step, tag, text):
    for writer in self._tensorboard():
      writer.write_text(step, tag, text)

  def write_png(self, step, tag, png, height, width):
    for writer in self._tensorboard():
      writer.write_png(step, tag, png, height, width)

  def flush(self):
    for writer in self._writers:
      writer.flush()

  def close(self):
    for writer in self._writers:
      writer.close()


def png_size(png: bytes):
  """(height, width) from a PNG's IHDR chunk."""
  width, height = struct.unpack(">II", png[16:24])
  return height, width


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

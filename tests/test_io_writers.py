"""TensorBoard events written without TensorFlow, read back by TensorBoard's own loader."""
import os
import subprocess
import sys

import numpy as np

from fdistill.io import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_crc32c_matches_the_standard_check_value():
  # CRC-32C's published check value (RFC 3720, the iSCSI polynomial) and the empty string.
  assert writers.crc32c(b"123456789") == 0xE3069283
  assert writers.crc32c(b"") == 0


def test_events_read_back_with_tensorboards_loader(tmp_path):
  """Scalars, the config as text and a PNG image, read by TensorBoard's EventAccumulator (which
  checks every record's CRC through TensorFlow's record reader when TensorFlow is installed)."""
  from matplotlib import pyplot as plt
  png_path = str(tmp_path / "grid.png")
  plt.imsave(png_path, np.random.default_rng(0).uniform(size=(12, 20, 3)))
  png = open(png_path, "rb").read()
  logdir = str(tmp_path / "tb")
  w = writers.MultiWriter([writers.TensorBoardWriter(logdir)])
  w.write_scalars(5, {"train/loss": 0.25, "train/skipped": 0})
  w.write_tensorboard(5, {"run/learning_rate": 1e-3})
  w.write_text(0, "config", "lr: 1e-3")
  w.write_png(5, "samples", png, *writers.png_size(png))
  w.close()
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0, "images": 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(5, 0.25)]
  assert acc.Scalars("run/learning_rate")[0].value == np.float32(1e-3)
  text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
  assert text == "lr: 1e-3"
  image = acc.Images("samples")[0]
  assert (image.height, image.width) == (12, 20) and image.encoded_image_string == png


def test_a_toy_run_imports_no_tensorflow(tmp_path):
  """A whole toy teacher run, then eval and sample, in one fresh interpreter: TensorFlow is never
  imported (it cost seconds at every start through tensorboard.compat.tf), also not through clu,
  whose parameter table the run writes (clu.metric_writers would import it)."""
  code = (
      "import sys; sys.path.insert(0, %r)\n"
      "from fdistill import modes\n"
      "from support import toy\n"
      "c = toy.tiny_teacher_config(10)\n"
      "c.eval.update(num_samples=100, batch_size=100)\n"
      "modes.run(c, %r, 'train_teacher'); modes.run(c, %r, 'eval'); modes.run(c, %r, 'sample')\n"
      "assert 'clu.parameter_overview' in sys.modules, 'the run used no clu'\n"
      "print('TF_IMPORTED' if 'tensorflow' in sys.modules else 'NO_TF')\n"
  ) % (os.path.join(ROOT, "tests"), *(str(tmp_path / "run"),) * 3)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "NO_TF", out.stdout[-2000:]

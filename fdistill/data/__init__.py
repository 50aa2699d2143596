"""Dataset registry.

Every dataset is an object with
  ``x_shape``  per-example shape (``(2,)`` for toys, ``(H, W, C)`` for images),
  ``cond_dim`` width of the one-hot class vector (0 = unconditional),
  ``iterator(batch_size, start_step=0, process_index=0, process_count=1)``
      yielding, for steps start_step, start_step+1, ..., this process's slice of
      the global batch as numpy ``{"x": float32 [B/P, ...], "cond": float32 [B/P, cond_dim]}``
      ("cond" only when cond_dim > 0).
Batches are a deterministic function of (seed, step) and independent of the
process count, so a resumed or re-sharded run sees exactly the same data.
No dataset imports TensorFlow: tfds data sets are read from prepared array_record
files (``images.TfdsImageDataset``); only preparing them needs TensorFlow.
"""
from fdistill.data import images
from fdistill.data import toy
from fdistill.registry import lookup

DATASETS = {
    "toy2d": toy.build_toy,
    "digits": images.build_digits,
    "mnist5k": images.build_mnist5k,
    "cifar10": images.build_cifar10,
    "imagenet64": images.build_imagenet64,
}


def build(data_config):
  """Builds the dataset named ``data_config.name`` from the remaining fields."""
  return lookup(DATASETS, data_config.name, "data.name")(data_config)

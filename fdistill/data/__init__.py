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
"""
from fdistill.registry import lookup

DATASETS = {}


def register(name):
  def deco(fn):
    DATASETS[name] = fn
    return fn
  return deco


def build(data_config):
  """Builds the dataset named ``data_config.name`` from the remaining fields."""
  # Imports register the datasets; done lazily so toy runs never import TensorFlow.
  from fdistill.data import toy  # noqa: F401
  try:
    from fdistill.data import images  # noqa: F401
  except ImportError as e:  # images.py may be absent in a minimal install
    if data_config.name not in DATASETS:
      raise ImportError(f"data.name={data_config.name!r} needs fdistill.data.images: {e}") from e
  return lookup(DATASETS, data_config.name, "data.name")(data_config)


def local_slice(global_batch, process_index, process_count):
  """This process's contiguous slice of a global numpy batch dict."""
  n = next(iter(global_batch.values())).shape[0]
  if n % process_count:
    raise ValueError(f"train.batch_size={n} is not divisible by the process count {process_count}")
  per = n // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in global_batch.items()}

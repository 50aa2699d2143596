"""Per-process slices of a global batch (shared by every dataset)."""
from fdistill.errors import ConfigError


def local_slice(global_batch, process_index, process_count):
  """This process's contiguous slice of a global numpy batch dict."""
  n = next(iter(global_batch.values())).shape[0]
  if n % process_count:
    raise ConfigError(f"train.batch_size={n} is not divisible by the process count {process_count}")
  per = n // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in global_batch.items()}

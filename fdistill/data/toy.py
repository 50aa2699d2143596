"""2-D distributions with exact densities (Gaussian mixtures) and their samplers.

All are GMMs, so the analytic teacher gives their exact noised scores and
``teachers.gmm_lib.log_prob`` their exact densities.
"""
import jax
import numpy as np

from fdistill.data import batching
from fdistill.diffusion import gmm as gmm_lib


class ToyDataset:
  """Exact samples of a toy GMM; batch ``step`` is drawn from key fold_in(seed, step)."""

  def __init__(self, config):
    self.gmm = gmm_lib.named(config.distribution)
    self.seed = int(config.get("seed", 0))
    self.x_shape = (2,)
    self.cond_dim = 0
    self._sample = jax.jit(gmm_lib.sample, static_argnums=2)

  def global_batch(self, step, batch_size):
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    return {"x": np.asarray(self._sample(self.gmm, key, batch_size))}

  def iterator(self, batch_size, start_step=0, process_index=0, process_count=1):
    step = start_step
    while True:
      yield batching.local_slice(self.global_batch(step, batch_size), process_index, process_count)
      step += 1


def build_toy(config):
  return ToyDataset(config)

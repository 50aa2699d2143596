"""2-D distributions with exact densities (Gaussian mixtures) and their samplers.

All are GMMs, so the analytic teacher gives their exact noised scores and
``fdistill.diffusion.gmm.log_prob`` their exact densities.
"""
import jax
import numpy as np

from fdistill.data import batching
from fdistill.diffusion import gmm as gmm_lib


class ToyDataset:
  """Exact samples of a toy GMM; batch ``step`` is drawn from key fold_in(seed, step).

  Besides the host ``iterator`` every dataset has, a toy dataset draws its batches on the
  device (:meth:`device_batches`): the same numbers, but no host round trip per step, which
  is most of a toy step's time on CPU.
  """

  def __init__(self, config):
    self.gmm = gmm_lib.named(config.distribution)
    self.seed = int(config.seed)
    self.x_shape = (2,)
    self.cond_dim = 0
    self._draw = jax.jit(self._batch, static_argnums=1)

  def _batch(self, step, batch_size):
    return {"x": gmm_lib.sample(self.gmm, jax.random.fold_in(jax.random.key(self.seed), step),
                                batch_size)}

  def global_batch(self, step, batch_size):
    return jax.tree_util.tree_map(np.asarray, self._draw(step, batch_size))

  def device_batches(self, batch_size, start_step, sharding):
    """Yields the global batches of steps start_step, start_step+1, ... as jax.Arrays placed
    with ``sharding``, drawn by one jitted program (every process runs it alike)."""
    draw = jax.jit(lambda step: self._batch(step, batch_size), out_shardings=sharding)
    step = start_step
    while True:
      yield draw(np.int32(step))
      step += 1

  def iterator(self, batch_size, start_step=0, process_index=0, process_count=1):
    step = start_step
    while True:
      yield batching.local_slice(self.global_batch(step, batch_size), process_index, process_count)
      step += 1


def build_toy(config):
  return ToyDataset(config)

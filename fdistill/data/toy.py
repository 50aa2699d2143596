"""2-D distributions with exact densities (Gaussian mixtures) and their samplers.

All are GMMs, so the analytic teacher gives their exact noised scores and
``teachers.analytic.log_prob`` their exact densities.
"""
import itertools

import jax
import numpy as np

from fdistill import data
from fdistill.teachers import analytic


def _unequal_weights(k, seed=0):
  """Weights spread over 1..4 (max/min ratio 4), in a fixed shuffled order."""
  w = np.linspace(1.0, 4.0, k)
  return np.random.default_rng(seed).permutation(w) / w.sum()


def gmm8(radius=1.0, std=0.05):
  """8 modes on a circle, unequal weights."""
  ang = 2 * np.pi * np.arange(8) / 8
  means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
  return analytic.make_gmm(_unequal_weights(8), means, std)


def gmm25(spacing=0.5, std=0.04):
  """5 x 5 grid of modes, unequal weights."""
  g = spacing * (np.arange(5) - 2)
  means = np.array(list(itertools.product(g, g)))
  return analytic.make_gmm(_unequal_weights(25), means, std)


def checkerboard(cells=4, size=2.0, per_cell=4, std=0.06):
  """Checkerboard-like mixture: small Gaussians filling the 'black' cells of a board."""
  width = size / cells
  offs = (np.arange(int(np.sqrt(per_cell))) + 0.5) / np.sqrt(per_cell) * width
  means = [(-size / 2 + i * width + a, -size / 2 + j * width + b)
           for i in range(cells) for j in range(cells) if (i + j) % 2 == 0
           for a in offs for b in offs]
  return analytic.make_gmm(np.ones(len(means)), np.array(means), std)


TOY_DISTRIBUTIONS = {"gmm8": gmm8, "gmm25": gmm25, "checkerboard": checkerboard}


def toy_gmm(name):
  from fdistill.registry import lookup
  return lookup(TOY_DISTRIBUTIONS, name, "data.distribution")()


class ToyDataset:
  """Exact samples of a toy GMM; batch ``step`` is drawn from key fold_in(seed, step)."""

  def __init__(self, config):
    self.gmm = toy_gmm(config.distribution)
    self.seed = int(config.get("seed", 0))
    self.x_shape = (2,)
    self.cond_dim = 0
    self._sample = jax.jit(analytic.sample, static_argnums=2)

  def global_batch(self, step, batch_size):
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    return {"x": np.asarray(self._sample(self.gmm, key, batch_size))}

  def iterator(self, batch_size, start_step=0, process_index=0, process_count=1):
    step = start_step
    while True:
      yield data.local_slice(self.global_batch(step, batch_size), process_index, process_count)
      step += 1


@data.register("toy2d")
def _build_toy(config):
  return ToyDataset(config)

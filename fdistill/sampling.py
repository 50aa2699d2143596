"""Drawing samples from a run's sampler: in batches for the metrics, as a PNG for people.

One home for the training loop's sample grids, the eval job's metric samples and
``--mode=sample``. ``sampling`` below is an :class:`fdistill.experiment.Sampling`
(the assembly's jitted sampler; used, never imported, which keeps this module beside
the assembly in the layers: ``tests/test_layout.py``).
"""
import os
from typing import Iterator

import jax
import numpy as np

from fdistill.diffusion import gmm as gmm_lib
from fdistill.parallel import mesh as mesh_lib


def class_labels(start: int, size: int, cond_dim: int) -> np.ndarray:
  """One-hot labels [size, cond_dim] cycling over the classes: sample ``start + i`` has class
  ``(start + i) mod cond_dim``, so every class is equally represented, as the papers' FID
  protocol draws them."""
  return np.eye(cond_dim, dtype=np.float32)[(start + np.arange(size)) % cond_dim]


def sample_batches(sampling, params, rng, num, batch_size) -> Iterator[np.ndarray]:
  """``num`` samples as host arrays, ``batch_size`` at a time (one compiled sampler).

  Class-conditional runs get :func:`class_labels`. The last batch is sampled full and cut.
  """
  cond_dim = sampling.task.cond_dim
  for i, start in enumerate(range(0, num, batch_size)):
    size = min(batch_size, num)
    cond = class_labels(start, size, cond_dim) if cond_dim else None
    x = np.asarray(sampling.sample(params, jax.random.fold_in(rng, i), size, cond))
    yield x[:num - start]


def sample_in_batches(sampling, params, rng, num, batch_size):
  """``num`` samples drawn ``batch_size`` at a time (one compiled sampler)."""
  return np.concatenate(list(sample_batches(sampling, params, rng, num, batch_size)))[:num]


def samples_path(workdir, step: int, sampler_steps: int) -> str:
  """One name for sample grids, from training and from ``--mode=sample``: the checkpoint step
  and the sampler's step count (a 2-step grid never overwrites the 1-step one)."""
  return os.path.join(workdir, f"samples_{step:07d}_{sampler_steps}steps.png")


def plot_reference(config):
  """The exact mixture behind toy data (drawn under scatter plots), else None."""
  return gmm_lib.named(config.data.distribution) if config.data.name == "toy2d" else None


def write_samples(sampling, params, rng, config, path, num=None):
  """Samples of ``params`` as a PNG: scatter for 2-D data, a grid for images; returns them.

  ``num`` (default ``eval.num_plot_samples``) in one sampler call; process 0 writes the file.
  """
  # Here, not at the top: matplotlib loads only when a PNG is drawn.
  from fdistill.io import plotting  # pylint: disable=g-import-not-at-top
  num = num or config.eval.num_plot_samples
  cond_dim = sampling.task.cond_dim
  cond = class_labels(0, num, cond_dim) if cond_dim else None
  samples = np.asarray(jax.device_get(sampling.sample(params, rng, num, cond)))
  if mesh_lib.is_main_process():
    plotting.save_samples(path, samples, reference=plot_reference(config))
  return samples

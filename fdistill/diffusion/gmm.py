"""Exact noised scores and denoisers of Gaussian mixtures (the oracle teacher).

For data ``x0 ~ sum_k w_k N(mu_k, C_k)`` and ``x_s = x0 + s eps`` the noised
density is ``p_s = sum_k w_k N(mu_k, C_k + s^2 I)`` and, with responsibilities
``g_k(x) = w_k N_k(x) / p_s(x)``,
  score    S(x; s) = -sum_k g_k (C_k + s^2 I)^{-1} (x - mu_k)
  denoiser D(x; s) = x + s^2 S(x; s)            (Tweedie)
Everything is closed form, so the analytic teacher (``teacher.kind='analytic'``)
is usable anywhere a trained one is, through :func:`as_apply_fn`. The named 2-D
mixtures of the toy data set live here too (:func:`named`).
"""
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.registry import lookup


class GMM(NamedTuple):
  """A Gaussian mixture; a pytree, so it can be passed as ``params``."""
  weights: jax.Array  # [K], sums to 1
  means: jax.Array    # [K, D]
  covs: jax.Array     # [K, D, D]


def make_gmm(weights, means, stds) -> GMM:
  """Mixture with isotropic components of standard deviations ``stds`` [K] (or a scalar)."""
  means = np.asarray(means, np.float64)
  k, d = means.shape
  stds = np.broadcast_to(np.asarray(stds, np.float64), (k,))
  weights = np.asarray(weights, np.float64)
  covs = stds[:, None, None]**2 * np.eye(d)[None]
  return GMM(jnp.asarray(weights / weights.sum(), jnp.float32), jnp.asarray(means, jnp.float32),
             jnp.asarray(covs, jnp.float32))


def _noised_components(gmm: GMM, x, sigma):
  """Per-component log N(x; mu_k, C_k + s^2 I) [B, K] and precision-times-residual [B, K, D]."""
  d = gmm.means.shape[-1]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  cov = gmm.covs[None] + (sigma**2)[:, None, None, None] * jnp.eye(d, dtype=x.dtype)  # [B,K,D,D]
  resid = x[:, None, :] - gmm.means[None]  # [B,K,D]
  chol = jnp.linalg.cholesky(cov)
  sol = jax.scipy.linalg.cho_solve((chol, True), resid[..., None])[..., 0]
  logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
  logn = -0.5 * (jnp.sum(resid * sol, -1) + logdet + d * jnp.log(2 * jnp.pi))
  return logn, sol


def log_prob(gmm: GMM, x, sigma=0.0):
  """log p_s(x) for x [B, D]."""
  logn, _ = _noised_components(gmm, x, sigma)
  return jax.nn.logsumexp(logn + jnp.log(gmm.weights), axis=-1)


def score(gmm: GMM, x, sigma):
  """Exact score of the noised mixture, [B, D]."""
  logn, sol = _noised_components(gmm, x, sigma)
  resp = jax.nn.softmax(logn + jnp.log(gmm.weights), axis=-1)
  return -jnp.einsum("bk,bkd->bd", resp, sol)


def denoiser(gmm: GMM, x, sigma):
  """Exact posterior mean E[x0 | x_s = x] (Tweedie)."""
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  return x + (sigma**2)[:, None] * score(gmm, x, sigma)


def as_apply_fn():
  """``apply(params=gmm, x, sigma, cond=None, **unused) -> D``: the teacher interface."""

  def apply(gmm, x, sigma, cond=None, **unused):
    del cond, unused
    return denoiser(gmm, x, sigma)

  return apply


def sample(gmm: GMM, rng, n):
  """n exact samples [n, D]."""
  k_rng, e_rng = jax.random.split(rng)
  comp = jax.random.choice(k_rng, gmm.weights.shape[0], (n,), p=gmm.weights)
  chol = jnp.linalg.cholesky(gmm.covs)[comp]
  eps = jax.random.normal(e_rng, (n, gmm.means.shape[-1]))
  return gmm.means[comp] + jnp.einsum("nij,nj->ni", chol, eps)


def mean(gmm: GMM):
  return jnp.einsum("k,kd->d", gmm.weights, gmm.means)


def covariance(gmm: GMM):
  """Closed-form mixture covariance: sum w (C + mu mu^T) - m m^T."""
  m = mean(gmm)
  second = jnp.einsum("k,kij->ij", gmm.weights,
                      gmm.covs + jnp.einsum("ki,kj->kij", gmm.means, gmm.means))
  return second - jnp.outer(m, m)


# ---------------------------------------------------------------------------
# The named 2-D mixtures of the toy data set (data.distribution), each with an exact density.


def _unequal_weights(k, seed=0):
  """Weights spread over 1..4 (max/min ratio 4), in a fixed shuffled order."""
  w = np.linspace(1.0, 4.0, k)
  return np.random.default_rng(seed).permutation(w) / w.sum()


def gmm8(radius=1.0, std=0.05):
  """8 modes on a circle, unequal weights."""
  ang = 2 * np.pi * np.arange(8) / 8
  means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
  return make_gmm(_unequal_weights(8), means, std)


def gmm25(spacing=0.5, std=0.04):
  """5 x 5 grid of modes, unequal weights."""
  g = spacing * (np.arange(5) - 2)
  means = np.array(list(itertools.product(g, g)))
  return make_gmm(_unequal_weights(25), means, std)


def checkerboard(cells=4, size=2.0, per_cell=4, std=0.06):
  """Checkerboard-like mixture: small Gaussians filling the 'black' cells of a board."""
  width = size / cells
  offs = (np.arange(int(np.sqrt(per_cell))) + 0.5) / np.sqrt(per_cell) * width
  means = [(-size / 2 + i * width + a, -size / 2 + j * width + b)
           for i in range(cells) for j in range(cells) if (i + j) % 2 == 0
           for a in offs for b in offs]
  return make_gmm(np.ones(len(means)), np.array(means), std)


TOY_DISTRIBUTIONS = {"gmm8": gmm8, "gmm25": gmm25, "checkerboard": checkerboard}


def named(name):
  """The 2-D mixture called ``name`` (``data.distribution``)."""
  return lookup(TOY_DISTRIBUTIONS, name, "data.distribution")()

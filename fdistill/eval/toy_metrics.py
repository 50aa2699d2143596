"""Exact metrics for samples of a known Gaussian mixture.

* precision:     share of samples within ``radius`` standard deviations of some mode
                 (Mahalanobis distance under that mode's covariance);
* modes_covered: modes that received at least ``min_frac`` of their expected share
                 (weight x number of samples) of such samples;
* weight_recall: sum_k min(share_k, w_k), 1 when the per-mode shares equal the
                 mixture weights (one minus the total-variation distance);
* log_density:   mean exact log p_data(sample); compare with ``-entropy``, the
                 same mean over true samples.
"""
import jax
import jax.numpy as jnp

from fdistill.diffusion import gmm as gmm_lib


def mahalanobis_to_modes(gmm: gmm_lib.GMM, x):
  """[N, K] Mahalanobis distances of samples to each mode."""
  resid = x[:, None, :] - gmm.means[None]
  prec = jnp.linalg.inv(gmm.covs)
  return jnp.sqrt(jnp.einsum("nki,kij,nkj->nk", resid, prec, resid))


def mode_statistics(gmm: gmm_lib.GMM, x, radius=3.0, min_frac=0.1):
  """Dict of the metrics above for samples ``x`` [N, D]."""
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  dist = mahalanobis_to_modes(gmm, x)
  nearest = jnp.argmin(dist, axis=1)
  precise = jnp.min(dist, axis=1) <= radius
  k = gmm.weights.shape[0]
  counts = jnp.zeros(k).at[nearest].add(precise.astype(jnp.float32))
  share = counts / n
  weights = gmm.weights
  covered = counts >= jnp.maximum(1.0, min_frac * weights * n)
  return {
      "modes_covered": int(jnp.sum(covered)),
      "num_modes": int(k),
      "precision": float(jnp.mean(precise)),
      "weight_recall": float(jnp.sum(jnp.minimum(share, weights))),
      "log_density": float(jnp.mean(gmm_lib.log_prob(gmm, x))),
  }


def reference_log_density(gmm: gmm_lib.GMM, rng=None, n=20000):
  """Mean log p_data over true samples (Monte-Carlo estimate of minus the entropy)."""
  rng = jax.random.key(0) if rng is None else rng
  return float(jnp.mean(gmm_lib.log_prob(gmm, gmm_lib.sample(gmm, rng, n))))

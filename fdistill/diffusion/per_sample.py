"""Per-sample array conventions, the one home of each: a batch is [B, ...] and a per-sample
quantity (a noise level, a weight, a loss) is [B] or a scalar.

``expand`` lines a per-sample quantity up against a batch; ``mean`` and ``total`` reduce a
batch over every axis but the first (the data dimensions). Pure ``jnp``; no dtype changes
(callers cast where their numerics need it).
"""
import jax.numpy as jnp


def expand(v, x):
  """``v`` [B] (or a scalar) reshaped to broadcast against ``x`` [B, ...]."""
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def mean(x):
  """[B, ...] -> [B]: the mean over the data dimensions."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def total(x):
  """[B, ...] -> [B]: the sum over the data dimensions."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)

"""Shared building blocks: noise / label embeddings (EDM ``networks.py`` semantics)."""
import flax.linen as nn
import jax
import jax.numpy as jnp


class FourierEmbedding(nn.Module):
  """EDM ``FourierEmbedding``: x -> [cos(2 pi f x), sin(2 pi f x)], f ~ N(0, scale^2) fixed.

  ``freqs`` is a parameter only so it is checkpointed and importable from EDM
  pickles; it is never trained (stop_gradient).
  """
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x):
    freqs = self.param("freqs", lambda k: self.scale * jax.random.normal(k, (self.num_channels // 2,)))
    h = jnp.outer(x.astype(jnp.float32), 2 * jnp.pi * jax.lax.stop_gradient(freqs))
    return jnp.concatenate([jnp.cos(h), jnp.sin(h)], axis=1)


class PositionalEmbedding(nn.Module):
  """EDM ``PositionalEmbedding`` (transformer sinusoids), [cos, sin] order."""
  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  @nn.compact
  def __call__(self, x):
    half = self.num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if self.endpoint else 0))
    freqs = (1.0 / self.max_positions)**freqs
    h = jnp.outer(x.astype(jnp.float32), freqs)
    return jnp.concatenate([jnp.cos(h), jnp.sin(h)], axis=1)

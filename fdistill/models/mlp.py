"""Toy score / generator network for low-dimensional (2-D) data."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fdistill.models import layers


class ScoreMLP(nn.Module):
  """Raw network F(x_in, c_noise, cond) for vectors [B, D].

  Noise conditioning: Fourier features of c_noise, added to every hidden layer
  (FiLM-style shift), which is what lets one small MLP fit all noise levels.
  """
  hidden: Sequence[int] = (256, 256, 256)
  emb_dim: int = 64
  num_classes: int = 0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, return_features=False):
    dtype = jnp.dtype(self.dtype)
    emb = layers.FourierEmbedding(self.emb_dim)(c_noise)
    if self.num_classes and cond is not None:
      emb = emb + nn.Dense(self.emb_dim, use_bias=False)(cond)
    emb = nn.silu(nn.Dense(self.emb_dim)(emb))
    h = x.astype(dtype)
    feats = []
    for width in self.hidden:
      h = nn.Dense(width, dtype=dtype)(h) + nn.Dense(width, dtype=dtype)(emb)
      h = nn.silu(h)
      feats.append(h)
    out = nn.Dense(x.shape[-1], dtype=dtype, kernel_init=nn.initializers.zeros)(h)
    return (out, feats) if return_features else out

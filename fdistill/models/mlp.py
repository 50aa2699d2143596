"""Toy score / generator network for low-dimensional (2-D) data."""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill.models import layers


class ScoreMLP(nn.Module):
  """Raw network F(x_in, c_noise, cond) for vectors [B, D].

  Noise conditioning: Fourier features of c_noise, added to every hidden layer
  (FiLM-style shift), which is what lets one small MLP fit all noise levels.

  ``input_fourier`` > 0 feeds ``concat(x, sin(x B), cos(x B))`` instead of x, with
  ``B`` [D, input_fourier] drawn once from N(0, input_fourier_scale^2) at init and
  never trained (random Fourier features): a plain MLP is a smooth function of
  its input and cannot map one Gaussian onto 25 sharp modes in a few thousand
  steps; these features make it able to (measured in the demo study, docs/toy_results.md).
  ``residual`` adds each hidden layer's input to its output where widths match.
  """
  hidden: Sequence[int] = (256, 256, 256)
  emb_dim: int = 64
  num_classes: int = 0
  dtype: str = "float32"
  input_fourier: int = 0
  input_fourier_scale: float = 3.0
  residual: bool = False

  def input_features(self, x):
    if not self.input_fourier:
      return x
    init = lambda key, shape: self.input_fourier_scale * jax.random.normal(key, shape)
    b = jax.lax.stop_gradient(self.param("input_fourier_b", init,
                                         (x.shape[-1], self.input_fourier)))
    proj = x @ b.astype(x.dtype)
    return jnp.concatenate([x, jnp.sin(proj), jnp.cos(proj)], axis=-1)

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, return_features=False):
    dtype = jnp.dtype(self.dtype)
    emb = layers.FourierEmbedding(self.emb_dim)(c_noise)
    if self.num_classes and cond is not None:
      emb = emb + nn.Dense(self.emb_dim, use_bias=False)(cond)
    emb = nn.silu(nn.Dense(self.emb_dim)(emb))
    h = self.input_features(x.astype(dtype))
    feats = []
    for width in self.hidden:
      out = nn.silu(nn.Dense(width, dtype=dtype)(h) + nn.Dense(width, dtype=dtype)(emb))
      h = h + out if self.residual and h.shape[-1] == width else out
      feats.append(h)
    out = nn.Dense(x.shape[-1], dtype=dtype, kernel_init=nn.initializers.zeros)(h)
    return (out, feats) if return_features else out

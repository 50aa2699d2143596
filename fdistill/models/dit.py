"""DiT (Peebles & Xie 2023): a patchified transformer with adaLN-zero conditioning, NHWC in/out.

Follows the reference DiT layout (parameter shapes, qkv channel order
[3, heads, head_dim], patch vector order (p, p, C), 2-D sin-cos position
table with the column coordinate in the first half) so published DiT
weights can be imported. Two deliberate differences, both for the EDM
model protocol of ``fdistill.models``:

* the noise embedding is the sinusoid of ``c_noise`` (= log(sigma)/4), as in
  EDM's U-Nets, instead of the DDPM timestep;
* the class input is a (one-hot or soft) vector ``cond`` [B, label_dim]; the
  class table has one extra row, the learned "null" class of classifier-free
  guidance, weighted by ``1 - sum(cond)`` (so a zero vector means
  unconditional, exactly DiT's ``num_classes + 1`` table for one-hot input).

With ``return_features`` the network also returns the token features of
``feature_blocks`` (default: the last block of each quarter of the depth),
each laid out on the patch grid [B, H/p, W/p, hidden_size].
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fdistill.models import layers
from fdistill.ops.attention import attention

_xavier = nn.initializers.xavier_uniform()
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


def _sincos_1d(dim: int, pos):
  """DiT's 1-D sin-cos table: [sin(pos w), cos(pos w)], w = 10000^(-i / (dim/2))."""
  omega = 1.0 / 10000**(np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embedding(dim: int, grid_size: int) -> np.ndarray:
  """DiT's fixed 2-D position table [grid_size**2, dim] (row-major tokens)."""
  cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                           np.arange(grid_size, dtype=np.float64))
  return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)],
                        axis=1).astype(np.float32)


def patchify(x, p: int):
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] with patch vectors in (p, p, C) order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p: int, h: int, w: int):
  """Inverse of :func:`patchify` for an output image of spatial size (h, w)."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(name, dtype):
  # DiT's LayerNorm has no affine parameters; the adaLN modulation replaces them.
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention over tokens through ``ops.attention``."""
  num_heads: int
  dtype: str = "float32"
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    b, t, c = x.shape
    qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=_xavier, name="qkv")(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, c // self.num_heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.attn_impl)
    return nn.Dense(c, dtype=self.dtype, kernel_init=_xavier, name="proj")(out.reshape(b, t, c))


class DiTBlock(nn.Module):
  """Transformer block whose LayerNorm shift/scale and residual gates come from the
  conditioning vector (adaLN-zero: gates start at zero, so the block starts as identity)."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: str = "float32"
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x, c, train: bool = False):
    mod = nn.Dense(6 * self.hidden_size, dtype=self.dtype, kernel_init=_zeros,
                   name="adaLN_modulation")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(_layer_norm("norm1", self.dtype)(x), shift_msa, scale_msa)
    h = Attention(self.num_heads, self.dtype, self.attn_impl, name="attn")(h)
    x = x + gate_msa[:, None, :] * h
    h = modulate(_layer_norm("norm2", self.dtype)(x), shift_mlp, scale_mlp)
    h = nn.Dense(int(self.hidden_size * self.mlp_ratio), dtype=self.dtype, kernel_init=_xavier,
                 name="mlp_fc1")(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h, approximate=True))
    h = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_xavier, name="mlp_fc2")(h)
    return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
  """DiT-{S,B,L,XL}/p as the raw EDM network F (see the module docstring)."""
  img_resolution: int = 32
  in_channels: int = 4
  out_channels: Optional[int] = None  # None: same as in_channels
  label_dim: int = 0
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  pos_embedding: str = "sincos"  # "sincos" (fixed, DiT) | "learned"
  noise_channels: int = 256
  dropout: float = 0.0
  label_dropout: float = 0.0
  feature_blocks: Tuple[int, ...] = ()
  dtype: str = "float32"
  attn_impl: str = "xla"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # layers.REMAT_POLICIES

  def _feature_blocks(self):
    if self.feature_blocks:
      return tuple(self.feature_blocks)
    return tuple(sorted({max(0, self.depth * q // 4 - 1) for q in (1, 2, 3, 4)}))

  def _conditioning(self, c_noise, cond, train):
    """Noise embedding plus class embedding (with the null-class row), [B, hidden] float32."""
    emb = layers.PositionalEmbedding(self.noise_channels, name="t_embedder_freq")(c_noise)
    emb = nn.Dense(self.hidden_size, kernel_init=_normal, name="t_embedder_fc1")(emb)
    emb = nn.Dense(self.hidden_size, kernel_init=_normal, name="t_embedder_fc2")(nn.silu(emb))
    if self.label_dim:
      labels = layers.class_labels(cond, self.label_dim, c_noise.shape[0])
      labels = layers.drop_labels(self, labels, self.label_dropout, train)
      labels = jnp.concatenate([labels, 1 - jnp.sum(labels, axis=1, keepdims=True)], axis=1)
      table = self.param("y_embedder", _normal, (self.label_dim + 1, self.hidden_size))
      emb = emb + labels @ table
    return emb

  def _positions(self, num_tokens):
    if self.pos_embedding == "sincos":
      return jnp.asarray(sincos_pos_embedding(self.hidden_size, int(round(num_tokens**0.5))))
    if self.pos_embedding == "learned":
      return self.param("pos_embed", _normal, (num_tokens, self.hidden_size))
    raise ValueError(f"Unknown pos_embedding={self.pos_embedding!r}; valid values: sincos, learned")

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, return_features=False):
    b, h, w, _ = x.shape
    p = self.patch_size
    if h != self.img_resolution or w != self.img_resolution or h % p:
      raise ValueError(f"input spatial shape {(h, w)} must be img_resolution="
                       f"{self.img_resolution} and divisible by patch_size={p}")
    dtype = jnp.dtype(self.dtype)
    out_channels = self.out_channels or self.in_channels
    c = self._conditioning(c_noise, cond, train)

    tokens = nn.Dense(self.hidden_size, dtype=dtype, kernel_init=_xavier, name="x_embedder")(
        patchify(x.astype(dtype), p))
    tokens = tokens + self._positions(tokens.shape[1]).astype(dtype)

    block_cls = layers.maybe_remat(DiTBlock, self.remat, self.remat_policy)
    keep = self._feature_blocks()
    features = []
    for i in range(self.depth):
      tokens = block_cls(self.hidden_size, self.num_heads, self.mlp_ratio, self.dropout,
                         self.dtype, self.attn_impl, name=f"blocks_{i}")(tokens, c, train)
      if i in keep:
        features.append(tokens.reshape(b, h // p, w // p, self.hidden_size))

    shift, scale = jnp.split(
        nn.Dense(2 * self.hidden_size, dtype=dtype, kernel_init=_zeros,
                 name="final_adaLN_modulation")(nn.silu(c)), 2, axis=-1)
    tokens = modulate(_layer_norm("final_norm", dtype)(tokens), shift, scale)
    tokens = nn.Dense(p * p * out_channels, dtype=dtype, kernel_init=_zeros,
                      name="final_linear")(tokens)
    out = unpatchify(tokens, p, h, w).astype(jnp.float32)
    return (out, features) if return_features else out

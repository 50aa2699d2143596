"""Shared building blocks (EDM ``networks.py`` semantics): noise / label embeddings,
EDM initialisers, Linear and GroupNorm with EDM parameter names."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill.errors import ConfigError


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


# ---------------------------------------------------------------------------
# EDM-style parameter layers. Parameter names follow EDM's state dicts
# ("weight", "bias") so a weight importer maps them by name; layouts are the
# JAX-native ones (Linear [in, out], conv HWIO), so the importer transposes.


@dataclasses.dataclass(frozen=True)
class Init:
  """An EDM init spec (``init_mode``, ``init_weight``, ``init_bias``), hashable for linen fields."""
  mode: str = "kaiming_normal"
  weight: float = 1.0
  bias: float = 0.0


# mode -> (uniform?, std-like scale as a function of fan_in, fan_out).
_INIT_MODES = {
    "xavier_uniform": (True, lambda fi, fo: math.sqrt(6 / (fi + fo))),
    "xavier_normal": (False, lambda fi, fo: math.sqrt(2 / (fi + fo))),
    "kaiming_uniform": (True, lambda fi, fo: math.sqrt(3 / fi)),
    "kaiming_normal": (False, lambda fi, fo: math.sqrt(1 / fi)),
}


def weight_init(mode: str, fan_in: int, fan_out: int, gain: float = 1.0):
  """EDM's ``weight_init`` as a flax initializer ``(key, shape, dtype) -> array``.

  EDM draws biases from the same distribution as weights (then scales by
  ``init_bias``), and its recipes were tuned with these exact distributions,
  so we reproduce them rather than use flax's variance-scaling initialisers.
  """
  if mode not in _INIT_MODES:
    raise ValueError(f"Unknown init mode={mode!r}; valid values: {', '.join(_INIT_MODES)}")
  uniform, scale_fn = _INIT_MODES[mode]
  scale = scale_fn(fan_in, fan_out) * gain

  def init(key, shape, dtype=jnp.float32):
    if gain == 0:
      return jnp.zeros(shape, dtype)
    noise = (jax.random.uniform(key, shape, dtype, -1.0, 1.0) if uniform
             else jax.random.normal(key, shape, dtype))
    return scale * noise

  return init


def weight_and_bias(module: nn.Module, init: Init, fan_in: int, fan_out: int, weight_shape,
                    use_bias: bool = True):
  """Creates EDM's "weight" (and "bias" [weight_shape[-1]]) params of ``module`` per ``init``."""
  weight = module.param("weight", weight_init(init.mode, fan_in, fan_out, init.weight),
                        tuple(weight_shape))
  if not use_bias:
    return weight, None
  bias = module.param("bias", weight_init(init.mode, fan_in, fan_out, init.bias),
                      tuple(weight_shape[-1:]))
  return weight, bias


class Linear(nn.Module):
  """EDM ``Linear``: ``x @ W + b`` computed in the input's dtype (params stay float32)."""
  features: int
  use_bias: bool = True
  init: Init = Init()

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    weight, bias = weight_and_bias(self, self.init, fan_in, self.features,
                                   (fan_in, self.features), self.use_bias)
    y = x @ weight.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


class GroupNorm(nn.Module):
  """EDM ``GroupNorm``: ``min(num_groups, C // min_channels_per_group)`` groups, NHWC.

  Statistics are computed in float32 whatever the compute dtype (EDM computes
  them in fp16 under mixed precision; float32 only removes rounding error).
  """
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    groups = min(self.num_groups, channels // self.min_channels_per_group)
    weight = self.param("weight", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    h = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, channels // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(h, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=axes, keepdims=True)
    h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (h * weight + bias).astype(x.dtype)


def pixel_norm(x, eps: float = 1e-8):
  """PixelNorm (Karras et al. 2018): ``x / sqrt(mean(x^2 over the last axis) + eps)``.

  Each vector along the channel axis gets unit RMS (norm ``sqrt(C)``); computed
  in float32, returned in x's dtype. sCM's adaptive double normalisation
  applies it to the time/class modulation of a norm layer (models/unet.py).
  """
  h = x.astype(jnp.float32)
  return (h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def class_labels(cond, label_dim: int, batch: int):
  """The class vector a conditional network sees: ``cond``, or zeros (unconditional) when None."""
  if cond is None:
    return jnp.zeros((batch, label_dim), jnp.float32)
  return jnp.asarray(cond, jnp.float32).reshape(batch, label_dim)


def drop_labels(module: nn.Module, labels, rate: float, train: bool):
  """Zeroes whole class vectors with probability ``rate`` (classifier-free guidance training).

  Uses the module's "dropout" rng, and is the identity unless ``train``.
  """
  if not train or not rate:
    return labels
  keep = jax.random.uniform(module.make_rng("dropout"), (labels.shape[0], 1)) >= rate
  return labels * keep.astype(labels.dtype)


# config.model.remat_policy: what a rematerialised block keeps from its forward for the
# backward (jax.checkpoint_policies); everything else is recomputed.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def maybe_remat(block_cls, remat: bool, policy: str = "nothing_saveable"):
  """``block_cls`` rematerialised per block with ``policy`` when ``remat``, else itself. The
  blocks' ``__call__(self, x, emb, train)``: static_argnums counts the module, so train is 3."""
  if policy not in REMAT_POLICIES:
    raise ConfigError(f"model.remat_policy={policy!r} is not valid; valid values: "
                      f"{', '.join(REMAT_POLICIES)}")
  if not remat:
    return block_cls
  return nn.remat(block_cls, static_argnums=(3,), policy=getattr(jax.checkpoint_policies, policy))

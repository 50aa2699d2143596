"""Discriminators for f-distill: one logit per sample and head, estimating ``log p_t/q_t``.

Two kinds (``objective.discriminator.name``):

* ``mlp``: a small MLP on the noised sample and its noise level, for 2-D data
  (the analytic teacher has no features to offer).
* ``unet_heads``: convolutional heads on the frozen teacher's encoder features
  (``apply(params, x, sigma, cond, return_features=True) -> (D, features)``,
  features = one map per encoder resolution, bottleneck last). CIFAR-10 uses
  one head per resolution, ImageNet-64 the bottleneck only, following the
  public f-distill code (NVlabs/FastGen ``Discriminator_EDM``: heads halve the
  resolution with 4x4 stride-2 convs + GroupNorm + SiLU, then collapse the
  map to 1x1 and project to one logit). Ours collapses from 4x4 rather than
  8x8 so the tiny test U-Nets (4x4 bottlenecks) work with the same code.

``build`` returns a :class:`Discriminator` of closures; nothing outside
models/ touches the linen modules.
"""
import dataclasses
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill.errors import ConfigError
from fdistill.models import layers
from fdistill.registry import lookup


class MLPDiscriminator(nn.Module):
  """Logit of (x_t, sigma): preconditioned input ``x_t / sqrt(sigma^2 + sd^2)`` (flattened,
  so images work too: a small baseline for tiny image runs) and Fourier features of
  ``log(sigma) / 4`` added to every hidden layer (as in ``ScoreMLP``)."""
  hidden: Sequence[int] = (128, 128, 128)
  emb_dim: int = 64
  sigma_data: float = 0.5

  @nn.compact
  def __call__(self, x_t, sigma):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x_t.shape[:1])
    h = x_t.reshape(x_t.shape[0], -1) / jnp.sqrt(sigma**2 + self.sigma_data**2)[:, None]
    emb = nn.silu(nn.Dense(self.emb_dim)(layers.FourierEmbedding(self.emb_dim)(jnp.log(sigma) / 4)))
    for width in self.hidden:
      h = nn.silu(nn.Dense(width)(h) + nn.Dense(width)(emb))
    return nn.Dense(1)(h)


def _group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
  """Largest divisor of ``channels`` that is at most ``max_groups`` and leaves at least
  ``min_group_size`` channels per group.

  Why the group size: the head's last GroupNorm sees a 1x1 map, where a group of one
  channel normalises every value to exactly 0; with 32 groups on 16 or 32 channels (the
  digits U-Nets) every logit was its bias and the discriminator's gradient exactly 0
  (``disc_grad_norm`` 0.0, ``disc_loss`` 2 log 2): no ratio, no GAN term. Wide networks
  (>= 128 channels) keep 32 groups, as FastGen's heads.
  """
  limit = max(1, min(max_groups, channels // min_group_size))
  return next(g for g in range(limit, 0, -1) if channels % g == 0)


class FeatureHead(nn.Module):
  """[B, H, W, C] feature map -> [B, 1] logit: stride-2 4x4 convs down to 4x4 (or the map's
  own size if smaller), a conv over the whole remaining map, then a 1x1 projection."""
  channels: int

  @nn.compact
  def __call__(self, feat):
    h = feat.astype(jnp.float32)

    def norm_act(x):
      return nn.silu(nn.GroupNorm(num_groups=_group_count(self.channels))(x))

    while h.shape[1] > 4:
      h = norm_act(nn.Conv(self.channels, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))(h))
    h = norm_act(nn.Conv(self.channels, h.shape[1:3], padding="VALID")(h))  # -> 1x1
    return nn.Conv(1, (1, 1))(h).reshape(h.shape[0], 1)


class FeatureDiscriminator(nn.Module):
  """One :class:`FeatureHead` per selected feature map; logits [B, len(feature_indices)]."""
  feature_indices: Tuple[int, ...] = (-1,)
  channels: int = 0  # 0: each head keeps its feature map's channel count

  @nn.compact
  def __call__(self, features):
    logits = []
    for i in self.feature_indices:
      feat = features[i]
      head = FeatureHead(self.channels or feat.shape[-1], name=f"head{i % len(features)}")
      logits.append(head(feat))
    return jnp.concatenate(logits, axis=1)


@dataclasses.dataclass(frozen=True)
class Discriminator:
  """``init(rng) -> params``; ``apply(params, x_t, sigma, features) -> logits [B, heads]``.

  ``uses_features``: whether ``apply`` needs the teacher's encoder features
  (then the caller runs the teacher with ``return_features=True``).
  """
  init: Callable
  apply: Callable
  uses_features: bool


def _mlp(config, x_shape, feature_shapes, sigma_data):
  del feature_shapes
  module = MLPDiscriminator(hidden=tuple(config.hidden), emb_dim=config.emb_dim,
                            sigma_data=sigma_data)
  x = jnp.zeros((1,) + tuple(x_shape), jnp.float32)

  def init(rng):
    return module.init(rng, x, jnp.ones((1,), jnp.float32))["params"]

  def apply(params, x_t, sigma, features=None):
    del features
    return module.apply({"params": params}, x_t, sigma)

  return Discriminator(init, apply, uses_features=False)


def _unet_heads(config, x_shape, feature_shapes, sigma_data):
  del x_shape, sigma_data
  if feature_shapes is None:
    raise ConfigError("objective.discriminator.name='unet_heads' needs a teacher network that "
                      "returns encoder features (teacher.kind='checkpoint' with a U-Net)")
  module = FeatureDiscriminator(tuple(config.feature_indices), config.channels)
  example = [jnp.zeros((1,) + tuple(s.shape[1:]), jnp.float32) for s in feature_shapes]

  def init(rng):
    return module.init(rng, example)["params"]

  def apply(params, x_t, sigma, features):
    del x_t, sigma
    return module.apply({"params": params}, list(features))

  return Discriminator(init, apply, uses_features=True)


DISCRIMINATORS = {"mlp": _mlp, "unet_heads": _unet_heads}


def build(config, x_shape, feature_shapes=None, sigma_data=0.5) -> Discriminator:
  """The discriminator named ``config.name``; ``feature_shapes``: the teacher's feature
  ShapeDtypeStructs (from ``jax.eval_shape``), needed by ``unet_heads``."""
  return lookup(DISCRIMINATORS, config.name, "objective.discriminator.name")(
      config, x_shape, feature_shapes, sigma_data)


def teacher_feature_shapes(teacher_apply, teacher_params, x_shape, cond_dim=0) -> Any:
  """Shapes of the teacher's encoder features for one example, or None if it has none."""
  x = jax.ShapeDtypeStruct((1,) + tuple(x_shape), jnp.float32)
  sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = jax.ShapeDtypeStruct((1, cond_dim), jnp.float32) if cond_dim else None
  out = jax.eval_shape(lambda p, x, s, c: teacher_apply(p, x, s, c, return_features=True),
                       teacher_params, x, sigma, cond)
  return out[1] if isinstance(out, tuple) else None

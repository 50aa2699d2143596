"""Model registry. Nothing outside this package touches a module object directly:
callers get closures: an EDM denoiser ``apply(params, x, sigma, cond)`` from
:func:`make_denoiser`, a TrigFlow network ``F_apply(params, x_scaled, t, cond)`` from
:func:`make_F`, both around the one linen call of :func:`raw_apply`.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fdistill.diffusion import edm
from fdistill.diffusion import trigflow
from fdistill.registry import lookup
from fdistill.models import dit
from fdistill.models import mlp
from fdistill.models import unet
from fdistill.errors import ConfigError

MODELS = {
    "mlp": mlp.ScoreMLP,
    "songunet": unet.SongUNet,
    "dhariwalunet": unet.DhariwalUNet,
    "dit": dit.DiT,
}

# Config fields of ``config.model`` that configure the wrapper, not the module.
_WRAPPER_FIELDS = ("name", "sigma_data")


def lookup_model(model_config):
  """The linen module class ``model_config.name`` names (ValueError listing the valid ones)."""
  return lookup(MODELS, model_config.name, "model.name")


def build(model_config):
  """Instantiates the linen module named ``model_config.name`` with the remaining fields."""
  cls = lookup_model(model_config)
  kwargs = {k: v for k, v in dict(model_config).items() if k not in _WRAPPER_FIELDS}
  valid = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - valid)
  if unknown:
    raise ConfigError(f"model.{unknown[0]} is not a field of model.name={model_config.name!r}; "
                      f"valid fields: {', '.join(sorted(valid))}")
  return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})


def augment_kwargs(augment_labels):
  """The augmentation keyword of a network call: none at all without labels (networks
  without ``augment_dim``, and the analytic teachers' closures, take no such argument)."""
  return {} if augment_labels is None else {"augment_labels": augment_labels}


def raw_apply(module) -> Callable:
  """The one linen call convention: ``net_fn(params, x_in, c_noise, cond, rng=None,
  return_features=False, augment_labels=None) -> F`` (or ``(F, features)``).

  ``rng`` enables dropout (training); ``return_features`` also returns the network's encoder
  features (for discriminators); ``augment_labels`` [B, 9] condition a U-Net with
  ``augment_dim`` on EDM's augmentation (``fdistill.data.augment``).
  """

  def net_fn(params, x_in, c_noise, cond, rng=None, return_features=False,
             augment_labels=None):
    rngs = {"dropout": rng} if rng is not None else None
    return module.apply({"params": params}, x_in, c_noise, cond, train=rng is not None,
                        return_features=return_features, rngs=rngs,
                        **augment_kwargs(augment_labels))

  return net_fn


def make_denoiser(module, sigma_data: float = edm.SIGMA_DATA) -> Callable:
  """``apply(params, x, sigma, cond=None, rng=None, return_features=False,
  augment_labels=None) -> D``: EDM's preconditioning around :func:`raw_apply`."""
  return edm.precondition(raw_apply(module), sigma_data)


def make_F(module, sigma_data: float = edm.SIGMA_DATA, time_embedding: str = "edm",
           time_scale: float = 1.0) -> Callable:
  """``F_apply(params, x_scaled, t, cond=None, rng=None, return_features=False)``: the TrigFlow
  network (:func:`fdistill.diffusion.trigflow.network_F`) around :func:`raw_apply`. With the
  default "edm" embedding, ``trigflow.trigflow_to_denoiser(make_F(m)) == make_denoiser(m)``
  for the same params."""
  return trigflow.network_F(raw_apply(module), sigma_data, time_embedding, time_scale)


def build_denoiser(model_config):
  """``(module, denoiser)``: the module ``model_config`` names and its :func:`make_denoiser`."""
  module = build(model_config)
  return module, make_denoiser(module, model_config.sigma_data)


def initializer(module, x_shape, cond_dim: int = 0) -> Callable:
  """``init(rng) -> params`` of ``module`` for examples of per-example shape ``x_shape``."""
  return lambda rng: init_params(module, rng, (1,) + tuple(x_shape), cond_dim)


def init_params(module, rng, x_shape, cond_dim: int = 0):
  """Initialises params for inputs of ``x_shape`` [B, ...] (cond one-hot of width cond_dim)."""
  x = jnp.zeros(x_shape, jnp.float32)
  c_noise = jnp.zeros(x_shape[:1], jnp.float32)
  cond = jnp.zeros((x_shape[0], cond_dim), jnp.float32) if cond_dim else None
  return module.init({"params": rng, "dropout": rng}, x, c_noise, cond)["params"]


def param_count(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))

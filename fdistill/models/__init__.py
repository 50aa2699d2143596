"""Model registry. Nothing outside this package touches a module object directly:
callers get ``apply(params, x, sigma, cond)`` closures from :func:`make_denoiser`.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fdistill.diffusion import edm
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


def make_denoiser(module, sigma_data: float = edm.SIGMA_DATA) -> Callable:
  """Returns ``apply(params, x, sigma, cond=None, rng=None, return_features=False) -> D``.

  ``rng`` enables dropout (training); ``return_features`` also returns the
  network's encoder features (for discriminators); ``augment_labels`` [B, 9] condition a
  U-Net with ``augment_dim`` on EDM's augmentation (``fdistill.data.augment``).
  """

  def net_fn(params, x_in, c_noise, cond, rng=None, return_features=False,
             augment_labels=None):
    rngs = {"dropout": rng} if rng is not None else None
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    return module.apply({"params": params}, x_in, c_noise, cond, train=rng is not None,
                        return_features=return_features, rngs=rngs, **extra)

  return edm.precondition(net_fn, sigma_data)


def init_params(module, rng, x_shape, cond_dim: int = 0):
  """Initialises params for inputs of ``x_shape`` [B, ...] (cond one-hot of width cond_dim)."""
  x = jnp.zeros(x_shape, jnp.float32)
  c_noise = jnp.zeros(x_shape[:1], jnp.float32)
  cond = jnp.zeros((x_shape[0], cond_dim), jnp.float32) if cond_dim else None
  return module.init({"params": rng, "dropout": rng}, x, c_noise, cond)["params"]


def param_count(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))

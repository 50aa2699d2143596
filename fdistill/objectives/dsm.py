"""Denoising score matching (EDM loss): teacher training; its loss also trains fake scores."""
import jax
import jax.numpy as jnp

from fdistill import models
from fdistill.diffusion import edm
from fdistill.diffusion import per_sample
from fdistill.objectives.base import Objective, SamplerSpec
from fdistill.optim import state as state_lib
from fdistill.optim import update


def make_loss(apply_fn, sigma_data=edm.SIGMA_DATA, p_mean=-1.2, p_std=1.2):
  """``loss(params, inputs, batch, rng)``: EDM-weighted ``|D(x0 + s eps; s) - x0|^2``.

  ``inputs`` is unused (the shared loss signature). The per-sample error is a
  mean over data dimensions, so learning rates do not depend on the
  resolution; with lambda(s) the effective weight on F is 1 at every s.
  """

  def loss(params, inputs, batch, rng):
    del inputs
    x0 = batch["x"]
    s_rng, e_rng, d_rng = jax.random.split(rng, 3)
    sigma = edm.sample_sigma_lognormal(s_rng, x0.shape[:1], p_mean, p_std)
    eps = jax.random.normal(e_rng, x0.shape, x0.dtype)
    d = apply_fn(params, edm.add_noise(x0, eps, sigma), sigma, batch.get("cond"), rng=d_rng)
    err = per_sample.mean(jnp.square(d - x0))
    loss_val = jnp.mean(edm.loss_weight(sigma, sigma_data) * err)
    return loss_val, {"loss": loss_val}

  return loss


def sampler(config, task, settings=None) -> SamplerSpec:  # pylint: disable=unused-argument
  """Heun (EDM) sampling of the trained denoiser's EMA, ``eval.sampler_steps`` steps."""
  module, apply_fn = models.build_denoiser(config.model)

  def sample(params, rng, num, cond=None):
    noise = jax.random.normal(rng, (num,) + tuple(task.x_shape))
    return edm.heun_sampler(apply_fn, params, noise, cond, num_steps=config.eval.sampler_steps)

  return SamplerSpec(init_params=models.initializer(module, task.x_shape, task.cond_dim),
                     sample=sample)


def build(config, task, settings=None) -> Objective:  # pylint: disable=unused-argument
  """Teacher training by DSM for any registered model and dataset."""
  _, apply_fn = models.build_denoiser(config.model)
  sample = sampler(config, task)
  loss = make_loss(apply_fn, config.model.sigma_data, config.objective.p_mean,
                   config.objective.p_std)
  net_update = update.updater(config, ema=True)

  def init(rng, teacher=None):
    del teacher  # teacher training has no teacher
    return dict(state_lib.init_counters(),
                net=state_lib.init_net_state(sample.init_params(rng), net_update.tx))

  def step(state, teacher, batch, rng):
    del teacher
    net, _, aux, ok = net_update(state["net"], loss, None, batch, rng, state["step"])
    return update.count_step(dict(state, net=net), ok), aux

  return Objective(init=init, steps={"dsm": step}, schedule=lambda i: "dsm",
                   export=lambda state: state["net"]["ema"], sampler=sample)

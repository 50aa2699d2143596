"""Denoising score matching (EDM loss): teacher training and fake-score training."""
import jax
import jax.numpy as jnp

from fdistill import models
from fdistill.diffusion import edm
from fdistill.objectives import Objective
from fdistill.optim import state as state_lib
from fdistill.optim import update


def make_loss(apply_fn, sigma_data=edm.SIGMA_DATA, p_mean=-1.2, p_std=1.2):
  """``loss(params, frozen, batch, rng)``: EDM-weighted ``|D(x0 + s eps; s) - x0|^2``.

  ``frozen`` is unused (kept for the shared loss signature). The per-sample
  error is a mean over data dimensions, so learning rates do not depend on
  the resolution; with lambda(s) the effective weight on F is 1 at every s.
  """

  def loss(params, frozen, batch, rng):
    del frozen
    x0 = batch["x"]
    s_rng, e_rng, d_rng = jax.random.split(rng, 3)
    sigma = edm.sample_sigma_lognormal(s_rng, x0.shape[:1], p_mean, p_std)
    eps = jax.random.normal(e_rng, x0.shape, x0.dtype)
    d = apply_fn(params, edm.add_noise(x0, eps, sigma), sigma, batch.get("cond"), rng=d_rng)
    err = jnp.mean(jnp.square(d - x0).reshape(x0.shape[0], -1), axis=-1)
    per_sample = edm.loss_weight(sigma, sigma_data) * err
    loss_val = jnp.mean(per_sample)
    return loss_val, {"loss": loss_val}

  return loss


def build(config, ctx) -> Objective:
  """Teacher training by DSM for any registered model and dataset."""
  module = models.build(config.model)
  sigma_data = config.model.get("sigma_data", edm.SIGMA_DATA)
  apply_fn = models.make_denoiser(module, sigma_data)
  tx = state_lib.make_optimizer(config.optim)
  obj = config.objective
  loss = make_loss(apply_fn, sigma_data, obj.get("p_mean", -1.2), obj.get("p_std", 1.2))
  ema_decay = config.optim.get("ema_decay", 0.999)

  def init(rng):
    params = models.init_params(module, rng, (1,) + tuple(ctx.x_shape), ctx.cond_dim)
    return dict(update.init_counters(), net=state_lib.init_net_state(params, tx))

  def step(state, frozen, batch, rng):
    del frozen  # teacher training has no teacher
    net, loss_val, aux, ok = update.grad_and_update(state["net"], loss, None, batch, rng, tx,
                                                   ema_decay, update.micro_batch_count(config))
    return update.count_step(dict(state, net=net), ok), {"train/" + k: v for k, v in aux.items()}

  def sample(state, rng, num, cond=None):
    noise = jax.random.normal(rng, (num,) + tuple(ctx.x_shape))
    return edm.heun_sampler(apply_fn, state["net"]["ema"], noise, cond,
                            num_steps=config.eval.get("sampler_steps", 18))

  return Objective(init=init, step=step, sample=sample,
                   denoiser=lambda state: (apply_fn, state["net"]["ema"]))

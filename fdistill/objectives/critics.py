"""What every score-distillation objective shares: the generator, the fake score and the
discriminator, their losses, and the noised batch the critics train on.

Notation (docs/design.md section 4): generator ``G(z) = D_g(s_g z; s_g)``,
teacher ``D_T`` (frozen), fake score ``D_fake`` trained by denoising score
matching on stop_gradient(G(z)), discriminator whose logit estimates
``log r = log p_t/q_t``. Losses have the shared signature
``loss(params, inputs, batch, rng) -> (loss, aux)``.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fdistill.diffusion import edm
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import noise
from fdistill.parallel import partition
from fdistill.registry import lookup


@dataclasses.dataclass(frozen=True)
class Nets:
  """The closures the losses need: generator, teacher, fake score (denoisers) and discriminator."""
  gen_apply: Callable
  teacher_apply: Callable
  fake_apply: Callable
  disc: disc_lib.Discriminator
  x_shape: tuple
  sigma_init: float


def per_sample_mean(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def teacher_and_features(nets: Nets, teacher_params, x_t, sigma, cond):
  """``(D_T, features or None)``; features only when the discriminator uses them."""
  if nets.disc.uses_features:
    d, feats = nets.teacher_apply(teacher_params, x_t, sigma, cond, return_features=True)
    return d, feats
  return nets.teacher_apply(teacher_params, x_t, sigma, cond), None


def generate(nets: Nets, params, z, cond=None):
  """``G(z) = D_g(s_g z; s_g)`` for standard normal ``z`` [B, *x_shape]."""
  return edm.one_step_generate(nets.gen_apply, params, z, cond, nets.sigma_init)


def generator_gan_loss(logits):
  """Non-saturating generator loss ``softplus(-logit)``."""
  return jnp.mean(jax.nn.softplus(-logits))


def discriminator_loss(real_logits, fake_logits):
  """Logistic loss, data = 1, generator = 0; its optimum logit is ``log p/q``."""
  return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))


FAKE_LOSS_WEIGHTS = {"edm": edm.loss_weight, "none": jnp.ones_like}


def make_fake_score_loss(nets: Nets, fake_loss_weight: str):
  """DSM of the fake score on the critic batch's stop_gradient generator samples.

  ``fake_loss_weight``: 'edm' (lambda(s) |D - x0|^2) or 'none' (plain x0 MSE, FastGen).
  """
  weight_fn = lookup(FAKE_LOSS_WEIGHTS, fake_loss_weight, "objective.fake_loss_weight")

  def loss(params, inputs, batch, rng):
    del inputs
    d = nets.fake_apply(params, batch["x_t"], batch["sigma"], batch.get("cond"), rng=rng)
    err = per_sample_mean(jnp.square(d - batch["x_gen"]))
    value = jnp.mean(weight_fn(batch["sigma"]) * err)
    return value, {"fake_loss": value}

  return loss


def make_discriminator_loss(nets: Nets):
  """Logistic loss on noised data vs noised generator samples; ``inputs`` = teacher params."""

  def logits_of(params, teacher, x_t, sigma, cond):
    _, feats = teacher_and_features(nets, teacher, x_t, sigma, cond)
    return nets.disc.apply(params, x_t, sigma, feats)

  def loss(params, inputs, batch, rng):
    del rng
    fake = logits_of(params, inputs, batch["x_t"], batch["sigma"], batch.get("cond"))
    real = logits_of(params, inputs, batch["real_t"], batch["real_sigma"], batch.get("cond"))
    value = discriminator_loss(real, fake)
    accuracy = 0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0))
    return value, {"disc_loss": value, "disc_accuracy": accuracy}

  return loss


def critic_batch(nets: Nets, st, gen_params, batch, rng, fsdp_gather: bool = True):
  """Noised stop_gradient generator samples and noised data for one critic step.

  The fake score and the discriminator see the same noised generator samples
  (FastGen); the data get their own noise levels unless ``st.same_noise_real``.
  ``st`` holds the noise-level settings (:mod:`fdistill.objectives.noise`).
  """
  cond = batch.get("cond")
  real = batch["x"]
  (z, eps, real_eps), (e, real_e) = noise.draw_noise(rng, real.shape[0], nets.x_shape, 3, 2)
  # Whole generator weights for this forward (FSDP), as inside the Updater.
  gen_params = partition.gather_fsdp(gen_params, fsdp_gather)
  x_gen = jax.lax.stop_gradient(generate(nets, gen_params, z, cond))
  sigma, _ = noise.sample_sigma(e, st)
  if st.same_noise_real:
    real_sigma, real_eps = sigma, eps
  else:
    real_sigma = noise.sample_sigma(real_e, st)[0]
  out = {"x_gen": x_gen, "x_t": edm.add_noise(x_gen, eps, sigma), "sigma": sigma,
         "real_t": edm.add_noise(real, real_eps, real_sigma), "real_sigma": real_sigma}
  if cond is not None:
    out["cond"] = cond
  return out


def same_structure(a, b) -> bool:
  """Whether two params pytrees (arrays or ShapeDtypeStructs) have one tree and shapes."""
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
  return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and
          shapes(a) == shapes(b))

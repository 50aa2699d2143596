"""What every score-distillation objective shares: the generator, the fake score and the
discriminator, their losses, and the noised batch the critics train on.

Notation (docs/design.md section 4): generator ``G(z) = D_g(s_g z; s_g)``,
teacher ``D_T`` (frozen), fake score ``D_fake`` trained by denoising score
matching on stop_gradient(G(z)), discriminator whose logit estimates
``log r = log p_t/q_t``. Losses have the shared signature
``loss(params, inputs, batch, rng) -> (loss, aux)``.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from fdistill import models
from fdistill.data import augment
from fdistill.diffusion import edm
from fdistill.diffusion import per_sample
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import noise
from fdistill.parallel import partition
from fdistill.registry import lookup
from fdistill.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Nets:
  """The closures the losses need: generator, teacher, fake score (denoisers) and discriminator."""
  gen_apply: Callable
  teacher_apply: Callable
  fake_apply: Callable
  disc: disc_lib.Discriminator
  x_shape: tuple
  sigma_init: float
  # Whose encoder features the discriminator's heads read: the frozen teacher's (FastGen,
  # f-distill) or the fake score's, whose encoder the discriminator loss then trains too
  # (DMD2's classifier on the fake U-Net's bottleneck). :data:`DISC_FEATURES`.
  disc_features: str = "teacher"


DISC_FEATURES = ("teacher", "fake")


def at_least_f32(x):
  """``x`` in float32, or float64 if it is (the float64 equivalence tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def teacher_and_features(nets: Nets, teacher_params, x_t, sigma, cond):
  """``(D_T, features or None)``; features only when the discriminator uses them."""
  if nets.disc.uses_features:
    d, feats = nets.teacher_apply(teacher_params, x_t, sigma, cond, return_features=True)
    return d, feats
  return nets.teacher_apply(teacher_params, x_t, sigma, cond), None


def disc_logits(nets: Nets, disc_params, feature_params, x_t, sigma, cond):
  """The discriminator's logits [B, heads] at ``x_t``, reading the features of the network
  ``nets.disc_features`` names, whose params are ``feature_params`` (teacher or fake score)."""
  if nets.disc_features == "teacher":
    _, feats = teacher_and_features(nets, feature_params, x_t, sigma, cond)
  else:
    _, feats = nets.fake_apply(feature_params, x_t, sigma, cond, return_features=True)
  return nets.disc.apply(disc_params, x_t, sigma, feats)


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


def encoder_logits(nets: Nets, fake_params, x_t, sigma, cond, rng=None, augment_labels=None):
  """``(D_fake, logit)``: the fake score and SiDA's discriminator logit, the channel mean of
  the fake score's last encoder features (a U-Net's bottleneck after its middle blocks:
  logits [B, H, W]; the toy MLP's last hidden layer: [B]).

  SiDA (Zhou et al. 2024, "Adversarial Score identity Distillation") makes the fake score's
  encoder the discriminator, so no separate network is trained; the mean over channels is
  its logit map (their EDM code: ``x.mean(dim=1)`` after the encoder blocks).
  """
  d, feats = nets.fake_apply(fake_params, x_t, sigma, cond, rng=rng, return_features=True,
                             **models.augment_kwargs(augment_labels))
  if not feats:
    raise ConfigError("loss='sida' needs a fake score that returns encoder features "
                      "(config.model: mlp with hidden layers, songunet, dhariwalunet or dit)")
  return d, jnp.mean(at_least_f32(feats[-1]), axis=-1)


def make_fake_score_loss(nets: Nets, fake_loss_weight: str, encoder_disc: bool = False):
  """DSM of the fake score on the critic batch's stop_gradient generator samples.

  ``fake_loss_weight``: 'edm' (lambda(s) |D - x0|^2) or 'none' (plain x0 MSE, FastGen); the
  per-sample error is a mean over data dimensions (SiD's code sums: a constant factor).
  ``encoder_disc`` (SiDA): the fake score's encoder is also the discriminator, trained in
  the same loss, weighted as SiDA's code weights it (``loss.sum() / B + loss_D.sum() / B``):
  the DSM error SUMMED over data dimensions, plus ``mean_b lambda(s_b) (BCE_real + BCE_fake)
  / 2`` with each BCE the mean over the batch and the logit map, lambda EDM's whatever
  ``fake_loss_weight`` is; noised data from ``batch["real_t"]`` (SiDA noises both with the
  same (s, eps): ``same_noise_real``).
  """
  weight_fn = lookup(FAKE_LOSS_WEIGHTS, fake_loss_weight, "objective.fake_loss_weight")
  numel = math.prod(nets.x_shape)

  def loss(params, inputs, batch, rng):
    del inputs
    x_t, sigma, cond = batch["x_t"], batch["sigma"], batch.get("cond")
    labels = batch.get("augment_labels")  # SiD's augmented fake-score inputs (critic_batch)
    if not encoder_disc:
      d = nets.fake_apply(params, x_t, sigma, cond, rng=rng, **models.augment_kwargs(labels))
    else:
      d, fake_logit = encoder_logits(nets, params, x_t, sigma, cond, rng, labels)
    value = dsm_value(weight_fn, d, batch)
    if not encoder_disc:
      return value, {"fake_loss": value}
    value = numel * value
    _, real_logit = encoder_logits(nets, params, batch["real_t"], batch["real_sigma"], cond, rng,
                                   batch.get("real_augment_labels"))
    bce = jnp.mean(jax.nn.softplus(fake_logit)) + jnp.mean(jax.nn.softplus(-real_logit))
    adv = jnp.mean(edm.loss_weight(batch["real_sigma"])) * bce / 2
    return value + adv, {"fake_loss": value + adv, "dsm_loss": value, "adv_disc_loss": adv}

  return loss


def pair(a, b):
  """Rows interleaved ``[a_0, b_0, a_1, b_1, ...]``: each device's rows of ``a`` and ``b``
  (the batch is split into contiguous blocks) stay on that device, so pairing needs no
  communication, unlike a concatenation."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def unpair(x):
  """The inverse of :func:`pair`: ``(a, b)``."""
  x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return x[:, 0], x[:, 1]


def dsm_value(weight_fn, d, batch):
  """``mean_b weight(s_b) mean_d (D_fake - x_gen)^2``: the fake score's DSM loss given its
  output ``d`` at the critic batch's ``x_t``."""
  err = per_sample.mean(jnp.square(d - batch["x_gen"]))
  return jnp.mean(weight_fn(batch["sigma"]) * err)


def paired_inputs(batch):
  """``(x, sigma, cond)``: the critic batch's generator rows and data rows, :func:`pair`-ed."""
  cond = batch.get("cond")
  return (pair(batch["x_t"], batch["real_t"]), pair(batch["sigma"], batch["real_sigma"]),
          None if cond is None else pair(cond, cond))


def logistic_of_paired(logits):
  """``(loss, aux)``: the logistic loss of :func:`pair`-ed logits (generator rows first)."""
  fake, real = unpair(logits)
  value = discriminator_loss(real, fake)
  accuracy = 0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0))
  return value, {"disc_loss": value, "disc_accuracy": accuracy}


def make_discriminator_loss(nets: Nets):
  """Logistic loss on noised data vs noised generator samples; ``inputs`` = the params of the
  network whose features the heads read (the teacher's, or the fake score's with
  ``nets.disc_features='fake'``)."""

  def loss(params, inputs, batch, rng):
    del rng
    # Fake and real rows through one feature pass: one network in the compiled step, not two
    # (XLA:CPU's compile time grows with each network copy; benchmarks/compile_time.py).
    return logistic_of_paired(disc_logits(nets, params, inputs, *paired_inputs(batch)))

  return loss


def make_joint_fake_score_loss(nets: Nets, fake_loss_weight: str, disc_loss_weight: float,
                               stochastic: bool = False):
  """DMD2's guidance loss as a function of each of its two parts' params, the other held:
  ``DSM(fake) + disc_loss_weight * logistic(disc on the fake score's features)``.

  Returns ``(fake_loss, disc_loss)``: ``fake_loss(fake_params, {"disc": ...}, ...)`` and
  ``disc_loss(disc_params, {"fake": ...}, ...)``; differentiating each at the same point
  gives the joint loss's gradient, applied by each network's own optimiser (DMD2: one
  optimiser over the fake U-Net and its classifier head; ``cls_loss_weight`` 1e-2).

  The DSM reads the fake score at ``x_t`` and the discriminator its features at ``x_t`` (and
  ``real_t``). Unless ``stochastic`` (the fake score draws dropout from its rng, or sees
  augmentation labels: its DSM call does, its feature call does not), those two calls at
  ``x_t`` compute the same thing, so ``fake_loss`` makes one call at ``x_t`` for both and a
  feature call at ``real_t`` (not a paired 2B-row call: that would run the decoder, and its
  backward, on the data rows the DSM does not read). DMD2's networks have no dropout."""
  weight_fn = lookup(FAKE_LOSS_WEIGHTS, fake_loss_weight, "objective.fake_loss_weight")
  dsm = make_fake_score_loss(nets, fake_loss_weight)
  logistic = make_discriminator_loss(nets)

  def joint(value, adv, adv_aux):
    total = value + disc_loss_weight * adv
    return total, {"fake_loss": total, "dsm_loss": value, "adv_disc_loss": adv_aux["disc_loss"]}

  def two_passes(params, inputs, batch, rng):
    value, _ = dsm(params, None, batch, rng)
    return joint(value, *logistic(inputs["disc"], params, batch, None))

  def one_pass(params, inputs, batch, rng):
    del rng  # no dropout: the feature call (no rng) is the DSM's call too
    cond = batch.get("cond")
    d, feats = nets.fake_apply(params, batch["x_t"], batch["sigma"], cond, return_features=True)
    _, real_feats = nets.fake_apply(params, batch["real_t"], batch["real_sigma"], cond,
                                    return_features=True)  # features only: XLA drops the rest
    x, sigma, _ = paired_inputs(batch)
    logits = nets.disc.apply(inputs["disc"], x, sigma,
                             [pair(f, r) for f, r in zip(feats, real_feats)])
    return joint(dsm_value(weight_fn, d, batch), *logistic_of_paired(logits))

  def disc_loss(params, inputs, batch, rng):
    del rng
    adv, aux = logistic(params, inputs["fake"], batch, None)
    return disc_loss_weight * adv, aux

  return (two_passes if stochastic else one_pass), disc_loss


def critic_batch(nets: Nets, st, gen_params, batch, rng, fsdp_gather: bool = True,
                 augment_p: float = 0.0):
  """Noised stop_gradient generator samples and noised data for one critic step.

  The fake score and the discriminator see the same noised generator samples
  (FastGen); the data get their own noise levels unless ``st.same_noise_real``.
  ``st`` holds the noise-level settings (:mod:`fdistill.objectives.noise`).
  ``augment_p`` > 0 (SiD's CIFAR-10 recipe): the generator samples, and the data, are
  augmented by EDM's pipe before the noise (independent draws), the DSM target being the
  augmented sample, and the batch carries their labels (``augment_labels``,
  ``real_augment_labels``) for the fake score.
  """
  cond = batch.get("cond")
  real = batch["x"]
  (z, eps, real_eps), (e, real_e) = noise.draw_noise(rng, real.shape[0], nets.x_shape, 3, 2)
  # Whole generator weights for this forward (FSDP), as inside the Updater.
  gen_params = partition.gather_fsdp(gen_params, fsdp_gather)
  x_gen = jax.lax.stop_gradient(generate(nets, gen_params, z, cond))
  extra = {}
  if augment_p:  # keys folded off ``rng``: the noise draws above stay those of no augmentation
    x_gen, extra["augment_labels"] = augment.augment(jax.random.fold_in(rng, 1), x_gen,
                                                     augment_p)
    real, extra["real_augment_labels"] = augment.augment(jax.random.fold_in(rng, 2), real,
                                                         augment_p)
  sigma, _ = noise.sample_sigma(e, st)
  if st.same_noise_real:
    real_sigma, real_eps = sigma, eps
  else:
    real_sigma = noise.sample_sigma(real_e, st)[0]
  out = {"x_gen": x_gen, "x_t": edm.add_noise(x_gen, eps, sigma), "sigma": sigma,
         "real_t": edm.add_noise(real, real_eps, real_sigma), "real_sigma": real_sigma, **extra}
  if cond is not None:
    out["cond"] = cond
  return out

"""f-distill: a one-step generator by f-divergence distribution matching.

Xu, Nie, Vahdat et al. 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching"; notation of docs/design.md section 4. Three networks train
against the frozen teacher ``D_T``:

* generator ``G(z) = D_g(s_g z; s_g)``: surrogate loss
  ``0.5 |x - sg(x - w (D_fake - D_T))|^2`` on ``x_t = G(z) + s eps``, whose
  x-gradient is ``w (D_fake - D_T) = w s^2 (S_fake - S_T)``, i.e. the
  f-divergence gradient ``h(r) (S_q - S_p)`` for ``w = h(r)/s^2``; plus a
  non-saturating GAN term ``softplus(-logit)`` through the discriminator;
* fake score ``D_fake``: denoising score matching on stop_gradient(G(z));
* discriminator: logistic loss, noised data (label 1) against noised generator
  samples (label 0), so its logit estimates ``log r = log p_t/q_t``.

The weight follows the public implementation (NVlabs/FastGen
``methods/distribution_matching/f_distill.py`` and ``common_loss.py``):
logits averaged over heads and clipped to [-10, 10], ``r = exp(logit)``
clipped to [0.1, 20], ``r`` divided by an EMA of its mean in its noise-level
bin (carried in the train state), ``h(r)`` divided by its mean over the global
batch, and the per-sample normaliser ``1/(mean|x - D_T| + 1e-6)`` of DMD's
surrogate. One deliberate difference, a setting: FastGen bins ``t`` linearly on
[t_min, t_max] (``ratio_bin_by='sigma'``; with EDM's [0.002, 80] two thirds of the
samples land in the first bin); by default (``'position'``) we bin the sampler's own
uniform coordinate (the Karras ramp position or the lognormal CDF), so every bin
receives the same share. The normaliser's ``+ abs_mean_eps`` (1e-6 here, none in DMD2's
code, which maps the rare infinity to a large number instead) is a setting too.
The fake score and the discriminator train on ``objective.critic_noise``'s levels (empty:
the generator's; DMD2: the whole ramp, :func:`noise.critic_levels`).

Update schedule (DMD2 / FastGen ``student_update_freq``): the generator is
updated on every ``gen_every``-th step, the fake score and the discriminator
on the others, each with its own optax optimiser, gradient clipping and the
NaN guard of the :class:`fdistill.optim.update.Updater`. The two kinds of
step are separate functions (``Objective.steps``) that the training loop
jits and picks on the host (``Objective.schedule``).

Initialisation (:mod:`fdistill.objectives.student`): the generator and the fake score copy
the teacher's params when it is a network (``Task.teacher_is_network``: a checkpoint or an
EDM pickle; same architecture as the teacher, checked at build time). The copy happens in
``init(rng, teacher)``, whose teacher argument is sharded like the state, so a large teacher
is never a constant.
With the analytic teacher (an exact GMM, no network) both start from the same
fresh ``config.model`` network (the zero-initialised output layer makes ``G``
a small Gaussian around 0) and ``warmup_critic_steps`` critic-only steps let
the fake score fit that initial generator before the generator moves.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fdistill.diffusion import edm
from fdistill.diffusion import per_sample
from fdistill.objectives import critics
from fdistill.objectives import divergences
from fdistill.objectives import dmd
from fdistill.objectives import noise
from fdistill.objectives import ratio
from fdistill.objectives import scaffold
from fdistill.objectives import student
from fdistill.objectives.base import Objective, settings_from_config
from fdistill.registry import check_choice
from fdistill.errors import ConfigError

# Sub-sections of ``config.objective`` that are not :class:`Settings` fields.
SECTIONS = ("name", "discriminator", "fake_optim", "disc_optim", "critic_noise")


@dataclasses.dataclass(frozen=True)
class Settings(noise.NoiseLevels):
  """The scalar fields of ``config.objective`` (the noise levels: :class:`noise.NoiseLevels`);
  defaults (FastGen's CIFAR-10 recipe, except the EDM-weighted fake-score loss) live in
  ``configs/common.py:fdistill_objective``."""
  divergence: str                 # a name of objectives/divergences.py
  alpha: float                    # only for divergence='alpha'
  gen_every: int                  # generator update on every k-th step (student_update_freq)
  warmup_critic_steps: int        # critic-only steps before the first generator update
  gan_weight: float               # non-saturating GAN term in the generator loss
  logit_clip: float
  ratio_lower: float
  ratio_upper: float
  ratio_bins: int                 # 0: no per-bin ratio normalisation
  ratio_ema: float                # EMA rate of the bin means (0: this batch's means)
  ratio_bin_by: str               # position: the sampler's uniform coordinate; sigma: linear
                                  # bins of sigma on [sigma_min, sigma_max] (FastGen)
  normalise_h: bool               # divide h by its global-batch mean
  weight: str                     # abs_mean: h / mean|x - D_T| (DMD); sigma2: h / s^2 (exact);
                                  # unit: h (Diff-Instruct's s^2 weighting of the score gap)
  abs_mean_eps: float             # abs_mean: h / (mean|x - D_T| + eps) (DMD2's code: 0)
  disc_features: str              # teacher: heads on the frozen teacher's features (FastGen);
                                  # fake: on the fake score's, trained with it (DMD2)
  disc_loss_weight: float         # disc_features='fake': the discriminator loss's weight in the
                                  # fake score's joint loss (DMD2's cls_loss_weight 1e-2)
  fake_loss_weight: str           # edm: lambda(s) |D - x0|^2; none: plain x0 MSE (FastGen)
  same_noise_real: bool           # noise real data with the fake samples' (s, eps)

  @classmethod
  def from_config(cls, objective_config):
    settings = settings_from_config(cls, objective_config, SECTIONS, "fdistill_objective")
    check_choice(settings.sigma_dist, noise.SIGMA_DISTS, "objective.sigma_dist")
    check_choice(settings.weight, WEIGHTS, "objective.weight")
    check_choice(settings.ratio_bin_by, RATIO_BIN_BY, "objective.ratio_bin_by")
    if not settings.abs_mean_eps >= 0:
      raise ConfigError(f"objective.abs_mean_eps={settings.abs_mean_eps} must be >= 0")
    noise.critic_levels(settings, objective_config.critic_noise)
    check_choice(settings.disc_features, critics.DISC_FEATURES, "objective.disc_features")
    if not settings.disc_loss_weight > 0:
      raise ConfigError(f"objective.disc_loss_weight={settings.disc_loss_weight} must be > 0")
    check_choice(settings.fake_loss_weight, critics.FAKE_LOSS_WEIGHTS,
                 "objective.fake_loss_weight")
    divergences.get(settings.divergence, settings.alpha)
    if settings.gen_every < 1:
      raise ConfigError(f"objective.gen_every={settings.gen_every} must be >= 1")
    return settings


# ---------------------------------------------------------------------------
# The generator loss.


def _abs_mean_weight(x, d_teacher, sigma, st):
  """DMD's normaliser ``1 / (mean|x - D_T| + abs_mean_eps)`` per sample."""
  del sigma
  return 1.0 / (dmd.abs_mean(x, d_teacher) + st.abs_mean_eps)


def _sigma2_weight(x, d_teacher, sigma, st):
  """``1/s^2``: turns the surrogate's x-gradient into exactly h (S_fake - S_T) (tests)."""
  del x, d_teacher, st
  return 1.0 / sigma**2


def _unit_weight(x, d_teacher, sigma, st):
  """1: the x-gradient is the denoiser difference ``D_fake - D_T = s^2 (S_q - S_p)``, i.e. the
  level-s gradient weighted by ``s^2``: Diff-Instruct's (its EDM code's generator loss is
  ``(D_fake - D_T) * G(z)`` with weight 1, Luo et al. 2023, training/di_loss.py)."""
  del x, sigma, st
  return jnp.ones(d_teacher.shape[:1], jnp.float32)


WEIGHTS = {"abs_mean": _abs_mean_weight, "sigma2": _sigma2_weight, "unit": _unit_weight}
RATIO_BIN_BY = ("position", "sigma")


def bin_coordinate(sigma, u, st):
  """The coordinate in [0, 1] the ratio bins divide: ``u`` or sigma's place on its range."""
  if st.ratio_bin_by == "position":
    return u
  return (sigma - st.sigma_min) / (st.sigma_max - st.sigma_min)


def vsd_surrogate(x, d_fake, d_teacher, weight):
  """``0.5 mean (x - sg(x - w (D_fake - D_T)))^2`` (:func:`dmd.surrogate`): gradient
  ``w (D_fake - D_T) / numel(x[0])`` per sample and data dimension, averaged over the batch."""
  return 0.5 * jnp.mean(dmd.surrogate(x, per_sample.expand(weight, x) * (d_fake - d_teacher)))


def make_generator_loss(nets: critics.Nets, div: divergences.Divergence, st: Settings,
                        gan_levels=None):
  """Generator loss; ``inputs = {"teacher", "fake", "disc", "bins"}``, aux has the new bins.

  The ratio and the GAN term read the discriminator at ``x_t``, on the teacher's features. With
  ``nets.disc_features='fake'`` (DMD2) the ratio reads the fake score's features at ``x_t``
  and the GAN term is DMD2's: the logit at the sample noised again at its own level, drawn
  from ``gan_levels`` (the critics' law: DMD2's ``diffusion_gan`` over the whole grid),
  through the frozen fake score with its input on the gradient path."""
  normaliser = WEIGHTS[st.weight]
  own_gan_noise = nets.disc_features == "fake"
  if own_gan_noise and gan_levels is None:
    raise ValueError("disc_features='fake' needs the GAN term's noise levels (gan_levels)")

  def loss(params, inputs, batch, rng):
    cond = batch.get("cond")
    xs, es = noise.draw_noise(rng, batch["x"].shape[0], nets.x_shape, 2 + own_gan_noise,
                              1 + own_gan_noise)
    (z, eps), e = xs[:2], es[0]
    x = critics.generate(nets, params, z, cond)
    sigma, u = noise.sample_sigma(e, st)
    x_t = edm.add_noise(x, eps, sigma)
    if own_gan_noise:
      d_fake, feats = nets.fake_apply(inputs["fake"], x_t, sigma, cond, return_features=True)
      d_teacher = nets.teacher_apply(inputs["teacher"], x_t, sigma, cond)
    else:
      d_fake = nets.fake_apply(inputs["fake"], x_t, sigma, cond)
      d_teacher, feats = critics.teacher_and_features(nets, inputs["teacher"], x_t, sigma, cond)
    d_fake, d_teacher = jax.lax.stop_gradient((d_fake, d_teacher))
    logits = nets.disc.apply(inputs["disc"], x_t, sigma, feats)
    h, bins, stats = ratio.f_weight(logits, bin_coordinate(sigma, u, st), inputs["bins"], div,
                                    st)
    weight = jax.lax.stop_gradient(h * normaliser(x, d_teacher, sigma, st))
    vsd = vsd_surrogate(x, d_fake, d_teacher, weight)
    if own_gan_noise and st.gan_weight:
      gan_sigma, _ = noise.sample_sigma(es[1], gan_levels)
      x_gan = edm.add_noise(x, xs[2], gan_sigma)
      frozen = jax.lax.stop_gradient(inputs)
      logits = critics.disc_logits(nets, frozen["disc"], frozen["fake"], x_gan, gan_sigma, cond)
    gan = critics.generator_gan_loss(logits)
    total = vsd + st.gan_weight * gan
    return total, dict(stats, vsd_loss=vsd, gan_gen=gan, ratio_bins=bins)

  return loss


# ---------------------------------------------------------------------------
# The objective.


sampler = scaffold.sampler  # one-step: G(z) with the generator's EMA (no teacher needed)


def build(config, task, settings=None) -> Objective:
  """f-distill of ``task``'s teacher into a one-step generator of architecture ``config.model``."""
  st = Settings.from_config(config.objective) if settings is None else settings
  div = divergences.get(st.divergence, st.alpha)
  critic_levels = noise.critic_levels(st, config.objective.critic_noise)
  parts = scaffold.build(config, task, st, "fdistill", critic_levels=critic_levels,
                         disc_features=st.disc_features, disc_loss_weight=st.disc_loss_weight)
  gen_loss = make_generator_loss(parts.nets, div, st, critic_levels)

  inputs_of = lambda state, teacher: {"teacher": teacher, "fake": state["fake"]["params"],
                                      "disc": state["disc"]["params"],
                                      "bins": state["ratio_bins"]}
  generator_step = student.generator_step(parts.gen_update, gen_loss, inputs_of,
                                          carried=("ratio_bins",))

  def init(rng, teacher=None):
    return dict(parts.init(rng, teacher),
                ratio_bins=jnp.ones((max(st.ratio_bins, 1),), jnp.float32))

  return Objective(init=init, steps={"generator": generator_step, "critic": parts.critic_step},
                   schedule=parts.schedule, export=lambda state: state["gen"]["ema"],
                   sampler=parts.sample)

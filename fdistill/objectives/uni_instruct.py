"""Uni-Instruct and the score-distillation family as settings of one objective.

Wang, Luo et al. 2025, "Uni-Instruct: One-step Diffusion Model through Unified
Diffusion Divergence Instruction". The generator minimises, level by level,
the expanded f-divergence ``J_s = E_q[h(r) |S_p - S_q|^2]`` through the
surrogate of :mod:`fdistill.objectives.uni_instruct_loss` (derivation and
oracle table: docs/uni_instruct.md), with the density ratio ``r`` from a
discriminator (logit = log r, trained by the logistic loss of f-distill)
evaluated at the noised generator sample with its input on the gradient path.
``objective.loss`` picks the member:

  expanded  Uni-Instruct: any divergence of the registry, or 'pearson';
            reverse KL needs no ratio (no discriminator is trained);
  sid       SiD (Zhou et al. 2024): ``Delta_D^T[(D_T - G) - alpha Delta_D]``; alpha = 0.5 is
            exactly half the reverse-KL member, the published 1.2 its own estimator;
  sim       SIM (Luo et al. 2024) with ``sim_distance`` 'l2' or 'pseudo_huber';
  sida      SiDA (Zhou et al. 2024, "Adversarial Score identity Distillation"):
            ``(1 - adv_weight) SiD + adv_weight sida_gan_scale GAN``, the GAN logit being the
            channel mean of the fake score's last encoder features (no separate
            discriminator; the fake score learns it beside its DSM loss,
            :func:`critics.make_fake_score_loss`).

Recipe "reverse KL, then another divergence": with ``switch_divergence`` set, generator
steps from ``switch_step`` on use it (kind ``generator_switched``, its own compiled program
chosen by the host schedule, never a ``lax.cond``); the discriminator trains from step 0
when either phase needs the ratio, so it is ready at the switch.

``objective.scale``: 'sid' (SiD's ``s^4 / mean|G - D_T|`` per sample, the
published training scale), 'sigma4' or 'exact' (score units: the oracle's).
The fake score and the discriminator train on ``objective.critic_noise``'s levels (SiD's
code: EDM's lognormal, whatever the generator's ramp; :func:`noise.critic_levels`).
The fake score, discriminator, schedule and one-step sampler are f-distill's
(:mod:`fdistill.objectives.scaffold`); an optional non-saturating GAN term
(``gan_weight``) uses the same discriminator.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from fdistill.diffusion import edm
from fdistill.objectives import critics
from fdistill.objectives import noise
from fdistill.objectives import scaffold
from fdistill.objectives import student
from fdistill.objectives import uni_instruct_loss as ul
from fdistill.objectives.base import Objective, settings_from_config
from fdistill.registry import check_choice
from fdistill.errors import ConfigError

SECTIONS = ("name", "discriminator", "fake_optim", "disc_optim", "critic_noise")
LOSSES = ("expanded", "sid", "sim", "sida")
SWITCHED = "generator_switched"  # the kind of generator step after ``switch_step``


@dataclasses.dataclass(frozen=True)
class Settings(noise.NoiseLevels):
  """The scalar fields of ``config.objective`` (the noise levels: :class:`noise.NoiseLevels`);
  defaults in ``configs/common.py:uni_instruct_objective``."""
  loss: str                       # expanded | sid | sim
  divergence: str                 # expanded: a divergence name or 'pearson'
  alpha: float                    # divergence='alpha' only
  sid_alpha: float                # sid: SiD's alpha (published 1.2)
  sim_distance: str               # sim: l2 | pseudo_huber
  sim_c: float                    # sim: pseudo-Huber's c
  adv_weight: float               # sida: weight of the GAN term (SiDA: 0.5, SiD gets the rest)
  sida_gan_scale: float           # sida: the GAN term's scale against SiD's before that mix
                                  # (SiDA's code: lsg_gan / lsg = 0.01 / 100 = 1e-4)
  switch_step: int                # expanded: generator steps >= this use switch_divergence
  switch_divergence: str          # '' = no switch; else a divergence name or 'pearson'
  scale: str                      # sid | sigma4 | exact
  gen_every: int                  # generator update on every k-th step
  warmup_critic_steps: int
  gan_weight: float               # non-saturating GAN term through the discriminator
  logit_clip: float               # |log r| clip of the ratio inside the surrogate
  fake_loss_weight: str           # edm | none
  same_noise_real: bool
  augment_p: float                # EDM's augmentation of the fake score's inputs (SiD's CIFAR-10
                                  # recipe: 0.12; fdistill.data.augment); 0 = off

  @classmethod
  def from_config(cls, objective_config):
    st = settings_from_config(cls, objective_config, SECTIONS, "uni_instruct_objective")
    check_choice(st.loss, LOSSES, "objective.loss")
    check_choice(st.scale, ul.SCALES, "objective.scale")
    check_choice(st.sim_distance, ("l2", "pseudo_huber"), "objective.sim_distance")
    check_choice(st.sigma_dist, noise.SIGMA_DISTS, "objective.sigma_dist")
    noise.critic_levels(st, objective_config.critic_noise)
    check_choice(st.fake_loss_weight, critics.FAKE_LOSS_WEIGHTS, "objective.fake_loss_weight")
    ul.get_divergence(st.divergence, st.alpha)
    if st.gen_every < 1:
      raise ConfigError(f"objective.gen_every={st.gen_every} must be >= 1")
    if st.loss == "sida" and st.gan_weight:
      raise ConfigError(f"objective.gan_weight={st.gan_weight} must be 0 with loss='sida' (its GAN "
                        "term is objective.adv_weight, through the fake score's encoder)")
    if not 0 <= st.adv_weight <= 1:
      raise ConfigError(f"objective.adv_weight={st.adv_weight} must be in [0, 1]")
    if not 0 <= st.augment_p <= 1:
      raise ConfigError(f"objective.augment_p={st.augment_p} must be in [0, 1]")
    if not st.sida_gan_scale > 0:
      raise ConfigError(f"objective.sida_gan_scale={st.sida_gan_scale} must be > 0 "
                        "(SiDA's code: 1e-4)")
    if st.switch_divergence:
      ul.get_divergence(st.switch_divergence, st.alpha)
      if st.loss != "expanded" or st.switch_step < 1:
        raise ConfigError(f"objective.switch_divergence={st.switch_divergence!r} needs "
                          f"objective.loss='expanded' (got {st.loss!r}) and objective.switch_step"
                          f" >= 1 (got {st.switch_step})")
    return st

  @property
  def needs_ratio(self) -> bool:
    return self.loss == "expanded" and self.divergence != "reverse_kl"

  @property
  def trains_disc(self) -> bool:
    """A discriminator is trained: a phase needs the ratio, or the GAN term reads it."""
    return any(p.needs_ratio for p in self.phases()) or bool(self.gan_weight)

  def phases(self):
    """The settings of each generator phase: before the switch and, if any, after it."""
    if not self.switch_divergence:
      return (self,)
    return self, dataclasses.replace(self, divergence=self.switch_divergence,
                                     switch_divergence="")


def make_sida_generator_loss(nets: critics.Nets, st: Settings):
  """SiDA's generator loss, ``(1 - adv_weight) SiD + adv_weight sida_gan_scale GAN``.

  As SiDA's EDM code computes it (``0.5 lsg loss_sid + 0.5 lsg_gan loss_gan`` with lsg = 100,
  lsg_gan = 0.01; this is that divided by lsg): ``SiD = mean_b sid_loss_b / wf_b`` and
  ``GAN = C H W mean_b(1 / wf_b) BCE``, ``wf_b = max(mean|G - D_T|, 1e-5)`` SiD's per-sample
  normaliser and ``BCE`` the mean of ``softplus(-clip(logit, +-10))`` over the batch AND the
  logit map (one scalar, then divided by each sample's ``wf``). The logit is the frozen
  fake score's channel-mean encoder feature at ``x_t`` (input on the gradient path)."""
  numel = math.prod(nets.x_shape)

  def loss(params, inputs, batch, rng):
    cond = batch.get("cond")
    (z, eps), (e,) = noise.draw_noise(rng, batch["x"].shape[0], nets.x_shape, 2, 1)
    sigma, _ = noise.sample_sigma(e, st)
    frozen = jax.lax.stop_gradient(inputs)  # params frozen; x_t carries the generator's path
    x = critics.generate(nets, params, z, cond)
    x_t = edm.add_noise(x, eps, sigma)
    d_teacher = nets.teacher_apply(frozen["teacher"], x_t, sigma, cond)
    d_fake, logit = critics.encoder_logits(nets, frozen["fake"], x_t, sigma, cond)
    normaliser = ul.sid_normaliser(x, d_teacher)
    sid = jnp.mean(ul.sid_loss(d_teacher, d_fake, x, st.sid_alpha) * normaliser)
    bce = jnp.mean(jax.nn.softplus(-jnp.clip(logit, -st.logit_clip, st.logit_clip)))
    gan = numel * jnp.mean(normaliser) * bce
    value = (1 - st.adv_weight) * sid + st.adv_weight * st.sida_gan_scale * gan
    return value, {"sid": sid, "gan_gen": gan}

  return loss


def make_generator_loss(nets: critics.Nets, st: Settings):
  """``loss(params, inputs, batch, rng)``, ``inputs = {"teacher", "fake", "disc"}``."""
  if st.loss == "sida":
    return make_sida_generator_loss(nets, st)
  options = dict(objective={"expanded": "uni_instruct"}.get(st.loss, st.loss),
                 divergence=st.divergence if st.loss == "expanded" else None,
                 alpha=st.alpha, sid_alpha=st.sid_alpha, sim_distance=st.sim_distance,
                 sim_c=st.sim_c, scale=st.scale, log_ratio_clip=st.logit_clip)
  generate = lambda params, z, cond: critics.generate(nets, params, z, cond)

  def loss(params, inputs, batch, rng):
    cond = batch.get("cond")
    (z, eps), (e,) = noise.draw_noise(rng, batch["x"].shape[0], nets.x_shape, 2, 1)
    sigma, _ = noise.sample_sigma(e, st)
    teacher = jax.lax.stop_gradient(inputs["teacher"])

    def log_ratio(disc_params, x, s):  # params frozen, x on the gradient path
      _, feats = critics.teacher_and_features(nets, teacher, x, s, cond)
      return nets.disc.apply(disc_params, x, s, feats)

    surrogate = ul.generator_loss_fn(generate, nets.teacher_apply, nets.fake_apply,
                                     log_ratio if st.needs_ratio else None, **options)
    value = surrogate(params, inputs, z, eps, sigma, cond)
    aux = {"surrogate": value}
    if st.gan_weight:
      x_t = edm.add_noise(critics.generate(nets, params, z, cond), eps, sigma)
      gan = critics.generator_gan_loss(log_ratio(inputs["disc"], x_t, sigma))
      value, aux["gan_gen"] = value + st.gan_weight * gan, gan
    return value, aux

  return loss


sampler = scaffold.sampler  # one-step: G(z) with the generator's EMA (no teacher needed)


def switch_schedule(base_schedule, switch_step: int):
  """``base_schedule`` with its generator steps from ``switch_step`` on renamed :data:`SWITCHED`."""

  def schedule(step: int) -> str:
    kind = base_schedule(step)
    return SWITCHED if kind == "generator" and step >= switch_step else kind

  return schedule


def build(config, task, settings=None) -> Objective:
  st = Settings.from_config(config.objective) if settings is None else settings
  phases = st.phases()
  parts = scaffold.build(config, task, st, "uni_instruct", train_disc=st.trains_disc,
                         encoder_disc=st.loss == "sida",
                         critic_levels=noise.critic_levels(st, config.objective.critic_noise),
                         augment_p=st.augment_p)

  inputs_of = lambda state, teacher: {"teacher": teacher, "fake": state["fake"]["params"],
                                      "disc": state["disc"]["params"]}
  generator_step_of = lambda phase: student.generator_step(
      parts.gen_update, make_generator_loss(parts.nets, phase), inputs_of)

  steps = {"generator": generator_step_of(phases[0]), "critic": parts.critic_step}
  schedule = parts.schedule
  if len(phases) > 1:
    steps[SWITCHED] = generator_step_of(phases[1])
    schedule = switch_schedule(parts.schedule, st.switch_step)
  return Objective(init=parts.init, steps=steps, schedule=schedule,
                   export=lambda state: state["gen"]["ema"], sampler=parts.sample)

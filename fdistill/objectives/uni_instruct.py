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
  sim       SIM (Luo et al. 2024) with ``sim_distance`` 'l2' or 'pseudo_huber'.

``objective.scale``: 'sid' (SiD's ``s^4 / mean|G - D_T|`` per sample, the
published training scale), 'sigma4' or 'exact' (score units: the oracle's).
The fake score, discriminator, schedule and one-step sampler are f-distill's
(:mod:`fdistill.objectives.scaffold`); an optional non-saturating GAN term
(``gan_weight``) uses the same discriminator.
"""
import dataclasses

import jax

from fdistill.diffusion import edm
from fdistill.objectives import critics
from fdistill.objectives import noise
from fdistill.objectives import scaffold
from fdistill.objectives import uni_instruct_loss as ul
from fdistill.objectives.base import Objective, settings_from_config
from fdistill.optim import update
from fdistill.registry import check_choice

SECTIONS = ("name", "discriminator", "fake_optim", "disc_optim")
LOSSES = ("expanded", "sid", "sim")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The scalar fields of ``config.objective``; defaults in
  ``configs/common.py:uni_instruct_objective``."""
  loss: str                       # expanded | sid | sim
  divergence: str                 # expanded: a divergence name or 'pearson'
  alpha: float                    # divergence='alpha' only
  sid_alpha: float                # sid: SiD's alpha (published 1.2)
  sim_distance: str               # sim: l2 | pseudo_huber
  sim_c: float                    # sim: pseudo-Huber's c
  scale: str                      # sid | sigma4 | exact
  gen_every: int                  # generator update on every k-th step
  warmup_critic_steps: int
  gan_weight: float               # non-saturating GAN term through the discriminator
  logit_clip: float               # |log r| clip of the ratio inside the surrogate
  fake_loss_weight: str           # edm | none
  same_noise_real: bool
  sigma_dist: str                 # karras | lognormal | fixed
  sigma_min: float
  sigma_max: float
  rho: float
  ramp_min: float
  ramp_max: float
  p_mean: float
  p_std: float
  sigma_fixed: float

  @classmethod
  def from_config(cls, objective_config):
    st = settings_from_config(cls, objective_config, SECTIONS, "uni_instruct_objective")
    check_choice(st.loss, LOSSES, "objective.loss")
    check_choice(st.scale, ul.SCALES, "objective.scale")
    check_choice(st.sim_distance, ("l2", "pseudo_huber"), "objective.sim_distance")
    check_choice(st.sigma_dist, noise.SIGMA_DISTS, "objective.sigma_dist")
    check_choice(st.fake_loss_weight, critics.FAKE_LOSS_WEIGHTS, "objective.fake_loss_weight")
    ul.get_divergence(st.divergence, st.alpha)
    if st.gen_every < 1:
      raise ValueError(f"objective.gen_every={st.gen_every} must be >= 1")
    return st

  @property
  def needs_ratio(self) -> bool:
    return self.loss == "expanded" and self.divergence != "reverse_kl"


def make_generator_loss(nets: critics.Nets, st: Settings):
  """``loss(params, inputs, batch, rng)``, ``inputs = {"teacher", "fake", "disc"}``."""
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


def build(config, task) -> Objective:
  st = Settings.from_config(config.objective)
  parts = scaffold.build(config, task, st, "uni_instruct",
                         train_disc=st.needs_ratio or bool(st.gan_weight))
  gen_loss = make_generator_loss(parts.nets, st)

  def generator_step(state, teacher, batch, rng):
    inputs = {"teacher": teacher, "fake": state["fake"]["params"],
              "disc": state["disc"]["params"]}
    gen, loss, aux, ok = parts.gen_update(state["gen"], gen_loss, inputs, batch, rng)
    metrics = {**aux, "gen_loss": loss}
    metrics["gen_grad_norm"] = metrics.pop("grad_norm")
    return update.count_step(dict(state, gen=gen), ok), metrics

  return Objective(init=parts.init, steps={"generator": generator_step,
                                           "critic": parts.critic_step},
                   schedule=parts.schedule, export=lambda state: state["gen"]["ema"],
                   sampler=parts.sample)

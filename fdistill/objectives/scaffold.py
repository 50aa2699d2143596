"""The parts every one-step score-distillation objective shares (f-distill, Uni-Instruct,
SiD, SIM, DMD): a generator initialised from the teacher (:mod:`student`), a fake score and
a discriminator trained on the same noised generator samples, their optimisers, the critic
step, the update schedule and the one-step sampler. An objective module adds its generator
loss and generator step (:func:`student.generator_step`).

Settings read from ``st`` (the objective's settings): gen_every,
warmup_critic_steps, fake_loss_weight, same_noise_real and the noise-level
fields of :mod:`fdistill.objectives.noise`.
"""
import dataclasses
from typing import Callable

import jax
import ml_collections

from fdistill import models
from fdistill.data import augment
from fdistill.diffusion import edm
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import critics
from fdistill.objectives import student
from fdistill.objectives.base import SamplerSpec
from fdistill.optim import state as state_lib
from fdistill.optim import update
from fdistill.errors import ConfigError


def section_optimizer(optim_config, overrides):
  """``config.optim`` with the fields of ``overrides`` replaced (fake score, discriminator)."""
  merged = ml_collections.ConfigDict(dict(optim_config))
  merged.update(dict(overrides))
  return merged


def sampler(config, task, settings=None) -> SamplerSpec:  # pylint: disable=unused-argument
  """One step: ``G(z) = D_g(s_g z; s_g)`` with the generator's EMA (no teacher needed)."""
  module, gen_apply = models.build_denoiser(config.model)
  sigma_init = float(config.generator.sigma_init)

  def sample(params, rng, num, cond=None):
    z = jax.random.normal(rng, (num,) + tuple(task.x_shape))
    return edm.one_step_generate(gen_apply, params, z, cond, sigma_init)

  return SamplerSpec(init_params=models.initializer(module, task.x_shape, task.cond_dim),
                     sample=sample)


def is_generator_step(step: int, st) -> bool:
  """Generator on steps warmup, warmup + k, warmup + 2k, ...; critics otherwise."""
  since = step - st.warmup_critic_steps
  return since >= 0 and since % st.gen_every == 0


@dataclasses.dataclass(frozen=True)
class Scaffold:
  """nets: the closures; init(rng, teacher) -> state; critic_step: the fake score (and, with
  ``train_disc``, discriminator) update; schedule(step) -> "generator" | "critic"."""
  nets: critics.Nets
  sample: SamplerSpec
  gen_update: update.Updater
  init: Callable
  critic_step: Callable
  schedule: Callable


def fake_score_is_stochastic(model_config, augment_p: float = 0.0) -> bool:
  """Whether the fake score's training call differs from its plain call: dropout (or label
  dropout) drawn from its rng, or augmentation labels. Then the joint loss keeps its DSM
  pass apart from its feature pass (:func:`critics.make_joint_fake_score_loss`)."""
  # model sections differ by architecture: a field a network lacks is dropout it never draws
  return bool(augment_p or any(field in model_config and model_config[field]
                               for field in ("dropout", "label_dropout")))


def build(config, task, st, what: str, train_disc: bool = True,
          encoder_disc: bool = False, critic_levels=None, disc_features: str = "teacher",
          disc_loss_weight: float = 1.0, augment_p: float = 0.0) -> Scaffold:
  """The shared parts for objective ``what`` (its name in error messages). ``encoder_disc``:
  the fake score's encoder doubles as the discriminator (SiDA; see
  :func:`fdistill.objectives.critics.make_fake_score_loss`). ``critic_levels``: settings
  whose noise-level fields the critic batch uses (default ``st``, the generator's levels).
  ``disc_features``: whose features the discriminator reads (:data:`critics.DISC_FEATURES`;
  'fake': DMD2's placement, the fake score and the heads trained by one joint loss, the
  discriminator part weighted by ``disc_loss_weight``). ``augment_p``: EDM's augmentation of
  the critics' inputs (SiD's CIFAR-10 recipe; :func:`critics.critic_batch`)."""
  critic_levels = st if critic_levels is None else critic_levels
  student.require_teacher(task, what)
  _, denoiser = models.build_denoiser(config.model)
  sample = sampler(config, task)
  fresh = jax.eval_shape(sample.init_params, jax.random.key(0))
  if disc_features == "teacher":
    feature_shapes = disc_lib.teacher_feature_shapes(task.teacher_apply, task.teacher_abstract,
                                                     task.x_shape, task.cond_dim)
  else:  # the fake score's: the generator's architecture
    feature_shapes = disc_lib.teacher_feature_shapes(denoiser, fresh, task.x_shape,
                                                     task.cond_dim)
  disc = disc_lib.build(config.objective.discriminator, task.x_shape, feature_shapes,
                        config.model.sigma_data)
  if augment_p and (config.model.name not in ("songunet", "dhariwalunet") or
                    config.model.augment_dim != augment.NUM_LABELS):
    raise ConfigError(f"objective.augment_p={augment_p} conditions the fake score on EDM's "
                      f"{augment.NUM_LABELS} augmentation labels: it needs a U-Net with "
                      f"model.augment_dim={augment.NUM_LABELS} (EDM's CIFAR-10 networks)")
  if disc_features == "fake" and train_disc and not disc.uses_features:
    raise ConfigError(f"objective.disc_features='fake' needs a discriminator that reads "
                      f"features: objective.discriminator.name='unet_heads' (got "
                      f"{config.objective.discriminator.name!r})")
  student.check_architecture(task, fresh, what)
  # The generator and the fake score are two param trees of one network (config.model, the
  # teacher's architecture): one denoiser closure serves both.
  nets = critics.Nets(gen_apply=denoiser, teacher_apply=task.teacher_apply,
                      fake_apply=denoiser, disc=disc, x_shape=tuple(task.x_shape),
                      sigma_init=float(config.generator.sigma_init),
                      disc_features=disc_features)

  gen_update = update.updater(config, ema=True, name=student.GEN)
  fake_update = update.updater(
      config, section_optimizer(config.optim, config.objective.fake_optim), name="fake")
  disc_update = update.updater(
      config, section_optimizer(config.optim, config.objective.disc_optim), name="disc")
  joint = disc_features == "fake" and train_disc
  if joint:
    fake_loss, disc_loss = critics.make_joint_fake_score_loss(
        nets, st.fake_loss_weight, disc_loss_weight, fake_score_is_stochastic(config.model,
                                                                              augment_p))
  else:
    fake_loss = critics.make_fake_score_loss(nets, st.fake_loss_weight, encoder_disc)
    disc_loss = critics.make_discriminator_loss(nets)

  def init(rng, teacher=None):
    """Fresh networks; with a network teacher, generator (params, EMA) and fake score copy it."""
    net_rng, disc_rng = jax.random.split(rng)
    return dict(student.initial_state(task, teacher, lambda: sample.init_params(net_rng),
                                      gen_update, fake_update),
                disc=state_lib.init_net_state(disc.init(disc_rng), disc_update.tx, ema=False))

  def critic_step(state, teacher, batch, rng):
    c_rng, f_rng, d_rng = jax.random.split(rng, 3)
    cb = critics.critic_batch(nets, critic_levels, state["gen"]["params"], batch, c_rng,
                              gen_update.fsdp_gather, augment_p)
    fake_inputs = {"disc": state["disc"]["params"]} if joint else None
    fake, _, metrics, ok = fake_update(state["fake"], fake_loss, fake_inputs, cb, f_rng)
    new = dict(state, fake=fake)
    if train_disc:
      # Joint (DMD2): both gradients at the same point, the fake score's params as they were.
      disc_inputs = {"fake": state["fake"]["params"]} if joint else teacher
      new["disc"], _, d_aux, d_ok = disc_update(state["disc"], disc_loss, disc_inputs, cb, d_rng)
      metrics = dict(metrics, **d_aux)
      ok = ok & d_ok
      if joint:  # one loss: a non-finite part skips both (each Updater skipped its own)
        new = state_lib.select_tree(ok, new, state)
    return update.count_step(new, ok), metrics

  return Scaffold(nets, sample, gen_update, init, critic_step,
                  lambda i: "generator" if is_generator_step(i, st) else "critic")

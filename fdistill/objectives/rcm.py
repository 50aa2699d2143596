"""rCM: sCM's continuous-time consistency distillation with a DMD regulariser, one objective.

Zheng et al. 2025, "Large Scale Diffusion Distillation via Score-Regularized
Continuous-Time Consistency" (rCM; NVlabs/rcm ``t2v_model_distill_rcm.py``),
built on Lu & Song 2024, "Simplifying, Stabilizing & Scaling Continuous-Time
Consistency Models" (sCM). Notation: docs/design.md section 4 and
:mod:`fdistill.diffusion.trigflow`. Three networks:

* student ``F`` (a TrigFlow network, :func:`models.make_F` of ``config.model``),
  its EMA samples; with a network teacher it starts as the teacher's weights
  (``time_embedding='edm'`` makes it exactly the teacher at init), with the
  analytic teacher (exact GMM, toy data) it starts fresh;
* teacher ``F_T = trigflow.edm_to_trigflow(task.teacher_apply)`` (frozen; the
  exact GMM denoiser works the same way as a network);
* fake score ``D_fake`` (an EDM denoiser of ``config.model``, initialised like
  the student), trained only when there is a DMD part.

Kinds of step (``Objective.steps``, picked on the host by :func:`schedule`, a
pure function of the step number):

  generator    the student update. sCM part: the target ``g`` of
               :func:`scm_loss.compute_target` (teacher velocity, ONE tangent of
               the student by jvp or finite differences, warm-up ``r``, the
               normalisation ``g / (|g| + norm_c)``) is computed FIRST, outside
               the differentiated function, and enters the Updater as data;
               the Updater differentiates only ``|F - sg(F) - g|^2`` (the fused
               attention kernel of ``ops.flash_jvp`` has no transpose, and
               nothing here needs one: tests/test_objectives_rcm.py counts it
               on the step's jaxpr). DMD part (``dmd_weight > 0``): a student
               rollout of 1..``rollout_max_steps`` consistency steps per sample
               from ``t = arctan(sigma_max / sd)`` (re-noised between steps at
               times ``min(draw, previous)``, every step but the last at
               stop_gradient(params)), re-noised once more, fake score and
               teacher x0 estimates there without gradient, and
               :func:`scm_loss.dmd_loss` times ``dmd_weight``.
  critic       the fake score by EDM-weighted DSM on stop_gradient rollouts
               (rCM's ``training_step_critic``; EDM's ``lambda(s)`` is rCM's
               ``1 / sin^2 t`` up to the constant ``sd^2``).
  scm_warmup   a student update with the sCM part only (the first
               ``scm_warmup_steps`` steps when there is a DMD part).

sCM's learned adaptive weight (``adaptive_weight``, on by default as in sCM's
Algorithm 1): ``state["weight"]`` holds the small network ``w(t)``
(:func:`scm_loss.logvar`) and its own Adam state, beside the student's rather
than inside its param tree, so export, the teacher-copy init and the student's
sharding are unchanged; each sCM student step also updates it on the same loss
(see ``student_step``).

Metrics of a student step, one quantity per name: ``gen_loss`` (the loss the student's
Updater minimised), ``scm_loss`` (its sCM term, logged only beside a DMD term), ``dmd_loss``
(the DMD surrogate before ``dmd_weight``), ``scm_error`` (the unweighted error ``mean_d g^2``,
with the adaptive weight on; the weight's own loss has the weighted term's value and is not
logged again), ``logvar`` (the mean ``w(t)``), ``g_norm``, ``tangent_r``, ``gen_grad_norm``.

Settings of this one objective: sCM only (``dmd_weight=0``: no fake score in
the state, the schedule only ever picks "generator"), rCM (sCM + DMD), DMD only
(``dmd_only=True``: the student loss is the DMD part alone, no tangent).

Schedule (rCM's ``is_student_phase``, with its two uses of ``tangent_warmup``
split into ``tangent_warmup_steps`` for ``r`` and ``scm_warmup_steps`` for the
sCM-only phase): steps ``< scm_warmup_steps`` are "scm_warmup"; then
``warmup_critic_steps`` critic steps (0 in rCM, whose fake score starts as the
teacher; a fresh fake score on toy data needs a few); then "generator" on every
``gen_every``-th step and "critic" on the others.

Differences from NVlabs/rcm: losses are means over data dimensions (rCM sums
and scales the sCM loss by 100 and the DMD loss by 1, hence its published ratio
is ``dmd_weight = 0.01`` here); the number of rollout steps is drawn per sample
(rCM cycles one count per iteration); rCM's rollout starts at ``t = pi/2``
from pure noise, this one at ``arctan(sigma_max / sd)`` like the sampler; no
classifier-free guidance of the teacher; no dropout in the student (its
``rng`` is None: sCM shares one dropout mask between tangent and regression,
not done); a constant-rate EMA instead of rCM's power EMA.

Sampler: the N-step consistency sampler (sCM Algorithm 1 / rCM's
``generate_samples_from_batch``) of the student's EMA, ``N =
eval.sampler_steps`` clipped to ``1..1 + len(sampler_times)`` (so 1..4 with
rCM's intermediate times [1.3, 1.0, 0.6]); no teacher needed.

Measured on the 25-mode toy (sCM, rCM and DMD only, analytic and DSM teachers, 1/2/4
sampler steps) with the commands that reproduce it: docs/results.md, "rCM on the 25-mode toy".

This file holds one job, the objective (settings, schedule, times and rollouts, the student
loss, the steps, the sampler), in about 350 lines of code under this docstring; the loss
pieces are :mod:`scm_loss`'s and the shared student parts :mod:`student`'s.

The time embedding matters for sCM's tangent: the toy MLP embeds ``c_noise``
with EDM's Fourier features of scale 16, and with the 'edm' embedding (``c_noise =
log(sd tan t) / 4``) sCM diverged on the toy (the normalised target saturated,
9/25 modes); the toy configs use 'linear' with ``time_scale=0.02``. The image
networks (U-Nets, DiT) embed ``c_noise`` positionally and keep 'edm'.
"""
import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp

from fdistill import models
from fdistill.diffusion import edm
from fdistill.diffusion import trigflow
from fdistill.objectives import critics
from fdistill.objectives import noise
from fdistill.objectives import scaffold
from fdistill.objectives import scm_loss
from fdistill.objectives import student
from fdistill.objectives.base import Objective, SamplerSpec, settings_from_config
from fdistill.optim import state as state_lib
from fdistill.optim import update
from fdistill.parallel import partition
from fdistill.registry import check_choice
from fdistill.errors import ConfigError

SECTIONS = ("name", "fake_optim")
DMD_TIMES = ("shift", "lognormal")
MAX_ROLLOUT_STEPS = 4
_sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Settings:
  """The scalar fields of ``config.objective``; defaults (rCM's Wan2.1 1.3B recipe) in
  ``configs/common.py:rcm_objective``."""
  p_mean: float                   # sCM training times: log(sd tan t) ~ N(p_mean, p_std^2)
  p_std: float
  tangent: str                    # jvp (one jax.jvp) | fd (central difference)
  fd_eps: float                   # fd: the step h
  warmup: str                     # scm (sCM Algorithm 1) | rcm (NVlabs/rcm's form)
  tangent_warmup_steps: int       # r = min(1, step / this); 0: r = 1 from the start
  norm_c: float                   # tangent normalisation g / (|g| + c); sCM: 0.1
  adaptive_weight: bool           # sCM's learned weight w(t): exp(w)/D |F - sg(F) - g|^2 - w
  time_embedding: str             # edm (the teacher's c_noise) | linear (time_scale * t)
  time_scale: float               # linear only
  dmd_weight: float               # weight of the DMD regulariser; 0 = sCM only
  dmd_only: bool                  # the student loss is the DMD part alone
  scm_warmup_steps: int           # sCM-only student steps before any DMD / critic step
  warmup_critic_steps: int        # then critic-only steps before the first DMD student step
  gen_every: int                  # then the student on every k-th step, the critic otherwise
  rollout_max_steps: int          # DMD / critic rollouts take 1..this many steps (<= 4)
  dmd_time: str                   # shift (rCM's timestep_shift) | lognormal (rCM's p_D)
  dmd_shift: float                # shift: s = k u / (1 + (k - 1) u), t = arctan(s / (1 - s))
  dmd_p_mean: float               # lognormal: log(sd tan t) ~ N(dmd_p_mean, dmd_p_std^2)
  dmd_p_std: float
  sigma_min: float                # every training time is clipped to
  sigma_max: float                # [arctan(sigma_min / sd), arctan(sigma_max / sd)]; rollouts
                                  # and the sampler start at the top
  sampler_times: Tuple[float, ...]  # intermediate TrigFlow times of the N-step sampler
  fake_loss_weight: str           # edm | none (critics.FAKE_LOSS_WEIGHTS)

  @classmethod
  def from_config(cls, objective_config):
    st = settings_from_config(cls, objective_config, SECTIONS, "rcm_objective")
    st = dataclasses.replace(st, sampler_times=tuple(float(t) for t in st.sampler_times))
    check_choice(st.tangent, ("jvp", "fd"), "objective.tangent")
    check_choice(st.warmup, ("scm", "rcm"), "objective.warmup")
    check_choice(st.time_embedding, ("edm", "linear"), "objective.time_embedding")
    check_choice(st.dmd_time, DMD_TIMES, "objective.dmd_time")
    check_choice(st.fake_loss_weight, critics.FAKE_LOSS_WEIGHTS, "objective.fake_loss_weight")
    if st.gen_every < 1:
      raise ConfigError(f"objective.gen_every={st.gen_every} must be >= 1")
    if not 1 <= st.rollout_max_steps <= MAX_ROLLOUT_STEPS:
      raise ConfigError(f"objective.rollout_max_steps={st.rollout_max_steps} must be in "
                        f"[1, {MAX_ROLLOUT_STEPS}]")
    if st.dmd_weight < 0:
      raise ConfigError(f"objective.dmd_weight={st.dmd_weight} must be >= 0")
    if st.dmd_only and not st.dmd_weight:
      raise ConfigError("objective.dmd_only=True needs objective.dmd_weight > 0")
    if st.dmd_only and st.adaptive_weight:
      raise ConfigError("objective.adaptive_weight=True weights the sCM loss, which "
                        "objective.dmd_only=True drops; valid with dmd_only: False")
    if min(st.scm_warmup_steps, st.warmup_critic_steps, st.tangent_warmup_steps) < 0:
      raise ConfigError("objective.scm_warmup_steps, warmup_critic_steps and "
                        "tangent_warmup_steps must be >= 0")
    if not 0 < st.sigma_min < st.sigma_max:
      raise ConfigError(f"objective.sigma_min={st.sigma_min} and sigma_max={st.sigma_max} "
                        "must satisfy 0 < sigma_min < sigma_max")
    times = st.sampler_times
    if any(not 0 < t < math.pi / 2 for t in times) or any(
        a <= b for a, b in zip(times, times[1:])):
      raise ConfigError(f"objective.sampler_times={list(times)} must decrease inside (0, pi/2)")
    return st

  @property
  def has_dmd(self) -> bool:
    return self.dmd_weight > 0

  @property
  def has_scm(self) -> bool:
    return not self.dmd_only


def schedule(step: int, st: Settings) -> str:
  """The kind of step at ``step``, on the host (module docstring)."""
  if not st.has_dmd:
    return "generator"
  if step < st.scm_warmup_steps:
    return "scm_warmup"
  since = step - st.scm_warmup_steps - st.warmup_critic_steps
  return "generator" if since >= 0 and since % st.gen_every == 0 else "critic"


# ---------------------------------------------------------------------------
# Times and rollouts.


def time_range(st: Settings, sigma_data: float):
  """``(t_min, t_max)``: the TrigFlow times of ``sigma_min`` and ``sigma_max``."""
  return math.atan(st.sigma_min / sigma_data), math.atan(st.sigma_max / sigma_data)


def scm_times(e, st: Settings, sigma_data: float):
  """sCM training times from standard normals ``e`` [B], clipped to :func:`time_range`."""
  t = trigflow.time_from_normals(e, st.p_mean, st.p_std, sigma_data)
  return jnp.clip(t, *time_range(st, sigma_data))


def dmd_times(e, st: Settings, sigma_data: float):
  """rCM's ``draw_training_time_D`` from standard normals ``e`` [B], clipped.

  'shift': ``u = Phi(e)``, the rectified-flow time ``s = k u / (1 + (k - 1) u)``
  (shift k; rCM: 5, most mass at high noise), ``t = arctan(s / (1 - s))``: the
  same TrigFlow time as rCM's (sd = 1) whatever ``sd``, i.e. the same noise
  level relative to the data scale. 'lognormal': ``log(sd tan t) ~ N(dmd_p_mean,
  dmd_p_std^2)`` (rCM's p_D = (0.0, 1.6), used when its shift is 0).
  """
  if st.dmd_time == "shift":
    u = jax.scipy.stats.norm.cdf(e)
    s = st.dmd_shift * u / (1 + (st.dmd_shift - 1) * u)
    t = jnp.arctan2(s, 1 - s)
  else:
    t = trigflow.time_from_normals(e, st.dmd_p_mean, st.dmd_p_std, sigma_data)
  return jnp.clip(t, *time_range(st, sigma_data))


def rollout(F_apply, params, starts, mid_times, counts, cond=None, *, t_start, sigma_data,
            grad_last: bool = True):
  """Student samples after ``counts[b]`` (1..K) consistency steps each: ``(x0, x_t, t)``.

  ``starts``: K standard-normal arrays [B, ...], the first the initial noise at
  ``t_start`` (``x = sd * noise``), the others the re-noising noise; ``mid_times``:
  K - 1 per-sample [B] times, non-increasing. Sample b runs ``counts[b] - 1``
  steps at stop_gradient(params) (``x0 = f(x, t)``, then ``x = cos t' x0 + sin t'
  sd eps`` at the next time ``t'``) and one last step ``x0 = f(x, t)`` at ``params``
  (with gradient when ``grad_last``): ``trigflow.student_rollout`` with a
  per-sample number of steps. Every sample pays the K - 1 frozen forwards.
  """
  frozen = _sg(params)
  x = sigma_data * starts[0]
  t = jnp.full(x.shape[:1], t_start, x.dtype)
  for i, t_next in enumerate(mid_times):
    x0 = trigflow.consistency_fn(F_apply, frozen, x, t, cond, sigma_data)
    moved = trigflow.add_noise(x0, starts[i + 1], t_next, sigma_data)
    active = i + 1 < counts
    x = jnp.where(active.reshape(active.shape + (1,) * (x.ndim - 1)), moved, x)
    t = jnp.where(active, t_next, t)
  x, t = _sg(x), _sg(t)
  x0 = trigflow.consistency_fn(F_apply, params if grad_last else frozen, x, t, cond, sigma_data)
  return x0, x, t


def rollout_with_noise(F_apply, params, rng, n, x_shape, st: Settings, sigma_data, cond=None,
                       grad_last: bool = True):
  """A student rollout (:func:`rollout`) and the noise that re-noises its result.

  All of it from one ``jax.random.normal`` call: K rollout noises, the
  re-noising ``eps``; K - 1 intermediate-time draws (running minimum, from
  :func:`dmd_times`), the per-sample step count (uniform on 1..K) and the
  re-noising time. Returns ``(x0, eps, t)`` with ``t`` the re-noising time [B].
  """
  k = st.rollout_max_steps
  xs, es = noise.draw_noise(rng, n, x_shape, k + 1, k + 1)
  t_min, t_max = time_range(st, sigma_data)
  mids, t_prev = [], jnp.full((n,), t_max, jnp.float32)
  for e in es[:k - 1]:
    t_prev = jnp.minimum(dmd_times(e, st, sigma_data), t_prev)
    mids.append(t_prev)
  counts = jnp.clip(1 + jnp.floor(k * jax.scipy.stats.norm.cdf(es[k - 1])), 1, k)
  x0, _, _ = rollout(F_apply, params, xs[:k], mids, counts, cond, t_start=t_max,
                     sigma_data=sigma_data, grad_last=grad_last)
  return x0, xs[k], dmd_times(es[k], st, sigma_data)


# ---------------------------------------------------------------------------
# Networks, losses, steps.


def _networks(config, st: Settings):
  """(module, student F_apply, EDM denoiser of the same module) for ``config.model``."""
  module = models.build(config.model)
  sd = float(config.model.sigma_data)
  F_apply = models.make_F(module, sd, st.time_embedding, st.time_scale)
  return module, F_apply, models.make_denoiser(module, sd)


def make_student_loss(F_apply, nets: critics.Nets, st: Settings, sigma_data: float,
                      with_scm: bool, with_dmd: bool):
  """``loss(params, inputs, batch, rng)``; ``inputs = {"teacher", "fake"}`` (DMD only).

  ``batch``: ``x_t``, ``t``, ``g`` (the constant sCM target, with_scm) or ``x``
  (its rows only set the batch size), ``logvar`` (the adaptive weight's ``w(t)``,
  optional) and ``cond``. Only the student's params
  are differentiated: the regression of :func:`scm_loss.regression_loss` and
  the last rollout step of the DMD part. aux: with both parts, ``scm_loss`` (the sCM term)
  and ``dmd_loss`` (the DMD term before ``dmd_weight``); with one part the loss is that
  term (logged once, as ``gen_loss``), DMD alone still logging ``dmd_loss`` (unweighted).
  """

  def loss(params, inputs, batch, rng):
    cond = batch.get("cond")
    value, aux = jnp.zeros((), jnp.float32), {}
    if with_scm:
      # batch["logvar"] (adaptive weight on): w(t) of the current phi, a constant here.
      reg, _ = scm_loss.regression_loss(F_apply, params, batch["x_t"], batch["t"], batch["g"],
                                        cond, sigma_data=sigma_data, logvar=batch.get("logvar"))
      value = value + reg
      if with_dmd:  # else the loss is this term: logged once, as gen_loss
        aux["scm_loss"] = reg
    if with_dmd:
      n = (batch["g"] if with_scm else batch["x"]).shape[0]
      x0, eps, t = rollout_with_noise(F_apply, params, rng, n, nets.x_shape, st, sigma_data,
                                      cond)
      sigma = trigflow.t_to_sigma(t, sigma_data)
      x_noisy = edm.add_noise(_sg(x0), eps, sigma)
      d_fake = nets.fake_apply(_sg(inputs["fake"]), x_noisy, sigma, cond)
      d_teacher = nets.teacher_apply(_sg(inputs["teacher"]), x_noisy, sigma, cond)
      dmd, dmd_aux = scm_loss.dmd_loss(x0, d_fake, d_teacher)
      value = value + st.dmd_weight * dmd
      aux.update(dmd_loss=dmd, dmd_scale=jnp.mean(dmd_aux["dmd_scale"]))
    return value, aux

  return loss


def sampler(config, task, settings=None) -> SamplerSpec:
  """``eval.sampler_steps`` (clipped to 1..1 + len(sampler_times)) consistency steps of the EMA."""
  st = Settings.from_config(config.objective) if settings is None else settings
  module, F_apply, _ = _networks(config, st)
  sd = float(config.model.sigma_data)
  num_steps = min(max(int(config.eval.sampler_steps), 1), 1 + len(st.sampler_times))
  times = trigflow.sampler_times(num_steps, st.sigma_max, sd, st.sampler_times)

  def sample(params, rng, num, cond=None):
    noise_rng, step_rng = jax.random.split(rng)
    z = jax.random.normal(noise_rng, (num,) + tuple(task.x_shape))
    return trigflow.consistency_sampler(F_apply, params, z, cond, times, step_rng, sd)

  return SamplerSpec(init_params=models.initializer(module, task.x_shape, task.cond_dim),
                     sample=sample)


def build(config, task, settings=None) -> Objective:
  """rCM / sCM / DMD-only distillation of ``task``'s teacher into ``config.model``."""
  st = Settings.from_config(config.objective) if settings is None else settings
  student.require_teacher(task, "rcm")
  sd = float(config.model.sigma_data)
  _, F_apply, fake_apply = _networks(config, st)
  sample = sampler(config, task, st)
  student.check_architecture(task, jax.eval_shape(sample.init_params, jax.random.key(0)),
                             "rcm", "student")
  teacher_F = trigflow.edm_to_trigflow(task.teacher_apply, sd)
  x_shape = tuple(task.x_shape)
  nets = critics.Nets(gen_apply=None, teacher_apply=task.teacher_apply, fake_apply=fake_apply,
                      disc=None, x_shape=x_shape, sigma_init=0.0)

  gen_update = update.updater(config, ema=True, name=student.GEN)
  fake_update = update.updater(
      config, scaffold.section_optimizer(config.optim, config.objective.fake_optim), name="fake")
  gather = lambda tree: partition.gather_fsdp(tree, gen_update.fsdp_gather)
  fake_loss = critics.make_fake_score_loss(nets, st.fake_loss_weight)
  # The adaptive weight's own Adam with the student's settings: Adam is per coordinate, so
  # this is the trajectory of one optimiser over both trees, except that clipping and the
  # NaN guard see w's small gradient alone (neither is swamped by the student's norm).
  weight_update = update.updater(config, name="weight")
  weight_loss = lambda params, inputs, batch, rng: (
      scm_loss.logvar_loss(params, batch["t"], batch["error"], sd), {})

  def init(rng, teacher=None):
    """The student (params, EMA) and, with a DMD part, the fake score: teacher copies or fresh."""
    state = student.initial_state(task, teacher, lambda: sample.init_params(rng), gen_update,
                                  fake_update if st.has_dmd else None)
    if st.adaptive_weight:
      state["weight"] = state_lib.init_net_state(scm_loss.init_logvar(), weight_update.tx,
                                                 ema=False)
    return state

  def student_step(with_scm, with_dmd):
    loss_fn = make_student_loss(F_apply, nets, st, sd, with_scm, with_dmd)

    def step(state, teacher, batch, rng):
      target_rng, loss_rng = jax.random.split(rng)
      cond = batch.get("cond")
      data = {"x": batch["x"]}
      metrics = {}
      if with_scm:
        # The target first, a constant: the Updater below never sees the tangent.
        (eps,), (e,) = noise.draw_noise(target_rng, batch["x"].shape[0], x_shape, 1, 1)
        r = scm_loss.tangent_warmup(state["step"], st.tangent_warmup_steps)
        g, aux = scm_loss.compute_target(
            F_apply, gather(state["gen"]["params"]), batch["x"], eps, scm_times(e, st, sd),
            teacher_F, gather(teacher), cond, sigma_data=sd, r=r, c=st.norm_c,
            tangent_mode=st.tangent, fd_eps=st.fd_eps, warmup=st.warmup)
        data = {"x_t": aux["x_t"], "t": aux["t"], "g": g}
        metrics.update(g_norm=jnp.mean(aux["g_norm"]), tangent_r=r)
      if cond is not None:
        data["cond"] = cond
      new = dict(state)
      weighted = with_scm and st.adaptive_weight
      if weighted:
        # One step of the joint loss exp(w)/D |F - sg(F) - g|^2 - w at the current (theta, phi):
        # the student's gradient needs w only as a value, phi's needs the error only as a
        # value (= mean_d g^2, scm_loss.regression_error), so two updates from the same point.
        data["logvar"] = _sg(scm_loss.logvar(state["weight"]["params"], data["t"], sd))
        # The weight's loss has the weighted sCM term's value (logged as gen_loss or scm_loss):
        # logged instead are the unweighted error and w itself.
        weight_batch = {"t": data["t"], "error": scm_loss.regression_error(g)}
        new["weight"], _, _, weight_ok = weight_update(
            state["weight"], weight_loss, None, weight_batch, loss_rng)
        metrics.update(scm_error=jnp.mean(weight_batch["error"]),
                       logvar=jnp.mean(data["logvar"]))
      inputs = {"teacher": teacher, "fake": state["fake"]["params"]} if with_dmd else None
      new["gen"], ok, gen_metrics = student.update_generator(gen_update, state, loss_fn, inputs,
                                                             data, loss_rng)
      metrics.update(gen_metrics)
      if weighted:  # joint: a non-finite part skips both (each Updater skipped its own)
        ok = ok & weight_ok
        new = state_lib.select_tree(ok, new, state)
      return update.count_step(new, ok), metrics

    return step

  def critic_step(state, teacher, batch, rng):
    """The fake score by DSM on stop_gradient student rollouts (the teacher is unused)."""
    del teacher
    roll_rng, fake_rng = jax.random.split(rng)
    cond = batch.get("cond")
    x0, eps, t = rollout_with_noise(F_apply, gather(state["gen"]["params"]), roll_rng,
                                    batch["x"].shape[0], x_shape, st, sd, cond, grad_last=False)
    x_gen, sigma = _sg(x0), trigflow.t_to_sigma(t, sd)
    critic_batch = {"x_gen": x_gen, "x_t": edm.add_noise(x_gen, eps, sigma), "sigma": sigma}
    if cond is not None:
      critic_batch["cond"] = cond
    fake, _, metrics, ok = fake_update(state["fake"], fake_loss, None, critic_batch, fake_rng)
    return update.count_step(dict(state, fake=fake), ok), metrics

  steps = {"generator": student_step(st.has_scm, st.has_dmd)}
  if st.has_dmd:
    steps["critic"] = critic_step
    if st.scm_warmup_steps:
      steps["scm_warmup"] = student_step(True, False)
  return Objective(init=init, steps=steps, schedule=lambda i: schedule(i, st),
                   export=lambda state: state["gen"]["ema"], sampler=sample)

"""f-distill: a one-step generator by f-divergence distribution matching.

Xu, Nie, Vahdat et al. 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching"; notation of DESIGN.md section 4. Three networks train
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
surrogate. One deliberate difference: FastGen bins ``t`` linearly on
[t_min, t_max] (with EDM's [0.002, 80] two thirds of the samples land in the
first bin); we bin the sampler's own uniform coordinate (the Karras ramp
position or the lognormal CDF), so every bin receives the same share.

Update schedule (DMD2 / FastGen ``student_update_freq``): the generator is
updated on every ``gen_every``-th step, the fake score and the discriminator
on the others, each with its own optax optimiser, gradient clipping and the
NaN guard of :func:`fdistill.train.update.grad_and_update`. The two kinds of
step are separate functions (``Objective.branches``) that the training loop
jits and picks on the host; ``Objective.step`` combines them with a
``lax.cond`` for callers that want one function.

Initialisation: the generator and the fake score copy the teacher's params
(``teacher.kind`` 'checkpoint' or 'edm_pickle'; same architecture as the
teacher, checked at build time). The copy happens inside the first step, from the ``frozen``
argument, so a large teacher never becomes a constant of the jitted init.
With the analytic teacher (an exact GMM, no network) both start from the same
fresh ``config.model`` network (the zero-initialised output layer makes ``G``
a small Gaussian around 0) and ``warmup_critic_steps`` critic-only steps let
the fake score fit that initial generator before the generator moves.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from fdistill import models
from fdistill.diffusion import edm
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import Objective
from fdistill.objectives import divergences
from fdistill.parallel import partition
from fdistill.registry import lookup
from fdistill.optim import state as state_lib
from fdistill.optim import update

# Sub-sections of ``config.objective`` that are not :class:`Settings` fields.
_SECTIONS = ("name", "discriminator", "fake_optim", "disc_optim")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The scalar fields of ``config.objective`` (defaults: FastGen's CIFAR-10 recipe, except the
  EDM-weighted fake-score loss)."""
  divergence: str = "js"
  alpha: float = 0.5              # only for divergence='alpha'
  gen_every: int = 5              # generator update on every k-th step (student_update_freq)
  warmup_critic_steps: int = 0    # critic-only steps before the first generator update
  gan_weight: float = 1e-3        # non-saturating GAN term in the generator loss
  logit_clip: float = 10.0
  ratio_lower: float = 0.1
  ratio_upper: float = 20.0
  ratio_bins: int = 10            # 0: no per-bin ratio normalisation
  ratio_ema: float = 0.0          # EMA rate of the bin means (0: this batch's means)
  normalise_h: bool = True        # divide h by its global-batch mean
  weight: str = "abs_mean"        # abs_mean: h / mean|x - D_T| (DMD); sigma2: h / s^2 (exact)
  fake_loss_weight: str = "edm"   # edm: lambda(s) |D - x0|^2; none: plain x0 MSE (FastGen)
  same_noise_real: bool = False   # noise real data with the fake samples' (s, eps)
  sigma_dist: str = "karras"      # karras | lognormal | fixed
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  ramp_min: float = 0.002         # karras: share of the ramp cut at each end (FastGen
  ramp_max: float = 0.998         # samples steps 2..998 of a 1000-step grid)
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_fixed: float = 1.0

  @classmethod
  def from_config(cls, objective_config):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(objective_config).items() if k not in _SECTIONS}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"objective.{unknown[0]} is not an f-distill setting; valid: "
                       f"{', '.join(sorted(names | set(_SECTIONS)))}")
    settings = cls(**values)
    lookup(SIGMA_DISTS, settings.sigma_dist, "objective.sigma_dist")
    lookup(_WEIGHTS, settings.weight, "objective.weight")
    lookup(_FAKE_WEIGHTS, settings.fake_loss_weight, "objective.fake_loss_weight")
    if settings.gen_every < 1:
      raise ValueError(f"objective.gen_every={settings.gen_every} must be >= 1")
    return settings


def objective_config(**overrides) -> ml_collections.ConfigDict:
  """A complete ``config.objective`` for f-distill: :class:`Settings` defaults, the
  discriminator and optimiser overrides for the fake score and discriminator, then
  ``overrides`` (configs/*_fdistill.py call this)."""
  c = dict(dataclasses.asdict(Settings()), name="fdistill",
           discriminator=dict(name="mlp"), fake_optim={}, disc_optim={})
  unknown = sorted(set(overrides) - set(c))
  if unknown:
    raise ValueError(f"objective.{unknown[0]} is not an f-distill setting; valid: "
                     f"{', '.join(sorted(c))}")
  c.update(overrides)
  divergences.get(c["divergence"], c["alpha"])  # fail early on an unknown divergence
  return ml_collections.ConfigDict(c)


# ---------------------------------------------------------------------------
# Noise. Each step draws all its Gaussian noise in one ``jax.random.normal`` call
# (every separate call adds a threefry expansion that XLA compiles, seconds on CPU).
# Noise-level samplers map a standard normal ``e`` [B] to (sigma, u), u in (0, 1) the
# sampler's own uniform coordinate, used to bin the density ratio.


def draw_noise(rng, n, x_shape, num_x, num_scalar):
  """``num_x`` standard normal arrays [n, *x_shape] and ``num_scalar`` of shape [n]."""
  size = math.prod(x_shape)
  flat = jax.random.normal(rng, (n, num_x * size + num_scalar))
  xs = [flat[:, i * size:(i + 1) * size].reshape((n,) + tuple(x_shape)) for i in range(num_x)]
  return xs, [flat[:, num_x * size + j] for j in range(num_scalar)]


def _karras(e, st: Settings):
  """FastGen's 'polynomial': a uniform position on EDM's Karras (rho) grid from s_max to s_min."""
  u = st.ramp_min + (st.ramp_max - st.ramp_min) * jax.scipy.stats.norm.cdf(e)
  hi, lo = st.sigma_max**(1 / st.rho), st.sigma_min**(1 / st.rho)
  return (hi + u * (lo - hi))**st.rho, u


def _lognormal(e, st: Settings):
  """EDM training levels ``log s ~ N(p_mean, p_std^2)``; u is the normal CDF."""
  return jnp.exp(st.p_mean + st.p_std * e), jax.scipy.stats.norm.cdf(e)


def _fixed(e, st: Settings):
  """One noise level (analysis and the oracle tests)."""
  return jnp.full_like(e, st.sigma_fixed), jnp.full_like(e, 0.5)


SIGMA_DISTS = {"karras": _karras, "lognormal": _lognormal, "fixed": _fixed}


def sample_sigma(e, st: Settings):
  """(sigma, u) from standard normals ``e`` [B]."""
  return SIGMA_DISTS[st.sigma_dist](e, st)


# ---------------------------------------------------------------------------
# The f-divergence weight.


def density_ratio(logits, st: Settings):
  """``r = exp(clip(mean_heads(logit)))`` clipped to [ratio_lower, ratio_upper] (FastGen)."""
  log_r = jnp.clip(jnp.mean(logits.astype(jnp.float32), axis=-1), -st.logit_clip, st.logit_clip)
  return jnp.clip(jnp.exp(log_r), st.ratio_lower, st.ratio_upper)


def bin_index(u, num_bins):
  return jnp.clip(jnp.floor(u * num_bins).astype(jnp.int32), 0, num_bins - 1)


def update_ratio_bins(bins, r, idx, ema):
  """EMA of the mean ratio per noise-level bin over the global batch; empty bins keep theirs.

  The sums run over the whole (sharded) batch, so under jit every device sees
  the same global statistics, as FastGen's all-reduce of counts and sums.
  """
  one_hot = jax.nn.one_hot(idx, bins.shape[0], dtype=jnp.float32)
  count = jnp.sum(one_hot, axis=0)
  mean = jnp.sum(one_hot * r[:, None], axis=0) / (count + 1e-6)
  return jnp.where(count > 0, ema * bins + (1 - ema) * mean, bins)


def normalise_by_batch_mean(h):
  """``h / (mean h + 1e-6)``, the mean over the global batch (all devices)."""
  return h / (jnp.mean(h) + 1e-6)


def f_weight(logits, u, bins, div: divergences.Divergence, st: Settings):
  """(h [B], new bins, stats) from discriminator logits [B, heads] (no gradient)."""
  logits = jax.lax.stop_gradient(logits)
  r = density_ratio(logits, st)
  new_bins = bins
  if st.ratio_bins:
    idx = bin_index(u, st.ratio_bins)
    new_bins = update_ratio_bins(bins, r, idx, st.ratio_ema)
    r_used = r / (new_bins[idx] + 1e-6)
  else:
    r_used = r
  h = div.h(r_used)
  if st.normalise_h:
    h = normalise_by_batch_mean(h)
  stats = {"ratio_mean": jnp.mean(r), "logit_mean": jnp.mean(logits), "h_min": jnp.min(h),
           "h_mean": jnp.mean(h), "h_max": jnp.max(h)}
  return h, new_bins, stats


def _per_sample_mean(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def _bcast(w, x):
  return w.reshape(w.shape + (1,) * (x.ndim - 1))


def _abs_mean_weight(x, d_teacher, sigma):
  """DMD's normaliser ``1 / (mean|x - D_T| + 1e-6)`` per sample."""
  del sigma
  return 1.0 / (_per_sample_mean(jnp.abs(x - d_teacher)) + 1e-6)


def _sigma2_weight(x, d_teacher, sigma):
  """``1/s^2``: turns the surrogate's x-gradient into exactly h (S_fake - S_T) (tests)."""
  del x, d_teacher
  return 1.0 / sigma**2


_WEIGHTS = {"abs_mean": _abs_mean_weight, "sigma2": _sigma2_weight}


def vsd_surrogate(x, d_fake, d_teacher, weight):
  """``0.5 mean (x - sg(x - w (D_fake - D_T)))^2``: gradient ``w (D_fake - D_T) / numel(x[0])``
  per sample and data dimension, averaged over the batch."""
  grad = _bcast(weight, x) * (d_fake - d_teacher)
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * jnp.mean(jnp.square(x - target))


def generator_gan_loss(logits):
  """Non-saturating generator loss ``softplus(-logit)``."""
  return jnp.mean(jax.nn.softplus(-logits))


def discriminator_loss(real_logits, fake_logits):
  """Logistic loss, data = 1, generator = 0; its optimum logit is ``log p/q``."""
  return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))


# ---------------------------------------------------------------------------
# Loss functions ``loss(params, frozen, batch, rng) -> (loss, aux)``.


@dataclasses.dataclass(frozen=True)
class Nets:
  """The closures the losses need: generator, teacher, fake score (denoisers) and discriminator."""
  gen_apply: Callable
  teacher_apply: Callable
  fake_apply: Callable
  disc: disc_lib.Discriminator
  x_shape: tuple
  sigma_init: float


def teacher_and_features(nets: Nets, teacher_params, x_t, sigma, cond):
  """``(D_T, features or None)``; features only when the discriminator uses them."""
  if nets.disc.uses_features:
    d, feats = nets.teacher_apply(teacher_params, x_t, sigma, cond, return_features=True)
    return d, feats
  return nets.teacher_apply(teacher_params, x_t, sigma, cond), None


def generate(nets: Nets, params, z, cond=None):
  """``G(z) = D_g(s_g z; s_g)`` for standard normal ``z`` [B, *x_shape]."""
  return edm.one_step_generate(nets.gen_apply, params, z, cond, nets.sigma_init)


def make_generator_loss(nets: Nets, div: divergences.Divergence, st: Settings):
  """Generator loss; ``frozen = {"teacher", "fake", "disc", "bins"}``, aux has the new bins."""
  normaliser = _WEIGHTS[st.weight]

  def loss(params, frozen, batch, rng):
    cond = batch.get("cond")
    (z, eps), (e,) = draw_noise(rng, batch["x"].shape[0], nets.x_shape, 2, 1)
    x = generate(nets, params, z, cond)
    sigma, u = sample_sigma(e, st)
    x_t = edm.add_noise(x, eps, sigma)
    d_fake = jax.lax.stop_gradient(nets.fake_apply(frozen["fake"], x_t, sigma, cond))
    d_teacher, feats = teacher_and_features(nets, frozen["teacher"], x_t, sigma, cond)
    d_teacher = jax.lax.stop_gradient(d_teacher)
    logits = nets.disc.apply(frozen["disc"], x_t, sigma, feats)
    h, bins, stats = f_weight(logits, u, frozen["bins"], div, st)
    weight = jax.lax.stop_gradient(h * normaliser(x, d_teacher, sigma))
    vsd = vsd_surrogate(x, d_fake, d_teacher, weight)
    gan = generator_gan_loss(logits)
    total = vsd + st.gan_weight * gan
    return total, dict(stats, vsd_loss=vsd, gan_gen=gan, bins=bins)

  return loss


def _edm_weight(sigma):
  return edm.loss_weight(sigma)


_FAKE_WEIGHTS = {"edm": _edm_weight, "none": jnp.ones_like}


def make_fake_score_loss(nets: Nets, st: Settings):
  """DSM of the fake score on the critic batch's stop_gradient generator samples."""
  weight_fn = _FAKE_WEIGHTS[st.fake_loss_weight]

  def loss(params, frozen, batch, rng):
    del frozen
    d = nets.fake_apply(params, batch["x_t"], batch["sigma"], batch.get("cond"), rng=rng)
    err = _per_sample_mean(jnp.square(d - batch["x_gen"]))
    value = jnp.mean(weight_fn(batch["sigma"]) * err)
    return value, {"fake_loss": value}

  return loss


def make_discriminator_loss(nets: Nets):
  """Logistic loss on noised data vs noised generator samples; ``frozen`` = teacher params."""

  def logits_of(params, teacher, x_t, sigma, cond):
    _, feats = teacher_and_features(nets, teacher, x_t, sigma, cond)
    return nets.disc.apply(params, x_t, sigma, feats)

  def loss(params, frozen, batch, rng):
    del rng
    fake = logits_of(params, frozen, batch["x_t"], batch["sigma"], batch.get("cond"))
    real = logits_of(params, frozen, batch["real_t"], batch["real_sigma"], batch.get("cond"))
    value = discriminator_loss(real, fake)
    accuracy = 0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0))
    return value, {"disc_loss": value, "disc_accuracy": accuracy}

  return loss


def critic_batch(nets: Nets, st: Settings, gen_params, batch, rng):
  """Noised stop_gradient generator samples and noised data for one critic step.

  The fake score and the discriminator see the same noised generator samples
  (FastGen); the data get their own noise levels unless ``same_noise_real``.
  """
  cond = batch.get("cond")
  real = batch["x"]
  (z, eps, real_eps), (e, real_e) = draw_noise(rng, real.shape[0], nets.x_shape, 3, 2)
  # Whole generator weights for this forward (FSDP), as inside update.grad_and_update.
  x_gen = jax.lax.stop_gradient(generate(nets, partition.gather_fsdp(gen_params), z, cond))
  sigma, _ = sample_sigma(e, st)
  if st.same_noise_real:
    real_sigma, real_eps = sigma, eps
  else:
    real_sigma = sample_sigma(real_e, st)[0]
  out = {"x_gen": x_gen, "x_t": edm.add_noise(x_gen, eps, sigma), "sigma": sigma,
         "real_t": edm.add_noise(real, real_eps, real_sigma), "real_sigma": real_sigma}
  if cond is not None:
    out["cond"] = cond
  return out


# ---------------------------------------------------------------------------
# The objective.

GEN_METRICS = ("gen_loss", "vsd_loss", "gan_gen", "gen_grad_norm", "ratio_mean", "logit_mean",
               "h_min", "h_mean", "h_max")
CRITIC_METRICS = ("fake_loss", "fake_grad_norm", "disc_loss", "disc_accuracy", "disc_grad_norm")


def _section_optimizer(optim_config, overrides):
  """``config.optim`` with the fields of ``overrides`` replaced (fake score, discriminator)."""
  merged = ml_collections.ConfigDict(dict(optim_config))
  merged.update(dict(overrides or {}))
  return state_lib.make_optimizer(merged)


def _same_structure(a, b) -> bool:
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
  return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and
          shapes(a) == shapes(b))


def is_generator_step(step, st: Settings):
  """Generator on steps warmup, warmup + k, warmup + 2k, ...; critic otherwise.

  For a traced step (``Objective.step``) or a Python int (``Objective.branch_of``).
  """
  since = step - st.warmup_critic_steps
  return (since >= 0) & (since % st.gen_every == 0)


def build(config, ctx) -> Objective:
  """f-distill of ``ctx``'s teacher into a one-step generator of architecture ``config.model``."""
  if ctx.teacher_apply is None:
    raise ValueError("objective.name='fdistill' distils a teacher: set teacher.kind to "
                     "'analytic' (toy data) or 'checkpoint' (with teacher.workdir)")
  st = Settings.from_config(config.objective)
  div = divergences.get(st.divergence, st.alpha)
  sigma_data = config.model.get("sigma_data", edm.SIGMA_DATA)
  module = models.build(config.model)
  net_apply = models.make_denoiser(module, sigma_data)
  feature_shapes = disc_lib.teacher_feature_shapes(ctx.teacher_apply, ctx.teacher_params,
                                                   ctx.x_shape, ctx.cond_dim)
  disc = disc_lib.build(config.objective.discriminator, ctx.x_shape, feature_shapes, sigma_data)
  nets = Nets(net_apply, ctx.teacher_apply, net_apply, disc, tuple(ctx.x_shape),
              float(config.generator.sigma_init))
  x_example = (1,) + tuple(ctx.x_shape)
  fresh = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0), x_example,
                                                    ctx.cond_dim))
  from_teacher = config.teacher.kind != "analytic"  # a network: checkpoint or edm_pickle
  if from_teacher and not _same_structure(fresh, ctx.teacher_params):
    raise ValueError("f-distill initialises the generator from the teacher: config.model must "
                     "be the teacher's architecture (compare with the teacher run's config.json)")

  tx_gen = state_lib.make_optimizer(config.optim)
  tx_fake = _section_optimizer(config.optim, config.objective.get("fake_optim"))
  tx_disc = _section_optimizer(config.optim, config.objective.get("disc_optim"))
  ema_decay = config.optim.get("ema_decay", 0.999)
  micro = update.micro_batch_count(config)  # micro-batches: bins are averaged over them
  gen_loss = make_generator_loss(nets, div, st)
  fake_loss = make_fake_score_loss(nets, st)
  disc_loss = make_discriminator_loss(nets)

  def init(rng):
    net_rng, disc_rng = jax.random.split(rng)
    params = models.init_params(module, net_rng, x_example, ctx.cond_dim)
    last = {k: jnp.zeros((), jnp.float32) for k in GEN_METRICS + CRITIC_METRICS}
    return dict(update.init_counters(),
                gen=state_lib.init_net_state(params, tx_gen),
                fake=state_lib.init_net_state(params, tx_fake, ema=False),
                disc=state_lib.init_net_state(disc.init(disc_rng), tx_disc, ema=False),
                ratio_bins=jnp.ones((max(st.ratio_bins, 1),), jnp.float32),
                last=last)

  def load_teacher(state, teacher_params):
    """Step 0: generator (params and EMA) and fake score become copies of the teacher."""
    copy = lambda: jax.tree_util.tree_map(jnp.array, teacher_params)
    return dict(state, gen=dict(state["gen"], params=copy(), ema=copy()),
                fake=dict(state["fake"], params=copy()))

  def generator_step(state, frozen, batch, rng):
    gen_frozen = {"teacher": frozen, "fake": state["fake"]["params"],
                  "disc": state["disc"]["params"], "bins": state["ratio_bins"]}
    gen, loss, aux, ok = update.grad_and_update(state["gen"], gen_loss, gen_frozen, batch, rng,
                                               tx_gen, ema_decay, micro)
    bins = jnp.where(ok, aux.pop("bins"), state["ratio_bins"])
    last = dict(state["last"], gen_loss=loss, gen_grad_norm=aux.pop("grad_norm"), **aux)
    return update.count_step(dict(state, gen=gen, ratio_bins=bins, last=last), ok)

  def critic_step(state, frozen, batch, rng):
    c_rng, f_rng, d_rng = jax.random.split(rng, 3)
    cb = critic_batch(nets, st, state["gen"]["params"], batch, c_rng)
    fake, _, f_aux, f_ok = update.grad_and_update(state["fake"], fake_loss, None, cb, f_rng,
                                                 tx_fake, micro_batches=micro)
    disc_state, _, d_aux, d_ok = update.grad_and_update(state["disc"], disc_loss, frozen, cb,
                                                       d_rng, tx_disc, micro_batches=micro)
    last = dict(state["last"], fake_grad_norm=f_aux.pop("grad_norm"),
                disc_grad_norm=d_aux.pop("grad_norm"), **f_aux, **d_aux)
    return update.count_step(dict(state, fake=fake, disc=disc_state, last=last),
                            jnp.logical_and(f_ok, d_ok))

  def branch(update):
    """A full step that runs ``update``: teacher copy at step 0, update, metrics."""

    def run(state, frozen, batch, rng):
      if from_teacher:
        state = jax.lax.cond(state["step"] == 0, load_teacher, lambda s, _: s, state, frozen)
      state = update(state, frozen, batch, rng)
      metrics = {"train/" + k: v for k, v in state["last"].items()}
      metrics["train/skipped"] = state["skipped"]
      return state, metrics

    return run

  gen_branch, critic_branch = branch(generator_step), branch(critic_step)

  def step(state, frozen, batch, rng):
    return jax.lax.cond(is_generator_step(state["step"], st), gen_branch, critic_branch,
                        state, frozen, batch, rng)

  def sample(state, rng, num, cond=None):
    z = jax.random.normal(rng, (num,) + tuple(nets.x_shape))
    return generate(nets, state["gen"]["ema"], z, cond)

  return Objective(init=init, step=step, sample=sample, branches=(gen_branch, critic_branch),
                   branch_of=lambda i: 0 if is_generator_step(i, st) else 1)

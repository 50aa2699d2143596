"""TrigFlow (Lu & Song 2024, sCM; used by rCM, Zheng et al. 2025) as pure functions.

Notation (docs/design.md section 4): ``x_t = cos(t) x0 + sin(t) z`` with
``z ~ N(0, sd^2 I)`` and ``t in [0, pi/2]``; a TrigFlow network is
``F(x_t / sd, t)`` and its consistency function / x0 estimate is
``f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t)``. The probability-flow
ODE is ``dx_t/dt = sd F_teacher(x_t / sd, t)``.

Relation to EDM (``x_s = x0 + s eps``, ``D = c_skip x + c_out F_edm(c_in x; c_noise)``):
``x_t / cos(t)`` is an EDM sample at ``s = sd tan(t)`` (``t = arctan(s / sd)``).
The posterior mean ``x0_hat = D(x_t / cos t; sd tan t)`` gives the velocity
``E[dx_t/dt | x_t] = E[-sin t x0 + cos t z | x_t] = (cos t x_t - x0_hat) / sin t``,
so ``F = (cos t x_t - x0_hat) / (sd sin t)`` (:func:`edm_to_trigflow`). Putting
EDM's preconditioning in, ``c_in x = x_t / sd``, ``c_skip x = cos t x_t`` and
``c_out = sd sin t``, hence exactly ``F_trigflow(y, t) = -F_edm(y; log(sd tan t) / 4)``:
an EDM raw network IS a TrigFlow network with the same weights, up to sign
and the time embedding (:func:`network_F`). That is how a TrigFlow student is
initialised from an EDM teacher, and why ``f`` of the student equals EDM's
``D`` at ``sigma = sd tan t`` (:func:`trigflow_to_denoiser`).

Every ``F_apply`` here has the signature ``F_apply(params, x_scaled, t, cond=None, **kw)``
with ``x_scaled = x_t / sd`` [B, ...] and per-sample ``t`` [B].
"""
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from fdistill.diffusion import edm
from fdistill.diffusion import per_sample

SIGMA_DATA = edm.SIGMA_DATA
# The EDM time embedding clips t to [arctan(_SIGMA_LO / sd), arctan(_SIGMA_HI / sd)]:
# t = 0 and t = pi/2 are sigma = 0 and sigma = inf, where log(sd tan t) is
# infinite (and in float32 tan(float32(pi/2)) < 0, a NaN). Inside the clip the
# embedding is exact; the clip only touches times no EDM teacher has seen.
_SIGMA_LO, _SIGMA_HI = 1e-6, 1e4


def _bcast(t, x):
  """Per-sample ``t`` [B] (or a scalar) shaped to broadcast against ``x`` [B, ...], in x's dtype."""
  return per_sample.expand(jnp.asarray(t, x.dtype), x)


def _per_sample(t, x):
  """``t`` as a [B] array in the floating dtype of ``x`` (a scalar is broadcast)."""
  return jnp.broadcast_to(jnp.asarray(t, jnp.result_type(x.dtype, jnp.float32)), x.shape[:1])


def sigma_to_t(sigma, sigma_data=SIGMA_DATA):
  """EDM noise level -> TrigFlow time, ``t = arctan(sigma / sd)``."""
  return jnp.arctan(jnp.asarray(sigma) / sigma_data)


def t_to_sigma(t, sigma_data=SIGMA_DATA):
  """TrigFlow time -> EDM noise level, ``sigma = sd tan t``."""
  return sigma_data * jnp.tan(jnp.asarray(t))


def add_noise(x0, eps, t, sigma_data=SIGMA_DATA):
  """``x_t = cos(t) x0 + sin(t) sd eps`` for standard-normal ``eps`` (so ``z = sd eps``)."""
  return _bcast(jnp.cos(t), x0) * x0 + _bcast(jnp.sin(t), x0) * sigma_data * eps


def edm_to_trigflow(denoiser_apply: Callable, sigma_data: float = SIGMA_DATA) -> Callable:
  """Wraps any EDM denoiser ``D(params, x, sigma, cond, **kw)`` into a TrigFlow ``F_apply``.

  ``F(y, t) = (cos t x_t - D(x_t / cos t; sd tan t)) / (sd sin t)`` with
  ``x_t = sd y`` (module docstring). Works for the exact GMM teacher and for
  networks alike; for a network prefer :func:`network_F`, which skips the
  division by ``sin t`` (cancellation at small t in float32). Needs
  ``0 < t < pi/2``.
  """

  def F_apply(params, x_scaled, t, cond=None, **kwargs):
    t = _per_sample(t, x_scaled)
    x_t = sigma_data * x_scaled
    cos, sin = _bcast(jnp.cos(t), x_t), _bcast(jnp.sin(t), x_t)
    x0 = denoiser_apply(params, x_t / cos, sigma_data * jnp.tan(t), cond, **kwargs)
    return (cos * x_t - x0) / (sigma_data * sin)

  return F_apply


def trigflow_to_denoiser(F_apply: Callable, sigma_data: float = SIGMA_DATA) -> Callable:
  """The EDM denoiser ``D(params, x, sigma, cond, **kw)`` of a TrigFlow ``F_apply``.

  ``D(x; s) = f(cos t x, t)`` at ``t = arctan(s / sd)``: the consistency
  function on the TrigFlow sample that corresponds to ``x``. So a TrigFlow
  student (or teacher) can go wherever an EDM ``apply_fn`` goes (Heun sampler,
  fake-score init, evaluation). Inverse of :func:`edm_to_trigflow`.
  """

  def denoise(params, x, sigma, cond=None, **kwargs):
    t = sigma_to_t(_per_sample(sigma, x), sigma_data)
    x_t = _bcast(jnp.cos(t), x) * x
    return consistency_fn(F_apply, params, x_t, t, cond, sigma_data, **kwargs)

  return denoise


def edm_time_embedding(t, sigma_data=SIGMA_DATA):
  """``c_noise(t) = log(sd tan t) / 4``: EDM's ``log(sigma) / 4`` at ``sigma = sd tan t``.

  Its derivative ``1 / (4 sin t cos t)`` blows up at both ends, but the sCM
  tangent differentiates along ``cos t sin t d/dt``, so the time tangent that
  reaches the network is exactly ``1/4`` at every t: bounded, no need for
  sCM's identity time embedding when distilling an EDM teacher.
  """
  lo = math.atan(_SIGMA_LO / sigma_data)
  hi = math.atan(_SIGMA_HI / sigma_data)
  return jnp.log(sigma_data * jnp.tan(jnp.clip(t, lo, hi))) / 4.0


def network_F(net_fn: Callable, sigma_data: float = SIGMA_DATA, time_embedding: str = "edm",
              time_scale: float = 1.0) -> Callable:
  """A TrigFlow ``F_apply`` from a raw network ``net_fn(params, x_in, c_noise, cond, **kw)``.

  ``F(y, t) = -net(y, c_noise(t))``. The sign makes an EDM raw network (whose
  input is ``c_in x = x_t / sd`` already) a TrigFlow network with the SAME
  weights, so the student starts as the teacher (module docstring).

  time_embedding:
    "edm"    - ``c_noise = log(sd tan t) / 4`` (:func:`edm_time_embedding`): the
               teacher's own conditioning, required for teacher initialisation;
               the default. rCM does the same for Wan (it maps t to the
               teacher's rectified-flow time).
    "linear" - ``c_noise = time_scale * t``: sCM's identity time embedding for
               networks trained from scratch in TrigFlow.
  The models are unchanged: only their ``c_noise`` input is derived from t.
  Extra outputs (encoder features) pass through like ``edm.precondition``.
  """
  if time_embedding not in ("edm", "linear"):
    raise ValueError(f"Unknown time_embedding={time_embedding!r}; valid values: edm, linear")

  def F_apply(params, x_scaled, t, cond=None, **kwargs):
    t = _per_sample(t, x_scaled)
    c_noise = edm_time_embedding(t, sigma_data) if time_embedding == "edm" else time_scale * t
    out = net_fn(params, x_scaled, c_noise, cond, **kwargs)
    raw, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    F = -raw.astype(jnp.promote_types(x_scaled.dtype, jnp.float32))
    return (F,) + tuple(extra) if extra else F

  return F_apply


def consistency_fn(F_apply: Callable, params, x_t, t, cond=None, sigma_data=SIGMA_DATA, **kwargs):
  """``f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t)``: the x0 estimate of ``F_apply``."""
  t = _per_sample(t, x_t)
  F = F_apply(params, x_t / sigma_data, t, cond, **kwargs)
  return _bcast(jnp.cos(t), x_t) * x_t - _bcast(jnp.sin(t), x_t) * sigma_data * F


def time_from_normals(normals, p_mean=-1.0, p_std=1.4, sigma_data=SIGMA_DATA):
  """``t = arctan(exp(p_mean + p_std n) / sd)``, i.e. ``log(sd tan t) ~ N(p_mean, p_std^2)``.

  Defaults are sCM's distillation setting; rCM (Wan, sd = 1) uses (-0.8, 1.6).
  """
  return jnp.arctan(jnp.exp(p_mean + p_std * normals) / sigma_data)


def sample_time(rng, shape, p_mean=-1.0, p_std=1.4, sigma_data=SIGMA_DATA):
  """Training times with ``log(sd tan t) ~ N(p_mean, p_std^2)`` (:func:`time_from_normals`)."""
  return time_from_normals(jax.random.normal(rng, shape), p_mean, p_std, sigma_data)


def sampler_times(num_steps: int, sigma_max: float = 80.0, sigma_data: float = SIGMA_DATA,
                  mid_times: Sequence[float] = (1.3, 1.0, 0.6)):
  """``[arctan(sigma_max / sd), *mid_times[:num_steps - 1], 0]`` for :func:`consistency_sampler`.

  The default intermediate times are NVlabs/rcm's inference script (Wan,
  sd = 1); sCM's 2-step sampler uses ``mid_times=(1.1,)``. They are in
  TrigFlow time, so they mean different noise levels for a different sd.
  """
  if not 1 <= num_steps <= len(mid_times) + 1:
    raise ValueError(f"num_steps must be in [1, {len(mid_times) + 1}] for mid_times={mid_times}; "
                     f"got {num_steps}")
  return (math.atan(sigma_max / sigma_data),) + tuple(mid_times[:num_steps - 1]) + (0.0,)


def consistency_sampler(F_apply: Callable, params, noise, cond=None, times=None, rng=None,
                        sigma_data: float = SIGMA_DATA):
  """Multistep consistency sampling (sCM Algorithm 1 / rCM's ``generate_samples``).

  ``noise`` is standard normal; ``x = sd * noise`` at ``times[0]`` (the prior
  at pi/2; ``arctan(80 / sd)`` differs from it by ``sd / 80``). Each step
  ``x0 = f(x, t_i)``, then ``x = cos(t_{i+1}) x0 + sin(t_{i+1}) sd eps`` with
  fresh ``eps`` unless ``t_{i+1} = 0``. ``times`` is a static sequence ending
  in 0 (default :func:`sampler_times` (1)); ``rng`` is needed for 2+ steps.
  """
  times = tuple(float(t) for t in (sampler_times(1, sigma_data=sigma_data) if times is None
                                   else times))
  if len(times) < 2 or times[-1] != 0.0:
    raise ValueError(f"times must have at least two entries and end in 0; got {times}")
  if len(times) > 2 and rng is None:
    raise ValueError("consistency_sampler needs rng for more than one step (fresh noise)")
  x = sigma_data * noise
  x0 = x
  for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
    x0 = consistency_fn(F_apply, params, x, jnp.full(x.shape[:1], t_cur, x.dtype), cond,
                        sigma_data)
    if t_next > 0:
      eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      x = add_noise(x0, eps, t_next, sigma_data)
  return x0


def student_rollout(F_apply: Callable, params, noise, rng, times, cond=None,
                    sigma_data: float = SIGMA_DATA):
  """Student samples for rCM's DMD regulariser: gradient through the LAST step only.

  ``times`` is a list of per-sample [B] (or scalar) times, ``times[0]`` the
  start (``x = sd * noise``); every step but the last runs at
  ``stop_gradient(params)`` and re-noises with fresh noise, as in
  :func:`consistency_sampler`. Returns ``(x0, x_t, t)`` of the last step:
  ``x0 = f_theta(x_t, t)`` carries the gradient, ``x_t`` does not. rCM draws
  the number of steps (1..4) and the intermediate times (``min`` of a fresh
  draw and the previous time) per iteration; that policy is the caller's.
  """
  frozen = jax.lax.stop_gradient(params)
  x = sigma_data * noise
  for i, t in enumerate(times[:-1]):
    x0 = consistency_fn(F_apply, frozen, x, t, cond, sigma_data)
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    x = add_noise(x0, eps, times[i + 1], sigma_data)
  x = jax.lax.stop_gradient(x)
  t_last = _per_sample(times[-1], x)
  return consistency_fn(F_apply, params, x, t_last, cond, sigma_data), x, t_last


def probability_flow(F_apply: Callable, params, x_t, times, cond=None,
                     sigma_data: float = SIGMA_DATA):
  """Integrates the PF-ODE ``dx_t/dt = sd F(x_t / sd, t)`` over decreasing ``times`` (Heun).

  A final time of 0 is reached by ``f(x, t)`` at the last positive time: the
  x0 estimate, EDM's Euler step to sigma = 0 (F is 0/0 at t = 0). For a
  teacher this is the ODE sampler; from any ``(x_t, t)`` it is the teacher's
  consistency function up to discretisation (tests, oracles). ``times`` is a
  concrete 1-D sequence (a scalar time shared by the batch at each step); the
  steps run in ``lax.scan``, so the cost of compiling does not grow with them.
  """
  times = [float(t) for t in times]
  to_zero = times[-1] == 0.0
  grid = jnp.asarray(times[:-1] if to_zero else times, jnp.result_type(x_t.dtype, jnp.float32))

  def drift(x, t):
    return sigma_data * F_apply(params, x / sigma_data, _per_sample(t, x), cond)

  def step(x, pair):
    t_cur, t_next = pair
    d_cur = drift(x, t_cur)
    x_euler = x + (t_next - t_cur) * d_cur
    return x + (t_next - t_cur) * 0.5 * (d_cur + drift(x_euler, t_next)), None

  x, _ = jax.lax.scan(step, x_t, (grid[:-1], grid[1:]))
  return consistency_fn(F_apply, params, x, grid[-1], cond, sigma_data) if to_zero else x


def karras_times(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 sigma_data=SIGMA_DATA):
  """EDM's Karras grid (with its final 0) mapped to TrigFlow time, for :func:`probability_flow`."""
  return [float(t) for t in sigma_to_t(edm.karras_sigmas(num_steps, sigma_min, sigma_max, rho),
                                       sigma_data)]

"""The sCM / rCM consistency loss (Lu & Song 2024; Zheng et al. 2025) as pure functions.

Notation of ``fdistill.diffusion.trigflow`` (docs/design.md section 4). With the
student's consistency function ``f = cos t x_t - sin t sd F(x_t / sd, t)``,
along the teacher's PF-ODE (``dx_t/dt = sd F_teacher``)

  df/dt = -cos t (sd F - dx_t/dt) - sin t (x_t + sd dF/dt),

and sCM's target is ``g = cos t df/dt`` with a warm-up ``r: 0 -> 1`` on the
second term, normalised per sample, ``g / (|g| + c)``. The loss
``|F - sg(F) - g|^2`` has gradient ``-2 g^T dF/dtheta`` (per sample, over the
mean over data dims): a descent step moves F along g, i.e. makes f more
constant along the ODE. ``cos t sin t dF/dt`` comes from ONE ``jax.jvp`` of
the student at ``stop_gradient(params)`` with tangents
``(cos t sin t dx_t/dt / sd, cos t sin t)`` on ``(x_t / sd, t)`` (sCM's
"JVP rearrangement": the cos t sin t factor keeps every tangent bounded).

Structure, so that ``jax.grad`` never traces through the JVP (the fused
attention kernel of ``ops.flash_jvp`` has no transpose):

  compute_target(...)   -> g (a constant: everything under stop_gradient)
  regression_loss(...)  -> |F(params) - sg(F) - g|^2, the only differentiated path
  scm_loss(...)         = both; ``jax.grad(scm_loss)`` is safe because the
                          tangent is taken at ``stop_gradient(params)`` on
                          inputs that do not depend on params, so grad's
                          linearisation sees only constants there (the kernel
                          runs in the forward, its transpose is never needed;
                          tests/test_objectives_scm.py asserts it on a jaxpr).

Differences from NVlabs/rcm (checked against its ``training_step_generator``):
the per-sample error is a MEAN over data dims (rCM sums and scales by 100;
only the learning-rate scale differs), and the warm-up follows sCM's
Algorithm 1 by default (``warmup="scm"``: ``-cos^2 t (sd F - dx/dt)``);
``warmup="rcm"`` uses rCM's ``-cos t sqrt(1 - r^2 sin^2 t) (sd F - dx/dt)``.
Both agree at r = 1.

sCM's learned adaptive weight (its Algorithm 1): the per-sample loss becomes
``exp(w(t)) |F - sg(F) - g|^2 / D - w(t)`` with ``w = w_phi`` a small network
of t trained on the same loss (:func:`logvar`, :func:`logvar_loss`). Its
minimiser at each t is ``w*(t) = -log E[|.|^2 / D | t]``, so the weighted
error has the same scale at every t. The double normalisation of the
network's conditioning is a model option (``model.double_norm``,
``models/unet.py``).
"""
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fdistill.diffusion import per_sample
from fdistill.diffusion import trigflow
from fdistill.objectives import dmd

SIGMA_DATA = trigflow.SIGMA_DATA
_sg = jax.lax.stop_gradient


def _bcast(t, x):
  return trigflow._bcast(t, x)


def tangent(F_apply: Callable, params, x_t, t, dxt_dt, cond=None,
            sigma_data: float = SIGMA_DATA, f_kwargs: Optional[dict] = None):
  """``(F_minus, cos t sin t dF/dt)`` of the student along the teacher's ODE, by ONE ``jax.jvp``.

  ``F_minus = F(sg(params), x_t / sd, t)``; the total derivative follows
  ``(dx_t/dt, 1)`` in ``(x_t, t)``, i.e. tangents ``(cs dx_t/dt / sd, cs)`` on
  ``(x_t / sd, t)`` with ``cs = cos t sin t``. Both outputs are constants
  (stop_gradient). ``f_kwargs`` go to ``F_apply`` (e.g. a dropout ``rng``,
  which must then be the same in :func:`regression_loss`).
  """
  frozen = _sg(params)
  kw = f_kwargs or {}
  x_t, dxt_dt = _sg(x_t), _sg(dxt_dt)
  t = _sg(trigflow._per_sample(t, x_t))
  cs = jnp.cos(t) * jnp.sin(t)
  y, dy = x_t / sigma_data, (_bcast(cs, x_t) * dxt_dt / sigma_data).astype(x_t.dtype)
  F_minus, dF = jax.jvp(lambda y, t: F_apply(frozen, y, t, cond, **kw), (y, t), (dy, cs))
  return _sg(F_minus), _sg(dF)


def finite_difference_tangent(F_apply: Callable, params, x_t, t, dxt_dt, cond=None,
                              sigma_data: float = SIGMA_DATA, eps: float = 1e-3,
                              f_kwargs: Optional[dict] = None):
  """:func:`tangent` by a central difference along ``(dx_t/dt, 1)``: three forward passes.

  ``dF/dt ~ [F(x_t + h dx_t/dt, t + h) - F(x_t - h dx_t/dt, t - h)] / 2h`` with
  ``h = min(eps, t / 2, (pi/2 - t) / 2)`` per sample (stays inside (0, pi/2)).
  Error O(h^2) plus rounding ~ ulp / h; no JVP, so it works with any
  attention (rCM's ``fd_type`` options are one-sided variants of this).
  """
  frozen = _sg(params)
  kw = f_kwargs or {}
  x_t, dxt_dt = _sg(x_t), _sg(dxt_dt)
  t = _sg(trigflow._per_sample(t, x_t))
  h = jnp.minimum(jnp.minimum(eps, 0.5 * t), 0.5 * (jnp.pi / 2 - t))
  y, dy = x_t / sigma_data, dxt_dt / sigma_data
  step = _bcast(h, x_t) * dy
  F = lambda y, t: F_apply(frozen, y, t, cond, **kw)
  diff = (F(y + step, t + h) - F(y - step, t - h)) / _bcast(2 * h, x_t)
  cs = jnp.cos(t) * jnp.sin(t)
  return _sg(F(y, t)), _sg(_bcast(cs, x_t) * diff)


def scm_target(F_minus, dF, x_t, t, dxt_dt, sigma_data: float = SIGMA_DATA, r=1.0,
               c: Optional[float] = 0.1, warmup: str = "scm"):
  """sCM's target ``g`` and its per-sample norm (before normalisation).

  ``g = -cos^2 t (sd F_minus - dx_t/dt) - r (cos t sin t x_t + sd dF)`` with
  ``dF = cos t sin t dF/dt`` (the :func:`tangent` output); then
  ``g / (|g| + c)``, ``|g|`` the L2 norm over all data dims of each sample.
  ``c=None`` skips the normalisation (tests). ``r`` may be a traced scalar.
  """
  if warmup not in ("scm", "rcm"):
    raise ValueError(f"Unknown warmup={warmup!r}; valid values: scm, rcm")
  t = trigflow._per_sample(t, x_t)
  cos, sin = _bcast(jnp.cos(t), x_t), _bcast(jnp.sin(t), x_t)
  r = jnp.asarray(r, x_t.dtype)
  first = cos * cos if warmup == "scm" else cos * jnp.sqrt(1 - r**2 * sin**2)
  g = -first * (sigma_data * F_minus - dxt_dt) - r * (cos * sin * x_t + sigma_data * dF)
  norm = jnp.sqrt(per_sample.total(jnp.square(g)))
  if c is not None:
    g = g / _bcast(norm + c, g)
  return g, norm


def compute_target(F_apply: Callable, params, x0, eps, t, teacher_F: Callable, teacher_params,
                   cond=None, *, sigma_data: float = SIGMA_DATA, r=1.0, c: Optional[float] = 0.1,
                   tangent_mode: str = "jvp", fd_eps: float = 1e-3, warmup: str = "scm",
                   f_kwargs: Optional[dict] = None):
  """``(g, aux)``: the regression target of sCM, a constant (nothing here is differentiated).

  ``x_t = cos t x0 + sin t sd eps`` (``eps`` standard normal), the teacher
  velocity ``dx_t/dt = sd teacher_F(teacher_params, x_t / sd, t, cond)`` (put
  guidance inside ``teacher_F``), the student tangent by ``tangent_mode``
  "jvp" (:func:`tangent`) or "fd" (:func:`finite_difference_tangent`), then
  :func:`scm_target`. aux: x_t, t, F_minus, dF (= cos t sin t dF/dt), dxt_dt,
  g_norm (per sample, before normalisation) and x0_teacher (the teacher's x0
  estimate at (x_t, t), e.g. for logging).
  """
  if tangent_mode not in ("jvp", "fd"):
    raise ValueError(f"Unknown tangent_mode={tangent_mode!r}; valid values: jvp, fd")
  t = _sg(trigflow._per_sample(t, x0))
  x_t = _sg(trigflow.add_noise(x0, eps, t, sigma_data))
  F_teacher = _sg(teacher_F(_sg(teacher_params), x_t / sigma_data, t, cond))
  dxt_dt = sigma_data * F_teacher
  if tangent_mode == "jvp":
    F_minus, dF = tangent(F_apply, params, x_t, t, dxt_dt, cond, sigma_data, f_kwargs)
  else:
    F_minus, dF = finite_difference_tangent(F_apply, params, x_t, t, dxt_dt, cond, sigma_data,
                                            fd_eps, f_kwargs)
  g, norm = scm_target(F_minus, dF, x_t, t, dxt_dt, sigma_data, r, c, warmup)
  cos, sin = _bcast(jnp.cos(t), x_t), _bcast(jnp.sin(t), x_t)
  aux = dict(x_t=x_t, t=t, F_minus=F_minus, dF=dF, dxt_dt=dxt_dt, g_norm=_sg(norm),
             x0_teacher=cos * x_t - sin * dxt_dt)
  return _sg(g), aux


def regression_loss(F_apply: Callable, params, x_t, t, g, cond=None, *,
                    sigma_data: float = SIGMA_DATA, logvar=None,
                    f_kwargs: Optional[dict] = None):
  """``(loss, aux)``: ``mean_b mean_d |F(params) - sg(F) - g|^2``, the differentiated part.

  Its gradient is ``-(2 / (B D)) sum_b g_b^T dF_b/dtheta`` (D = data dims per
  sample): that of the surrogate ``-(2/D) mean_b sg(g)^T F``. ``logvar`` [B]
  (sCM's adaptive weight ``w(t)``, :func:`logvar`; rCM's step passes its value,
  a constant, and trains ``w`` by :func:`logvar_loss`) turns the per-sample
  term into ``exp(w) |.|^2 / D - w``. aux: ``F`` (the student's
  F at (x_t, t), with gradient) and ``per_sample`` errors.
  """
  F = F_apply(params, _sg(x_t) / sigma_data, _sg(trigflow._per_sample(t, x_t)), cond,
              **(f_kwargs or {}))
  g = _sg(g)
  errors = per_sample.mean(jnp.square(F - _sg(F) - g))
  if logvar is not None:
    errors = jnp.exp(logvar) * errors - logvar
  loss = jnp.mean(errors)
  return loss, dict(F=F, per_sample=errors)


def scm_loss(F_apply: Callable, params, x0, eps, t, teacher_F: Callable, teacher_params,
             cond=None, *, sigma_data: float = SIGMA_DATA, r=1.0, c: Optional[float] = 0.1,
             tangent_mode: str = "jvp", fd_eps: float = 1e-3, warmup: str = "scm",
             logvar=None, f_kwargs: Optional[dict] = None):
  """``(loss, aux)``: :func:`compute_target` then :func:`regression_loss`; safe under ``jax.grad``.

  aux: the target's aux plus ``g``, ``F`` and ``loss``. Differentiate with
  ``jax.grad(lambda p: scm_loss(F_apply, p, ...)[0])`` or ``has_aux``.
  """
  g, aux = compute_target(F_apply, params, x0, eps, t, teacher_F, teacher_params, cond,
                          sigma_data=sigma_data, r=r, c=c, tangent_mode=tangent_mode,
                          fd_eps=fd_eps, warmup=warmup, f_kwargs=f_kwargs)
  loss, reg = regression_loss(F_apply, params, aux["x_t"], aux["t"], g, cond,
                              sigma_data=sigma_data, logvar=logvar, f_kwargs=f_kwargs)
  return loss, dict(aux, g=g, F=reg["F"], loss=loss)


# w(t): EDM2's uncertainty head (Karras et al. 2024; sCM, Lu & Song 2024, uses the
# same): fixed random Fourier features of c_noise, then one trained linear layer.
LOGVAR_CHANNELS = 128
_LOGVAR_SEED = 0


def logvar_features(t, sigma_data: float = SIGMA_DATA, channels: int = LOGVAR_CHANNELS):
  """``sqrt(2) cos(2 pi (f c + p))`` [B, channels] of ``c = log(sd tan t) / 4`` (EDM2's MPFourier).

  ``f ~ N(0, 1)`` and ``p ~ U(0, 1)`` are fixed constants (seed 0), not parameters:
  EDM2 keeps them as buffers. The input is EDM2's ``c_noise``
  (:func:`trigflow.edm_time_embedding`): under sCM's lognormal times it has
  standard deviation ``p_std / 4``, a good range for unit frequencies.
  """
  rng = np.random.default_rng(_LOGVAR_SEED)
  freqs, phases = rng.standard_normal(channels), rng.uniform(size=channels)
  c = trigflow.edm_time_embedding(jnp.asarray(t, jnp.float32), sigma_data)
  angle = 2 * math.pi * (c[:, None] * freqs.astype(np.float32) + phases.astype(np.float32))
  return math.sqrt(2) * jnp.cos(angle)


def init_logvar(channels: int = LOGVAR_CHANNELS):
  """Params of :func:`logvar`: ``{"kernel": [channels], "bias": []}``, all zero.

  Zero (EDM2 draws the kernel at random) so that ``w = 0`` at the start: the
  weighted loss begins as the unweighted one, whatever the student's init.
  """
  return {"kernel": jnp.zeros((channels,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def logvar(params, t, sigma_data: float = SIGMA_DATA):
  """sCM's adaptive weight ``w_phi(t)`` [B]: a linear layer on :func:`logvar_features`."""
  feats = logvar_features(t, sigma_data, params["kernel"].shape[0])
  return feats @ params["kernel"] + params["bias"]


def regression_error(g):
  """The per-sample VALUE of ``mean_d |F - sg(F) - g|^2``: ``mean_d g^2`` [B].

  ``F - sg(F)`` is exactly 0 in value (only its gradient is not), so the error
  the weight network sees is known from the target alone, before and
  independently of the student's update.
  """
  return per_sample.mean(jnp.square(g))


def logvar_loss(params, t, error, sigma_data: float = SIGMA_DATA):
  """``mean_b exp(w(t_b)) error_b - w(t_b)``: the adaptive-weight loss as a function of phi.

  ``error`` [B] are per-sample squared errors over D (a constant here: the
  student's part of the joint loss is :func:`regression_loss` with
  ``logvar = sg(w)``). Per t the minimiser is ``w*(t) = -log E[error | t]``
  (``d/dw (e^w a - w) = 0``).
  """
  w = logvar(params, t, sigma_data)
  return jnp.mean(jnp.exp(w) * _sg(error) - w)


def tangent_warmup(step, warmup_steps):
  """``r = min(1, step / warmup_steps)`` (rCM's ``tangent_warmup``; sCM: 10k iterations)."""
  if not warmup_steps:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def dmd_loss(x0_student, x0_fake, x0_teacher):
  """rCM's DMD regulariser on student samples ``x0_student`` (with gradient): the
  :func:`fdistill.objectives.dmd.surrogate` with the step

  ``grad = (x0_fake - x0_teacher) / mean_d |x0_student - x0_teacher|`` (per
  sample, clipped below at 1e-5), loss ``mean_b mean_d |x - sg(x - grad)|^2``:
  its gradient moves x0_student along ``-2 grad / D``. ``x0_fake`` and
  ``x0_teacher`` are the fake-score and teacher x0 estimates at a re-noised
  ``x0_student`` (both constants here). rCM sums over dims (weight 1) where
  this takes the mean, as :func:`regression_loss` does.
  """
  x0_fake, x0_teacher = _sg(x0_fake), _sg(x0_teacher)
  scale = jnp.maximum(dmd.abs_mean(_sg(x0_student), x0_teacher), 1e-5)
  grad = (x0_fake - x0_teacher) / _bcast(scale, x0_student)
  return jnp.mean(dmd.surrogate(x0_student, grad)), dict(dmd_scale=scale)

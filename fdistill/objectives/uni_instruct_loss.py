"""Uni-Instruct generator losses (expanded f-divergence), with SiD and SIM for comparison.

Wang, Luo et al. 2025, "Uni-Instruct: One-step Diffusion Model through
Unified Diffusion Divergence Instruction"; notation of docs/design.md section 4 and
the derivation in docs/uni_instruct.md. Teacher p and student q are noised at
the same level s (``x_t = G(z) + s eps``), ``r = p/q``, ``h(r) = r^2 f''(r)``
and ``Delta = S_p - S_q = (D_T - D_fake)/s^2``. At one level

  J_s(theta) = E_{x ~ q_s}[ h(r(x)) |Delta(x)|^2 ],   d D_f(p_s||q_s)/d(s^2) = -J_s/2,

and the per-sample surrogate

  l = [h(r) - r h'(r)] |Delta(x_t)|^2 + 2 h(r) Delta(x_t)^T (D_fake(x_t) - G(z)) / s^2

has ``E[grad_theta l] = grad_theta J_s`` when the fake score and the ratio are
exact. That holds only with the right gradient paths, and the functions here
cannot enforce them because they take already-computed arrays:

* ``x_gen = G(z)`` carries the generator's gradient;
* ``delta``, ``d_teacher``, ``d_fake`` are network outputs at ``x_t`` with the
  networks' PARAMETERS frozen (stop_gradient on the params) but their INPUT
  ``x_t`` on the gradient path: the reparameterised-sample terms differentiate
  through it;
* ``r`` is the density ratio at the same ``x_t``, again with the
  discriminator's params frozen and its input live: the ``-r h'(r)`` term and
  ``h(r)`` need ``d r/d x_t``.

:func:`generator_loss_fn` builds the whole thing from network closures and does
exactly that; its switches ``ratio_grad``, ``drop_rh_prime`` and
``delta_grad`` break one path each (negative controls for the oracle test).

Scale. Every per-sample loss here sums over the data dimensions (SiD's code
sums too). In score units, as above, the gradient is ``grad J_s`` itself
(``scale='exact'``, the oracle's); ``'sigma4'`` multiplies by ``s^4``
(denoiser units: the reverse-KL member is then exactly twice SiD's loss at
alpha = 0.5); ``'sid'`` also divides by SiD's per-sample ``mean|G - D_T|``.
Integrating ``J_s/2`` over ``s^2`` gives ``D_f(p_0 || q_0)``, so a training
objective that draws ``s`` from a density ``pi(s)`` and wants that integral
weights level ``s`` by ``s / pi(s)`` (caller's business; not done here).
"""
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from fdistill.diffusion import per_sample
from fdistill.objectives import divergences
from fdistill.objectives import dmd
from fdistill.registry import lookup

# Pearson chi^2 is not in the f-distill registry (divergences.DIVERGENCES); the expanded
# form needs only f and h, so it lives here. f = (r - 1)^2, h = r^2 f'' = 2 r^2.
PEARSON = divergences.Divergence("pearson", lambda r: (r - 1)**2, lambda r: 2 * r**2)


def get_divergence(name: str, alpha: Optional[float] = None) -> divergences.Divergence:
  """The registry's divergence ``name``, or :data:`PEARSON` for ``'pearson'``."""
  if name == "pearson":
    return PEARSON
  return divergences.get(name, alpha)


# ---------------------------------------------------------------------------
# Array helpers.


def _compute_dtype(*xs):
  """float32 for bf16/f16/f32 inputs, float64 when any input is float64 (oracle tests)."""
  dt = jnp.result_type(*xs)  # Python scalars are weakly typed and do not widen
  return jnp.float64 if dt == jnp.float64 else jnp.float32


def _f(x, dtype):
  return jnp.asarray(x).astype(dtype)


def _per_sample(sigma, x):
  """``sigma`` (scalar or [B]) in ``x``'s dtype, shaped to broadcast against ``x`` [B, ...]."""
  return per_sample.expand(jnp.asarray(sigma, x.dtype), x)


def _batch_sigma(sigma, x):
  """``sigma`` as a [B] vector in ``x``'s dtype."""
  return jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])


def h_prime(h: Callable) -> Callable:
  """Elementwise ``h'(r)``, itself differentiable (the surrogate's gradient needs ``h''``).

  ``h`` must act elementwise, as every registry weight does, so the gradient of
  ``sum h(r)`` is ``h'`` per element. A constant ``h`` (reverse KL) gives zeros.
  """
  return jax.grad(lambda r: jnp.sum(h(r)))


def score_difference(d_teacher, d_fake, sigma):
  """``Delta = S_p - S_q = (D_T - D_fake) / s^2`` (score units), computed in float32 or wider."""
  dt = _compute_dtype(d_teacher, d_fake, sigma)
  d_teacher, d_fake = _f(d_teacher, dt), _f(d_fake, dt)
  return (d_teacher - d_fake) / _per_sample(sigma, d_teacher)**2


# ---------------------------------------------------------------------------
# Uni-Instruct.


def surrogate(h: Callable, r, delta, d_fake, x_gen, sigma, drop_rh_prime: bool = False):
  """Per-sample [B] Uni-Instruct surrogate in score units (module docstring).

  ``h``: the weight ``h(r) = r^2 f''(r)`` (elementwise jnp function).
  ``r`` [B]: density ratio ``p_s/q_s`` at ``x_t``, from a ratio model whose INPUT is
      ``x_t`` with gradient (params frozen). Its gradient path carries the change of
      ``q`` inside ``r``.
  ``delta`` [B, ...]: ``(D_T - D_fake)/s^2`` at ``x_t``, input path live, params frozen.
  ``d_fake`` [B, ...]: ``D_fake(x_t)``, input path live, params frozen.
  ``x_gen`` [B, ...]: ``G(z)``, with the generator's gradient.
  ``sigma``: scalar or [B].
  ``drop_rh_prime``: omit ``-r h'(r)`` (a negative control: the gradient is then wrong
      for every divergence whose ``h`` is not constant).

  ``|Delta|^2`` and the inner product sum over the data dimensions.
  """
  dt = _compute_dtype(r, delta, d_fake, x_gen, sigma)
  r, delta, d_fake, x_gen = (_f(v, dt) for v in (r, delta, d_fake, x_gen))
  hr = h(r)
  w_sq = hr if drop_rh_prime else hr - r * h_prime(h)(r)
  s2 = _batch_sigma(sigma, x_gen)**2
  proj = per_sample.total(delta * (d_fake - x_gen)) / s2
  return w_sq * per_sample.total(delta**2) + 2 * hr * proj


# ---------------------------------------------------------------------------
# SiD (Zhou et al. 2024), in denoiser units as published.


def sid_loss(d_teacher, d_fake, x_gen, alpha: float = 1.2):
  """Per-sample [B] SiD generator loss ``sum_dims Delta_D * ((D_T - G) - alpha Delta_D)``.

  ``Delta_D = D_T - D_fake``, networks at ``x_t`` with params frozen and input live,
  ``x_gen = G(z)`` live (same gradient paths as :func:`surrogate`). Summed over the data
  dimensions, as SiD's code does before its batch scaling. Identity (exact, any arrays):
  ``2 sid_loss(alpha=0.5) = s^4 surrogate(h=1)``, since
  ``|Delta_D|^2 + 2 Delta_D^T (D_fake - G) = 2 Delta_D^T (D_T - G) - |Delta_D|^2``.
  alpha = 0.5 is therefore the exact Fisher-divergence (reverse-KL member) gradient;
  SiD's published alpha = 1.2 is its own estimator, and alpha = 0 is SIM's L2 form.
  """
  dt = _compute_dtype(d_teacher, d_fake, x_gen)
  d_teacher, d_fake, x_gen = (_f(v, dt) for v in (d_teacher, d_fake, x_gen))
  dd = d_teacher - d_fake
  return per_sample.total(dd * ((d_teacher - x_gen) - alpha * dd))


def sid_normaliser(x_gen, d_teacher, floor: float = 1e-5):
  """SiD's per-sample weight ``1 / max(mean_dims |G - D_T|, floor)`` [B], no gradient."""
  dt = _compute_dtype(x_gen, d_teacher)
  return jax.lax.stop_gradient(1.0 / jnp.maximum(dmd.abs_mean(_f(x_gen, dt), _f(d_teacher, dt)),
                                                 floor))


# ---------------------------------------------------------------------------
# SIM (Luo et al. 2024): distance d of the score difference y = S_p - S_q.


def _l2(y):
  n2 = per_sample.total(y**2)
  return n2, 2 * y


def _pseudo_huber(c):
  def dist(y):
    n2 = per_sample.total(y**2)
    root = jnp.sqrt(n2 + c**2)
    return root - c, y / _per_sample(root, y)
  return dist


def distance(name: str, c: float = 1.0) -> Callable:
  """``dist(y) -> (d(y) [B], d'(y) [B, ...])`` for y [B, ...] (norm over the data dims).

  ``l2``: ``d = |y|^2``. ``pseudo_huber``: ``d = sqrt(|y|^2 + c^2) - c``, ``c`` in the
  units of ``y`` (score units here).
  """
  return lookup({"l2": lambda: _l2, "pseudo_huber": lambda: _pseudo_huber(c)}, name,
                "sim distance")()


def _score_gap(d_teacher, d_fake, x_gen, sigma, dist, c, y):
  """The inputs of SIM's losses in one dtype: ``(D_T, D_fake, G, s^2, y, dist)``, ``y`` the
  score gap ``(D_T - D_fake)/s^2`` unless given, ``dist`` a :func:`distance` closure."""
  dt = _compute_dtype(d_teacher, d_fake, x_gen, sigma)
  d_teacher, d_fake, x_gen = (_f(v, dt) for v in (d_teacher, d_fake, x_gen))
  dist = distance(dist, c) if isinstance(dist, str) else dist
  s2 = _per_sample(sigma, d_teacher)**2
  y = (d_teacher - d_fake) / s2 if y is None else _f(y, dt)
  return d_teacher, d_fake, x_gen, s2, y, dist


def sim_loss(d_teacher, d_fake, x_gen, sigma, dist: Union[str, Callable] = "pseudo_huber",
             c: float = 1.0, y=None):
  """Per-sample [B] SIM generator loss ``d'(y)^T (S_p(x_t) - grad log q(x_t | G))``.

  ``y = (D_T - D_fake)/s^2`` (pass ``y`` to override, e.g. a stop-gradient copy) and
  ``S_p(x_t) - grad_x log N(x_t; G, s^2) = (D_T - G)/s^2``. Gradient paths as in
  :func:`surrogate`. Sign: chosen so that minimising decreases the divergence, i.e. the
  L2 case is ``2 sid_loss(alpha=0)/s^4`` exactly. It differs from the exact surrogate of
  the score divergence ``K = E_q[d(y)]`` (:func:`score_divergence_surrogate`) by the
  fixed-function term ``d'(y)^T y - d(y)``, so its expected gradient is
  ``grad K + grad_path E[d'(y)^T y - d(y)]`` (the second gradient taken through the
  sample only); docs/uni_instruct.md has the oracle numbers.
  """
  d_teacher, d_fake, x_gen, s2, y, dist = _score_gap(d_teacher, d_fake, x_gen, sigma, dist, c, y)
  _, dprime = dist(y)
  return per_sample.total(dprime * (d_teacher - x_gen) / s2)


def score_divergence_surrogate(d_teacher, d_fake, x_gen, sigma,
                               dist: Union[str, Callable] = "pseudo_huber", c: float = 1.0,
                               y=None):
  """Per-sample [B] exact surrogate of ``K_s = E_q[d(S_p - S_q)]``.

  ``d(y) + d'(y)^T (D_fake - G)/s^2`` with ``y = (D_T - D_fake)/s^2`` (or the ``y`` given),
  gradient paths as in :func:`surrogate`.

  Same derivation as the Uni-Instruct surrogate with ``psi = d(y)`` in place of
  ``h |Delta|^2``: ``E[grad] = grad K_s`` for an exact fake score. With ``l2`` it is the
  reverse-KL member of :func:`surrogate` (``K_s`` is then the Fisher divergence ``J_s``).
  """
  d_teacher, d_fake, x_gen, s2, y, dist = _score_gap(d_teacher, d_fake, x_gen, sigma, dist, c, y)
  d, dprime = dist(y)
  return d + per_sample.total(dprime * (d_fake - x_gen) / s2)


# ---------------------------------------------------------------------------
# Normalisers.

SCALES = ("exact", "sigma4", "sid")


def loss_scale(kind: str, sigma, x_gen, d_teacher):
  """Per-sample [B] factor applied to a loss written in score units.

  ``exact``: 1 (the gradient is ``grad J_s``; the oracle's choice). ``sigma4``: ``s^4``
  (denoiser units, SiD's scale without its normaliser). ``sid``: ``s^4 / mean|G - D_T|``
  (SiD's published per-sample normaliser, no gradient).
  """
  lookup(dict.fromkeys(SCALES), kind, "uni_instruct scale")
  dt = _compute_dtype(x_gen, sigma)
  s = _batch_sigma(sigma, _f(x_gen, dt))
  if kind == "exact":
    return jnp.ones_like(s)
  if kind == "sigma4":
    return s**4
  return s**4 * sid_normaliser(x_gen, d_teacher)


# ---------------------------------------------------------------------------
# The generator loss from network closures.

OBJECTIVES = ("uni_instruct", "sid", "sim", "score_divergence")


def generator_loss_fn(generate: Callable, teacher_apply: Callable, fake_apply: Callable,
                      log_ratio: Optional[Callable] = None, *,
                      objective: str = "uni_instruct",
                      divergence: Union[str, divergences.Divergence, None] = None,
                      alpha: Optional[float] = None,
                      sid_alpha: float = 1.2,
                      sim_distance: str = "pseudo_huber", sim_c: float = 1.0,
                      scale: str = "exact",
                      log_ratio_clip: Optional[float] = None,
                      ratio_grad: bool = True, drop_rh_prime: bool = False,
                      delta_grad: bool = True, reduce: bool = True) -> Callable:
  """``loss(gen_params, frozen, z, eps, sigma, cond=None)``: the generator's loss.

  Closures (the same interfaces as the networks):
    ``generate(params, z, cond) -> G(z)`` [B, ...]
    ``teacher_apply(tp, x, sigma, cond) -> D_T(x; s)``
    ``fake_apply(fp, x, sigma, cond) -> D_fake(x; s)``
    ``log_ratio(dp, x, sigma) -> log r(x)`` [B] (or [B, heads], averaged over heads);
    only the Uni-Instruct objective uses it, and not for reverse KL.
  ``frozen = {'teacher': tp, 'fake': fp, 'disc': dp}`` ('disc' optional when unused):
  stop_gradient is applied to these PARAMS, never to the networks' inputs, so
  ``x_t = G(z) + s eps`` carries the generator's gradient into every network.
  ``sigma``: scalar or [B]. Returns the batch mean (``reduce``) or the [B] losses.

  ``objective``: 'uni_instruct' (:func:`surrogate`, needs ``divergence``),
  'sid' (:func:`sid_loss` / s^4 with ``sid_alpha``), 'sim' (:func:`sim_loss`) or
  'score_divergence' (:func:`score_divergence_surrogate`); each is multiplied by
  :func:`loss_scale` ``scale``, so 'sid' with ``scale='sigma4'`` is SiD's raw loss and
  with ``'sid'`` SiD's published normalised loss.
  ``log_ratio_clip``: clip log r to +-clip (a learned discriminator's tails); where the
  clip is active the ratio's input gradient is zero.
  Negative controls: ``ratio_grad=False`` evaluates r at stop_gradient(x_t);
  ``drop_rh_prime=True`` drops ``-r h'(r)``; ``delta_grad=False`` makes the score
  difference (Delta, SiD's Delta_D, SIM's y) a constant, while the other factor
  (``D_fake - G``, ``D_T - G``) keeps its path.
  """
  lookup(dict.fromkeys(OBJECTIVES), objective, "uni_instruct objective")
  lookup(dict.fromkeys(SCALES), scale, "uni_instruct scale")
  if objective == "uni_instruct":
    if divergence is None:
      raise ValueError("objective 'uni_instruct' needs a divergence")
    div = get_divergence(divergence, alpha) if isinstance(divergence, str) else divergence
    needs_ratio = div.name != "reverse_kl"
    if needs_ratio and log_ratio is None:
      raise ValueError(f"divergence {div.name!r} needs a log_ratio closure")
  elif not (ratio_grad and not drop_rh_prime):
    raise ValueError("ratio_grad / drop_rh_prime apply to objective 'uni_instruct' only")
  dist = distance(sim_distance, sim_c) if objective in ("sim", "score_divergence") else None

  def loss(gen_params, frozen, z, eps, sigma, cond=None):
    frozen = jax.lax.stop_gradient(frozen)
    x_gen = generate(gen_params, z, cond)
    dt = _compute_dtype(x_gen, eps, sigma)
    x_gen = _f(x_gen, dt)
    s = _batch_sigma(sigma, x_gen)
    x_t = x_gen + _per_sample(s, x_gen) * _f(eps, dt)
    d_teacher = _f(teacher_apply(frozen["teacher"], x_t, s, cond), dt)
    d_fake = _f(fake_apply(frozen["fake"], x_t, s, cond), dt)
    if delta_grad:
      d_teacher_delta, d_fake_delta = d_teacher, d_fake
    else:
      d_teacher_delta, d_fake_delta = jax.lax.stop_gradient((d_teacher, d_fake))
    if objective == "uni_instruct":
      if needs_ratio:
        x_r = x_t if ratio_grad else jax.lax.stop_gradient(x_t)
        log_r = _f(log_ratio(frozen["disc"], x_r, s), dt)
        log_r = per_sample.mean(log_r)
        if log_ratio_clip is not None:
          log_r = jnp.clip(log_r, -log_ratio_clip, log_ratio_clip)
        r = jnp.exp(log_r)
      else:
        r = jnp.ones_like(s)
      delta = score_difference(d_teacher_delta, d_fake_delta, s)
      per = surrogate(div.h, r, delta, d_fake, x_gen, s, drop_rh_prime=drop_rh_prime)
    elif objective == "sid":
      if delta_grad:
        per = sid_loss(d_teacher, d_fake, x_gen, sid_alpha) / s**4
      else:
        dd = d_teacher_delta - d_fake_delta
        per = per_sample.total(dd * ((d_teacher - x_gen) - sid_alpha * dd)) / s**4
    elif objective == "sim":
      y = score_difference(d_teacher_delta, d_fake_delta, s)
      per = sim_loss(d_teacher, d_fake, x_gen, s, dist, y=y)
    else:
      y = score_difference(d_teacher_delta, d_fake_delta, s)
      per = score_divergence_surrogate(d_teacher, d_fake, x_gen, s, dist, y=y)
    per = per * loss_scale(scale, s, x_gen, d_teacher)
    return jnp.mean(per) if reduce else per

  return loss


"""Oracle gradient test: the f-distill surrogate gradient equals grad D_f(p_s || q_s).

Teacher: a 1-D two-component Gaussian mixture with exact noised scores
(``teachers.analytic``). Generator: ``G(z) = A z + b``, so ``q_s = N(b, A^2 + s^2)``
is known exactly, and so are the fake score and ``r = p_s / q_s``. The
generator loss of ``objectives.fdistill`` is run as in training, with the
oracle plugged in for the fake score and the discriminator, normalisers off
and ``w = h(r) / s^2`` (docs/design.md section 6). Its Monte-Carlo gradient over
(A, b) must match the gradient of ``D_f = int q_s f(p_s/q_s) dx`` computed
independently: trapezoid quadrature on a fine grid in float64, differentiated
by autodiff and cross-checked by central finite differences.

Tolerance: the MC estimate is the mean of 32 independent chunks of 16384
samples; its standard error comes from their spread. Each component must
lie within 4 standard errors (+1e-4 for float32 sums), a false-alarm rate
of ~4e-4 per component (Student t, 31 degrees of freedom); the seed is
fixed, so the test is deterministic. Measured: every component within 1.6
s.e. (median relative s.e. 0.8%); the quadrature's autodiff and finite
differences agree to 1e-10. A negative control checks that a wrong weight is
caught by > 20 s.e.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import divergences
from fdistill.objectives import critics
from fdistill.objectives import fdistill
from fdistill.diffusion import gmm as gmm_lib

TEACHER = gmm_lib.make_gmm([0.3, 0.7], [[-1.0], [1.5]], [0.3, 0.5])
CHUNKS, CHUNK = 32, 16384
# (A, b, s): q wider than p (bounded r); q narrower than one teacher component (r -> inf in
# the tails, finite variance).
CASES = [(1.2, 0.3, 0.7), (0.4, 0.8, 1.0)]
DIVS = [(n, None) for n in divergences.DIVERGENCES if n != "alpha"] + [("alpha", -0.5),
                                                                       ("alpha", 1.5)]


def _q_log_prob(theta, x, s):
  var = theta["A"]**2 + s**2
  return -0.5 * ((x - theta["b"])**2 / var + jnp.log(2 * jnp.pi * var))


def _log_ratio(theta, x, s):
  """Exact log p_s(x) - log q_s(x) for x [N, 1]."""
  return gmm_lib.log_prob(TEACHER, x, s) - _q_log_prob(theta, x[:, 0], s)


def _oracle_nets():
  """The linear generator, exact teacher, exact fake denoiser and exact log-ratio 'logit'."""

  def gen_apply(theta, x_in, sigma, cond=None):
    return theta["A"] * x_in + theta["b"]  # sigma_init = 1: x_in = z

  def fake_apply(theta, x_t, sigma, cond=None, **unused):
    s2 = sigma[:, None]**2
    return x_t - s2 * (x_t - theta["b"]) / (theta["A"]**2 + s2)  # Tweedie for q_s

  def disc_apply(theta, x_t, sigma, features=None):
    return _log_ratio(theta, x_t, sigma[0])[:, None]

  disc = disc_lib.Discriminator(init=None, apply=disc_apply, uses_features=False)
  return critics.Nets(gen_apply, gmm_lib.as_apply_fn(), fake_apply, disc, (1,), 1.0)


def _oracle_settings(name, alpha, s):
  return fdistill.Settings.from_config(common.fdistill_objective(
      divergence=name, alpha=alpha if alpha is not None else 0.5, gan_weight=0.0,
      logit_clip=1e4, ratio_lower=0.0, ratio_upper=float("inf"), ratio_bins=0,
      normalise_h=False, weight="sigma2", sigma_dist="fixed", sigma_fixed=s))


@functools.lru_cache(maxsize=None)
def surrogate_gradients(case):
  """{(name, alpha): {param: [CHUNKS] MC gradients}} of the generator loss for every divergence.

  One jit per case: the divergences share the samples, teacher and oracle
  terms, which XLA computes once (compiling a loss per divergence would
  dominate the test's run time).
  """
  a, b, s = CASES[case]
  theta = {"A": jnp.float32(a), "b": jnp.float32(b)}
  inputs = {"teacher": TEACHER, "fake": theta, "disc": theta, "bins": jnp.ones((1,))}
  batch = {"x": jnp.zeros((CHUNK, 1))}

  def all_gradients(rng):
    out = {}
    for name, alpha in DIVS:
      loss = fdistill.make_generator_loss(_oracle_nets(), divergences.get(name, alpha),
                                          _oracle_settings(name, alpha, s))
      out[(name, alpha)] = jax.grad(lambda p: loss(p, inputs, batch, rng)[0])(theta)
    return out

  rngs = jax.random.split(jax.random.key(1), CHUNKS)
  grads = jax.jit(jax.vmap(all_gradients))(rngs)
  return {key: {k: np.asarray(v, np.float64) for k, v in g.items()} for key, g in grads.items()}


def mc_estimate(chunks):
  """(mean, standard error) of the chunk gradients."""
  return chunks.mean(), chunks.std(ddof=1) / np.sqrt(len(chunks))


def quadrature_divergence(f, theta, s):
  """D_f(p_s || q_s) by the trapezoid rule on [-14, 14] (float64; both tails < 1e-20)."""
  x = jnp.linspace(-14.0, 14.0, 28001, dtype=jnp.float64)
  log_q = _q_log_prob(theta, x, s)
  log_p = gmm_lib.log_prob(TEACHER, x[:, None], s)
  return jnp.trapezoid(jnp.exp(log_q) * f(jnp.exp(log_p - log_q)), x)


def quadrature_gradient(f, theta, s, fd_step=1e-5):
  """(autodiff gradient, central finite differences) of the quadrature, float64."""
  with jax.enable_x64(True):
    theta64 = {k: jnp.asarray(v, jnp.float64) for k, v in theta.items()}
    auto = jax.grad(lambda t: quadrature_divergence(f, t, s))(theta64)
    fd = {}
    for k in theta64:
      up = dict(theta64, **{k: theta64[k] + fd_step})
      down = dict(theta64, **{k: theta64[k] - fd_step})
      fd[k] = (quadrature_divergence(f, up, s) - quadrature_divergence(f, down, s)) / (2 * fd_step)
    return ({k: float(v) for k, v in auto.items()}, {k: float(v) for k, v in fd.items()})


def _finite_variance(name, alpha, case):
  """Whether the MC estimator has finite variance. Case 0 has r -> 0 in the tails, where
  h = r^a with a < 0 blows up: h^2 q ~ exp(x^2 (1/var_p - 2/var_q)/2) is integrable only if
  var_q < 2 var_p, and var_q = 1.93 > 2 * 0.58 there (the mean is finite, its error bars not)."""
  return not (name == "alpha" and alpha < 0 and case == 0)


@pytest.mark.parametrize("name,alpha,case", [(n, a, c) for n, a in DIVS for c in range(len(CASES))
                                             if _finite_variance(n, a, c)])
def test_surrogate_gradient_matches_divergence_gradient(name, alpha, case):
  a, b, s = CASES[case]
  exact, fd = quadrature_gradient(divergences.get(name, alpha).f, {"A": a, "b": b}, s)
  chunks = surrogate_gradients(case)[(name, alpha)]
  for k in ("A", "b"):
    assert abs(exact[k] - fd[k]) <= 1e-6 * (1 + abs(exact[k])), (k, exact[k], fd[k])
    mc, se = mc_estimate(chunks[k])
    assert abs(mc - exact[k]) <= 4 * se + 1e-4, (
        f"{name} d/d{k}: MC {mc:.5f} +- {se:.5f}, quadrature {exact[k]:.5f} "
        f"({abs(mc - exact[k]) / se:.1f} s.e.)")
    # Informative: the gradient stands out of the MC noise (guards the test itself).
  assert max(abs(exact[k]) / mc_estimate(chunks[k])[1] for k in exact) > 10


@pytest.mark.parametrize("used,claimed", [("reverse_kl", "forward_kl"), ("js", "jeffreys"),
                                          ("squared_hellinger", "softened_rkl")])
def test_wrong_weight_is_detected(used, claimed):
  """Negative control: the surrogate weighted with one divergence's h does not match the
  gradient of another divergence, by far more than the tolerance."""
  a, b, s = CASES[1]
  exact, _ = quadrature_gradient(divergences.get(claimed).f, {"A": a, "b": b}, s)
  chunks = surrogate_gradients(1)[(used, None)]
  z = [abs(mc_estimate(chunks[k])[0] - exact[k]) / mc_estimate(chunks[k])[1] for k in exact]
  assert max(z) > 20, z

"""TrigFlow <-> EDM (diffusion/trigflow.py), checked against closed forms and EDM's own sampler.

Oracles: for 1-D Gaussian data ``N(mu, s0^2)`` the TrigFlow marginal is
``N(cos t mu, v(t))``, ``v = cos^2 t s0^2 + sin^2 t sd^2``; the PF-ODE is
monotone in 1-D, so it maps standardised values to standardised values and
its flow map from t to t' is ``cos t' mu + sqrt(v(t') / v(t)) (x - cos t mu)``
(at t' = 0 the exact consistency function). The wrapped exact GMM denoiser
must reproduce that, and for the 2-D ``gmm8`` its ODE must agree with EDM's
Heun sampler sample by sample (the same ODE in other coordinates).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import models
from fdistill.diffusion import edm
from fdistill.diffusion import gmm as gmm_lib
from fdistill.diffusion import trigflow
from fdistill.models import mlp

SD = 0.5
MU, S0 = 0.7, 0.3


def _gaussian(dtype=jnp.float64):
  """1-D N(MU, S0^2) as a one-component GMM in ``dtype`` (float64 under enable_x64)."""
  return gmm_lib.GMM(jnp.ones((1,), dtype), jnp.full((1, 1), MU, dtype),
                     jnp.full((1, 1, 1), S0**2, dtype))


def _v(t):
  return jnp.cos(t)**2 * S0**2 + jnp.sin(t)**2 * SD**2


def _flow_map(x, t, t_next):
  """Closed-form PF-ODE flow of N(MU, S0^2) data from time t to t_next (scalars)."""
  return math.cos(t_next) * MU + jnp.sqrt(_v(t_next) / _v(t)) * (x - math.cos(t) * MU)


def test_time_conversions_and_training_time_distribution():
  sigma = jnp.asarray([0.002, 0.5, 80.0])
  np.testing.assert_allclose(trigflow.t_to_sigma(trigflow.sigma_to_t(sigma, SD), SD), sigma,
                             rtol=1e-5)
  t = trigflow.sample_time(jax.random.key(0), (20000,), p_mean=-1.0, p_std=1.4, sigma_data=SD)
  assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
  log_sigma = np.log(SD * np.tan(np.asarray(t, np.float64)))
  assert abs(log_sigma.mean() + 1.0) < 0.05 and abs(log_sigma.std() - 1.4) < 0.05
  assert trigflow.sampler_times(1, sigma_data=SD) == (math.atan(80 / SD), 0.0)
  assert trigflow.sampler_times(3, sigma_data=SD)[1:] == (1.3, 1.0, 0.0)
  with pytest.raises(ValueError, match="num_steps"):
    trigflow.sampler_times(5)


def test_edm_time_embedding_has_a_bounded_tangent():
  """Along sCM's tangent direction cos t sin t d/dt, c_noise = log(sd tan t)/4 moves by 1/4
  at every t: the unbounded d/dt at both ends never reaches the network."""
  t = jnp.asarray([1e-3, 0.1, 0.8, 1.5, 1.5707])
  c, dc = jax.jvp(lambda t: trigflow.edm_time_embedding(t, SD), (t,), (jnp.cos(t) * jnp.sin(t),))
  np.testing.assert_allclose(c, jnp.log(SD * jnp.tan(t)) / 4, rtol=1e-5)
  np.testing.assert_allclose(dc, 0.25, rtol=1e-3)
  ends = trigflow.edm_time_embedding(jnp.asarray([0.0, math.pi / 2]), SD)  # clipped, finite
  assert np.isfinite(np.asarray(ends)).all()


def test_wrapped_exact_teacher_is_the_closed_form_velocity_and_flow():
  """F of the wrapped exact denoiser is (cos t x_t - E[x0|x_t]) / (sd sin t), and its ODE
  reproduces the closed-form flow map and consistency function (float64)."""
  with jax.enable_x64(True):
    teacher = trigflow.edm_to_trigflow(gmm_lib.as_apply_fn(), SD)
    rng = np.random.default_rng(0)
    x_t = jnp.asarray(rng.standard_normal((256, 1)))
    t = jnp.asarray(rng.uniform(0.01, 1.55, 256))
    x0_hat = MU + (jnp.cos(t) * S0**2 / _v(t))[:, None] * (x_t - jnp.cos(t)[:, None] * MU)
    expected = (jnp.cos(t)[:, None] * x_t - x0_hat) / (SD * jnp.sin(t)[:, None])
    np.testing.assert_allclose(teacher(_gaussian(), x_t / SD, t), expected, rtol=1e-12,
                               atol=1e-12)
    # The EDM denoiser back from the TrigFlow F, at the matching sigma.
    sigma = trigflow.t_to_sigma(t, SD)
    back = trigflow.trigflow_to_denoiser(teacher, SD)(_gaussian(), x_t, sigma)
    np.testing.assert_allclose(back, gmm_lib.denoiser(_gaussian(), x_t, sigma), rtol=1e-12,
                               atol=1e-12)
    # The ODE: flow map from t = 1.2 to t = 0.3, and to 0 (the consistency function).
    flow = jax.jit(lambda x, times: trigflow.probability_flow(teacher, _gaussian(), x, times,
                                                              None, SD), static_argnums=1)
    x = x_t * math.sqrt(_v(1.2)) + math.cos(1.2) * MU
    to_mid = flow(x, tuple(np.linspace(1.2, 0.3, 201)))
    np.testing.assert_allclose(to_mid, _flow_map(x, 1.2, 0.3), atol=1e-5)  # Heun, h = 0.0045
    to_zero = flow(x, tuple(trigflow.karras_times(200, sigma_max=SD * math.tan(1.2),
                                                   sigma_data=SD)))
    # Last step: the teacher's x0 estimate at sigma_min = 0.002, off by O(sigma_min^2 / s0^2).
    np.testing.assert_allclose(to_zero, _flow_map(x, 1.2, 0.0), atol=1e-4)


def _perturbed(params, scale, seed=0):
  """Random offsets: the MLP's zero-initialised output layer would make F = 0."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


def test_network_F_is_the_edm_network_with_teacher_weights():
  """F_trigflow(y, t) = -F_edm(y; log(sd tan t)/4): an EDM-initialised student is the teacher."""
  module = mlp.ScoreMLP(hidden=(32, 32), emb_dim=16)
  params = jax.jit(lambda k: models.init_params(module, k, (8, 2)))(jax.random.key(0))
  params = _perturbed(params, 0.2)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)
  sigma = jnp.asarray(np.exp(rng.uniform(-3, 3, 8)), jnp.float32)
  student = models.make_F(module, SD)
  edm_d = models.make_denoiser(module, SD)
  linear = models.make_F(module, SD, time_embedding="linear", time_scale=2.0)
  t = trigflow.sigma_to_t(sigma, SD)

  @jax.jit
  def outputs(params):
    return (trigflow.trigflow_to_denoiser(student, SD)(params, x, sigma), edm_d(params, x, sigma),
            trigflow.edm_to_trigflow(edm_d, SD)(params, x, t), student(params, x, t),
            linear(params, x, t), module.apply({"params": params}, x, 2.0 * t, None))

  d_student, d_edm, f_wrapped, f_student, f_linear, raw = outputs(params)
  np.testing.assert_allclose(d_student, d_edm, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(f_wrapped, f_student, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(f_linear, -raw, rtol=1e-6)
  with pytest.raises(ValueError, match="valid values: edm, linear"):
    models.make_F(module, SD, time_embedding="fourier")


def _mode_fractions(gmm, x):
  dist = jnp.linalg.norm(x[:, None, :] - gmm.means[None], axis=-1)
  nearest = jnp.argmin(dist, axis=1)
  fractions = np.bincount(np.asarray(nearest), minlength=gmm.means.shape[0]) / x.shape[0]
  within = float(jnp.mean(jnp.min(dist, axis=1) < 5 * 0.05))  # 5 component std
  return fractions, within


def test_pf_ode_of_wrapped_gmm8_teacher_matches_edm_heun_and_the_mixture():
  """dx_t/dt = sd F from t = arctan(80/sd) to 0 vs EDM's Heun from sigma = 80, same noise."""
  gmm = gmm_lib.named("gmm8")
  teacher = trigflow.edm_to_trigflow(gmm_lib.as_apply_fn(), SD)
  n, steps = 2000, 128
  noise = jax.random.normal(jax.random.key(0), (n, 2))
  times = tuple(trigflow.karras_times(steps, sigma_data=SD))
  # x_t = cos(t) x_edm and x_edm = 80 noise at the start.
  x = jax.jit(lambda z: trigflow.probability_flow(teacher, gmm, SD * math.sin(times[0]) * z,
                                                  times, None, SD))(noise)
  ref = jax.jit(lambda z: edm.heun_sampler(gmm_lib.as_apply_fn(), gmm, z, num_steps=steps))(noise)
  diff = np.asarray(jnp.max(jnp.abs(x - ref), axis=1))
  # Two discretisations of one ODE: equal up to step error, larger only for the
  # few trajectories that pass near a boundary between modes (measured: median
  # 2e-4, 99th percentile 9e-4, max 9e-3).
  assert np.median(diff) < 1e-3 and np.percentile(diff, 99) < 5e-3
  # And the samples follow the mixture: moments within 4 standard errors, every mode.
  mean, cov = gmm_lib.mean(gmm), gmm_lib.covariance(gmm)
  se_mean = np.sqrt(np.diag(cov) / n)
  assert np.all(np.abs(np.asarray(x.mean(0) - mean)) < 4 * se_mean)
  se_cov = np.sqrt((np.diag(cov)[:, None] * np.diag(cov)[None] + cov**2) / n)
  assert np.all(np.abs(np.cov(np.asarray(x).T) - np.asarray(cov)) < 4 * se_cov)
  fractions, within = _mode_fractions(gmm, x)
  np.testing.assert_allclose(fractions, gmm.weights, atol=0.04)
  assert within > 0.99


def test_consistency_sampler_with_exact_consistency_function_covers_gmm8_modes():
  """1- and 2-step consistency sampling with f = the exact teacher ODE to t = 0 (many steps).

  With the exact consistency function every step lands on the data
  distribution, so both samplers must cover all 8 modes with the mixture's
  weights. Prints the fractions.
  """
  gmm = gmm_lib.named("gmm8")
  teacher = trigflow.edm_to_trigflow(gmm_lib.as_apply_fn(), SD)

  @jax.jit
  def ode_to_zero(x, sigma_max):
    # The Karras grid from the current time down to 0, with a traced top.
    ramp = jnp.arange(64, dtype=jnp.float32) / 63
    sigmas = (sigma_max**(1 / 7) + ramp * (0.002**(1 / 7) - sigma_max**(1 / 7)))**7
    t_grid = trigflow.sigma_to_t(sigmas, SD)

    def step(x, pair):
      t_cur, t_next = pair
      drift = lambda x, t: SD * teacher(gmm, x / SD, jnp.full(x.shape[:1], t))
      d = drift(x, t_cur)
      x_e = x + (t_next - t_cur) * d
      return x + (t_next - t_cur) * 0.5 * (d + drift(x_e, t_next)), None

    x, _ = jax.lax.scan(step, x, (t_grid[:-1], t_grid[1:]))
    return trigflow.consistency_fn(teacher, gmm, x, t_grid[-1], None, SD)

  def exact_F(params, y, t, cond=None):
    """The F whose consistency function is the exact ODE map to t = 0 (t shared by the batch)."""
    del params, cond
    x_t = SD * y
    f = ode_to_zero(x_t, SD * jnp.tan(t[0]))
    return (jnp.cos(t[0]) * x_t - f) / (SD * jnp.sin(t[0]))

  noise = jax.random.normal(jax.random.key(1), (2000, 2))
  for times in (trigflow.sampler_times(1, sigma_data=SD), (math.atan(80 / SD), 1.1, 0.0)):
    x = trigflow.consistency_sampler(exact_F, None, noise, None, times, jax.random.key(2), SD)
    fractions, within = _mode_fractions(gmm, x)
    print(f"consistency sampler, times {tuple(round(t, 3) for t in times)}: mode fractions "
          f"{np.round(fractions, 3)} (weights {np.round(np.asarray(gmm.weights), 3)}), "
          f"{within:.3f} within 5 std of a mode")
    np.testing.assert_allclose(fractions, gmm.weights, atol=0.04)
    assert within > 0.99


def test_student_rollout_differentiates_only_the_last_step():
  module = mlp.ScoreMLP(hidden=(16,), emb_dim=8)
  params = jax.jit(lambda k: models.init_params(module, k, (4, 2)))(jax.random.key(0))
  params = _perturbed(params, 0.3)
  F = models.make_F(module, SD)
  noise = jax.random.normal(jax.random.key(3), (4, 2))
  times = [math.atan(80 / SD), jnp.asarray([1.3, 1.0, 0.7, 0.4]), 0.5]
  rollout = lambda p: trigflow.student_rollout(F, p, noise, jax.random.key(4), times, None, SD)
  weights = jax.random.normal(jax.random.key(5), (4, 2))

  @jax.jit
  def outputs(params):
    x0, x_t, t = rollout(params)
    f = trigflow.consistency_fn(F, params, x_t, t, None, SD)
    grad = jax.grad(lambda p: jnp.sum(weights * rollout(p)[0]))(params)
    last_only = jax.grad(
        lambda p: jnp.sum(weights * trigflow.consistency_fn(F, p, x_t, t, None, SD)))(params)
    return x0, f, grad, last_only

  x0, f, grad, last_only = outputs(params)
  np.testing.assert_allclose(x0, f, rtol=1e-6)
  for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(last_only)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  # The sampler is the same recursion without gradients: one step is f at times[0].
  x1 = trigflow.consistency_sampler(F, params, noise, None, (times[0], 0.0), None, SD)
  np.testing.assert_allclose(
      x1, trigflow.consistency_fn(F, params, SD * noise, times[0], None, SD), rtol=1e-6)
  with pytest.raises(ValueError, match="needs rng"):
    trigflow.consistency_sampler(F, params, noise, None, (1.5, 1.0, 0.0), None, SD)

"""EDM core against closed forms and the exact GMM oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.diffusion import gmm as gmm_lib
from fdistill.diffusion import edm


def test_preconditioning_closed_form():
  s, sd = 0.7, 0.5
  c_skip, c_out, c_in, c_noise = map(float, edm.preconditioning(s, sd))
  np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
  # The unit-variance property EDM is built on: Var(c_in x_s) = 1 for Var(x0) = sd^2.
  np.testing.assert_allclose(c_in**2 * (sd**2 + s**2), 1.0, rtol=1e-6)


def test_karras_grid_matches_formula():
  n, smin, smax, rho = 7, 0.002, 80.0, 7.0
  ref = [(smax**(1 / rho) + i / (n - 1) * (smin**(1 / rho) - smax**(1 / rho)))**rho for i in range(n)]
  got = np.asarray(edm.karras_sigmas(n, smin, smax, rho))
  np.testing.assert_allclose(got[:-1], ref, rtol=1e-5)
  assert got[-1] == 0.0


def test_precondition_is_exact_denoiser_for_exact_raw_network():
  """Feeding the F that reproduces a known D through ``precondition`` gives D back."""
  gmm = gmm_lib.gmm8()
  x = jax.random.normal(jax.random.key(0), (16, 2))
  sigma = jnp.exp(jax.random.normal(jax.random.key(1), (16,)))

  def exact_raw(params, x_in, c_noise, cond):
    s = jnp.exp(4 * c_noise)[:, None]
    c_skip, c_out, c_in, _ = edm.preconditioning(s)
    xs = x_in / c_in
    return (gmm_lib.denoiser(gmm, xs, s[:, 0]) - c_skip * xs) / c_out

  d = edm.precondition(exact_raw)(None, x, sigma)
  np.testing.assert_allclose(d, gmm_lib.denoiser(gmm, x, sigma), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gmm8", "gmm25"])
def test_heun_sampler_with_exact_denoiser_matches_mixture_moments(name):
  """Noise -> samples with the exact denoiser: mean/cov equal the mixture's closed form."""
  gmm = gmm_lib.TOY_DISTRIBUTIONS[name]()
  n = 20000
  noise = jax.random.normal(jax.random.key(2), (n, 2))
  x = edm.heun_sampler(gmm_lib.as_apply_fn(), gmm, noise, num_steps=40)
  mean_ref, cov_ref = np.asarray(gmm_lib.mean(gmm)), np.asarray(gmm_lib.covariance(gmm))
  # Monte-Carlo standard errors: sqrt(diag(cov)/n) ~ 0.005; allow 4 sigma.
  se = np.sqrt(np.diag(cov_ref) / n)
  np.testing.assert_array_less(np.abs(np.mean(x, 0) - mean_ref), 4 * se + 1e-3)
  np.testing.assert_allclose(np.cov(np.asarray(x).T), cov_ref, atol=0.02)


def test_heun_sampler_fails_with_wrong_denoiser():
  """The moment check above can fail: a denoiser of another mixture misses the moments."""
  gmm, wrong = gmm_lib.gmm8(), gmm_lib.gmm8(radius=0.5)
  x = edm.heun_sampler(gmm_lib.as_apply_fn(), wrong, jax.random.normal(jax.random.key(3), (4000, 2)),
                       num_steps=20)
  assert abs(np.trace(np.cov(np.asarray(x).T)) - np.trace(np.asarray(gmm_lib.covariance(gmm)))) > 0.3


def test_analytic_score_is_gradient_of_log_density():
  gmm = gmm_lib.gmm25()
  x = jax.random.normal(jax.random.key(4), (8, 2))
  s = jnp.full((8,), 0.3)
  auto = jax.vmap(jax.grad(lambda xi, si: gmm_lib.log_prob(gmm, xi[None], si[None])[0]))(x, s)
  np.testing.assert_allclose(gmm_lib.score(gmm, x, s), auto, rtol=1e-3, atol=1e-4)


def test_one_step_generate_is_denoiser_at_init_sigma():
  gmm = gmm_lib.gmm8()
  z = jax.random.normal(jax.random.key(5), (4, 2))
  out = edm.one_step_generate(gmm_lib.as_apply_fn(), gmm, z, sigma_init=2.5)
  np.testing.assert_allclose(out, gmm_lib.denoiser(gmm, 2.5 * z, jnp.full((4,), 2.5)), rtol=1e-6)

"""DSM is minimised by the exact denoiser (the posterior mean)."""
import jax
import jax.numpy as jnp
import numpy as np

from fdistill.diffusion import gmm as gmm_lib
from fdistill.objectives import dsm


def _loss_at(gmm_denoiser_params, data_gmm, rng, delta=None):
  apply = gmm_lib.as_apply_fn()
  if delta is not None:
    base = apply
    apply = lambda p, x, s, c=None, **kw: base(p, x, s, c) + delta
  loss = dsm.make_loss(apply)
  x0 = gmm_lib.sample(data_gmm, jax.random.fold_in(rng, 0), 4096)
  return float(loss(gmm_denoiser_params, None, {"x": x0}, jax.random.fold_in(rng, 1))[0])


def test_exact_denoiser_minimises_dsm():
  gmm = gmm_lib.gmm8()
  for seed in range(3):
    rng = jax.random.key(seed)
    exact = _loss_at(gmm, gmm, rng)
    # Perturbed denoisers: a constant offset, and the exact denoiser of a shifted mixture.
    offset = _loss_at(gmm, gmm, rng, delta=jnp.array([0.05, -0.05]))
    shifted = _loss_at(gmm._replace(means=gmm.means * 1.1), gmm, rng)
    assert exact < offset and exact < shifted, (exact, offset, shifted)


def test_dsm_excess_equals_weighted_squared_offset():
  """With the same draws, loss(D + c) - loss(D) = mean(lambda(s) * (|c|^2 + 2 c.(D - x0))/d);
  check against the closed form E[lambda] |c|^2 / d up to Monte-Carlo error."""
  gmm = gmm_lib.gmm8()
  rng = jax.random.key(7)
  c = jnp.array([0.02, 0.0])
  diff = _loss_at(gmm, gmm, rng, delta=c) - _loss_at(gmm, gmm, rng)
  # E[lambda(s)] for log s ~ N(-1.2, 1.2^2), sd = 0.5: lambda = 1/sd^2 + 1/s^2.
  e_inv_s2 = np.exp(2 * 1.2 + 2 * 1.2**2)
  expected = (1 / 0.25 + e_inv_s2) * float(jnp.sum(c**2)) / 2
  assert diff > 0
  np.testing.assert_allclose(diff, expected, rtol=0.35)

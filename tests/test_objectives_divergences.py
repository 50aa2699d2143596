"""The f-divergence registry: h(r) = r^2 f''(r) by autodiff, f(1) = 0, convexity, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.objectives import divergences

CASES = [(name, None) for name in divergences.DIVERGENCES if name != "alpha"]
CASES += [("alpha", a) for a in (-1.0, 0.5, 2.0, 3.0)]


def _random_ratios(n=64, dtype=jnp.float32):
  """log r ~ U(-4, 4): ratios from 0.02 to 55, where the weights differ most."""
  return jnp.exp(jax.random.uniform(jax.random.key(0), (n,), dtype, minval=-4.0, maxval=4.0))


@pytest.mark.parametrize("name,alpha", CASES)
def test_h_is_r2_times_second_derivative_of_f(name, alpha):
  """In float64: the f'' of some f (softened RKL) cancels catastrophically in float32."""
  div = divergences.get(name, alpha)
  with jax.enable_x64(True):
    r = _random_ratios(dtype=jnp.float64)
    f2 = jax.vmap(jax.grad(jax.grad(div.f)))(r)
    np.testing.assert_allclose(div.h(r), r**2 * f2, rtol=1e-10)


@pytest.mark.parametrize("name,alpha", CASES)
def test_f_is_a_convex_generator(name, alpha):
  """f(1) = 0 and h > 0 (so f'' > 0): D_f >= 0 with equality iff p = q."""
  div = divergences.get(name, alpha)
  assert abs(float(div.f(jnp.float32(1.0)))) < 1e-6
  assert bool(jnp.all(div.h(_random_ratios()) > 0))


def test_alpha_family_interpolates_known_weights():
  r = _random_ratios()
  np.testing.assert_allclose(divergences.get("alpha", 0.5).h(r),
                             4 * divergences.get("squared_hellinger").h(r), rtol=1e-6)
  for a in (1e-4, 1 - 1e-4):  # near the KL limits
    limit = "reverse_kl" if a < 0.5 else "forward_kl"
    np.testing.assert_allclose(divergences.get("alpha", a).h(r), divergences.get(limit).h(r),
                               rtol=1e-3)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="reverse_kl") as err:
    divergences.get("kl")
  assert "jeffreys" in str(err.value) and "objective.divergence" in str(err.value)


@pytest.mark.parametrize("alpha", [None, 0.0, 1.0])
def test_alpha_needs_a_non_limit_parameter(alpha):
  with pytest.raises(ValueError, match="alpha"):
    divergences.get("alpha", alpha)

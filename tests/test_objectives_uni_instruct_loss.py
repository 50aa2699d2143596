"""Uni-Instruct generator losses: oracle gradients, negative controls, SiD/SIM identities, bf16.

Oracle (``fdistill.diffusion.gaussian_oracle``): teacher N(0.3, 1) in 1-D, generator
``G(z) = a z + b`` so ``q_s = N(b, a^2 + s^2)``, exact fake-score and log-ratio
closures with the networks' interfaces. The loss of
``uni_instruct_loss.generator_loss_fn`` is differentiated per sample (jax.vmap of
jax.grad, float64) over 2^20 draws; its mean must equal ``grad_(a,b) J_s``,
``J_s = E_q[h(r) |Delta|^2]``, computed independently (numpy float64 trapezoid
quadrature + central finite differences) within 4 standard errors (the s.e. from the
per-sample gradients), for every divergence at the three points of
``gaussian_oracle.POINTS``. Two rows have infinite per-sample variance (Pearson and
alpha = 1.5 at (0.7, -0.4, 0.5): ``h ~ r^k`` with ``2k(1 - v_q/v_p) > 1``); they are
reported, not checked. Every point shares the same draws, so the z-scores of one point
are correlated across divergences (e.g. d/db at (0.5, 1.5, 2.0) is -2.7..-3.0 for all;
reverse and forward KL on seeds 1-6, checked by hand: every |z| <= 2.52).

Measured (seed 0, n = 2^20; `python -m pytest -s` prints the whole table, also in
docs/uni_instruct.md, reproduced by benchmarks/uni_instruct_oracle.py):
  checked rows: max |z| = 2.99 (jeffreys d/db at (0.5, 1.5, 2.0)).
  negative controls at (1.3, 0.8, 1.0), forward KL: no -r h'(r) z = +111 (d/db);
  ratio input cut z = +232 (d/da); Delta cut z = -764 (d/da).
  SIM l2 = SiD alpha = 0: matches grad K + grad_path E|y|^2 (|z| <= 2.8) and misses
  grad K = grad J_rkl by 197..685 s.e. (largest component, per point); SIM pseudo-Huber
  (c = 0.5) likewise, missing its grad K by 120..589 s.e.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.diffusion import gaussian_oracle as go
from fdistill.objectives import uni_instruct_loss as ul

N, CHUNK, SEED = 2**20, 2**17, 0  # benchmarks/uni_instruct_oracle.py uses the same


@functools.lru_cache(maxsize=None)
def oracle_rows():
  """The oracle table (one Monte-Carlo run for every case and point), printed once."""
  closures = go.closures()
  losses = {c.label: ul.generator_loss_fn(*closures, **c.loss) for c in go.CASES}
  results = go.monte_carlo_gradients(losses, n=N, chunk=CHUNK, seed=SEED)
  table = go.rows(results)
  print("\n" + go.format_rows(table))
  return table


def _row(label, point):
  return next(r for r in oracle_rows() if r.label == label and r.point == point)


# ---------------------------------------------------------------------------
# The independent truth.


@pytest.mark.parametrize("name,alpha", go.DIVERGENCES)
def test_numpy_weights_match_the_registry(name, alpha):
  """The oracle's numpy f and h are the registry's (plus Pearson from uni_instruct_loss)."""
  div = ul.get_divergence(name, alpha)
  f, h = go.numpy_divergence(name, alpha)
  r = np.exp(np.linspace(-4, 4, 33))
  with jax.enable_x64(True):
    np.testing.assert_allclose(np.asarray(div.h(jnp.asarray(r))), h(r), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(div.f(jnp.asarray(r))), f(r), rtol=1e-12, atol=1e-14)


def test_quadrature_matches_the_closed_form_fisher_divergence():
  """Reverse KL: J_s = (mu - b)^2/v_p^2 + v_q (1/v_q - 1/v_p)^2 and its (a, b) gradient."""
  mu, v0 = go.TEACHER
  for a, b, s in go.POINTS:
    vq, vp = a**2 + s**2, v0 + s**2
    h = go.numpy_divergence("reverse_kl")[1]
    closed = (mu - b)**2 / vp**2 + vq * (1 / vq - 1 / vp)**2
    grad = np.array([2 * a * (1 / vp**2 - 1 / vq**2), 2 * (b - mu) / vp**2])
    np.testing.assert_allclose(go.j_s(h, a, b, s), closed, rtol=1e-12)
    np.testing.assert_allclose(go.j_s_gradient(h, a, b, s), grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("point", go.POINTS)
@pytest.mark.parametrize("name,alpha", go.DIVERGENCES)
def test_expansion_identity(name, alpha, point):
  """J_s = -(1/s) d D_f(p_s || q_s)/ds, i.e. d D_f/d(s^2) = -J_s/2 (quadrature, central
  differences in s with step 1e-4: measured relative error <= 7e-7)."""
  f, h = go.numpy_divergence(name, alpha)
  a, b, s = point
  ds = 1e-4
  dd = (go.f_divergence(f, a, b, s + ds) - go.f_divergence(f, a, b, s - ds)) / (2 * ds)
  np.testing.assert_allclose(go.j_s(h, a, b, s), -dd / s, rtol=1e-5)


# ---------------------------------------------------------------------------
# Monte-Carlo surrogate gradients against the truth.


def _checkable(case, point):
  """Rows whose per-sample gradient has finite variance (elsewhere MC error bars mean nothing;
  those rows are printed by benchmarks/uni_instruct_oracle.py, not asserted)."""
  return case.truth[0] != "j" or go.gradient_variance_finite(case.truth[1], case.truth[2], point)


def test_infinite_variance_rows_are_the_narrow_student_with_fast_growing_h():
  """At (0.7, -0.4, 0.5) q_s is narrower than p_s; h = 2 r^2 (Pearson) and r^1.5 make the
  per-sample gradient's variance infinite, while reverse KL and JS stay finite."""
  narrow = go.POINTS[0]
  assert not go.gradient_variance_finite("pearson", None, narrow)
  assert not go.gradient_variance_finite("alpha", 1.5, narrow)
  assert go.gradient_variance_finite("reverse_kl", None, narrow)
  assert go.gradient_variance_finite("js", None, narrow)
  assert all(go.gradient_variance_finite("pearson", None, p) for p in go.POINTS[1:])


@pytest.mark.parametrize("label,point", [
    (c.label, p) for c in go.CASES if c.check == "match" for p in go.POINTS if _checkable(c, p)])
def test_surrogate_gradient_matches_truth(label, point):
  row = _row(label, point)
  assert row.check == "match"
  assert np.all(np.abs(row.z) <= 4), (
      f"{label} at {point}: estimate {row.estimate} +- {row.se}, truth {row.truth}, z {row.z}")
  # Informative: the gradient stands out of the Monte-Carlo noise.
  assert np.max(np.abs(row.truth) / row.se) > 10, (row.truth, row.se)


@pytest.mark.parametrize("label", [c.label for c in go.CASES if c.check == "miss"])
def test_negative_controls_miss_the_truth(label):
  """Dropping -r h'(r), the ratio's input path or Delta's path is caught by > 10 s.e."""
  row = _row(label, go.POINTS[go.NEGATIVE_POINT])
  assert row.check == "miss"
  assert np.max(np.abs(row.z)) > 10, (label, row.z)


@pytest.mark.parametrize("label", ["SIM l2", "SIM pseudo-Huber c=0.5", "SiD alpha=1.2"])
def test_sim_and_published_sid_are_not_the_divergence_gradient(label):
  """SIM's form (and SiD at alpha = 1.2) match their own predicted gradients above but
  miss the gradient of the divergence they name by far more than the noise."""
  for point in go.POINTS:
    row = _row(label, point)
    assert np.max(np.abs(row.z_exact)) > 10, (label, point, row.z_exact)


# ---------------------------------------------------------------------------
# Identities on random networks.


def _mlp_init(rng, din, dout, width=16, scale=1.0):
  """numpy draws: every eager jax.random call compiles its own threefry (seconds on CPU)."""
  return {"w1": scale * rng.standard_normal((din, width)) / np.sqrt(din),
          "b1": 0.1 * rng.standard_normal(width),
          "w2": scale * rng.standard_normal((width, dout)) / np.sqrt(width)}


def _mlp(p, x):
  x = x.astype(p["w1"].dtype)
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _features(x, sigma):
  s = jnp.broadcast_to(sigma, x.shape[:1]).astype(x.dtype)
  return jnp.concatenate([x / jnp.sqrt(1 + s[:, None]**2), jnp.log(s)[:, None] / 4], -1)


def _networks(dim=4):
  """Tiny random closures with the networks' interfaces (data [B, dim])."""

  def generate(gp, z, cond=None):
    return z + _mlp(gp, z)

  def denoiser(p, x, sigma, cond=None):
    s = jnp.broadcast_to(sigma, x.shape[:1]).astype(x.dtype)
    return x / (1 + s[:, None]**2) + _mlp(p, _features(x, sigma)).astype(x.dtype)

  def log_ratio(dp, x, sigma):
    return _mlp(dp, _features(x, sigma))[:, 0]

  def init(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    cast = lambda t: jax.tree.map(lambda v: jnp.asarray(v, dtype), t)
    return cast(_mlp_init(rng, dim, dim)), cast({
        "teacher": _mlp_init(rng, dim + 1, dim), "fake": _mlp_init(rng, dim + 1, dim),
        "disc": _mlp_init(rng, dim + 1, 1, scale=0.5)})

  return (generate, denoiser, denoiser, log_ratio), init


def test_twice_sid_at_half_is_the_reverse_kl_member():
  """2 SiD(alpha=0.5) = s^4 x reverse-KL surrogate: values and generator gradients (float64)."""
  (generate, teacher, fake, log_ratio), init = _networks()
  with jax.enable_x64(True):
    gp, frozen = init(0, jnp.float64)
    rng = np.random.default_rng(1)
    z, eps = (jnp.asarray(rng.standard_normal((8, 4))) for _ in range(2))
    sigma = jnp.asarray(np.exp(rng.uniform(-2.0, 2.0, 8)))
    rkl = ul.generator_loss_fn(generate, teacher, fake, log_ratio, divergence="reverse_kl",
                               scale="sigma4", reduce=False)
    sid = ul.generator_loss_fn(generate, teacher, fake, objective="sid", sid_alpha=0.5,
                               scale="sigma4", reduce=False)

    @jax.jit
    def both(gp):
      out = {}
      for name, fn, k in (("rkl", rkl, 1.0), ("sid", sid, 2.0)):
        out[name] = jax.value_and_grad(lambda p: k * jnp.mean(fn(p, frozen, z, eps, sigma)))(gp)
        out[name + "_per_sample"] = k * fn(gp, frozen, z, eps, sigma)
      # The same identities on raw arrays; SIM's l2 form is SiD at alpha = 0.
      x_gen = generate(gp, z)
      x_t = x_gen + sigma[:, None] * eps
      d_t, d_f = teacher(frozen["teacher"], x_t, sigma), fake(frozen["fake"], x_t, sigma)
      delta = ul.score_difference(d_t, d_f, sigma)
      uni = ul.surrogate(ul.get_divergence("reverse_kl").h, jnp.ones(8), delta, d_f, x_gen, sigma)
      out["arrays"] = (sigma**4 * uni, 2 * ul.sid_loss(d_t, d_f, x_gen, 0.5),
                       sigma**4 * ul.sim_loss(d_t, d_f, x_gen, sigma, "l2"),
                       2 * ul.sid_loss(d_t, d_f, x_gen, 0.0),
                       ul.score_divergence_surrogate(d_t, d_f, x_gen, sigma, "l2"), uni)
      return out

    out = both(gp)
    np.testing.assert_allclose(out["rkl_per_sample"], out["sid_per_sample"], rtol=1e-12)
    np.testing.assert_allclose(out["rkl"][0], out["sid"][0], rtol=1e-12)
    for k in gp:
      np.testing.assert_allclose(out["rkl"][1][k], out["sid"][1][k], rtol=1e-10, atol=1e-12)
    uni_s4, sid_half, sim_s4, sid_zero, sd_l2, uni = out["arrays"]
    np.testing.assert_allclose(uni_s4, sid_half, rtol=1e-12)
    np.testing.assert_allclose(sim_s4, sid_zero, rtol=1e-12)
    np.testing.assert_allclose(sd_l2, uni, rtol=1e-12)


def test_normalisers():
  x_gen = jnp.array([[1.0, -1.0], [0.0, 0.0]])
  d_t = jnp.array([[0.5, 0.0], [0.0, 0.0]])
  sigma = jnp.array([2.0, 0.5])
  np.testing.assert_allclose(ul.sid_normaliser(x_gen, d_t), [1 / 0.75, 1e5], rtol=1e-6)
  np.testing.assert_allclose(ul.loss_scale("exact", sigma, x_gen, d_t), [1, 1])
  np.testing.assert_allclose(ul.loss_scale("sigma4", sigma, x_gen, d_t), [16, 0.0625])
  np.testing.assert_allclose(ul.loss_scale("sid", sigma, x_gen, d_t), [16 / 0.75, 6250],
                             rtol=1e-6)


def test_bfloat16_losses_and_gradients_are_finite():
  """bf16 networks and inputs at s = 0.002 and 80: every objective and scale is finite.

  One jit over all configurations with s traced (two runs, one compile)."""
  (generate, teacher, fake, log_ratio), init = _networks(dim=6)
  gp, frozen = init(2, jnp.bfloat16)
  rng = np.random.default_rng(3)
  z, eps = (jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16) for _ in range(2))
  configs = {d: dict(divergence=d) for d in ("reverse_kl", "js", "forward_kl", "pearson")}
  configs.update({"alpha(-0.5)": dict(divergence="alpha", alpha=-0.5),
                  "sid": dict(objective="sid"), "sim_l2": dict(objective="sim", sim_distance="l2"),
                  "sim_ph": dict(objective="sim"), "exact_ph": dict(objective="score_divergence")})
  # Every objective at the exact scale (the largest numbers: Delta ~ 1/s^2), every scale for js.
  runs = [(name, "exact") for name in configs] + [("js", "sigma4"), ("js", "sid")]
  losses = {(name, scale): ul.generator_loss_fn(generate, teacher, fake, log_ratio, scale=scale,
                                                **configs[name]) for name, scale in runs}

  @jax.jit
  def run(sigma):
    return {k: jax.value_and_grad(fn)(gp, frozen, z, eps, sigma) for k, fn in losses.items()}

  for sigma in (0.002, 80.0):
    for key, (value, grads) in run(jnp.bfloat16(sigma)).items():
      assert np.isfinite(float(value)), (sigma, key, value)
      for k, g in grads.items():
        assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))), (sigma, key, k)


def test_argument_errors():
  gen, teacher, fake, log_ratio = go.closures()
  with pytest.raises(ValueError, match="needs a divergence"):
    ul.generator_loss_fn(gen, teacher, fake, log_ratio)
  with pytest.raises(ValueError, match="needs a log_ratio"):
    ul.generator_loss_fn(gen, teacher, fake, divergence="js")
  with pytest.raises(ValueError, match="uni_instruct' only"):
    ul.generator_loss_fn(gen, teacher, fake, objective="sid", ratio_grad=False)
  with pytest.raises(ValueError, match="scale"):
    ul.generator_loss_fn(gen, teacher, fake, divergence="reverse_kl", scale="bogus")
  ul.generator_loss_fn(gen, teacher, fake, divergence="reverse_kl")  # no ratio needed

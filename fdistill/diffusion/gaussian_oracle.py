"""Closed-form 1-D Gaussian oracle for the Uni-Instruct tests and benchmark.

Teacher ``p_0 = N(mu, v0)`` (default N(0.3, 1)) and a linear generator
``G(z) = a z + b``, ``z ~ N(0, 1)``, so at noise level s (``x = x0 + s eps``)

  p_s = N(mu, v0 + s^2),    q_s = N(b, a^2 + s^2),
  D_p(x; s) = x - s^2 (x - mu)/(v0 + s^2),   D_q(x; s) = x - s^2 (x - b)/(a^2 + s^2),
  log r(x) = log N(x; mu, v0 + s^2) - log N(x; b, a^2 + s^2),

all exact. Two halves, deliberately independent:

* JAX closures with the networks' interfaces (:func:`closures`), so a loss
  built for networks runs unchanged on the oracle, plus a Monte-Carlo gradient
  helper with per-sample standard errors (:func:`monte_carlo_gradients`);
* float64 numpy truths: ``J_s = E_q[h(r) |Delta|^2]``, ``D_f = E_q[f(r)]`` and
  ``K_s = E_q[d(Delta)]`` by the trapezoid rule on a fine grid (spectrally
  accurate for these smooth, Gaussian-decaying integrands), differentiated by
  central finite differences in (a, b). Its f and h are written out again in
  numpy (:data:`NUMPY_DIVERGENCES`) instead of reusing the JAX registry.
"""
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

TEACHER = (0.3, 1.0)                       # (mean, variance) of p_0
POINTS = ((0.7, -0.4, 0.5), (1.3, 0.8, 1.0), (0.5, 1.5, 2.0))  # (a, b, s)
# (registry name, alpha) of every divergence the oracle covers; 'pearson' is defined in
# objectives.uni_instruct_loss.
DIVERGENCES = (("reverse_kl", None), ("softened_rkl", None), ("js", None),
               ("squared_hellinger", None), ("forward_kl", None), ("jeffreys", None),
               ("pearson", None), ("alpha", -0.5), ("alpha", 1.5))


def label(name: str, alpha: Optional[float]) -> str:
  return name if alpha is None else f"alpha({alpha:g})"


# ---------------------------------------------------------------------------
# numpy f and h (independent of fdistill.objectives.divergences).


def _xlogx(r):
  return r * np.log(r)


NUMPY_DIVERGENCES: Dict[str, Tuple[Callable, Callable]] = {
    "reverse_kl": (lambda r: -np.log(r), lambda r: np.ones_like(r)),
    "softened_rkl": (lambda r: (r + 1) * np.log((r + 1) / (2 * r)), lambda r: 1 / (r + 1)),
    "js": (lambda r: _xlogx(r) - (r + 1) * np.log((r + 1) / 2), lambda r: r / (r + 1)),
    "squared_hellinger": (lambda r: 1 - np.sqrt(r), lambda r: np.sqrt(r) / 4),
    "forward_kl": (_xlogx, lambda r: r),
    "jeffreys": (lambda r: (r - 1) * np.log(r), lambda r: r + 1),
    "pearson": (lambda r: (r - 1)**2, lambda r: 2 * r**2),
}


def numpy_divergence(name: str, alpha: Optional[float] = None) -> Tuple[Callable, Callable]:
  """(f, h) in numpy float64."""
  if name == "alpha":
    a = float(alpha)
    return (lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)), lambda r: r**a)
  return NUMPY_DIVERGENCES[name]


def growth_exponents(name: str, alpha: Optional[float] = None) -> Tuple[float, float]:
  """(k_0, k_inf): ``h(r) ~ r^k`` as r -> 0 and r -> inf (r h'(r) grows alike)."""
  return {"reverse_kl": (0, 0), "softened_rkl": (0, -1), "js": (1, 0),
          "squared_hellinger": (0.5, 0.5), "forward_kl": (1, 1), "jeffreys": (0, 1),
          "pearson": (2, 2)}.get(name, (alpha, alpha))


def gradient_variance_finite(name: str, alpha: Optional[float], point,
                             teacher=TEACHER) -> bool:
  """Whether the per-sample surrogate gradient has finite variance under q_s.

  Per-sample gradients grow like ``r^k`` times a polynomial, with ``log r`` quadratic in
  x: ``r^(2k) q_s ~ exp(-x^2/2 [1/v_q - 2k (1/v_q - 1/v_p)])``, integrable iff the bracket
  is positive; ``k`` is the growth of h in the tail that r reaches (r -> inf where q_s is
  the narrower, r -> 0 where it is the wider). Without it the MC error bars mean nothing.
  """
  a, b, s = point
  vq, vp = a**2 + s**2, teacher[1] + s**2
  k0, kinf = growth_exponents(name, alpha)
  k = kinf if vq < vp else k0
  return 1 / vq - 2 * k * (1 / vq - 1 / vp) > 0


# ---------------------------------------------------------------------------
# JAX closures with the networks' interfaces.


def closures(teacher=TEACHER):
  """(generate, teacher_apply, fake_apply, log_ratio) for the Gaussian oracle.

  Params: generator and fake score ``{'a', 'b'}``; teacher ``{'mean', 'var'}``;
  discriminator ``{'teacher': ..., 'student': {'a', 'b'}}``. Data are [B, 1].
  """
  del teacher  # the teacher's numbers travel as params, like a network's weights

  def generate(theta, z, cond=None):
    return theta["a"] * z + theta["b"]

  def _tweedie(mean, var0, x, sigma):
    s2 = sigma[:, None]**2
    return x - s2 * (x - mean) / (var0 + s2)

  def teacher_apply(tp, x, sigma, cond=None):
    return _tweedie(tp["mean"], tp["var"], x, sigma)

  def fake_apply(fp, x, sigma, cond=None):
    return _tweedie(fp["b"], fp["a"]**2, x, sigma)

  def _log_normal(x, mean, var):
    return -0.5 * ((x - mean)**2 / var + jnp.log(2 * jnp.pi * var))

  def log_ratio(dp, x, sigma):
    s2 = sigma**2
    tp, st = dp["teacher"], dp["student"]
    return (_log_normal(x[:, 0], tp["mean"], tp["var"] + s2)
            - _log_normal(x[:, 0], st["b"], st["a"]**2 + s2))

  return generate, teacher_apply, fake_apply, log_ratio


def frozen_params(theta, teacher=TEACHER):
  """The ``frozen`` dict of :func:`fdistill.objectives.uni_instruct_loss.generator_loss_fn`:
  exact fake score and ratio at the generator's current ``theta``."""
  tp = {"mean": jnp.asarray(teacher[0]), "var": jnp.asarray(teacher[1])}
  return {"teacher": tp, "fake": theta, "disc": {"teacher": tp, "student": theta}}


def monte_carlo_gradients(losses: Mapping[str, Callable], points: Sequence = POINTS,
                          n: int = 2**20, chunk: int = 2**17, seed: int = 0,
                          teacher=TEACHER) -> Dict[tuple, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
  """{point: {name: (mean [2], standard error [2])}} of per-sample gradients over (a, b).

  ``losses[name](gen_params, frozen, z, eps, sigma) -> scalar`` (a generator_loss_fn).
  float64 throughout; one jit over all losses, reused for every point and chunk; the
  standard error is the per-sample standard deviation over sqrt(n) (samples are iid).
  Every point shares the same noise draws.
  """
  names = tuple(losses)
  with jax.enable_x64(True):

    def sample_grad(loss, theta, frozen, z, e, s):
      return jax.grad(lambda t: loss(t, frozen, z[None], e[None], jnp.full((1,), s)))(theta)

    @jax.jit
    def chunk_stats(theta, s, key):
      frozen = frozen_params(theta, teacher)
      ze = jax.random.normal(key, (chunk, 2, 1), jnp.float64)
      out = {}
      for name in names:
        g = jax.vmap(sample_grad, in_axes=(None, None, None, 0, 0, None))(
            losses[name], theta, frozen, ze[:, 0], ze[:, 1], s)
        g = jnp.stack([g["a"], g["b"]], -1)
        out[name] = (jnp.sum(g, 0), jnp.sum(g**2, 0))
      return out

    keys = jax.random.split(jax.random.key(seed), n // chunk)
    results = {}
    for point in points:
      a, b, s = point
      theta = {"a": jnp.float64(a), "b": jnp.float64(b)}
      sums = {k: [np.zeros(2), np.zeros(2)] for k in names}
      for key in keys:
        stats = chunk_stats(theta, jnp.float64(s), key)
        for k in names:
          sums[k][0] += np.asarray(stats[k][0])
          sums[k][1] += np.asarray(stats[k][1])
      m = (n // chunk) * chunk
      results[point] = {}
      for k in names:
        mean = sums[k][0] / m
        var = (sums[k][1] - m * mean**2) / (m - 1)
        results[point][k] = (mean, np.sqrt(np.maximum(var, 0) / m))
    return results


# ---------------------------------------------------------------------------
# float64 numpy truths.


def _log_normal_np(x, mean, var):
  return -0.5 * ((x - mean)**2 / var + np.log(2 * np.pi * var))


def expectation(fn: Callable, a: float, b: float, s: float, teacher=TEACHER,
                frozen: Optional[Tuple[float, float]] = None, half_width: float = 30.0,
                num: int = 60001) -> float:
  """``E_{x ~ q_s}[fn(r(x), Delta(x), x)]`` by the trapezoid rule on [-half_width, half_width].

  ``frozen=(a0, b0)``: evaluate r and Delta with the student (a0, b0) while the density
  is q_s of (a, b), i.e. the functions held fixed (the sample-path part of a gradient).
  The default grid (spacing 1e-3, |x| <= 30) resolves every integrand of the oracle
  points to ~1e-13: the widest one, p^2/q at point 0, has standard deviation 2.
  """
  x = np.linspace(-half_width, half_width, num)
  mean, var0 = teacher
  fa, fb = (a, b) if frozen is None else frozen
  log_q = _log_normal_np(x, b, a**2 + s**2)
  log_r = _log_normal_np(x, mean, var0 + s**2) - _log_normal_np(x, fb, fa**2 + s**2)
  delta = -(x - mean) / (var0 + s**2) + (x - fb) / (fa**2 + s**2)
  with np.errstate(over="ignore", under="ignore"):
    vals = np.exp(log_q) * fn(np.exp(log_r), delta, x)
  return float(np.trapezoid(vals, x))


def j_s(h: Callable, a, b, s, teacher=TEACHER, **kw) -> float:
  """``J_s = E_q[h(r) |Delta|^2]``."""
  return expectation(lambda r, d, x: h(r) * d**2, a, b, s, teacher, **kw)


def f_divergence(f: Callable, a, b, s, teacher=TEACHER) -> float:
  """``D_f(p_s || q_s) = E_q[f(r)]``."""
  return expectation(lambda r, d, x: f(r), a, b, s, teacher)


def score_divergence(d: Callable, a, b, s, teacher=TEACHER, **kw) -> float:
  """``K_s = E_q[d(Delta)]`` for a distance ``d`` of the (1-D) score difference."""
  return expectation(lambda r, dl, x: d(dl), a, b, s, teacher, **kw)


def central_gradient(fn: Callable[[float, float], float], a, b, step=1e-4) -> np.ndarray:
  """(d/da, d/db) of ``fn(a, b)`` by central differences."""
  return np.array([(fn(a + step, b) - fn(a - step, b)) / (2 * step),
                   (fn(a, b + step) - fn(a, b - step)) / (2 * step)])


def j_s_gradient(h: Callable, a, b, s, teacher=TEACHER, step=1e-4) -> np.ndarray:
  """``grad_(a,b) J_s`` (fake score and ratio move with the student)."""
  return central_gradient(lambda a_, b_: j_s(h, a_, b_, s, teacher), a, b, step)


def score_divergence_gradient(d: Callable, a, b, s, teacher=TEACHER, step=1e-4) -> np.ndarray:
  """``grad_(a,b) K_s``."""
  return central_gradient(lambda a_, b_: score_divergence(d, a_, b_, s, teacher), a, b, step)


def sample_path_gradient(phi: Callable, a, b, s, teacher=TEACHER, step=1e-4) -> np.ndarray:
  """``grad_(a,b) E_{q_s(a,b)}[phi(r_0, Delta_0, x)]`` with r_0, Delta_0 frozen at (a, b):
  the part of a gradient that comes from moving the samples only."""
  return central_gradient(
      lambda a_, b_: expectation(phi, a_, b_, s, teacher, frozen=(a, b)), a, b, step)


# ---------------------------------------------------------------------------
# The oracle table: which losses, what each gradient should equal, how it is checked.
# Shared by tests/test_objectives_uni_instruct.py and benchmarks/uni_instruct_oracle.py.


def numpy_distance(name: str, c: float = 0.5) -> Tuple[Callable, Callable]:
  """(d(y), d'(y) y - d(y)) for a 1-D score difference y, in numpy.

  The second function is what SIM's form adds to the exact score-divergence surrogate.
  """
  if name == "l2":
    return (lambda y: y**2, lambda y: y**2)
  if name == "pseudo_huber":
    return (lambda y: np.sqrt(y**2 + c**2) - c, lambda y: c - c**2 / np.sqrt(y**2 + c**2))
  raise ValueError(name)


class Case(NamedTuple):
  """One row family of the oracle table.

  ``loss``: keyword arguments of ``uni_instruct_loss.generator_loss_fn`` (closures and
  scale='exact' implied). ``truth``: ('j', divergence, alpha) grad J_s;
  ('k', distance, c) grad K_s = grad E_q[d(Delta)]; ('sim', distance, c)
  grad K_s + grad_path E[d'(y) y - d(y)]; ('sid', alpha) (grad J_rkl + (1 - 2 alpha) A)/2 with
  A = grad_path E[|Delta|^2]. ``check``: 'match' (within 4 s.e. where the variance is
  finite) or 'miss' (more than 10 s.e. away from grad J_s of ``truth``), at the point
  indices ``at`` (every point when None).
  """
  label: str
  loss: dict
  truth: tuple
  check: str = "match"
  at: Optional[Tuple[int, ...]] = None


NEGATIVE_POINT = 1  # (1.3, 0.8, 1.0): every dropped path is far outside the noise there

CASES = tuple(Case(label(n, a), dict(divergence=n, alpha=a), ("j", n, a))
              for n, a in DIVERGENCES) + (
    Case("forward_kl, no -r h'(r)", dict(divergence="forward_kl", drop_rh_prime=True),
         ("j", "forward_kl", None), "miss", (NEGATIVE_POINT,)),
    Case("forward_kl, ratio input cut", dict(divergence="forward_kl", ratio_grad=False),
         ("j", "forward_kl", None), "miss", (NEGATIVE_POINT,)),
    Case("forward_kl, Delta cut", dict(divergence="forward_kl", delta_grad=False),
         ("j", "forward_kl", None), "miss", (NEGATIVE_POINT,)),
    Case("SiD alpha=1.2", dict(objective="sid", sid_alpha=1.2), ("sid", 1.2)),
    Case("SIM l2", dict(objective="sim", sim_distance="l2"), ("sim", "l2", None)),
    Case("SIM pseudo-Huber c=0.5", dict(objective="sim", sim_distance="pseudo_huber", sim_c=0.5),
         ("sim", "pseudo_huber", 0.5)),
    Case("exact pseudo-Huber c=0.5",
         dict(objective="score_divergence", sim_distance="pseudo_huber", sim_c=0.5),
         ("k", "pseudo_huber", 0.5)),
)


def truth(spec: tuple, point, teacher=TEACHER) -> Tuple[np.ndarray, np.ndarray]:
  """(what the MC gradient should equal, the exact divergence gradient it is compared with)."""
  a, b, s = point
  kind = spec[0]
  if kind == "j":
    g = j_s_gradient(numpy_divergence(spec[1], spec[2])[1], a, b, s, teacher)
    return g, g
  if kind == "sid":
    k = j_s_gradient(numpy_divergence("reverse_kl")[1], a, b, s, teacher)
    path = sample_path_gradient(lambda r, d, x: d**2, a, b, s, teacher)
    return (k + (1 - 2 * spec[1]) * path) / 2, k / 2
  d, extra = numpy_distance(spec[1], spec[2])
  k = score_divergence_gradient(d, a, b, s, teacher)
  if kind == "k":
    return k, k
  return k + sample_path_gradient(lambda r, dl, x: extra(dl), a, b, s, teacher), k


class Row(NamedTuple):
  label: str
  point: tuple
  estimate: np.ndarray
  se: np.ndarray
  truth: np.ndarray
  z: np.ndarray            # (estimate - truth) / se
  z_exact: np.ndarray      # (estimate - exact divergence gradient) / se
  finite: bool             # per-sample gradient variance finite (else z means nothing)
  check: Optional[str]     # 'match' | 'miss' | None (reported only)


def rows(results, cases: Sequence[Case] = CASES, points: Sequence = POINTS,
         teacher=TEACHER) -> list:
  """Table rows from :func:`monte_carlo_gradients` results keyed by case label."""
  out = []
  for case in cases:
    for i, point in enumerate(points):
      est, se = results[point][case.label]
      want, exact = truth(case.truth, point, teacher)
      finite = case.truth[0] != "j" or gradient_variance_finite(case.truth[1], case.truth[2],
                                                                 point, teacher)
      check = case.check if (case.at is None or i in case.at) and finite else None
      out.append(Row(case.label, point, est, se, want, (est - want) / se, (est - exact) / se,
                     finite, check))
  return out


def format_rows(table: Sequence[Row]) -> str:
  """A markdown table: per component (d/da, d/db) estimate +- s.e., truth, z."""
  head = ("| case | (a, b, s) | d/da estimate +- s.e. | truth | z | d/db estimate +- s.e. | truth "
          "| z | z vs exact | checked |")
  lines = [head, "|" + "---|" * 10]
  for r in table:
    comp = []
    for i in range(2):
      comp += [f"{r.estimate[i]:.6g} +- {r.se[i]:.2g}", f"{r.truth[i]:.6g}", f"{r.z[i]:+.2f}"]
    exact = "" if np.allclose(r.z, r.z_exact) else f"{r.z_exact[0]:+.1f}, {r.z_exact[1]:+.1f}"
    check = r.check or ("infinite variance" if not r.finite else "-")
    lines.append(f"| {r.label} | {r.point} | " + " | ".join(comp) + f" | {exact} | {check} |")
  return "\n".join(lines)

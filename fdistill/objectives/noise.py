"""Noise for the distillation objectives: one Gaussian draw per step, and noise-level samplers.

Each step draws all its Gaussian noise in one ``jax.random.normal`` call
(every separate call adds a threefry expansion that XLA compiles, seconds on
CPU). A noise-level sampler maps a standard normal ``e`` [B] to ``(sigma, u)``,
``u`` in (0, 1) the sampler's own uniform coordinate, used to bin the density
ratio. Samplers read the settings of :class:`NoiseLevels` (``config.objective`` fields):
sigma_dist, sigma_min, sigma_max, rho, ramp_min, ramp_max, p_mean, p_std, sigma_fixed; the
one-step families' settings inherit that block, and :func:`check_levels` checks the
relations between its fields in any objective section.

The critics (fake score, discriminator) may train on another law than the generator's
loss (SiD's code: the generator on a Karras ramp, the fake score on EDM's lognormal;
DMD2's: the generator on ramp positions 2-98 %, the fake score on the whole ramp): the
``objective.critic_noise`` section overrides any of the fields above for the critics
(:func:`critic_levels`); empty means the generator's law.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from fdistill.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NoiseLevels:
  """The noise-level settings block: the generator's law (and, with ``objective.critic_noise``
  overrides, the critics', :func:`critic_levels`)."""
  sigma_dist: str                 # karras | lognormal | fixed
  sigma_min: float
  sigma_max: float
  rho: float
  ramp_min: float                 # karras: share of the ramp cut at each end (FastGen
  ramp_max: float                 # samples steps 2..998 of a 1000-step grid)
  p_mean: float                   # lognormal: log s ~ N(p_mean, p_std^2)
  p_std: float
  sigma_fixed: float              # fixed: the one level


def draw_noise(rng, n, x_shape, num_x, num_scalar):
  """``num_x`` standard normal arrays [n, *x_shape] and ``num_scalar`` of shape [n]."""
  size = math.prod(x_shape)
  flat = jax.random.normal(rng, (n, num_x * size + num_scalar))
  xs = [flat[:, i * size:(i + 1) * size].reshape((n,) + tuple(x_shape)) for i in range(num_x)]
  return xs, [flat[:, num_x * size + j] for j in range(num_scalar)]


def _karras(e, st):
  """FastGen's 'polynomial': a uniform position on EDM's Karras (rho) grid from s_max to s_min."""
  u = st.ramp_min + (st.ramp_max - st.ramp_min) * jax.scipy.stats.norm.cdf(e)
  hi, lo = st.sigma_max**(1 / st.rho), st.sigma_min**(1 / st.rho)
  return (hi + u * (lo - hi))**st.rho, u


def _lognormal(e, st):
  """EDM training levels ``log s ~ N(p_mean, p_std^2)``; u is the normal CDF."""
  return jnp.exp(st.p_mean + st.p_std * e), jax.scipy.stats.norm.cdf(e)


def _fixed(e, st):
  """One noise level (analysis and the oracle tests)."""
  return jnp.full_like(e, st.sigma_fixed), jnp.full_like(e, 0.5)


SIGMA_DISTS = {"karras": _karras, "lognormal": _lognormal, "fixed": _fixed}
FIELDS = tuple(f.name for f in dataclasses.fields(NoiseLevels))


def critic_levels(st, overrides):
  """``st`` (a settings dataclass with the :data:`FIELDS`) with ``overrides`` (the
  ``objective.critic_noise`` section) replacing some of its noise fields; a ConfigError
  names an unknown key or an unknown law."""
  overrides = dict(overrides)
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ConfigError(f"objective.critic_noise.{unknown[0]} is not a noise-level field; valid: "
                      f"{', '.join(FIELDS)}")
  levels = dataclasses.replace(st, **overrides)
  if levels.sigma_dist not in SIGMA_DISTS:
    raise ConfigError(f"objective.critic_noise.sigma_dist={levels.sigma_dist!r} is not valid; "
                      f"valid values: {', '.join(SIGMA_DISTS)}")
  return levels


def check_levels(objective_config):
  """The relations between noise-level fields, wherever ``config.objective`` has them (any
  objective: DSM's p_std, rCM's sigma_min and sigma_max too) and in its ``critic_noise``
  overrides; a ConfigError naming the field."""
  sections = {"objective": objective_config}
  if "critic_noise" in objective_config:
    sections["objective.critic_noise"] = dict(objective_config,
                                              **dict(objective_config.critic_noise))
  for prefix, sec in sections.items():
    if "p_std" in sec and not sec["p_std"] > 0:
      raise ConfigError(f"{prefix}.p_std={sec['p_std']!r} must be > 0")
    if "sigma_min" in sec and not 0 < sec["sigma_min"] < sec["sigma_max"]:
      raise ConfigError(f"{prefix}.sigma_min={sec['sigma_min']!r} and sigma_max="
                        f"{sec['sigma_max']!r} must satisfy 0 < sigma_min < sigma_max")
    if "ramp_min" in sec and not 0 <= sec["ramp_min"] < sec["ramp_max"] <= 1:
      raise ConfigError(f"{prefix}.ramp_min={sec['ramp_min']!r} and ramp_max="
                        f"{sec['ramp_max']!r} must satisfy 0 <= ramp_min < ramp_max <= 1")
    if "rho" in sec and not sec["rho"] > 0:
      raise ConfigError(f"{prefix}.rho={sec['rho']!r} must be > 0")


def sample_sigma(e, st):
  """(sigma, u) from standard normals ``e`` [B]."""
  return SIGMA_DISTS[st.sigma_dist](e, st)



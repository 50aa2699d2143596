"""EDM (Karras et al. 2022) noise process as pure functions.

Notation (docs/design.md section 4): ``x_s = x0 + s * eps`` and the denoiser
``D(x; s) = c_skip x + c_out F(c_in x; c_noise)``.
Every function here takes arrays and, where a network is involved, an
``apply_fn(params, x, sigma, cond) -> D`` closure.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from fdistill.diffusion import per_sample

SIGMA_DATA = 0.5


def _bcast(sigma, x):
  """Per-sample ``sigma`` [B] (or a scalar) in float32, shaped to broadcast against ``x``."""
  return per_sample.expand(jnp.asarray(sigma, jnp.float32), x)


def preconditioning(sigma, sigma_data=SIGMA_DATA):
  """Returns (c_skip, c_out, c_in, c_noise) for noise level(s) ``sigma``."""
  sigma = jnp.asarray(sigma, jnp.float32)
  var = sigma**2 + sigma_data**2
  c_skip = sigma_data**2 / var
  c_out = sigma * sigma_data / jnp.sqrt(var)
  c_in = 1.0 / jnp.sqrt(var)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def precondition(net_fn: Callable, sigma_data: float = SIGMA_DATA) -> Callable:
  """Wraps a raw network ``net_fn(params, x_in, c_noise, cond, **kw) -> F`` into a denoiser.

  The returned ``denoise(params, x, sigma, cond, **kw)`` computes
  ``c_skip x + c_out F(c_in x; c_noise)`` in float32 whatever the network's
  compute dtype. Extra outputs of the network (encoder features) pass through
  when ``net_fn`` returns a tuple.
  """

  def denoise(params, x, sigma, cond=None, **kwargs):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    out = net_fn(params, _bcast(c_in, x) * x, c_noise, cond, **kwargs)
    raw, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    d = _bcast(c_skip, x) * x + _bcast(c_out, x) * raw.astype(jnp.float32)
    return (d,) + tuple(extra) if extra else d

  return denoise


def sample_sigma_lognormal(rng, shape, p_mean=-1.2, p_std=1.2):
  """EDM training noise levels: ``log s ~ N(p_mean, p_std^2)``."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape))


def loss_weight(sigma, sigma_data=SIGMA_DATA):
  """EDM loss weight ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` (unit effective weight on F)."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """The Karras grid, decreasing from sigma_max to sigma_min, with a final 0 appended."""
  i = jnp.arange(num_steps, dtype=jnp.float32)
  ramp = i / max(num_steps - 1, 1)
  inv = 1.0 / rho
  sig = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv))**rho
  return jnp.concatenate([sig, jnp.zeros((1,), jnp.float32)])


def heun_sampler(apply_fn: Callable, params, noise, cond=None, num_steps=18,
                 sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """Deterministic EDM Heun sampler (Karras et al. Algorithm 1, S_churn = 0).

  ``noise`` is standard normal; it is scaled by sigma_max. Uses ``lax.scan`` so
  it compiles once whatever ``num_steps`` is. The last step (to sigma = 0) is Euler.
  """
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
  x0 = noise.astype(jnp.float32) * sigmas[0]

  def drift(x, s):
    d = apply_fn(params, x, jnp.full(x.shape[:1], s), cond)
    return (x - d) / s

  def step(x, pair):
    s_cur, s_next = pair
    dx = drift(x, s_cur)
    x_euler = x + (s_next - s_cur) * dx
    x_heun = x + (s_next - s_cur) * 0.5 * (dx + drift(x_euler, jnp.maximum(s_next, 1e-12)))
    return jnp.where(s_next > 0, x_heun, x_euler), None

  x, _ = jax.lax.scan(step, x0, (sigmas[:-1], sigmas[1:]))
  return x


def one_step_generate(apply_fn: Callable, params, noise, cond=None, sigma_init=2.5):
  """One-step generator ``G(z) = D_g(s_g z; s_g)`` (docs/design.md section 4)."""
  sigma = jnp.full(noise.shape[:1], sigma_init, jnp.float32)
  return apply_fn(params, sigma_init * noise.astype(jnp.float32), sigma, cond)


def add_noise(x0, eps, sigma):
  """``x_s = x0 + s * eps`` with per-sample ``sigma``."""
  return x0 + _bcast(sigma, x0) * eps

"""f-divergences for f-distill: each is ``f(r)`` and its weight ``h(r) = r^2 f''(r)``.

Convention (Xu et al. 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching", Table 1): ``D_f(p || q) = E_q[f(p/q)]`` with ``p`` the
teacher (data) and ``q`` the one-step generator, both noised at the same level,
and ``r = p/q``. Every ``f`` here is convex with ``f(1) = 0``. The generator
gradient of ``D_f`` is ``E_q[h(r) (S_q - S_p)^T dx/dtheta]`` (docs/design.md
section 4), so ``h`` is all the training step needs; ``f`` is kept for the
tests (``h == r^2 f''`` by autodiff) and for computing the divergence itself.

  name               f(r)                                   h(r)
  reverse_kl         -log r                                 1
  softened_rkl       (r+1) log((r+1)/(2r))                  1/(r+1)
  js                 r log r - (r+1) log((r+1)/2)           r/(r+1)
  squared_hellinger  1 - sqrt(r)                            sqrt(r)/4
  forward_kl         r log r                                r
  jeffreys           (r-1) log r                            r+1
  alpha (a != 0, 1)  (r^a - a r - (1-a)) / (a (a-1))        r^a

``alpha`` is Amari's alpha-divergence written in ``r``: a -> 0 is reverse KL,
a -> 1 forward KL, a = 1/2 four times squared Hellinger. The published code
(NVlabs/FastGen ``f_distill.py``) drops constant factors of ``h`` (e.g. uses
``sqrt(r)`` for Hellinger) because ``h`` is renormalised by its batch mean;
we keep the exact ``r^2 f''`` so the oracle tests can check the scale.
"""
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp

from fdistill.registry import lookup
from fdistill.errors import ConfigError


class Divergence(NamedTuple):
  """``f`` (the divergence's generator) and ``h(r) = r^2 f''(r)`` (the gradient weight)."""
  name: str
  f: Callable
  h: Callable


def _xlogx(r):
  return r * jnp.log(r)


def _reverse_kl():
  return Divergence("reverse_kl", lambda r: -jnp.log(r), jnp.ones_like)


def _softened_rkl():
  return Divergence("softened_rkl", lambda r: (r + 1) * jnp.log((r + 1) / (2 * r)),
                    lambda r: 1 / (r + 1))


def _js():
  return Divergence("js", lambda r: _xlogx(r) - (r + 1) * jnp.log((r + 1) / 2),
                    lambda r: r / (r + 1))


def _squared_hellinger():
  return Divergence("squared_hellinger", lambda r: 1 - jnp.sqrt(r), lambda r: jnp.sqrt(r) / 4)


def _forward_kl():
  return Divergence("forward_kl", _xlogx, lambda r: r)


def _jeffreys():
  return Divergence("jeffreys", lambda r: (r - 1) * jnp.log(r), lambda r: r + 1)


def _alpha(alpha):
  """Amari alpha-divergence; a in {0, 1} is the KL limit, which has its own entry."""
  if alpha is None:
    raise ConfigError("divergence 'alpha' needs objective.alpha (any real number except 0 and 1)")
  a = float(alpha)
  if a in (0.0, 1.0):
    raise ConfigError(f"objective.alpha={a} is the limit of the alpha family; use "
                      f"divergence={'reverse_kl' if a == 0.0 else 'forward_kl'!r}")
  return Divergence(f"alpha({a:g})", lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)),
                    lambda r: r**a)


DIVERGENCES = {
    "reverse_kl": _reverse_kl,
    "softened_rkl": _softened_rkl,
    "js": _js,
    "squared_hellinger": _squared_hellinger,
    "forward_kl": _forward_kl,
    "jeffreys": _jeffreys,
    "alpha": _alpha,
}


def get(name: str, alpha: Optional[float] = None) -> Divergence:
  """The divergence named ``name`` (``alpha`` only for ``name == 'alpha'``)."""
  make = lookup(DIVERGENCES, name, "objective.divergence")
  return make(alpha) if name == "alpha" else make()

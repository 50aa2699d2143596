"""EDM's non-leaking augmentation (Karras et al. 2022, ``training/augment.py``), CIFAR-10 setting.

SiD trains its fake score on augmented generator samples (``--augment=0.12`` on CIFAR-10,
the network conditioned on the 9 augmentation labels through ``map_augment``); the
generator's loss and sampling use zero labels. The transforms and their labels, in EDM's
order (``xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1``):

  [0] xflip          w in {0, 1}, a fair coin (its gate 1e8 p always passes)
  [1] yflip          w in {0, 1} with probability p/2
  [2] scale          w ~ N(0, 1) with probability p, else 0; scale 2^(0.2 w)
  [3,4] rotate_frac  cos(w) - 1, sin(w); w ~ U(-pi, pi) with probability p, else 0
  [5,6] aniso        w cos(r), w sin(r); w ~ N(0, 1) with probability p, r ~ U(-pi, pi)
                     with probability 1/2 (else 0); scales 2^(0.2 w) and 2^(-0.2 w) along r
  [7,8] translate    w ~ N(0, 1)^2 with probability p (one gate for both), else 0; shift
                     (w_x W, w_y H) * 0.125 pixels

The flips move pixels; the rest is one affine map per image (EDM's ``G_inv``, composed
scale, rotation, anisotropy, translation, in centred pixel coordinates) resampled
bilinearly with mirrored borders. One difference from EDM: EDM resamples through a 2x
upsampling with the sym6 wavelet filter (anti-aliasing); here plain bilinear, so images
whose transform is the identity come back exactly, and others a little softer. Images are
NHWC.
"""
import math
from typing import Dict

import jax
import jax.numpy as jnp

NUM_LABELS = 9
SCALE_STD = 0.2
ANISO_STD = 0.2
TRANSLATE_STD = 0.125


def draw(rng, n: int, p: float) -> Dict[str, jax.Array]:
  """EDM's random transform parameters for ``n`` images at probability ``p`` (zeros where a
  transform's gate fails)."""
  keys = jax.random.split(rng, 12)
  gate = lambda k, prob, shape=(n,): jax.random.uniform(k, shape) < prob
  uniform_pi = lambda k: (jax.random.uniform(k, (n,)) * 2 - 1) * math.pi
  zero = jnp.zeros((n,))
  return {
      "xflip": jax.random.randint(keys[0], (n,), 0, 2).astype(jnp.float32),
      "yflip": jnp.where(gate(keys[1], p), jax.random.randint(keys[2], (n,), 0, 2), 0
                         ).astype(jnp.float32),
      "scale": jnp.where(gate(keys[3], p), jax.random.normal(keys[4], (n,)), zero),
      "rotate": jnp.where(gate(keys[5], p), uniform_pi(keys[6]), zero),
      "aniso": jnp.where(gate(keys[7], p), jax.random.normal(keys[8], (n,)), zero),
      "aniso_angle": jnp.where(gate(keys[9], 0.5), uniform_pi(keys[10]), zero),
      "translate": jnp.where(gate(keys[11], p)[:, None],
                             jax.random.normal(jax.random.fold_in(keys[11], 1), (n, 2)), 0.0),
  }


def labels(params) -> jax.Array:
  """The 9 augmentation labels [n, 9] of :func:`draw`'s parameters (EDM's layout)."""
  w, r = params["aniso"], params["aniso_angle"]
  return jnp.stack([params["xflip"], params["yflip"], params["scale"],
                    jnp.cos(params["rotate"]) - 1, jnp.sin(params["rotate"]),
                    w * jnp.cos(r), w * jnp.sin(r),
                    params["translate"][:, 0], params["translate"][:, 1]], axis=1)


def _rotate(theta):
  c, s = jnp.cos(theta), jnp.sin(theta)
  return jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _scale(sx, sy):
  return jnp.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def _translate(tx, ty):
  return jnp.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def inverse_matrix(params_one, height: int, width: int):
  """EDM's ``G_inv`` of one image (output pixel -> input pixel, centred coordinates)."""
  s = 2.0 ** (params_one["scale"] * SCALE_STD)
  a = 2.0 ** (params_one["aniso"] * ANISO_STD)
  r = params_one["aniso_angle"]
  tx = params_one["translate"][0] * width * TRANSLATE_STD
  ty = params_one["translate"][1] * height * TRANSLATE_STD
  g = _scale(1 / s, 1 / s)                                   # scale2d_inv(s, s)
  g = g @ _rotate(params_one["rotate"])                      # rotate2d_inv(-w)
  g = g @ _rotate(-r) @ _scale(1 / a, a) @ _rotate(r)        # aniso
  return g @ _translate(-tx, -ty)                            # translate2d_inv(tx, ty)


def _warp(image, g_inv):
  """``image`` [H, W, C] sampled at ``g_inv`` of every output pixel (bilinear, mirrored)."""
  h, w, _ = image.shape
  ys, xs = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2,
                        indexing="ij")
  src = jnp.einsum("ij,jhw->ihw", g_inv, jnp.stack([xs, ys, jnp.ones_like(xs)]))
  coords = [src[1] + (h - 1) / 2, src[0] + (w - 1) / 2]
  channel = lambda c: jax.scipy.ndimage.map_coordinates(c, coords, order=1, mode="mirror")
  return jax.vmap(channel, in_axes=2, out_axes=2)(image)


def apply(images, params):
  """``(augmented images, labels [n, 9])`` for NHWC ``images`` and :func:`draw`'s params."""
  images = jnp.where(params["xflip"][:, None, None, None] > 0, images[:, :, ::-1], images)
  images = jnp.where(params["yflip"][:, None, None, None] > 0, images[:, ::-1], images)
  g_inv = jax.vmap(lambda p: inverse_matrix(p, images.shape[1], images.shape[2]))(
      {k: params[k] for k in ("scale", "rotate", "aniso", "aniso_angle", "translate")})
  warped = jax.vmap(_warp)(images.astype(jnp.float32), g_inv).astype(images.dtype)
  return warped, labels(params)


def augment(rng, images, p: float):
  """EDM's augmentation of NHWC ``images`` at probability ``p``: (images, labels [n, 9])."""
  return apply(images, draw(rng, images.shape[0], p))

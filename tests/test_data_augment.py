"""EDM's augmentation (fdistill/data/augment.py) against direct NumPy indexing and its laws."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.data import augment

RNG = np.random.default_rng(0)


def params_of(n, **values):
  """Transform parameters of ``n`` images, all identity except ``values`` (arrays of [n])."""
  out = {k: jnp.zeros((n,)) for k in ("xflip", "yflip", "scale", "rotate", "aniso",
                                       "aniso_angle")}
  out["translate"] = jnp.zeros((n, 2))
  out.update({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  return out


def images(n=3, h=6, w=8, c=2):
  return jnp.asarray(RNG.normal(size=(n, h, w, c)), jnp.float32)


def test_identity_transform_returns_the_images_exactly():
  x = images()
  y, labels = augment.apply(x, params_of(3))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(labels), np.zeros((3, 9)))


def test_flips_and_their_labels():
  x = images()
  y, labels = augment.apply(x, params_of(3, xflip=[1, 0, 1], yflip=[0, 1, 1]))
  want = np.asarray(x).copy()
  want[0] = want[0][:, ::-1]
  want[1] = want[1][::-1]
  want[2] = want[2][::-1, ::-1]
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(labels[:, :2]), [[1, 0], [0, 1], [1, 1]])


def test_a_quarter_turn_moves_pixels_as_its_matrix_says():
  """rotate = pi/2: output pixel (x, y) (centred) reads input (cos w x - sin w y, sin w x +
  cos w y) = (-y, x), written here as integer indexing of a square image."""
  x = images(n=1, h=6, w=6)
  y, labels = augment.apply(x, params_of(1, rotate=[math.pi / 2]))
  want = np.empty_like(np.asarray(x))
  c = 2.5
  for i in range(6):
    for j in range(6):
      xs, ys = j - c, i - c
      want[0, i, j] = np.asarray(x)[0, int(round(xs + c)), int(round(-ys + c))]
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(labels[0, 3:5]), [-1, 1], atol=1e-6)


def test_a_translation_of_one_pixel_shifts_the_interior():
  """translate_x = 1 / (W * 0.125) = one pixel to the right: out[:, j] = in[:, j - 1]."""
  x = images(n=1, h=4, w=8)
  y, labels = augment.apply(x, params_of(1, translate=[[1.0, 0.0]]))
  np.testing.assert_allclose(np.asarray(y)[0, :, 1:], np.asarray(x)[0, :, :-1], atol=1e-5)
  np.testing.assert_allclose(np.asarray(y)[0, :, 0], np.asarray(x)[0, :, 1], atol=1e-5)  # mirror
  np.testing.assert_array_equal(np.asarray(labels[0, 7:]), [1, 0])


def test_scale_and_aniso_labels_follow_edms_layout():
  p = params_of(2, scale=[0.5, 0.0], aniso=[0.0, 1.5], aniso_angle=[0.0, 0.3])
  labels = np.asarray(augment.labels(p))
  np.testing.assert_allclose(labels[0], [0, 0, 0.5, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(labels[1], [0, 0, 0, 0, 0, 1.5 * math.cos(0.3),
                                         1.5 * math.sin(0.3), 0, 0], rtol=1e-6)
  # Scale 2^(0.2 * 5) = 2 about the centre: the centre pixel of an odd image stays.
  x = images(n=1, h=5, w=5)
  y, _ = augment.apply(x, params_of(1, scale=[5.0]))
  np.testing.assert_allclose(np.asarray(y)[0, 2, 2], np.asarray(x)[0, 2, 2], atol=1e-6)


def test_gates_fire_at_edms_rates():
  n, p = 20_000, 0.12
  d = {k: np.asarray(v) for k, v in augment.draw(jax.random.key(0), n, p).items()}
  rate = lambda v: np.mean(v != 0)
  assert abs(rate(d["xflip"]) - 0.5) < 0.015           # gate 1e8 p always passes
  assert abs(rate(d["yflip"]) - p / 2) < 0.006
  for name in ("scale", "rotate", "aniso"):
    assert abs(rate(d[name]) - p) < 0.008, name
  assert abs(rate(d["translate"][:, 0]) - p) < 0.008
  assert np.all((d["translate"][:, 0] != 0) == (d["translate"][:, 1] != 0))  # one gate
  assert abs(rate(d["aniso_angle"]) - 0.5) < 0.015
  assert abs(np.std(d["scale"][d["scale"] != 0]) - 1) < 0.05
  assert np.all(np.abs(d["rotate"]) <= math.pi)

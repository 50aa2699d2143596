"""PNG output of samples: image grids (exact uint8 round trip) and 2-D scatter plots."""
import numpy as np
import pytest

from fdistill.io import plotting


def test_image_grid_layout_and_values():
  u = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 2), dtype=np.uint8)
  x = u.astype(np.float32) / 127.5 - 1.0
  grid = plotting.image_grid(x, nrow=3, padding=1)
  assert grid.shape == (2 * 5 - 1, 3 * 4 - 1, 2) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[0:4, 0:3], u[0])  # exact inverse of u / 127.5 - 1
  np.testing.assert_array_equal(grid[5:9, 4:7], u[4])  # row 2, column 2
  assert grid[4].max() == 0 and grid[5:9, 8:11].max() == 0  # padding and the empty cell
  clipped = plotting.image_grid(np.array([[[[-3.0]], [[3.0]]]]))
  np.testing.assert_array_equal(clipped[..., 0], [[0], [255]])


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_roundtrip(tmp_path, channels):
  from PIL import Image
  x = np.random.default_rng(1).uniform(-1, 1, (4, 6, 6, channels))
  path = plotting.save_image_grid(tmp_path / "sub" / "grid.png", x)
  with Image.open(path) as im:
    saved = np.asarray(im)
  want = plotting.image_grid(x)
  np.testing.assert_array_equal(saved, want[..., 0] if channels == 1 else want)


def test_save_samples_writes_scatter_and_rejects_other_shapes(tmp_path):
  path = tmp_path / "points.png"
  plotting.save_samples(str(path), np.random.default_rng(0).normal(size=(100, 2)))
  assert path.stat().st_size > 1000
  with pytest.raises(ValueError, match=r"\[N, 2\] points or \[N, H, W, C\] images"):
    plotting.save_samples(str(tmp_path / "bad.png"), np.zeros((3, 4, 5)))

"""PNG output of samples: a scatter for 2-D data, a grid for images."""
import os

import matplotlib

matplotlib.use("Agg")  # headless: CI, eval jobs and pods have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def scatter_2d(ax, samples, reference=None, title=None, lim=1.6):
  """Samples as dots, the reference mixture's modes as crosses sized by weight."""
  ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
  if reference is not None:
    means = np.asarray(reference.means)
    w = np.asarray(reference.weights)
    ax.scatter(means[:, 0], means[:, 1], marker="x", c="r", s=400 * w / w.max() * 0.3)
  ax.set_xlim(-lim, lim)
  ax.set_ylim(-lim, lim)
  ax.set_aspect("equal")
  if title:
    ax.set_title(title)


def image_grid(images, nrow=None):
  """[N, H, W, C] images in [-1, 1] -> one uint8 [rows*H, nrow*W, C] grid."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  nrow = nrow or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / nrow))
  grid = np.zeros((rows * h, nrow * w, c), np.float32)
  for i, im in enumerate(images):
    r, col = divmod(i, nrow)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
  return np.clip((grid + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_samples(path, samples, reference=None, title=None):
  """Writes ``samples`` to ``path`` (PNG): scatter if [N, 2], image grid if [N, H, W, C]."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  samples = np.asarray(samples)
  if samples.ndim == 2:
    fig, ax = plt.subplots(figsize=(5, 5))
    scatter_2d(ax, samples, reference, title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
  elif samples.ndim == 4:
    grid = image_grid(samples)
    plt.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
  else:
    raise ValueError(f"save_samples: expected [N, 2] points or [N, H, W, C] images, "
                     f"got shape {samples.shape}")

"""PNG output of samples: a scatter for 2-D data, a grid for images.

No backend is chosen here: a notebook keeps its inline backend (so ``plt.show()`` draws),
and the command-line entry points choose the headless one (``use_headless_backend``).
"""
import io
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np


def use_headless_backend():
  """Agg, for the CLI, the demo and the benchmarks (pods and CI have no display); call before
  any figure is made."""
  matplotlib.use("Agg")


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
    save_image_grid(path, samples)
  else:
    raise ValueError(f"save_samples: expected [N, 2] points or [N, H, W, C] images, "
                     f"got shape {samples.shape}")


def save_panels(path, samples_by_title, reference=None, cols=4):
  """Writes one PNG with a scatter panel per ``{title: [N, 2] samples}``, side by side."""
  titles = list(samples_by_title)
  cols = min(cols, len(titles))
  rows = -(-len(titles) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
  for ax, title in zip(axes.flat, titles):
    scatter_2d(ax, np.asarray(samples_by_title[title]), reference, title=title)
  for ax in list(axes.flat)[len(titles):]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def to_uint8(x):
  """[-1, 1] floats -> uint8, the exact inverse of ``u / 127.5 - 1`` (round half up)."""
  return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def image_grid(x, nrow=None, padding=0):
  """[N, H, W, C] images in [-1, 1] -> one uint8 [rows*(H+p)-p, nrow*(W+p)-p, C] grid.

  ``nrow`` images per row (default ceil(sqrt(N))); unused cells and ``padding``
  pixels between cells are black.
  """
  x = np.asarray(x, np.float32)
  n, h, w, c = x.shape
  nrow = nrow or int(np.ceil(np.sqrt(n)))
  rows = -(-n // nrow)
  grid = np.zeros((rows * (h + padding) - padding, nrow * (w + padding) - padding, c), np.uint8)
  for i, img in enumerate(to_uint8(x)):
    r, col = divmod(i, nrow)
    grid[r * (h + padding):r * (h + padding) + h, col * (w + padding):col * (w + padding) + w] = img
  return grid


def save_image_grid(path, x, nrow=None, padding=0):
  """Writes ``image_grid(x)`` as a PNG to ``path`` (local or any etils.epath URL, e.g. gs://)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = image_grid(x, nrow, padding)
  buf = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
  return path

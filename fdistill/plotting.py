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
    from fdistill.data import images
    images.save_image_grid(path, samples)
  else:
    raise ValueError(f"save_samples: expected [N, 2] points or [N, H, W, C] images, "
                     f"got shape {samples.shape}")

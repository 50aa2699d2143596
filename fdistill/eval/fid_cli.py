"""FID of a set of images against reference statistics, in one command.

  python -m fdistill.eval.fid_cli SAMPLES --ref=REF.npz [--inception=PATH] [--batch_size=250]

``SAMPLES``: a ``.npz`` (its ``samples`` array, else its only array) or ``.npy`` of NHWC
images, uint8 in [0, 255] or float in [-1, 1] (what ``--mode=sample`` writes), or a
folder of ``.png`` / ``.jpg`` files. ``REF``: EDM's ``fid-refs`` npz or one written by
``fdistill.eval.ref_stats``. ``--inception``: the converted Inception ``.npz``
(``eval.inception_path``; default ``$FDISTILL_INCEPTION``; docs/fid.md). The images
take the eval job's path exactly (uint8, grey tiled to RGB, the papers' detector,
float64 statistics), so the number equals the eval job's for the same images.
"""
import argparse
import glob
import os
import sys

import numpy as np

from fdistill.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(path: str) -> np.ndarray:
  """NHWC float images in [-1, 1] from a .npz, .npy or a folder of images (ValueError if none)."""
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise ConfigError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
    from PIL import Image
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      key = "samples" if "samples" in data.files else (data.files[0] if len(data.files) == 1
                                                        else None)
      if key is None:
        raise ConfigError(f"{path}: holds {data.files}; name the images 'samples'")
      images = data[key]
  elif path.endswith(".npy"):
    images = np.load(path, allow_pickle=False)
  else:
    raise ConfigError(f"{path}: give a .npz, a .npy or a folder of images")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ConfigError(f"{path}: images of shape {images.shape}; expected [N, H, W, C]")
  if images.dtype == np.uint8:
    return images.astype(np.float64) / 127.5 - 1  # inverted exactly by the uint8 quantisation
  return images


def fid_of_images(images, ref_path: str, detector, batch_size: int = 250):
  """(FID, number of images, (IS mean, std) or None) of [-1, 1] images against ``ref_path``."""
  from fdistill.eval import fid, statistics
  reference = fid.load_reference(ref_path)
  if reference[0].size != detector.dim:
    raise ConfigError(f"--ref={ref_path} holds {reference[0].size}-d statistics; the detector's "
                      f"features are {detector.dim}-d")
  batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  stats, score = statistics.feature_stats(batches, detector, score_total=len(images))
  return fid.fid_from_stats(stats, reference), stats.count, score


def main(argv=None, detector=None):
  p = argparse.ArgumentParser(description="FID of images against reference statistics.")
  p.add_argument("samples", help=".npz / .npy of NHWC images, or a folder of images")
  p.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma)")
  p.add_argument("--inception", default="", help="converted Inception .npz "
                 "(default $FDISTILL_INCEPTION)")
  p.add_argument("--batch_size", type=int, default=250)
  args = p.parse_args(argv)
  from fdistill.errors import USER_ERRORS
  try:
    if args.batch_size < 1:
      raise ConfigError(f"--batch_size={args.batch_size} must be >= 1")
    if detector is None:
      from fdistill.eval import inception, statistics
      detector = statistics.detector_of(inception.load_params(args.inception or None))
    images = load_images(args.samples)
    value, count, score = fid_of_images(images, args.ref, detector, args.batch_size)
  except USER_ERRORS as e:
    print(f"FATAL: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
  line = f"FID {value:.4f} ({count} images of {args.samples} against {args.ref})"
  if score is not None:
    line += f"; Inception Score {score[0]:.3f} +- {score[1]:.3f}"
  print(line, flush=True)
  return value


if __name__ == "__main__":
  main()

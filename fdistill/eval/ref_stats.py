"""FID reference statistics of a config's dataset, in EDM's ``fid-refs`` format.

  python -m fdistill.eval.ref_stats --config=configs/cifar10_teacher.py --out=refs/cifar10.npz [--num=50000]

Why: ``eval.metric='fid'`` compares samples against (mu, sigma) of the real
images. EDM's published ``fid-refs`` npz (``cifar10-32x32.npz``,
``imagenet-64x64.npz``) are accepted as they are; this computes the same
statistics for any dataset the configs read (another resolution, a subset, a
machine without EDM's files). The images take the samples' path exactly: the
dataset's [-1, 1] floats quantised back to uint8 (exact for datasets at their
native resolution: ``u / 127.5 - 1`` inverts), grey tiled to RGB, the papers'
Inception (``eval.inception_path`` / ``$FDISTILL_INCEPTION``), float64
statistics with the unbiased covariance. Horizontal flips are switched off,
as EDM's reference statistics use the unflipped images.

``--num``: images (default 50000, EDM's CIFAR-10 count; 0 = the whole
dataset); at most one epoch, so no image counts twice. The first ``num``
images of the dataset's seeded epoch order are used. ``--config.data.data_dir=``
and other overrides work as in ``fdistill.main``. The file is written
atomically (``mu`` float64 [2048], ``sigma`` float64 [2048, 2048]).

Several hosts: run the same command on every host under ``jax.distributed``
(started as ``fdistill.main`` does when a coordinator or a cluster launcher is
detected, e.g. ``JAX_COORDINATOR_ADDRESS``). Every process reads the same
batches (decoding is cheap), extracts the features of its slice of each on its
devices, the float64 sums are merged over processes, and process 0 writes. A dead or hung
process ends the others with one FATAL line (:mod:`fdistill.parallel.peers`).
"""
import argparse
import itertools
import sys
import time

import jax
import ml_collections
from absl import logging

from fdistill import data
from fdistill.configfile import apply_config_flags, load_config_file
from fdistill.errors import ConfigError, USER_ERRORS
from fdistill.eval import fid
from fdistill.eval import statistics
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import peers


def parse_args(argv=None):
  """argparse, not absl flags: this module is imported by tests and the eval job's process, where
  absl's global --config flag of fdistill.main may already be defined."""
  p = argparse.ArgumentParser(description="Reference FID statistics of a config's dataset.")
  p.add_argument("--config", required=True, help="Config file (path[:variant]).")
  p.add_argument("--out", required=True, help="Output .npz (EDM's fid-refs layout: mu, sigma).")
  p.add_argument("--num", type=int, default=50_000, help="Images to use (0 = the whole dataset).")
  p.add_argument("--batch_size", type=int, default=500, help="Images decoded per batch.")
  return p.parse_known_args(argv)


def dataset_of(config):
  """The config's dataset with horizontal flips off (reference images are the real ones)."""
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.random_flip = False
  return data.build(data_config)


def num_examples(dataset) -> int:
  return int(getattr(dataset, "num_examples", 0) or len(dataset.images))


def reference_stats(config, num: int = 50_000, batch_size: int = 500, detector=None,
                    mesh=None) -> fid.FeatureStats:
  """FeatureStats of the first ``num`` images (0 = all; capped at one epoch) of the dataset.

  ``detector``: a :class:`fdistill.eval.statistics.Detector` (default: the Inception of
  ``eval.inception_path``, loaded through ``statistics.inception_detector``). Under
  ``jax.distributed`` a collective: every process returns the merged statistics.
  """
  if detector is None:  # checks eval.inception_path first: fails before the dataset loads
    detector = statistics.inception_detector(config, mesh)
  dataset = dataset_of(config)
  total = num_examples(dataset)
  num = total if num <= 0 else min(num, total)
  if num < 2:
    raise ConfigError(f"ref_stats: need at least 2 images, the dataset has {total}")
  batches = (batch["x"] for batch in dataset.iterator(batch_size))
  steps = -(-num // batch_size)
  cut = (b[:num - i * batch_size] for i, b in enumerate(itertools.islice(batches, steps)))
  stats, _ = statistics.feature_stats(cut, detector)
  if stats.count != num:
    raise RuntimeError(f"ref_stats: read {stats.count} images, expected {num}")
  return stats


def main(argv=None):
  args, overrides = parse_args(argv)
  try:
    start = time.time()
    mesh_lib.maybe_initialize_distributed()  # before any JAX computation
    config = apply_config_flags(load_config_file(args.config), overrides)
    devices = jax.device_count()  # the detector's batch split over all devices of all processes
    mesh = jax.make_mesh((devices,), ("batch",)) if devices > 1 else None
    with peers.watch():  # a dead or hung peer: one FATAL line, as in training
      stats = reference_stats(config, args.num, args.batch_size, mesh=mesh)
      mu, sigma = stats.mean_cov()
      if mesh_lib.is_main_process():
        fid.save_reference(args.out, mu, sigma)
  except USER_ERRORS as e:
    print(f"FATAL: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
  logging.info("ref_stats took %.0f s", time.time() - start)
  print(f"wrote {args.out}: mu {mu.shape}, sigma {sigma.shape} (float64) from {stats.count} "
        f"images of data.name={config.data.name!r}")


if __name__ == "__main__":
  main()

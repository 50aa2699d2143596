"""Throughput of the jitted FID feature extractor (fdistill/eval/fid.py: feature_fn).

What it measures: images/s of resize-to-299 + Inception pool_3 features for
uint8 batches (default 64 images of 32x32, CIFAR-10's size; the cost is
dominated by the 299x299 network, so the input size hardly matters), after one
warm-up call that compiles; the median of ``--rounds`` rounds of ``--iters``
back-to-back calls, each ending when the features are on the host (as the FID
loop consumes them). Weights: the converted ``.npz`` if ``--weights`` or
``$FDISTILL_INCEPTION`` names one, else random weights of the same shapes (the
speed does not depend on the values). Prints one line and writes a JSON record.

  python benchmarks/fid_features.py                      # default device(s), batch 64
  python benchmarks/fid_features.py --mesh               # batch split over all devices
  python benchmarks/fid_features.py --precision default  # allow TF32 on GPUs (not paper-exact)
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax import lax

from fdistill.eval import fid
from fdistill.eval import inception


def _params(path):
  try:
    return inception.load_params(path), "converted"
  except ValueError:
    rng = np.random.default_rng(0)
    shapes = inception.abstract_params()
    def fill(leaf):
      return (rng.standard_normal(leaf.shape) * 0.05).astype(np.float32)
    params = jax.tree_util.tree_map(fill, shapes)
    return jax.tree_util.tree_map(np.asarray, params), "random"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=32, help="input height = width")
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--weights", default=None)
  parser.add_argument("--mesh", action="store_true", help="shard the batch over all devices")
  parser.add_argument("--precision", choices=("highest", "default"), default="highest")
  parser.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "fid_features.json"))
  args = parser.parse_args(argv)

  params, source = _params(args.weights)
  precision = lax.Precision.HIGHEST if args.precision == "highest" else lax.Precision.DEFAULT
  mesh = jax.make_mesh((len(jax.devices()),), ("batch",)) if args.mesh else None
  extract = fid.feature_fn(params, mesh, precision)
  images = np.random.default_rng(1).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)
  start = time.perf_counter()
  extract(images)
  compile_s = time.perf_counter() - start
  rounds = []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for _ in range(args.iters):
      extract(images)
    rounds.append((time.perf_counter() - start) / args.iters)
  per_batch = statistics.median(rounds)
  devices = jax.devices()
  record = {
      "benchmark": "fid_features", "images_per_s": args.batch / per_batch,
      "seconds_per_batch": per_batch, "first_call_s": compile_s, "batch": args.batch,
      "size": args.size, "platform": devices[0].platform,
      "device_kind": devices[0].device_kind, "num_devices": len(devices) if args.mesh else 1,
      "precision": args.precision, "weights": source, "rounds_s": rounds,
      "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  print(f"fid_features: {record['images_per_s']:.1f} images/s (batch {args.batch}, "
        f"{args.size}x{args.size} -> 299, {record['device_kind']} x{record['num_devices']}, "
        f"precision {args.precision}, {source} weights; first call {compile_s:.1f} s)")
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  main()

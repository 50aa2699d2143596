"""One process of tests/test_eval_fid_multiprocess.py: FID statistics of fixed images under
jax.distributed, through the eval job's own path (statistics.feature_stats, fid.feature_fn).

  python tests/support/fid_worker.py OUT.npz PORT PROCESS_ID NUM_PROCESSES

The Inception network is replaced by :func:`stand_in_features` (the real one takes ~0.5 s per
image on a CPU); what runs for real is the slicing, the global arrays over the mesh, the
sharded jit and the merge of the float64 sums over processes. Then again with a wrong split
(every process takes process 0's rows), which the test must catch.
"""
import sys

import jax.numpy as jnp
import numpy as np

DIM = 16            # stand-in feature dimension
CLASSES = 5         # stand-in head
PER_DEVICE = 2      # detector calls of 2 images per device: chunking and tail padding run too


def stand_in_features(params, images, precision=None):
  """uint8 NHWC -> [N, DIM]: a random projection of the pixels and a tanh (nothing Inception)."""
  del precision
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1
  return jnp.tanh(x @ params["projection"])


def params_and_batches():
  """Fixed stand-in weights and 3 global batches of [-1, 1] images (11 + 11 + 5: uneven on purpose,
  so the process slices of a batch differ in length and the last one is short)."""
  rng = np.random.default_rng(0)
  params = {"projection": (rng.standard_normal((4 * 4 * 3, DIM)) / 4).astype(np.float32),
            "output": {"kernel": rng.standard_normal((DIM, CLASSES)).astype(np.float32)}}
  images = rng.uniform(-1, 1, (27, 4, 4, 3)).astype(np.float32)
  return params, [images[:11], images[11:22], images[22:]]


def statistics(mesh, batches=None):
  """(FeatureStats, (IS mean, std)) through statistics.feature_stats with the stand-in detector."""
  from fdistill.eval import inception
  from fdistill.eval import statistics as eval_statistics
  real = inception.features
  # fid.feature_fn looks it up when it builds its jit; restored after, since the test process
  # calls this too and later tests in the same worker need the real network.
  inception.features = stand_in_features
  try:
    params, default = params_and_batches()
    detector = eval_statistics.detector_of(params, mesh, dim=DIM, batch=PER_DEVICE)
    batches = default if batches is None else batches
    return eval_statistics.feature_stats(batches, detector,
                                         score_total=sum(map(len, batches)), num_splits=4)
  finally:
    inception.features = real


def main(out, port, process_id, num_processes):
  import jax
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  from fdistill.eval import fid
  from fdistill.eval import statistics as eval_statistics
  mesh = jax.make_mesh((2, jax.device_count() // 2), ("data", "fsdp"))  # every global device
  stats, score = statistics(mesh)
  # A wrong split, which the test must tell apart: every process takes process 0's rows.
  rows = eval_statistics.process_rows
  eval_statistics.process_rows = lambda x, index, count: rows(x, 0, count)
  wrong, _ = statistics(mesh)
  # Not representable in float32: a gather through float32 would change the sum.
  probe, = fid.sum_over_processes(np.array([1 / 3 + jax.process_index(), 1e-12]))
  np.savez(out, count=stats.count, mu=stats.mean(), sigma=stats.cov(), score=np.asarray(score),
           wrong_count=wrong.count, wrong_mu=wrong.mean(), probe=probe,
           devices=jax.device_count(), local=jax.local_device_count())


if __name__ == "__main__":
  main(*sys.argv[1:])

"""FID statistics under jax.distributed: two CPU processes (2 fake devices each, gloo) equal one.

Each process of tests/support/fid_worker.py extracts (stand-in) features of its
slice of every batch over a 4-device mesh and merges the float64 sums with the
other process; both must end with the statistics and Inception Score that this
process computes alone from all the images, and those must match an independent
NumPy computation. A wrong split (both processes taking process 0's rows) must
not match.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from support import fid_worker
from support import multiprocess as mp
from fdistill.eval import statistics
from fdistill.io import plotting

WORKER = os.path.join(mp.ROOT, "tests", "support", "fid_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def start_pair(out_dir):
  """Two worker processes joined on a fresh port; returns them with their output files."""
  port, procs, outs = free_port(), [], []
  os.makedirs(out_dir, exist_ok=True)
  for i in range(2):
    out = os.path.join(out_dir, f"process_{i}.npz")
    log = open(os.path.join(out_dir, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen([sys.executable, WORKER, out, str(port), str(i), "2"],
                                  cwd=mp.ROOT, env=mp.child_env(2), stdout=log,
                                  stderr=subprocess.STDOUT))
    outs.append(out)
  return procs, outs


def finish_pair(procs, outs, out_dir):
  for proc in procs:
    proc.wait(timeout=120)
  assert all(p.returncode == 0 for p in procs), mp.logs(out_dir)
  return [dict(np.load(o)) for o in outs]


def numpy_reference():
  """count, mu, sigma and the 4-split Inception Score of the stand-in, in float64 NumPy."""
  params, batches = fid_worker.params_and_batches()
  images = np.concatenate(batches)
  u8 = np.clip(np.floor((images.astype(np.float64) + 1) * 127.5 + 0.5), 0, 255)
  x = u8.reshape(len(u8), -1) / 127.5 - 1
  feats = np.tanh(x @ params["projection"].astype(np.float64))
  logits = feats @ params["output"]["kernel"].astype(np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  n, scores = len(probs), []
  for i in range(4):  # StyleGAN3's metrics/inception_score.py
    part = probs[i * n // 4:(i + 1) * n // 4]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return n, feats.mean(0), np.cov(feats, rowvar=False), (np.mean(scores), np.std(scores))


@pytest.mark.parametrize("size", [1, 5, 11])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_process_rows_cover_the_batch_once_in_equal_shapes(size, count):
  x = np.arange(size * 2, dtype=np.float32).reshape(size, 2) + 1
  shares = [statistics.process_rows(x, i, count) for i in range(count)]
  assert len({rows.shape for rows, _, _ in shares}) == 1  # one compiled shape everywhere
  got = np.concatenate([rows[:valid] for rows, _, valid in shares])
  np.testing.assert_array_equal(got, x)
  for rows, offset, valid in shares:
    np.testing.assert_array_equal(rows[:valid], x[offset:offset + valid])
    assert not rows[valid:].any()  # padding rows are zeros


def test_two_processes_equal_one_and_numpy(tmp_path):
  workers = start_pair(str(tmp_path / "workers"))
  # Meanwhile, here: one process, the job's path without a mesh and over 4 of its 8 devices.
  import jax
  single = fid_worker.statistics(None)
  sharded = fid_worker.statistics(jax.make_mesh((2, 2), ("data", "fsdp"),
                                                devices=jax.devices()[:4]))
  n, mu, sigma, score = numpy_reference()
  for stats, got_score in (single, sharded):
    assert stats.count == n
    np.testing.assert_allclose(stats.mean(), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.cov(), sigma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_score, score, rtol=1e-5)

  results = finish_pair(*workers, str(tmp_path / "workers"))
  for r in results:
    assert int(r["devices"]) == 4 and int(r["local"]) == 2
    assert int(r["count"]) == n
    np.testing.assert_allclose(r["mu"], single[0].mean(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r["sigma"], single[0].cov(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r["score"], single[1], rtol=1e-6)
    np.testing.assert_array_equal(r["probe"], np.array([1 / 3, 1e-12]) + [1 + 1 / 3, 1e-12])
  for key in ("mu", "sigma", "score"):  # every process ends with the same bits
    np.testing.assert_array_equal(results[0][key], results[1][key])
    # The wrong split fails the same comparison.
    assert int(r["wrong_count"]) != n
    assert not np.allclose(r["wrong_mu"], single[0].mean(), rtol=1e-3, atol=1e-4)

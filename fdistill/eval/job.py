"""The evaluation job: polls a training workdir's checkpoints and writes metrics.

Resumable: evaluated steps are recorded in ``<workdir>/eval/done.json`` so a
restarted job continues where it stopped. It ends once the final training step
(``train.num_steps``) is evaluated, or after ``eval.timeout_seconds`` without a
new checkpoint (0 = evaluate what exists and stop).
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from fdistill.io import checkpoint
from fdistill.train import loop
from fdistill.registry import lookup


def toy_metrics(config, objective, state, dataset, rng):
  """Exact mode statistics of ``eval.num_samples`` samples against the data GMM."""
  from fdistill.eval import toy_metrics as tm
  samples = sample_in_batches(objective, state, rng, config.eval.num_samples, config.eval.batch_size)
  return {"eval/" + k: v for k, v in tm.mode_statistics(dataset.gmm, samples).items()}


def sample_in_batches(objective, state, rng, num, batch_size):
  """``num`` samples drawn ``batch_size`` at a time (one compiled sampler)."""
  sample = jax.jit(objective.sample, static_argnums=2)
  out = [np.asarray(sample(state, jax.random.fold_in(rng, i), min(batch_size, num)))
         for i in range(-(-num // batch_size))]
  return np.concatenate(out)[:num]


METRICS = {"toy": toy_metrics}


def metric_name(config, dataset):
  return config.eval.get("metric", "toy" if dataset.x_shape == (2,) else "fid")


def evaluate_checkpoint(config, workdir, step, objective=None, dataset=None, mesh=None):
  """Metrics dict for the checkpoint at ``step`` of ``workdir``."""
  if objective is None:
    dataset, objective, mesh, _ = loop.setup(config, mesh)
  state, _ = checkpoint.restore_from(workdir, *loop.state_shardings(objective, mesh, config),
                                     step=step)
  metric_fn = lookup(METRICS, metric_name(config, dataset), "eval.metric")
  return metric_fn(config, objective, state, dataset, jax.random.key(config.seed + 1))


def run(config, workdir):
  """Polls ``workdir`` and evaluates every new checkpoint; returns {step: metrics}."""
  dataset, objective, mesh, _ = loop.setup(config)
  lookup(METRICS, metric_name(config, dataset), "eval.metric")  # fail fast on a bad name
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  done_path = os.path.join(eval_dir, "done.json")
  done = json.load(open(done_path)) if os.path.exists(done_path) else {}
  writer = loop.make_writer(eval_dir)
  last_new = time.time()
  while True:
    steps = checkpoint.saved_steps(workdir)
    todo = [s for s in sorted(steps) if str(s) not in done]
    for step in todo:
      metrics = evaluate_checkpoint(config, workdir, step, objective, dataset, mesh)
      writer.write_scalars(step, metrics)
      done[str(step)] = metrics
      tmp = done_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(done, f, indent=1)
      os.replace(tmp, done_path)
      logging.info("eval step %d: %s", step, metrics)
      last_new = time.time()
    finished = str(config.train.num_steps) in done
    timed_out = time.time() - last_new > config.eval.get("timeout_seconds", 0.0)
    if finished or timed_out:
      writer.flush()
      return {int(k): v for k, v in done.items()}
    time.sleep(config.eval.get("poll_seconds", 60.0))

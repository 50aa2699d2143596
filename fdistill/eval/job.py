"""The evaluation job: polls a training workdir's checkpoints and writes metrics.

It reads only each checkpoint's exported params (the EMA of the sampled
network): no teacher, no optimiser state. Resumable: evaluated steps are
recorded in ``<workdir>/eval/done.json`` so a restarted job continues where it
stopped. It ends once the final training step (``train.num_steps``) is
evaluated, or after ``eval.timeout_seconds`` without a new checkpoint (0 =
evaluate what exists and stop).
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from fdistill import experiment
from fdistill.diffusion import gmm as gmm_lib
from fdistill.io import checkpoint
from fdistill.io import writers
from fdistill.registry import lookup


def sample_in_batches(sampling, params, rng, num, batch_size):
  """``num`` samples drawn ``batch_size`` at a time (one compiled sampler)."""
  out = [np.asarray(sampling.sample(params, jax.random.fold_in(rng, i), min(batch_size, num)))
         for i in range(-(-num // batch_size))]
  return np.concatenate(out)[:num]


def toy_metrics(config, sampling, params, rng):
  """Exact mode statistics of ``eval.num_samples`` samples against the data GMM."""
  from fdistill.eval import toy_metrics as tm
  samples = sample_in_batches(sampling, params, rng, config.eval.num_samples,
                              config.eval.batch_size)
  gmm = gmm_lib.named(config.data.distribution)
  return {"eval/" + k: v for k, v in tm.mode_statistics(gmm, samples).items()}


METRICS = {"toy": toy_metrics}


def metric_name(config):
  return config.eval.metric or ("toy" if config.data.name == "toy2d" else "fid")


def evaluate_checkpoint(config, workdir, step, sampling=None):
  """Metrics dict for the checkpoint at ``step`` of ``workdir``."""
  if sampling is None:
    sampling = experiment.build_sampler(config, experiment.task_of_run(workdir)[1])
  params, _ = experiment.restore_export(sampling, workdir, step)
  metric_fn = lookup(METRICS, metric_name(config), "eval.metric")
  return metric_fn(config, sampling, params, jax.random.key(config.seed + 1))


def _write_json(path, value):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def run(config, workdir):
  """Polls ``workdir`` and evaluates every new checkpoint; returns {step: metrics}."""
  lookup(METRICS, metric_name(config), "eval.metric")  # fail fast on a bad name
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  done_path = os.path.join(eval_dir, "done.json")
  done = json.load(open(done_path)) if os.path.exists(done_path) else {}
  writer = writers.make_writer(eval_dir, resume_step=max(map(int, done), default=0))
  sampling = None  # built at the first checkpoint, whose metadata gives the data shape
  last_new = time.time()
  while True:
    todo = [s for s in sorted(checkpoint.saved_steps(workdir)) if str(s) not in done]
    for step in todo:
      try:
        if sampling is None:
          sampling = experiment.build_sampler(config, experiment.task_of_run(workdir)[1])
        metrics = evaluate_checkpoint(config, workdir, step, sampling)
      except Exception:  # pylint: disable=broad-except
        if step in checkpoint.saved_steps(workdir):
          raise
        # The trainer's keep-last-N deleted it while we read it: nothing to evaluate.
        logging.warning("eval: checkpoint %d of %s was deleted while being read; skipped",
                        step, workdir)
        continue
      writer.write_scalars(step, metrics)
      done[str(step)] = metrics
      _write_json(done_path, done)
      logging.info("eval step %d: %s", step, metrics)
      last_new = time.time()
    finished = str(config.train.num_steps) in done
    timed_out = time.time() - last_new > config.eval.timeout_seconds
    if finished or timed_out:
      writer.flush()
      return {int(k): v for k, v in done.items()}
    time.sleep(config.eval.poll_seconds)

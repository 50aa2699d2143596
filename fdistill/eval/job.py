"""The evaluation job: polls a training workdir's checkpoints and writes metrics.

It reads only each checkpoint's exported params (the EMA of the sampled
network): no teacher, no optimiser state. Resumable: evaluated steps and their
metrics are recorded in ``<workdir>/eval/done.json`` so a restarted job
continues where it stopped; a step counts as done for a metric when its record
holds that metric's number, so switching ``eval.metric`` evaluates the old
checkpoints again rather than skipping them. It ends once the final training
step (``train.num_steps``) is evaluated, or after ``eval.timeout_seconds``
without a new checkpoint (0 = evaluate what exists and stop).
``eval.step=N`` evaluates checkpoint N only (once: a recorded step is returned
as recorded) and returns.

What is measured: :mod:`fdistill.eval.metrics` (the registry, ``eval.metric``),
through :mod:`fdistill.eval.statistics` (the detector and feature statistics).

``eval/best.json`` points at the best step so far (lowest FID / digits_fd,
highest toy weight recall): ``{"metric", "step", "value", "lower_is_better"}``.
It is recomputed from ``done.json`` after every step and written atomically,
so it needs no state of its own to survive a restart.

Several hosts (``jax.distributed``): every process runs the job; each extracts
the Inception features of its slice of every sample batch on its devices, the
float64 statistics (and Inception Score sums) are merged over processes, and
process 0 picks the checkpoints and alone writes files.
"""
import json
import math
import os
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fdistill import errors, experiment
from fdistill.eval import metrics as metrics_lib
from fdistill.io import checkpoint
from fdistill.io import console
from fdistill.io import writers
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import peers
from fdistill.errors import ConfigError


def evaluate_checkpoint(config, workdir, step, evaluator=None):
  """Metrics dict for the checkpoint at ``step`` of ``workdir``.

  ``evaluator``: a :class:`fdistill.eval.metrics.Evaluator` (the job passes its own, prepared
  once), a bare sampler, or None to build one.
  """
  if not isinstance(evaluator, metrics_lib.Evaluator):
    evaluator = metrics_lib.make_evaluator(config, workdir, evaluator)
  params, _ = experiment.restore_export(evaluator.sampling, workdir, step)
  return evaluator.compute(params, jax.random.key(config.seed + 1))


def _write_json(path, value):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def eval_setting(config, metric: metrics_lib.Metric) -> str:
  """Everything besides the checkpoint that changes an evaluation's numbers, as one string:
  a record made with another setting is never served for this one."""
  times = config.objective.sampler_times if "sampler_times" in config.objective else None
  return (f"{metric.key}|sampler_steps={config.eval.sampler_steps}|num_samples="
          f"{config.eval.num_samples}|sampler_times={None if times is None else list(times)}"
          f"|seed={config.seed}")


def best_of(done, metric: metrics_lib.Metric, setting: Optional[str] = None) -> Optional[dict]:
  """The best recorded step for ``metric`` (finite values only; the earliest on ties), among
  the records of ``setting`` (None: all)."""
  scored = [(float(rec[metric.key]), int(step)) for step, rec in done.items()
            if rec.get(metric.key) is not None and math.isfinite(float(rec[metric.key]))
            and (setting is None or rec.get("setting") == setting)]
  if not scored:
    return None
  sign = 1.0 if metric.lower_is_better else -1.0
  value, step = min(scored, key=lambda vs: (sign * vs[0], vs[1]))
  return {"metric": metric.key, "step": step, "value": value,
          "lower_is_better": metric.lower_is_better}


def _metrics_only(record):
  return {k: v for k, v in record.items() if k != "setting"}


def _update_best(eval_dir, done, metric, setting=None):
  best = best_of(done, metric, setting)
  path = os.path.join(eval_dir, "best.json")
  if best is not None:
    current = None
    if os.path.exists(path):
      with open(path) as f:
        current = json.load(f)
    if current != best:
      _write_json(path, best)
  return best


# What process 0 tells every process to do next, besides evaluating a step (>= 0).
_WAIT, _STOP = -1, -2


def agreed(value: int) -> int:
  """Process 0's ``value`` on every process.

  Why: each evaluation is a collective (sampling, the sharded detector, merging the
  statistics), so all processes must evaluate the same checkpoints in the same
  order; a checkpoint listing or a clock read on each process could disagree.
  """
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def wait_for_run(workdir, timeout_seconds, poll_seconds):
  """Returns once ``workdir`` holds a run (its ``config.json``); a trainer started beside the
  job may write it a while after the job starts. A ValueError if none appears within
  ``timeout_seconds``: a mistyped workdir is an error, and nothing is created under it."""
  path = os.path.join(workdir, "config.json")
  deadline = time.time() + timeout_seconds
  while not os.path.exists(path):
    if time.time() >= deadline:
      raise ConfigError(f"--workdir={workdir!r} holds no run (no config.json"
                        + (f" after {timeout_seconds:g} s, eval.timeout_seconds" if timeout_seconds
                          else "") + "); give the workdir of a training run")
    time.sleep(min(poll_seconds, max(deadline - time.time(), 0)))


def run(config, workdir, mesh=None, settings=None):
  """Polls ``workdir`` and evaluates every new checkpoint; returns {step: metrics}.

  ``mesh`` / ``settings``: the device mesh and objective settings of ``experiment.validate``'s
  plan (None: made from ``config``).

  With ``eval.step >= 0``: evaluates that checkpoint only and returns {step: metrics}.
  Under ``jax.distributed`` every process runs this (each samples and extracts its
  slice); process 0 decides what to evaluate and alone writes the metrics,
  ``done.json`` and ``best.json``. A dead or hung peer ends this process with one FATAL
  line, as in training (:mod:`fdistill.parallel.peers`).
  """
  with peers.watch():
    return _run(config, workdir, mesh, settings)


def _run(config, workdir, mesh, settings):
  metric = metrics_lib.metric_of(config)  # fail fast on a bad name, a missing file or field
  if metric.check is not None:
    metric.check(config)
  only = int(config.eval.step)
  wait_for_run(workdir, config.eval.timeout_seconds, config.eval.poll_seconds)
  if only >= 0:  # checked before eval/ exists: a wrong step writes nothing
    saved = sorted(checkpoint.saved_steps(workdir))
    if only not in saved:
      raise ConfigError(f"eval.step={only}: {workdir} has no checkpoint {only} "
                        f"(saved: {saved or 'none'})")
  main = mesh_lib.is_main_process()
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  done_path = os.path.join(eval_dir, "done.json")
  done = json.load(open(done_path)) if os.path.exists(done_path) else {}
  setting = eval_setting(config, metric)
  if main:  # catches up after a stop between the two writes
    _update_best(eval_dir, done, metric, setting)

  def is_done(step):
    record = done.get(str(step), {})
    return metric.key in record and record.get("setting") == setting

  if only >= 0 and is_done(only):
    logging.info("eval: step %d already evaluated (%s); nothing to do", only, done_path)
    return {only: _metrics_only(done[str(only)])}
  writer = writers.make_writer(eval_dir, resume_step=max(map(int, done), default=0))
  console.say(f"eval {metric.key} of {workdir}: " + (
      f"checkpoint {only}" if only >= 0 else
      f"every new checkpoint until step {config.train.num_steps} (poll "
      f"{config.eval.poll_seconds:g} s, timeout {config.eval.timeout_seconds:g} s)")
      + f", {config.eval.num_samples} samples, {config.eval.sampler_steps} sampler steps")
  evaluated = 0
  evaluator = None  # built at the first checkpoint, whose metadata gives the data shape
  last_new = time.time()
  skipped = set()  # steps whose export is corrupt or half-deleted

  def next_step() -> int:
    if only >= 0:
      return _STOP if is_done(only) else only
    todo = [s for s in sorted(checkpoint.saved_steps(workdir))
            if not is_done(s) and s not in skipped]
    if todo:
      return todo[0]
    finished = is_done(config.train.num_steps)
    timed_out = time.time() - last_new > config.eval.timeout_seconds
    return _STOP if finished or timed_out else _WAIT

  while True:
    step = agreed(next_step())
    if step == _STOP:
      writer.flush()
      best = best_of(done, metric, setting)
      console.say(f"eval done: {evaluated} checkpoint(s) evaluated, results in {done_path}"
                  + (f"; best {metric.key}={best['value']:.5g} at step {best['step']}"
                     if best else ""))
      if only >= 0:
        return {only: _metrics_only(done[str(only)])}
      return {int(k): _metrics_only(v) for k, v in done.items() if v.get("setting") == setting}
    if step == _WAIT:
      time.sleep(config.eval.poll_seconds)
      continue
    try:
      if evaluator is None:
        evaluator = metrics_lib.make_evaluator(config, workdir, mesh=mesh, settings=settings)
      start = time.time()
      metrics = evaluate_checkpoint(config, workdir, step, evaluator)
    except errors.CorruptCheckpointError as e:
      if only >= 0:
        raise
      # Half-deleted under us by the trainer's keep-last-N, or damaged: never scored.
      logging.warning("eval: skipped step %d: %s", step, e)
      skipped.add(step)
      continue
    except Exception:  # pylint: disable=broad-except
      if only >= 0 or step in checkpoint.saved_steps(workdir):
        raise
      # The trainer's keep-last-N deleted it while we read it: nothing to evaluate.
      logging.warning("eval: checkpoint %d of %s was deleted while being read; skipped",
                      step, workdir)
      continue
    writer.write_scalars(step, metrics)
    previous = done.get(str(step))
    if main and previous is not None and previous.get("setting") != setting:
      with open(os.path.join(eval_dir, "replaced.jsonl"), "a") as f:  # kept, not lost
        f.write(json.dumps(dict(previous, step=step)) + "\n")
    done[str(step)] = dict(metrics, setting=setting)
    if main:
      _write_json(done_path, done)
      _update_best(eval_dir, done, metric, setting)
    evaluated += 1
    shown = ", ".join(f"{k.split('/', 1)[-1]}={float(v):.5g}" for k, v in metrics.items())
    console.say(f"eval step {step} ({time.time() - start:.1f} s): {shown}")
    last_new = time.time()

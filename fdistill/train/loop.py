"""The training loop shared by every objective (teacher training and distillation).

Reads top to bottom: the assembly (``fdistill.experiment.build``), the state
(restored or created sharded), then the loop with its periodic actions
(metrics, samples, checkpoints) and preemption handling (SIGTERM / maintenance
event: save, then return). Which kind of step runs is decided on the host
(``Experiment.schedule``); each kind is one jitted program.
"""
import collections
import json
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from fdistill import errors, experiment
from fdistill import sampling
from fdistill.io import checkpoint
from fdistill.io import console as console_lib
from fdistill.io import writers
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import peers
from fdistill.parallel import preemption


# The trained networks' parameters (clu's table: path, shape, dtype, size, sharding; the total),
# written at every start of a run beside config.json.
PARAMETERS = "parameters.txt"


class MetricMeans:
  """Per kind of step, the metrics of the steps since the last record; their means on flush.

  Values stay on the device until :meth:`flush` (one transfer per record), so
  a record holds only values of the steps it covers: a critic-only interval
  carries no generator value.
  """

  def __init__(self):
    self._values = collections.defaultdict(list)

  def add(self, kind, metrics):
    self._values[kind].append(metrics)

  def flush(self, single_kind: bool):
    """``{"train/<kind>/<name>": mean}`` (``train/<name>`` for single-kind objectives)."""
    out = {}
    for kind, rows in jax.device_get(dict(self._values)).items():
      prefix = "train/" if single_kind else f"train/{kind}/"
      for name in rows[0]:
        out[prefix + name] = float(np.mean([row[name] for row in rows]))
      out[prefix + "steps"] = len(rows)
    self._values.clear()
    return out


def init_or_restore(exp: experiment.Experiment, ckpt: checkpoint.Checkpointer, rng):
  """Restores the newest intact checkpoint (corrupt ones are moved aside), else initialises
  the state directly sharded (the generator from ``generator.init_workdir`` when set)."""
  restored = ckpt.restore_intact(checkpoint.with_shardings(exp.abstract_state,
                                                           exp.state_shardings))
  if restored is not None:
    logging.info("Restored step %d from %s", restored[1]["step"], ckpt.manager.directory)
    return restored[0]
  return experiment.start_generator_from_run(exp, exp.init(rng, exp.teacher))


def skip_counts(state, step, last_skipped):
  """(skipped, in a row) from the state (one host sync); warns if updates were skipped since
  the last check."""
  skipped, consecutive = (int(x) for x in jax.device_get((state["skipped"],
                                                          state["consecutive_skips"])))
  if skipped > last_skipped:
    logging.warning("%d non-finite updates skipped up to step %d (%d in a row)",
                    skipped - last_skipped, step, consecutive)
  return skipped, consecutive


def stop_if_runaway(consecutive, step, max_consecutive):
  """Stops a run whose last ``max_consecutive`` updates were all skipped (before any save)."""
  if consecutive >= max_consecutive:
    raise errors.NonFiniteRunError(
        f"the last {consecutive} updates (to step {step}) were non-finite and skipped "
        f"(train.max_consecutive_skips={max_consecutive}); nothing was saved after the last "
        "good checkpoint. Likely causes: optim.lr too high, noise levels out of range "
        "(objective sigma_min / sigma_max / p_mean / p_std), or model.dtype")


def save(ckpt, exp, step, state, force=False):
  return ckpt.save(step, state, exp.export(state), meta=experiment.run_meta(exp), force=force)


def train(config, workdir: str, mesh=None, teacher_pin=None, settings=None):
  """Runs ``config.train.num_steps`` steps of ``config.objective``; resumes from ``workdir``.

  Returns (state, experiment, the last logged record). Nothing is written before
  the experiment is built (config checked, teacher and data found); SIGTERM and
  Ctrl-C save after the step in flight (a second Ctrl-C aborts at once).
  ``teacher_pin``: the teacher checkpoint record of :func:`experiment.pin_teacher`,
  written beside ``config.json``. In a multi-process run a dead or hung peer ends this
  process with one FATAL line (:mod:`fdistill.parallel.peers`).
  """
  with peers.watch():
    return _train(config, workdir, mesh, teacher_pin, settings)


def _train(config, workdir, mesh, teacher_pin, settings):
  exp = experiment.build(config, mesh, settings=settings)
  tc = config.train
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.keep_checkpoints, writer=True)
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
  state = init_or_restore(exp, ckpt, init_rng)
  parameter_table, num_parameters = console_lib.parameter_overview(state)
  if mesh_lib.is_main_process():  # after the restore: a checkpoint of another model stops first
    checkpoint.save_config(workdir, config)
    checkpoint.write_text(os.path.join(workdir, PARAMETERS), parameter_table + "\n")
    if teacher_pin is not None:
      checkpoint.write_text(os.path.join(workdir, experiment.TEACHER_PIN),
                            json.dumps(teacher_pin, indent=1))
  start = int(jax.device_get(state["step"]))
  skipped = int(jax.device_get(state["skipped"]))

  writer = writers.make_writer(workdir, resume_step=start)
  writer.write_text(start, "config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  last_log = (time.monotonic(), start)
  console = console_lib.Console(tc.num_steps, start)
  console.line(f"fdistill {config.objective.name}: workdir {workdir}, {jax.device_count()} "
               f"{jax.devices()[0].platform} devices (mesh {dict(exp.mesh.shape)}), "
               + (f"resumed from step {start}" if start else "from scratch")
               + f", {tc.num_steps} steps, {num_parameters:,} parameters")
  batches = exp.batches(tc.batch_size, start)
  means, record = MetricMeans(), {}

  # Only logging steps sync with the host. A preemption notice saves after the
  # step in flight and leaves; a restart resumes from there.
  with preemption.PreemptionWatch((signal.SIGTERM, signal.SIGINT)) as watch:
    for step in range(start, tc.num_steps):
      kind = exp.schedule(step)
      state, metrics = exp.steps[kind](state, exp.teacher, next(batches),
                                       jax.random.fold_in(train_rng, step))
      means.add(kind, metrics)
      done = step + 1
      log = done % tc.log_every == 0 or done == tc.num_steps
      periodic_save = done % tc.save_every == 0 or done == tc.num_steps
      preempted = watch.reached(done)
      if log or periodic_save or preempted:
        skipped, consecutive = skip_counts(state, done, skipped)
      if log:
        record = dict(means.flush(len(exp.steps) == 1), **{"train/skipped": skipped})
        writer.write_scalars(done, record)
        now = time.monotonic()
        writer.write_tensorboard(done, {
            "run/learning_rate": learning_rate(config.optim, done),
            "run/steps_per_second": (done - last_log[1]) / max(now - last_log[0], 1e-9)})
        last_log = (now, done)
      console.progress(done, record if log else None, force=done == tc.num_steps)
      if log or periodic_save or preempted:
        stop_if_runaway(consecutive, done, tc.max_consecutive_skips)
      if preempted:
        save(ckpt, exp, done, state, force=True)
        console.line(f"Preempted: saved step {done} to {ckpt.manager.directory}; exiting")
        logging.warning("Preempted: saved step %d to %s; exiting", done, ckpt.manager.directory)
        break
      if periodic_save:
        save(ckpt, exp, done, state)
        console.line(f"saved checkpoint {done} in {ckpt.manager.directory}")
      if tc.sample_every and done % tc.sample_every == 0:
        png_path = sampling.samples_path(workdir, done, config.eval.sampler_steps)
        sampling.write_samples(exp.sampler, exp.export(state), jax.random.fold_in(sample_rng, done),
                               config, png_path)
        if os.path.exists(png_path):  # process 0 wrote it
          png = open(png_path, "rb").read()
          writer.write_png(done, "samples", png, *writers.png_size(png))
  if tc.num_steps == 0 and start == 0:  # the initialisation: the baseline the eval job scores
    save(ckpt, exp, 0, state)
    console.line(f"saved checkpoint 0 (the initialisation) in {ckpt.manager.directory}")
  ckpt.close()
  writer.flush()
  elapsed = time.monotonic() - console.started
  console.line(f"done: step {int(jax.device_get(state['step']))} in {elapsed:.0f} s; "
               f"{console_lib.summary_values(record, limit=8)}".rstrip("; "))
  return state, exp, record


def learning_rate(optim_config, step: int) -> float:
  """The generator's learning rate at ``step`` (``state.make_optimizer``'s linear warm-up)."""
  warmup = int(optim_config.warmup_steps)
  return float(optim_config.lr) * (min(1.0, step / warmup) if warmup > 0 else 1.0)


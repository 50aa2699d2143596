"""The run modes as importable functions (main.py, the demo, tests and notebooks call them)."""
import os

from absl import logging

MODES = ("train_teacher", "distill", "eval", "sample")


def check_mode(mode, config):
  """Teacher training trains by DSM; distillation needs a distillation objective."""
  is_dsm = config.objective.name == "dsm"
  if mode == "train_teacher" and not is_dsm:
    raise ValueError(f"--mode=train_teacher needs objective.name='dsm', got "
                     f"{config.objective.name!r}; use --mode=distill")
  if mode == "distill" and is_dsm:
    raise ValueError("--mode=distill needs a distillation objective (objective.name), got 'dsm'; "
                     "use --mode=train_teacher")


def sample(config, workdir, num=0):
  """Samples the latest checkpoint's exported network into ``samples_step<N>.png`` (+ .npy).

  Needs only the run's own checkpoint (no data set, no teacher).
  """
  import jax
  import numpy as np
  from fdistill import experiment
  from fdistill.train import loop
  _, task = experiment.task_of_run(workdir)
  sampling = experiment.build_sampler(config, task)
  params, step = experiment.restore_export(sampling, workdir)
  path = os.path.join(workdir, f"samples_step{step}.png")
  samples = loop.write_samples(sampling, params, jax.random.key(config.seed + 2), config, path,
                               num=num or None)
  np.save(path.replace(".png", ".npy"), samples)
  logging.info("Wrote %s", path)
  return path


def run(config, workdir, mode, num_samples=0):
  """Runs one mode; importable (tests and notebooks call it)."""
  from fdistill.eval import job
  from fdistill.train import loop
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; valid values: {', '.join(MODES)}")
  if mode in ("train_teacher", "distill"):
    check_mode(mode, config)
    return loop.train(config, workdir)
  if mode == "eval":
    return job.run(config, workdir)
  return sample(config, workdir, num_samples)

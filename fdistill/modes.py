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
  """Restores the latest checkpoint and writes ``samples.png`` (+ samples.npy)."""
  import jax
  import numpy as np
  from fdistill.io import checkpoint
  from fdistill.train import loop
  dataset, objective, mesh, _ = loop.setup(config)
  state, meta = checkpoint.restore_from(workdir, *loop.state_shardings(objective, mesh, config))
  path = os.path.join(workdir, f"samples_step{meta['step']}.png")
  samples = loop.write_samples(objective, state, jax.random.key(config.seed + 2), config, path,
                               dataset, num=num or None)
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

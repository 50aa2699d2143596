"""A run as a Python object: ``fdistill.load(workdir)``, then ``.sample(num)``.

    import fdistill
    run = fdistill.load("runs/demo/teacher")   # a train_teacher or distill workdir
    x = run.sample(2000)                       # numpy [2000, *x_shape], data scale
    x2 = run.sample(16, num_steps=2, seed=1)   # another sampler step count (rCM, Heun)

What is loaded is what ``--mode=sample`` reads: the run's own ``config.json`` and the
exported network (the EMA params that sample) of its newest intact checkpoint; no teacher
and no data set are needed. A corrupt newest export is skipped with a warning and the one
before it is used, as the polling eval job does.
"""
import dataclasses
import os
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdistill import errors
from fdistill import experiment
from fdistill import objectives
from fdistill.io import checkpoint


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained network ready to sample: the run's config, its params and their step."""
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  params: Any
  task: objectives.Task
  samplers: dict = dataclasses.field(default_factory=dict, repr=False)  # by step count

  def sample(self, num: int, seed: int = 0, num_steps: Optional[int] = None,
             labels=None) -> np.ndarray:
    """``num`` samples as a numpy array [num, *x_shape] (images in [-1, 1], NHWC).

    ``num_steps``: the sampler's step count (teacher: Heun steps; rCM/sCM students: 1-4;
    None = the run's ``eval.sampler_steps``). ``labels``: class indices of a conditional
    run (default: 0, 1, 2, ... cycling over the classes, as the sample grids).
    """
    steps = int(self.config.eval.sampler_steps if num_steps is None else num_steps)
    if steps not in self.samplers:
      config = self.config.copy_and_resolve_references()
      config.eval.sampler_steps = steps
      self.samplers[steps] = experiment.build_sampler(config, self.task)
    sampling = self.samplers[steps]
    cond = None
    if self.task.cond_dim:
      labels = np.arange(num) % self.task.cond_dim if labels is None else np.asarray(labels)
      cond = jax.nn.one_hot(jnp.asarray(labels), self.task.cond_dim)
    out = sampling.sample(self.params, jax.random.key(seed), num, cond)
    return np.asarray(jax.device_get(out))


def load(workdir: str, step: Optional[int] = None) -> Run:
  """The network of ``workdir``'s newest intact checkpoint (or of ``step``), ready to sample.

  Errors: :class:`fdistill.errors.ConfigError` (a ValueError) when ``workdir`` holds no run or
  no checkpoint, or not ``step``;
  :class:`fdistill.errors.CorruptCheckpointError` when no export (or ``step``'s) is intact.
  """
  config = checkpoint.load_config(workdir) if _is_run(workdir) else None
  steps = sorted(checkpoint.saved_steps(workdir), reverse=True) if config else []
  if not steps:
    raise errors.ConfigError(f"load({workdir!r}): not a run with a checkpoint (config.json "
                             "and checkpoints/<step>); train one with fdistill.main "
                             "--mode=train_teacher or --mode=distill")
  if step is not None and step not in steps:
    raise errors.ConfigError(f"load({workdir!r}, step={step}): no such checkpoint; saved: "
                             f"{sorted(steps)}")
  problems = []
  for candidate in [step] if step is not None else steps:
    try:
      return _restore(workdir, config, candidate)
    except errors.CorruptCheckpointError as e:
      problems.append(str(e))
      if step is None:
        warnings.warn(f"{e}; trying the checkpoint before it")
  raise errors.CorruptCheckpointError("; ".join(problems))


def _is_run(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "config.json"))


def _restore(workdir: str, config, step: int) -> Run:
  """The Run of checkpoint ``step``; CorruptCheckpointError when its metadata or export is bad."""
  try:
    meta = checkpoint.latest_meta(workdir, step)
  except (KeyError, ValueError, OSError) as e:
    raise errors.CorruptCheckpointError(f"checkpoint {step} of {workdir}: unreadable metadata "
                                        f"({type(e).__name__})") from None
  task = objectives.Task(tuple(meta["x_shape"]), int(meta["cond_dim"]))
  params, found = experiment.restore_export(experiment.build_sampler(config, task), workdir, step)
  return Run(workdir, config, int(found), params, task)

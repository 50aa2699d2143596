"""Where the frozen teacher comes from (``config.teacher.kind``); params only.

  none        no teacher (teacher training itself);
  analytic    the exact noised GMM of ``config.data.distribution`` (toy data);
  checkpoint  the EMA denoiser of a ``--mode=train_teacher`` run in ``config.teacher.workdir``;
  edm_pickle  a published NVlabs/edm network pickle at ``config.teacher.path`` (local; no torch).

:func:`spec` returns a :class:`Teacher`: the apply function, the params' shapes
(so objectives are built without the values) and a loader that reads the
params straight into the run's target shardings: no replicated copy, no host
round trip, no optimiser state.
"""
import dataclasses
from typing import Any, Callable, Optional

import jax

from fdistill import models
from fdistill.diffusion import gmm as gmm_lib
from fdistill.io import checkpoint
from fdistill.parallel import partition
from fdistill.registry import lookup
from fdistill.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Teacher:
  """apply(params, x, sigma, cond) -> D; abstract: ShapeDtypeStructs of the params;
  load(shardings) -> params placed on ``shardings`` (a pytree like ``abstract``)."""
  apply: Callable
  abstract: Any
  load: Callable


def _none(config, x_shape, cond_dim):
  return None


def _analytic(config, x_shape, cond_dim):
  gmm = gmm_lib.named(config.data.distribution)
  return Teacher(gmm_lib.as_apply_fn(), jax.eval_shape(lambda: gmm),
                 lambda shardings: partition.place(gmm, shardings))


def _checkpoint(config, x_shape, cond_dim):
  """The EMA denoiser exported by a ``train_teacher`` run (its ``export`` checkpoint item)."""
  workdir = config.teacher.workdir
  if not workdir:
    raise ConfigError("teacher.kind='checkpoint' needs teacher.workdir (a train_teacher workdir)")
  teacher_config = checkpoint.load_config(workdir)
  if teacher_config.objective.name != "dsm":
    raise ConfigError(f"teacher.workdir={workdir!r} holds a {teacher_config.objective.name!r} run; "
                      "a teacher is a --mode=train_teacher (objective.name='dsm') run")
  module = models.build(teacher_config.model)
  apply_fn = models.make_denoiser(module, teacher_config.model.sigma_data)
  abstract = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0),
                                                       (1,) + tuple(x_shape), cond_dim))
  step = config.teacher.step  # -1 (the config default): the latest checkpoint

  def load(shardings):
    params, _ = checkpoint.restore_export_from(workdir, abstract, shardings,
                                               step=None if step < 0 else step)
    return params

  return Teacher(apply_fn, abstract, load)


def _edm_pickle(config, x_shape, cond_dim):
  """An EDM ``.pkl`` (e.g. edm-cifar10-32x32-cond-vp.pkl): architecture and weights from the file.

  Compute settings (dtype, attn_impl, remat, remat_policy) come from ``config.model`` when it
  names the same network; everything else comes from the pickle.
  """
  from fdistill.teachers import edm_pickle
  path = config.teacher.path
  if not path:
    raise ConfigError("teacher.kind='edm_pickle' needs teacher.path (a local EDM .pkl)")
  teacher = edm_pickle.load(path)
  model_config = teacher.model_config
  if config.model.name == model_config.name:
    for field in ("dtype", "attn_impl", "remat", "remat_policy"):
      if field in config.model:
        model_config[field] = config.model[field]
  apply_fn = models.make_denoiser(models.build(model_config), model_config.sigma_data)
  params = teacher.params
  return Teacher(apply_fn, jax.eval_shape(lambda: params),
                 lambda shardings: partition.place(params, shardings))


# The kinds whose params are a denoiser network (a student of its architecture starts from them).
NETWORK_KINDS = ("checkpoint", "edm_pickle")
TEACHERS = {"none": _none, "analytic": _analytic, "checkpoint": _checkpoint,
            "edm_pickle": _edm_pickle}


def spec(config, x_shape, cond_dim=0) -> Optional[Teacher]:
  """The teacher ``config.teacher`` names, for data of per-example ``x_shape``; None for 'none'."""
  return lookup(TEACHERS, config.teacher.kind, "teacher.kind")(config, tuple(x_shape), cond_dim)

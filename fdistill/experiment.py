"""The assembly: config + mesh -> dataset, teacher params, objective, shardings, jitted steps.

The training loop, the eval job, ``--mode=sample``, the tests and every
benchmark take their programs from here, so a test or a benchmark never
measures a program the trainer does not run. Two entry points:

* :func:`build` (training): the dataset, the teacher (params only, restored
  straight into the state's shardings), the objective, the state shardings and
  one jitted function per kind of step, each ``(state, teacher, batch, rng) ->
  (state, metrics)`` with the state donated.
* :func:`build_sampler` (sampling and evaluation): the sampled network's
  params from a run's checkpoints (its ``export`` item) and a jitted sampler;
  no dataset, no teacher, no optimiser state.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax

from fdistill import data, objectives, teachers
from fdistill.io import checkpoint
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import partition


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a training run needs, built once.

  init(rng, teacher) -> state     jitted, state created directly in its shardings
  steps: {name: step}             jitted ``(state, teacher, batch, rng) -> (state, metrics)``
  schedule(step) -> name          the kind of step to run at ``step`` (host side)
  export(state) -> params         the sampled network's params (for checkpoints)
  """
  config: Any
  mesh: jax.sharding.Mesh
  dataset: Any
  task: objectives.Task
  objective: objectives.Objective
  teacher: Any                          # teacher params on the mesh, or None
  teacher_shardings: Any                # their shardings (the state's rules)
  abstract_state: Any
  state_shardings: Any
  init: Callable
  steps: Dict[str, Callable]
  schedule: Callable[[int], str]
  sampler: "Sampling"

  def export(self, state):
    return self.objective.export(state)

  def global_batch(self, local_batch):
    return mesh_lib.global_batch(local_batch, self.mesh)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """A jitted sampler of a run's exported params.

  sample(params, rng, num, cond) -> samples, replicated so every process can read them.
  """
  mesh: jax.sharding.Mesh
  task: objectives.Task
  abstract_params: Any
  param_shardings: Any
  sample: Callable


def make_mesh(config, mesh=None):
  return mesh_lib.make_mesh(config.mesh) if mesh is None else mesh


def shardings_of(tree, mesh):
  """The shardings of a placed pytree (replicated for None, which jit needs a prefix for)."""
  if tree is None:
    return mesh_lib.replicated(mesh)
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def _sampler(config, mesh, task) -> Sampling:
  spec = objectives.sampler(config, task)
  abstract = jax.eval_shape(spec.init_params, jax.random.key(0))
  shardings = partition.config_shardings(abstract, mesh, config.mesh)
  sample = jax.jit(spec.sample, static_argnums=2, out_shardings=mesh_lib.replicated(mesh))
  return Sampling(mesh, task, abstract, shardings, sample)


def build(config, mesh=None, *, teacher_params: bool = True, dataset=None,
          teacher=None) -> Experiment:
  """The training experiment of ``config`` on ``mesh`` (default: ``config.mesh`` over all devices).

  ``teacher_params=False`` builds everything but reads no teacher weights
  (``Experiment.teacher`` is then None): for compiling, memory analysis and tests.
  ``dataset`` / ``teacher`` (a :class:`fdistill.teachers.Teacher`) replace the ones
  the config names, e.g. shape-only stand-ins for benchmarks of models without data.
  """
  mesh = make_mesh(config, mesh)
  mesh_lib.check_batch_size(config.train.batch_size, mesh)
  dataset = data.build(config.data) if dataset is None else dataset
  if teacher is None:
    teacher = teachers.spec(config, dataset.x_shape, dataset.cond_dim)
  task = objectives.Task(tuple(dataset.x_shape), dataset.cond_dim,
                         teacher.apply if teacher else None, teacher.abstract if teacher else None)
  objective = objectives.build(config, task)

  teacher_shardings = mesh_lib.replicated(mesh)
  placed = None
  if teacher is not None:
    teacher_shardings = partition.config_shardings(teacher.abstract, mesh, config.mesh)
    if teacher_params:
      placed = teacher.load(teacher_shardings)
  abstract = jax.eval_shape(objective.init, jax.random.key(0), teacher.abstract if teacher else None)
  state_sh = partition.config_shardings(abstract, mesh, config.mesh)
  repl = mesh_lib.replicated(mesh)
  init = jax.jit(objective.init, in_shardings=(repl, teacher_shardings), out_shardings=state_sh)
  steps = {name: jax.jit(fn, in_shardings=(state_sh, teacher_shardings,
                                           mesh_lib.batch_sharding(mesh), repl),
                         out_shardings=(state_sh, repl), donate_argnums=0)
           for name, fn in objective.steps.items()}
  return Experiment(config, mesh, dataset, task, objective, placed, teacher_shardings, abstract,
                    state_sh, init, steps, objective.schedule, _sampler(config, mesh, task))


def task_of_run(workdir: str) -> Tuple[Any, objectives.Task]:
  """(config, Task) of a run from its ``config.json`` and checkpoint metadata (no data, no
  teacher): the per-example shape and class count are recorded in every checkpoint."""
  config = checkpoint.load_config(workdir)
  meta = checkpoint.latest_meta(workdir)
  return config, objectives.Task(tuple(meta["x_shape"]), int(meta["cond_dim"]))


def build_sampler(config, task: objectives.Task, mesh=None) -> Sampling:
  """The sampler of a run of ``config`` (its exported network); needs no teacher."""
  return _sampler(config, make_mesh(config, mesh), task)


def restore_export(sampler: Sampling, workdir: str, step: Optional[int] = None):
  """(params, step): the exported params of ``workdir``'s checkpoint (None = latest)."""
  return checkpoint.restore_export_from(workdir, sampler.abstract_params,
                                        sampler.param_shardings, step)


def run_meta(experiment: Experiment) -> dict:
  """What a checkpoint records beside the step so samplers need neither data nor teacher."""
  return {"x_shape": list(experiment.task.x_shape), "cond_dim": int(experiment.task.cond_dim)}

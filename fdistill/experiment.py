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

Before them, :func:`validate` checks the config and returns the :class:`Plan` (mesh, parsed
objective settings) that they consume; the workdir and teacher checks of a run sit beside it.
They live in this file (about 400 lines) because each check guards one input of the
assembly, and reading the two together shows what is checked before anything is built.
"""
import copy
import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from fdistill import data, models, objectives, teachers
from fdistill.errors import ConfigError
from fdistill.objectives import noise
from fdistill.registry import lookup
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

  def batches(self, batch_size: int, start_step: int = 0):
    """The global batches of steps start_step, start_step+1, ... as sharded jax.Arrays.

    A dataset that can draw its batches on the device (``device_batches``: the toy
    mixtures) does so, with no host round trip per step; others are read on each host
    (its slice) and assembled.
    """
    if hasattr(self.dataset, "device_batches"):
      return self.dataset.device_batches(batch_size, start_step,
                                         mesh_lib.batch_sharding(self.mesh))
    local = self.dataset.iterator(batch_size, start_step, jax.process_index(),
                                  jax.process_count())
    return map(self.global_batch, local)


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


# ---------------------------------------------------------------------------
# Checks that run before anything is created or written.


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(value, field, low=None, high=None, low_open=False, integer=False):
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise ConfigError(f"{field}={value!r} must be {'an integer' if integer else 'a number'}")
  if low is not None and (value <= low if low_open else value < low):
    raise ConfigError(f"{field}={value!r} must be {'>' if low_open else '>='} {low}")
  if high is not None and value >= high:
    raise ConfigError(f"{field}={value!r} must be < {high}")


def check_numbers_finite(section, prefix=""):
  """Every float of ``section`` (nested sections, lists and tuples too) is finite and fits
  float32, the dtype it is used in (``lr=1e39`` is finite as typed and inf on the device)."""
  items = section.items() if hasattr(section, "items") else enumerate(section)
  for key, value in items:
    field = f"{prefix}.{key}" if prefix and not isinstance(key, int) else (
        f"{prefix}[{key}]" if isinstance(key, int) else str(key))
    if hasattr(value, "items") or isinstance(value, (list, tuple)):
      check_numbers_finite(value, field)
    elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
      raise ConfigError(f"{field}={value!r} must be a finite number within float32's range "
                        f"(|x| <= {FLOAT32_MAX:.3g})")


def check_noise_levels(config):
  """The relations between noise-level fields, wherever a section has them."""
  if not config.model.sigma_data > 0:
    raise ConfigError(f"model.sigma_data={config.model.sigma_data!r} must be > 0")
  noise.check_levels(config.objective)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What :func:`validate` made from a config and :func:`build` takes over, so it is made once:
  the device mesh of ``config.mesh`` and the objective's parsed ``Settings`` (None for an
  objective without them) (``build(config, plan.mesh, settings=plan.settings)``)."""
  mesh: jax.sharding.Mesh
  settings: Any = None


def validate(config, mesh=None) -> Plan:
  """Ranges and names of every section (ConfigError naming the field); no side effects.

  Returns the :class:`Plan` of the run (``mesh``: as for :func:`build`)."""
  check_numbers_finite(config)
  check_noise_levels(config)
  tc, ec = config.train, config.eval
  _number(tc.batch_size, "train.batch_size", 0, low_open=True, integer=True)
  _number(tc.num_steps, "train.num_steps", 0, integer=True)
  for field in ("log_every", "save_every", "keep_checkpoints", "max_consecutive_skips"):
    _number(tc[field], f"train.{field}", 1, integer=True)
  _number(tc.sample_every, "train.sample_every", 0, integer=True)
  optims = {"optim": config.optim}
  for name in ("fake_optim", "disc_optim"):
    if name in config.objective:
      optims[f"objective.{name}"] = dict(config.optim, **dict(config.objective[name]))
  for prefix, optim in optims.items():
    _number(optim["lr"], f"{prefix}.lr", 0, low_open=prefix == "optim")
    _number(optim["grad_clip"], f"{prefix}.grad_clip", 0)
    _number(optim["warmup_steps"], f"{prefix}.warmup_steps", 0, integer=True)
  _number(config.optim.ema_decay, "optim.ema_decay", 0, 1)
  _number(config.optim.micro_batches, "optim.micro_batches", 1, integer=True)
  for field in ("num_samples", "batch_size", "num_plot_samples", "sampler_steps"):
    _number(ec[field], f"eval.{field}", 1, integer=True)
  for field in ("poll_seconds", "timeout_seconds"):
    _number(ec[field], f"eval.{field}", 0)
  mesh = make_mesh(config, mesh)
  mesh_lib.check_batch_size(tc.batch_size, mesh)
  settings_cls = getattr(objectives.module(config), "Settings", None)
  settings = None if settings_cls is None else settings_cls.from_config(config.objective)
  models.lookup_model(config.model)
  lookup(data.DATASETS, config.data.name, "data.name")
  lookup(teachers.TEACHERS, config.teacher.kind, "teacher.kind")
  return Plan(mesh, settings)


def check_generator_init(config, workdir_of_run):
  """``generator.init_workdir`` ('' = off) must be a run with a checkpoint (at ``init_step``,
  -1 = latest) of this config's model; a one-line ConfigError naming the field otherwise.
  Checked only while the run (``workdir_of_run``) has no checkpoint: a resumed run restores
  its own generator and no longer needs the other run."""
  workdir, step = config.generator.init_workdir, config.generator.init_step
  if not workdir or os.path.isdir(os.path.join(workdir_of_run, "checkpoints")):
    return
  field = f"generator.init_workdir={workdir!r}"
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise ConfigError(f"{field} is not a run's workdir (no config.json); give the workdir of a "
                      "distillation run, e.g. a SiD run, or '' to start from the teacher")
  steps = checkpoint.saved_steps(workdir)
  if not steps or (step >= 0 and step not in steps):
    raise ConfigError(f"{field} has no checkpoint at generator.init_step={step} (saved: "
                      f"{sorted(steps) or 'none'}; -1 = the latest)")
  if _field(checkpoint.load_config(workdir), "model") != _field(config, "model"):
    raise ConfigError(f"{field} holds a generator of another config.model; the generator must "
                      "have this run's architecture")


# Fields that shape a run's state: a workdir's saved run must agree on them.
SHAPING_FIELDS = ("objective.name", "model", "data.name", "data.distribution", "data.resolution",
                  "data.conditional", "objective.discriminator", "generator.sigma_init")


def _field(config, dotted):
  node = config
  for key in dotted.split("."):
    if not hasattr(node, "keys") or key not in node:
      return None
    node = node[key]
  node = node.to_dict() if hasattr(node, "to_dict") else node
  return json.loads(json.dumps(node, default=str))  # as config.json holds it (tuples -> lists)


def _differs(saved, given):
  """Whether ``given`` disagrees with a saved run's ``saved`` value; a field the saved run did
  not record (a run from before configs/common.py held it) is not compared, so such runs
  resume."""
  if saved is None:
    return False
  if isinstance(saved, dict) and isinstance(given, dict):
    return any(_differs(value, given.get(key)) for key, value in saved.items())
  return saved != given


def check_workdir(workdir, config=None):
  """A ConfigError unless ``workdir`` can hold this run: not a file, and if it already holds a
  run (``config.json``), that run agrees with ``config`` on :data:`SHAPING_FIELDS`."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} is a file, not a directory")
  saved_path = os.path.join(workdir, "config.json")
  if config is None or not os.path.exists(saved_path):
    return
  saved = checkpoint.load_config(workdir)
  differ = [f for f in SHAPING_FIELDS if _differs(_field(saved, f), _field(config, f))]
  if differ:
    details = "; ".join(f"{f}: saved {_field(saved, f)!r}, given {_field(config, f)!r}"
                        for f in differ[:3])
    raise ConfigError(f"--workdir={workdir!r} holds another run ({details}); use a new workdir "
                      "or the run's own config")


def check_num_steps(config, workdir):
  """A resumed run cannot end before the step it has reached (nothing is rewritten)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  reached = max(checkpoint.saved_steps(workdir), default=0)
  if config.train.num_steps < reached:
    raise ConfigError(f"train.num_steps={config.train.num_steps} is below step {reached}, which "
                      f"--workdir={workdir!r} has reached; give train.num_steps >= {reached} or "
                      "use a new workdir")


TEACHER_PIN = "teacher.json"


def pin_teacher(config, workdir):
  """``(config, pin)``: a student's teacher checkpoint fixed at its first start.

  A ``teacher.kind='checkpoint'`` student loads the same teacher step on every resume
  (``teacher.step=-1`` means the latest at the FIRST start, recorded with the export's
  digest in ``<workdir>/teacher.json``), so a teacher run that gained checkpoints since
  does not silently change the teacher. The returned config has ``teacher.step`` set to
  that step; ``pin`` is the record to write (None for other teacher kinds). A changed or
  missing teacher checkpoint is a ConfigError naming the field. Writes nothing."""
  tc = config.teacher
  if tc.kind != "checkpoint":
    return config, None
  pin_path = os.path.join(workdir, TEACHER_PIN)
  pinned = json.load(open(pin_path)) if os.path.exists(pin_path) else None
  teacher_dir = os.path.abspath(tc.workdir)
  if pinned is None:
    steps = checkpoint.saved_steps(tc.workdir) if os.path.isdir(tc.workdir) else []
    if not steps:
      raise ConfigError(f"teacher.workdir={tc.workdir!r} has no checkpoint; train the teacher "
                        "first (--mode=train_teacher)")
    step = int(tc.step) if tc.step >= 0 else max(steps)
    if step not in steps:
      raise ConfigError(f"teacher.step={tc.step}: teacher.workdir={tc.workdir!r} has no "
                        f"checkpoint {step} (saved: {sorted(steps)})")
  else:
    step = int(pinned["step"])
    if pinned["workdir"] != teacher_dir:
      raise ConfigError(f"teacher.workdir={tc.workdir!r}: this run started from the teacher in "
                        f"{pinned['workdir']!r} ({pin_path}); resume with that teacher.workdir or "
                        "use a new workdir")
    if tc.step >= 0 and tc.step != step:
      raise ConfigError(f"teacher.step={tc.step}: this run started from teacher step {step} "
                        f"({pin_path}); resume with teacher.step=-1 or {step}, or use a new "
                        "workdir")
  try:
    digest = checkpoint.latest_meta(tc.workdir, step).get("digest", {}).get("export")
  except FileNotFoundError:
    raise ConfigError(f"teacher.workdir={tc.workdir!r} no longer has checkpoint {step}, the "
                      f"teacher step this run started from ({pin_path}); restore it or use a new "
                      "workdir") from None
  if pinned is not None and digest != pinned["digest"]:
    raise ConfigError(f"teacher.workdir={tc.workdir!r}: checkpoint {step} changed since this run "
                      f"started (its export digest differs from {pin_path}); restore the original "
                      "or use a new workdir")
  config = copy.deepcopy(config)
  config.teacher.step = step
  return config, {"workdir": teacher_dir, "step": step, "digest": digest}


def start_generator_from_run(exp: "Experiment", state):
  """``state`` (fresh) with the generator's params and EMA replaced by the exported generator
  of ``generator.init_workdir`` (checked by :func:`check_generator_init`); unchanged when it
  is ''. Only a fresh run calls this: a resumed run restores its own generator."""
  gc = exp.config.generator
  if not gc.init_workdir:
    return state
  if "gen" not in state:
    raise ConfigError(f"generator.init_workdir needs a distillation objective; "
                      f"objective.name={exp.config.objective.name!r} has no generator")
  shardings = exp.state_shardings["gen"]["params"]
  params, _ = checkpoint.restore_export_from(gc.init_workdir, exp.abstract_state["gen"]["params"],
                                             shardings, None if gc.init_step < 0 else gc.init_step)
  # Separate buffers for params and EMA: the steps donate the state, each leaf once.
  ema = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 0, t), out_shardings=shardings)
  return dict(state, gen=dict(state["gen"], params=params, ema=ema(params)))


def make_mesh(config, mesh=None):
  return mesh_lib.make_mesh(config.mesh) if mesh is None else mesh


def shardings_of(tree, mesh):
  """The shardings of a placed pytree (replicated for None, which jit needs a prefix for)."""
  if tree is None:
    return mesh_lib.replicated(mesh)
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def _sampler(config, mesh, task, spec: objectives.SamplerSpec) -> Sampling:
  abstract = jax.eval_shape(spec.init_params, jax.random.key(0))
  shardings = partition.config_shardings(abstract, mesh, config.mesh)
  sample = jax.jit(spec.sample, static_argnums=2, out_shardings=mesh_lib.replicated(mesh))
  return Sampling(mesh, task, abstract, shardings, sample)


def build(config, mesh=None, *, teacher_params: bool = True, dataset=None,
          teacher_spec=None, settings=None) -> Experiment:
  """The training experiment of ``config`` on ``mesh`` (default: ``config.mesh`` over all devices;
  a run passes the mesh of :func:`validate`'s :class:`Plan`).

  ``teacher_params=False`` builds everything but reads no teacher weights
  (``Experiment.teacher`` is then None): for compiling, memory analysis and tests.
  ``dataset`` / ``teacher_spec`` (a :class:`fdistill.teachers.Teacher`: the network and where its
  params come from; ``Experiment.teacher`` holds the params) replace the ones
  the config names, e.g. shape-only stand-ins for benchmarks of models without data.
  ``settings``: the objective's settings from :func:`validate`'s :class:`Plan` (None: parsed here).
  """
  mesh = make_mesh(config, mesh)
  mesh_lib.check_batch_size(config.train.batch_size, mesh)
  dataset = data.build(config.data) if dataset is None else dataset
  if teacher_spec is None:
    teacher_spec = teachers.spec(config, dataset.x_shape, dataset.cond_dim)
  task = objectives.Task(tuple(dataset.x_shape), dataset.cond_dim,
                         teacher_spec.apply if teacher_spec else None,
                         teacher_spec.abstract if teacher_spec else None,
                         teacher_is_network=config.teacher.kind in teachers.NETWORK_KINDS)
  objective = objectives.build(config, task, settings)

  teacher_shardings = mesh_lib.replicated(mesh)
  placed = None
  if teacher_spec is not None:
    teacher_shardings = partition.config_shardings(teacher_spec.abstract, mesh, config.mesh)
    if teacher_params:
      placed = teacher_spec.load(teacher_shardings)
  abstract = jax.eval_shape(objective.init, jax.random.key(0),
                            teacher_spec.abstract if teacher_spec else None)
  state_sh = partition.config_shardings(abstract, mesh, config.mesh)
  repl = mesh_lib.replicated(mesh)
  init = jax.jit(objective.init, in_shardings=(repl, teacher_shardings), out_shardings=state_sh)
  steps = {name: jax.jit(fn, in_shardings=(state_sh, teacher_shardings,
                                           mesh_lib.batch_sharding(mesh), repl),
                         out_shardings=(state_sh, repl), donate_argnums=0)
           for name, fn in objective.steps.items()}
  sampling = _sampler(config, mesh, task, objective.sampler)  # the objective's own: parsed once
  return Experiment(config, mesh, dataset, task, objective, placed, teacher_shardings, abstract,
                    state_sh, init, steps, objective.schedule, sampling)


def task_of_run(workdir: str) -> objectives.Task:
  """The Task (data shape, class count) of a run, from its latest checkpoint's metadata: no
  data set and no teacher are needed to sample it."""
  meta = checkpoint.latest_meta(workdir)
  return objectives.Task(tuple(meta["x_shape"]), int(meta["cond_dim"]))


def build_sampler(config, task: objectives.Task, mesh=None, settings=None) -> Sampling:
  """The sampler of a run of ``config`` (its exported network); needs no teacher.
  ``mesh`` / ``settings``: those of :func:`validate`'s :class:`Plan` (None: made here)."""
  return _sampler(config, make_mesh(config, mesh), task,
                  objectives.sampler(config, task, settings))


def restore_export(sampler: Sampling, workdir: str, step: Optional[int] = None):
  """(params, step): the exported params of ``workdir``'s checkpoint (None = latest)."""
  return checkpoint.restore_export_from(workdir, sampler.abstract_params,
                                        sampler.param_shardings, step)


def run_meta(experiment: Experiment) -> dict:
  """What a checkpoint records beside the step so samplers need neither data nor teacher."""
  return {"x_shape": list(experiment.task.x_shape), "cond_dim": int(experiment.task.cond_dim)}

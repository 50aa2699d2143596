"""The objective interface: what the assembly gets from every objective module."""
import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Tuple, runtime_checkable

from fdistill.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
  """What an objective needs to know beyond the config.

  ``teacher_abstract`` holds the teacher params' shapes and dtypes
  (ShapeDtypeStructs), never their values: the values are a sharded argument of
  every step, so a large teacher is never an HLO constant. ``teacher_is_network``: the
  teacher is a denoiser network (a checkpoint or an EDM pickle, whose params a student of
  the same architecture starts from), not the analytic GMM.
  """
  x_shape: Tuple[int, ...]                   # per-example data shape
  cond_dim: int = 0                          # one-hot class width, 0 = unconditional
  teacher_apply: Optional[Callable] = None   # apply(params, x, sigma, cond) -> D
  teacher_abstract: Any = None
  teacher_is_network: bool = False


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """How a trained run makes samples, from the params it exports (no teacher needed): pure
  functions, not yet placed or jitted (``experiment.Sampling`` is that, on a mesh).

  init_params(rng) -> params          fresh params of the sampled network (for shapes)
  sample(params, rng, num, cond) -> [num, *x_shape] samples (``num`` static)
  """
  init_params: Callable
  sample: Callable


@dataclasses.dataclass(frozen=True)
class Objective:
  """Pure functions of one objective.

  init(rng, teacher) -> state
      a dict pytree with int32 ``step`` and ``skipped``; ``teacher`` (the teacher's
      params or None) is an argument so a generator can start as a copy of it.
  steps: {name: step(state, teacher, batch, rng) -> (state, metrics)}
      one function per kind of update (f-distill: "generator" and "critic"); metrics
      is a dict of float32 scalars of this step alone (never stored in the state).
  schedule(step: int) -> name
      which kind of update runs at a step, decided on the host: the loop jits each
      kind once and calls one per step (XLA:CPU runs convolutions inside a
      ``lax.cond`` about 10x slower, and a host-side choice costs nothing anywhere).
  export(state) -> params
      the params of the network that samples (its EMA), saved beside every checkpoint.
  sampler: :class:`SamplerSpec` for the exported params.
  """
  init: Callable
  steps: Mapping[str, Callable]
  schedule: Callable[[int], str]
  export: Callable
  sampler: SamplerSpec


@runtime_checkable
class ObjectiveModule(Protocol):
  """The contract of an objective module (``objectives.OBJECTIVES`` maps names to them).

  ``build`` reads ``config.objective`` (a section built by its ``configs/common.py`` helper)
  and may raise a :class:`~fdistill.errors.ConfigError` naming a field; ``sampler`` needs
  no teacher, so sampling and evaluating a trained run works without one.
  """

  def build(self, config, task: Task, settings=None) -> Objective:
    """``settings``: ``Settings.from_config(config.objective)`` already parsed (the run's plan
    holds it, so a run parses its settings once), or None to parse them here."""
    ...

  def sampler(self, config, task: Task, settings=None) -> SamplerSpec:
    ...


def settings_from_config(cls, section, subsections, defaults_name):
  """``cls(**scalars of section)`` after checking every field is known and present.

  ``cls`` is a dataclass with one field per scalar setting; ``subsections`` are
  the section's other keys (name, optimiser overrides, ...); ``defaults_name``
  names the configs/common.py helper that builds a complete section.
  """
  names = {f.name for f in dataclasses.fields(cls)}
  values = {k: v for k, v in dict(section).items() if k not in subsections}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"objective.{unknown[0]} is not a setting of objective.name="
                      f"{section.name!r}; valid: {', '.join(sorted(names | set(subsections)))}")
  missing = sorted(names - set(values))
  if missing:
    raise ConfigError(f"objective.{missing[0]} is missing; build the section with "
                      f"configs/common.py:{defaults_name}")
  return cls(**values)

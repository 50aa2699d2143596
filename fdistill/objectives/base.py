"""The objective interface: what the assembly gets from every objective module."""
import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple



@dataclasses.dataclass(frozen=True)
class Task:
  """What an objective needs to know beyond the config.

  ``teacher_abstract`` holds the teacher params' shapes and dtypes
  (ShapeDtypeStructs), never their values: the values are a sharded argument of
  every step, so a large teacher is never an HLO constant.
  """
  x_shape: Tuple[int, ...]                   # per-example data shape
  cond_dim: int = 0                          # one-hot class width, 0 = unconditional
  teacher_apply: Optional[Callable] = None   # apply(params, x, sigma, cond) -> D
  teacher_abstract: Any = None


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How a trained run makes samples, from the params it exports (no teacher needed).

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
  sampler: :class:`Sampler` for the exported params.
  minimum_passes: {name: {pass: count}}
      the network passes each kind of step cannot do without (:data:`PASSES`);
      ``benchmarks/distill_step.py`` prices each pass with XLA's FLOP count on the
      step's own network and batch and prints the step's FLOPs against their sum, so
      duplicated work (a network run twice, a backward nobody needs) shows as a ratio
      above 1 (tests/test_benchmarks_distill_step.py bounds them). Not counted: the
      optimiser's elementwise update and the losses (negligible at real batch sizes).
  """
  init: Callable
  steps: Mapping[str, Callable]
  schedule: Callable[[int], str]
  export: Callable
  sampler: Sampler
  minimum_passes: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)


# The passes of :attr:`Objective.minimum_passes`, each on the network of the step (generator,
# teacher and fake score share one architecture; the discriminator heads sit on the teacher).
PASSES = {
    "forward": "one denoiser forward",
    "train": "a forward and the backward to the network's params (the network being updated)",
    "input_grad": "the backward of a frozen network to its input only (no weight gradients)",
    "jvp": "the tangent half of a forward-mode pass (sCM's dF/dt; its primal is the forward "
           "of the student's own train pass, which XLA shares)",
    "disc_train": "the discriminator's logit (the teacher up to its feature layers, then the "
                  "heads; or an MLP on x_t) and the backward to the discriminator's params",
    "disc_input_grad": "the backward from the discriminator's logit to x_t (through the "
                       "teacher's feature layers, or the MLP)",
}


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
    raise ValueError(f"objective.{unknown[0]} is not a setting of objective.name="
                     f"{section.name!r}; valid: {', '.join(sorted(names | set(subsections)))}")
  missing = sorted(names - set(values))
  if missing:
    raise ValueError(f"objective.{missing[0]} is missing; build the section with "
                     f"configs/common.py:{defaults_name}")
  return cls(**values)


def add_passes(*counts):
  """The sum of :attr:`Objective.minimum_passes` entries (dicts of pass -> count), zeros
  dropped."""
  total = {}
  for c in counts:
    for name, n in c.items():
      if name not in PASSES:
        raise ValueError(f"pass {name!r} is not one of {', '.join(PASSES)}")
      total[name] = total.get(name, 0) + n
  return {k: v for k, v in total.items() if v}

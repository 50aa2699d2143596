"""Objective registry.

An objective is built from the config and a :class:`Context` into an
:class:`Objective` of pure functions; train/loop.py jits and shards them.
"""
import dataclasses
from typing import Any, Callable, Optional, Tuple

from fdistill.registry import lookup


@dataclasses.dataclass(frozen=True)
class Context:
  """What an objective needs to know beyond the config."""
  x_shape: Tuple[int, ...]          # per-example data shape
  cond_dim: int = 0                 # one-hot class width, 0 = unconditional
  teacher_apply: Optional[Callable] = None   # apply(params, x, sigma, cond) -> D
  teacher_params: Any = None


@dataclasses.dataclass(frozen=True)
class Objective:
  """Pure functions of one objective.

  init(rng) -> state                            (a dict pytree with "step" and "skipped")
  step(state, frozen, batch, rng) -> (state, metrics)
      ``frozen`` is the teacher's params (or None), passed as an argument, never
      closed over, so a large teacher is a sharded input rather than an HLO constant;
      metrics is a dict of scalar arrays named "train/...".
  sample(state, rng, num, cond) -> samples      (the model being trained, EMA weights)
  denoiser(state) -> (apply_fn, params)         (the trained score model, if there is one)
  branches, branch_of (optional): an objective that alternates updates (f-distill:
      generator / critics) gives each kind of step as its own function with ``step``'s
      signature, and ``branch_of(step: int) -> index`` on the host; the training loop jits
      each branch and calls the one for the step. ``step`` stays the single-function form
      (a ``lax.cond``), equivalent: XLA:CPU runs convolutions nested in a conditional ~10x
      slower, and a host-side choice costs nothing on any backend.
  """
  init: Callable
  step: Callable
  sample: Callable
  denoiser: Optional[Callable] = None
  branches: Optional[Tuple[Callable, ...]] = None
  branch_of: Optional[Callable[[int], int]] = None


def _registry():
  from fdistill.objectives import dsm
  reg = {"dsm": dsm.build}
  try:
    from fdistill.objectives import fdistill as fdistill_obj
    reg["fdistill"] = fdistill_obj.build
  except ImportError:
    pass
  return reg


def build(config, ctx: Context) -> Objective:
  return lookup(_registry(), config.objective.name, "objective.name")(config, ctx)

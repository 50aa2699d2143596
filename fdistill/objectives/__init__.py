"""Objectives: losses and update schedules as pure closures, and their registry.

An objective module follows :class:`~fdistill.objectives.base.ObjectiveModule`:
``build(config, task, settings=None) -> Objective`` and ``sampler(config, task, settings=None)``; the
assembly (``fdistill.experiment``) jits and shards what they return. ``sampler`` never needs the
teacher, so sampling and evaluating a trained run works without it. A new family is one
module here, one entry in :data:`OBJECTIVES` and its section helper in ``configs/common.py``
(docs/design.md, "Extending fdistill").
"""
from typing import Mapping

from fdistill.objectives import dsm, fdistill, rcm, uni_instruct
from fdistill.objectives.base import Objective, ObjectiveModule, SamplerSpec, Task  # noqa: F401
from fdistill.registry import lookup

OBJECTIVES: Mapping[str, ObjectiveModule] = {
    "dsm": dsm, "fdistill": fdistill, "rcm": rcm, "uni_instruct": uni_instruct}


def module(config) -> ObjectiveModule:
  """The objective module named ``config.objective.name``."""
  return lookup(OBJECTIVES, config.objective.name, "objective.name")


def build(config, task: Task, settings=None) -> Objective:
  """``settings``: the module's parsed ``Settings`` (``experiment.validate``'s plan), if any."""
  return module(config).build(config, task, settings)


def sampler(config, task: Task, settings=None) -> SamplerSpec:
  return module(config).sampler(config, task, settings)

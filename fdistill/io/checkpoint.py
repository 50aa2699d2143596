"""Orbax CheckpointManager wrapper: atomic saves of state, exported params and metadata.

Each checkpoint ``<workdir>/checkpoints/<step>/`` holds three items: ``state``
(everything the run needs to resume: params, optimiser states, EMAs,
counters), ``export`` (the params of the network that samples, i.e. its EMA:
what sampling, evaluation and a student's teacher loading read, and nothing
else) and ``meta`` (JSON). Keep-last-N.

Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never corrupts the latest good checkpoint.
The metadata holds what the data iterator needs to resume (the step), so a
restarted run sees the same batches and reproduces the same losses.
"""
import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores ``{"state", "export", "meta"}`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, export, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves ``state`` and the ``export`` params at ``step`` (``force``: even off-schedule)."""
    meta = dict(meta or {}, step=int(step))
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), export=ocp.args.StandardSave(export),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state, step: Optional[int] = None):
    """Restores (state, meta) into the shardings/dtypes of ``abstract_state``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_targets(abstract_state)), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_export(self, abstract_params, step: Optional[int] = None):
    """Only the exported params of ``step`` (None = latest), into ``abstract_params``' shardings.

    Reads nothing of the ``state`` item (no optimiser moments, no other networks).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    out = self.manager.restore(step, args=ocp.args.Composite(
        export=ocp.args.StandardRestore(_targets(abstract_params))))
    return out["export"], step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _targets(abstract):
  """ShapeDtypeStructs of ``abstract``, each with its target sharding (required)."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract)
  missing = [l for l in jax.tree_util.tree_leaves(abstract) if getattr(l, "sharding", None) is None]
  if missing:  # restoring without target shardings would reuse the saving run's topology
    raise ValueError("restore needs a sharding on every leaf of the target (see with_shardings)")
  return abstract


def restore_from(workdir: str, abstract_state, shardings, step: Optional[int] = None):
  """(state, meta) of ``workdir``'s checkpoint at ``step`` (None = latest), placed by ``shardings``.

  Opens and closes its own manager: for readers (sample, eval, teacher loading)
  that never write to the run they read.
  """
  ckpt = Checkpointer(workdir)
  try:
    return ckpt.restore(with_shardings(abstract_state, shardings), step=step)
  finally:
    ckpt.close()


def restore_export_from(workdir: str, abstract_params, shardings, step: Optional[int] = None):
  """(exported params, step) of ``workdir``'s checkpoint at ``step`` (None = latest), placed by
  ``shardings``; for readers (sample, eval, a student loading its teacher)."""
  ckpt = Checkpointer(workdir)
  try:
    return ckpt.restore_export(with_shardings(abstract_params, shardings), step=step)
  finally:
    ckpt.close()


def latest_meta(workdir: str) -> dict:
  """The JSON metadata of ``workdir``'s latest checkpoint (FileNotFoundError if none)."""
  ckpt = Checkpointer(workdir)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {ckpt.manager.directory}")
    return ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    ckpt.close()


def saved_steps(workdir: str):
  """The steps with a complete checkpoint under ``workdir``."""
  ckpt = Checkpointer(workdir)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def save_config(workdir: str, config) -> None:
  """Writes ``config.json`` beside the checkpoints (atomically: write then rename)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load_config(workdir: str):
  """Reads a run's ``config.json`` back into a ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a fdistill workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs of ``abstract_state`` carrying the target ``shardings`` (same tree)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)

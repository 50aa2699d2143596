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

Integrity: the metadata also holds a content digest of ``state`` and
``export`` (one uint32 per leaf, computed on the devices, so nothing is
gathered to a host). :meth:`Checkpointer.restore_intact` verifies the digest
and that every float is finite; a checkpoint that fails (unreadable, missing
files, flipped bytes, non-finite values) is moved aside to
``<workdir>/checkpoints_corrupt/`` (renamed, never deleted) and the next older
one is tried. If none is intact the run stops instead of starting afresh.
"""
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from fdistill.errors import CorruptCheckpointError, NonFiniteRunError


def _leaf_digest(x):
  """A position-sensitive uint32 checksum of one array's bits (any single change shows)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  return jnp.sum((bits * jnp.uint32(0x9E3779B1) + index) * (index * 2 + 1), dtype=jnp.uint32)


@jax.jit
def _digests(tree):
  return [_leaf_digest(x) for x in jax.tree_util.tree_leaves(tree)]


def digest(tree):
  """Per-leaf checksums of ``tree`` (global arrays, any sharding) as a list of ints."""
  return [int(d) for d in jax.device_get(_digests(tree))]


def problems(tree, expected_digest):
  """Why ``tree`` does not match its saved digest or holds non-finite floats; None if intact."""
  if expected_digest is None:
    return "no content digest in its metadata"
  if digest(tree) != list(expected_digest):
    return "content digest mismatch (bytes changed after the save)"
  if not floats_finite(tree):
    return "non-finite values"
  return None


def floats_finite(tree) -> bool:
  """Whether every float of ``tree`` is finite (one jitted reduction, one host read)."""
  floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return not floats or all(jax.device_get(_all_finite(floats)))


@jax.jit
def _all_finite(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


class Checkpointer:
  """Saves/restores ``{"state", "export", "meta"}`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.workdir = os.path.abspath(workdir)
    self.manager = ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"),
                                         options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, export, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves ``state`` and the ``export`` params at ``step`` (``force``: even off-schedule).

    Refuses (NonFiniteRunError, nothing written) a state with a non-finite float: the step's
    guard never commits one, so this is the last line against saving garbage over good
    checkpoints (keep-N would then delete those)."""
    if not floats_finite((state, export)):
      raise NonFiniteRunError(
          f"refusing to save step {step}: the state holds non-finite values; the checkpoints "
          f"under {self.manager.directory} (latest {self.latest_step()}) were left as they were")
    meta = dict(meta or {}, step=int(step),
                digest={"state": digest(state), "export": digest(export)})
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

  def restore_intact(self, abstract_state):
    """(state, meta) of the newest checkpoint that reads back intact, or None if there is none.

    Each failing checkpoint is moved aside with a warning naming it and why;
    :class:`CorruptCheckpointError` if checkpoints existed and none is intact.
    """
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      try:
        state, meta = self.restore(abstract_state, step)
        problem = problems(state, meta.get("digest", {}).get("state"))
      except Exception as e:  # any unreadable checkpoint: orbax, tensorstore, JSON, OS errors
        problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      if problem is None:
        return state, meta
      self.move_aside(step, problem)
    if steps:
      raise CorruptCheckpointError(
          f"no intact checkpoint under {self.manager.directory}: steps {steps} failed and were "
          f"moved to {os.path.join(self.workdir, 'checkpoints_corrupt')}; nothing was deleted")
    return None

  def move_aside(self, step: int, why: str) -> str:
    """Renames checkpoint ``step`` into ``checkpoints_corrupt/`` (process 0), with a warning."""
    src = os.path.join(str(self.manager.directory), str(step))
    dst = os.path.join(self.workdir, "checkpoints_corrupt", f"{step}.{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
    logging.warning("Checkpoint %s is corrupt (%s): moved to %s; trying the previous one",
                    src, why, dst)
    self.manager.reload()
    return dst

  def restore_export(self, abstract_params, step: Optional[int] = None):
    """Only the exported params of ``step`` (None = latest), into ``abstract_params``' shardings,
    verified against the digest saved with them and for finiteness.

    Reads nothing of the ``state`` item (no optimiser moments, no other networks). A
    corrupt or unreadable export is a :class:`CorruptCheckpointError` naming the
    checkpoint (sampling, evaluating or distilling from it would give garbage silently).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    where = os.path.join(str(self.manager.directory), str(step))
    targets = _targets(abstract_params)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          export=ocp.args.StandardRestore(targets),
          meta=ocp.args.JsonRestore()))
      problem = problems(out["export"], out["meta"].get("digest", {}).get("export"))
    except (KeyError, ValueError, OSError) as e:  # a missing item or file, bad bytes or tree
      problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if problem is not None:
      raise CorruptCheckpointError(f"checkpoint {where}: its exported params are {problem}; "
                                   "use another step (or restore this one from a backup)")
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


def latest_meta(workdir: str, step: Optional[int] = None) -> dict:
  """The JSON metadata of ``workdir``'s checkpoint ``step`` (None: the latest;
  FileNotFoundError if there is none)."""
  ckpt = Checkpointer(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint {'' if step is None else step} under "
                              f"{ckpt.manager.directory}".replace("  ", " "))
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


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (write then rename)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_config(workdir: str, config) -> None:
  """Writes ``config.json`` beside the checkpoints (atomically: write then rename)."""
  write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2,
                                                                            sort_keys=True))


def load_config(workdir: str):
  """Reads a run's ``config.json`` back into a ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a fdistill workdir?")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except ValueError as e:  # truncated or edited by hand
    raise ValueError(f"{path} is not valid JSON ({e}); restore it from a copy, or rewrite it "
                     "from the run's config file") from None


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs of ``abstract_state`` carrying the target ``shardings`` (same tree)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)

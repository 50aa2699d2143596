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
one is tried. If none is intact the run stops instead of starting afresh. In a
multi-process run the processes agree on each verdict (a problem that one process finds
counts on all of them), so all restore, move aside or give up on the same step. A
checkpoint whose tree does not match the config (another model's checkpoint) is
not corrupt: it stops the run with one error naming the first differing arrays,
and nothing is moved.

A checkpoint is read through orbax only after :func:`read_problem` has read every array of
it back through tensorstore's own futures, each waited for: orbax (0.12) runs a restore's reads
in an asyncio loop that it closes as soon as one read fails, with the other reads still in
flight; as those land, tensorstore prints an ``Event loop is closed`` traceback for each (on
stderr, from its threads, during the fallback to the next checkpoint or before the run's FATAL
line). The check costs one more read of the item on each restore (every process reads the
whole item, a few arrays at a time); a save's keep-N read-back does not run it.

A save that fails (disk full, a write error) raises :class:`SaveFailedError`, one
line naming the step, the cause and the checkpoints that remain; nothing older is
touched, and the trainer's next start removes the partial directory.
"""
import errno
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fdistill.errors import ConfigError, CorruptCheckpointError, NonFiniteRunError, UserError


class SaveFailedError(UserError):
  """A checkpoint could not be written or did not read back intact (older ones kept)."""


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


READ_BATCH_BYTES = 1 << 28  # what read_problem holds in memory at once (whole arrays)
_ARRAY_TYPES = ("jax.Array", "np.ndarray")  # the leaves orbax stores as zarr arrays


def _wait_all(futures):
  """The first error among tensorstore ``futures``, after every one of them has finished."""
  errors = []
  for future in futures:
    try:
      future.result()
    except Exception as e:  # tensorstore's errors (DATA_LOSS, NOT_FOUND, ...) and OS errors
      errors.append(e)
  return errors[0] if errors else None


def read_problem(item_dir: str) -> Optional[str]:
  """Why the orbax item at ``item_dir`` (an OCDBT database of zarr arrays) does not read back
  in full, or None. Nothing is left in flight when it returns, whatever failed: every
  tensorstore operation it started is waited for (no asyncio loop is involved), unlike a
  failed orbax restore (see the module's docstring). The arrays are read whole, in batches of
  about :data:`READ_BATCH_BYTES`, and dropped."""
  item_dir = str(item_dir)
  # A local path as orbax opens it (a file:// URL would read '#', '?' and '%' as URL syntax).
  base = (item_dir.rstrip("/") + "/" if "://" in item_dir else
          {"driver": "file", "path": os.path.abspath(item_dir) + "/"})
  kvstore = {"driver": "ocdbt", "base": base}
  # One context for every open: they share one database (its manifest read once) and one limit
  # on concurrent file reads.
  context = ts.Context()
  try:
    tree = json.loads(epath.Path(item_dir, "_METADATA").read_text())["tree_metadata"]
    expected = {".".join(str(k["key"]) for k in leaf["key_metadata"]) for leaf in tree.values()
                if leaf["value_metadata"]["value_type"] in _ARRAY_TYPES and
                not leaf["value_metadata"].get("skip_deserialize")}
    keys = ts.KvStore.open(kvstore, context=context).result().list().result()
    drivers = {".zarray": "zarr", "zarr.json": "zarr3"}
    arrays = sorted({(key.decode().rsplit("/", 1)[0], drivers[key.decode().rsplit("/", 1)[1]])
                     for key in keys if key.decode().rsplit("/", 1)[-1] in drivers})
    missing = sorted(expected - {name for name, _ in arrays})
    if missing:  # e.g. no manifest: OCDBT then opens as an empty database
      return (f"unreadable ({len(missing)} of its {len(expected)} arrays are not in its "
              f"database, e.g. {missing[0]})")
    opens = [ts.open({"driver": driver, "kvstore": dict(kvstore, path=name + "/")},
                     open=True, read=True, context=context) for name, driver in arrays]
    error = _wait_all(opens)
    batch, size = [], 0
    for array in ([] if error else [f.result() for f in opens]):
      batch.append(array.read())
      size += array.dtype.numpy_dtype.itemsize * int(np.prod(array.shape))
      if size >= READ_BATCH_BYTES:
        error, batch, size = _wait_all(batch), [], 0
        if error:
          break
    error = error or _wait_all(batch)
  except Exception as e:  # the database itself: missing manifest, corrupt b-tree node, ...
    error = e
  return None if error is None else _unreadable(error)


def _unreadable(error) -> str:
  return f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})"


def _processes_with(flag: bool) -> list:
  """The indices of the processes on which ``flag`` holds (an allgather if several run)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  return [int(i) for i in np.flatnonzero(multihost_utils.process_allgather(np.int32(flag)))]


def agreed_problem(problem: Optional[str]) -> Optional[str]:
  """``problem`` (this process's verdict on a checkpoint), or a problem if any other process
  found one: every process then acts alike (moves it aside, tries the next, or raises). A
  read that fails on one host only (a transient error, keep-N deleting the step under a
  reader) would otherwise have one process restore the step while another skips it, and their
  collectives would no longer match (a hang)."""
  flagged = _processes_with(problem is not None)
  if problem is None and flagged:
    return f"unreadable on process {flagged[0]}"
  return problem


class Checkpointer:
  """Saves/restores ``{"state", "export", "meta"}`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, max_to_keep: int = 3, writer: bool = False):
    """``writer``: the trainer (it holds the workdir's lock), which removes the temporary
    directories of saves that failed or were killed; readers never do (one may be in flight)."""
    # Orbax keeps every step; :meth:`save` applies keep-N itself, after verifying the new one.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=writer)
    self.workdir = os.path.abspath(workdir)
    self.max_to_keep = max_to_keep
    self.manager = ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"),
                                         options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, export, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves ``state`` and the ``export`` params at ``step`` (``force``: even off-schedule),
    then applies keep-N. Nothing is lost whatever goes wrong:

    - a non-finite float in the state: NonFiniteRunError, nothing written (the step's guard
      never commits one; this is the last line against saving garbage over good checkpoints);
    - a failed write (disk full, ...): SaveFailedError (the next trainer start removes the
      partial directory);
    - keep-N deletes older checkpoints only after the new one has been read back with its
      digest and finiteness checked; one that does not read back is moved aside
      (SaveFailedError) and the older ones stay.
    """
    if not floats_finite((state, export)):
      raise NonFiniteRunError(
          f"refusing to save step {step}: the state holds non-finite values; the checkpoints "
          f"under {self.manager.directory} (latest {self.latest_step()}) were left as they were")
    digests = {"state": digest(state), "export": digest(export)}
    meta = dict(meta or {}, step=int(step), digest=digests)
    try:
      saved = self.manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), export=ocp.args.StandardSave(export),
          meta=ocp.args.JsonSave(meta)), force=force)
    except jax.errors.JaxRuntimeError:  # a collective of the save failed: a peer, not the disk
      raise
    except Exception as e:  # orbax, tensorstore and OS errors of the write alike
      raise SaveFailedError(f"could not save step {step} to {self.manager.directory}: "
                            f"{_write_cause(e)}; {self._what_is_kept()}") from e
    if saved:
      self._keep_last_n(step, state, export, digests)
    return saved

  def _keep_last_n(self, step, state, export, digests):
    """Deletes all but the newest ``max_to_keep`` checkpoints once ``step`` reads back intact."""
    steps = sorted(self.all_steps())
    stale = steps[:-self.max_to_keep] if self.max_to_keep else []
    if not stale:
      return
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_targets(state)),
          export=ocp.args.StandardRestore(_targets(export))))
      problem = (problems(out["state"], digests["state"]) or
                 problems(out["export"], digests["export"]))
    except Exception as e:  # unreadable right after the write: the storage is at fault
      problem = _unreadable(e)
    if problem is not None:
      where = self.move_aside(step, problem)
      raise SaveFailedError(f"checkpoint {step} did not read back intact ({problem}); moved to "
                            f"{where}, nothing deleted; {self._what_is_kept()}")
    for old in stale:
      self.manager.delete(old)

  def _what_is_kept(self) -> str:
    self.manager.reload()
    steps = self.all_steps()
    if not steps:
      return "no checkpoint was saved before; a restart begins from scratch"
    return (f"the checkpoints {sorted(steps)} are intact and a restart resumes from step "
            f"{max(steps)}")

  def restore(self, abstract_state, step: Optional[int] = None):
    """Restores (state, meta) into the shardings/dtypes of ``abstract_state``, after
    :meth:`read_problem` (a :class:`CorruptCheckpointError` if the state does not read back;
    its digest is not checked: :meth:`restore_intact` does that)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    problem = agreed_problem(self.read_problem(step, "state"))
    if problem is not None:
      raise CorruptCheckpointError(
          f"checkpoint {os.path.join(str(self.manager.directory), str(step))}: its state is "
          f"{problem}")
    return self._restore(abstract_state, step)

  def _restore(self, abstract_state, step: int):
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
      # read_problem first: orbax's metadata read in tree_mismatch abandons reads too.
      problem = agreed_problem(self.read_problem(step, "state"))
      mismatch = None if problem else self.tree_mismatch(step, abstract_state)
      if mismatch is not None:  # not corrupt: written by another config; nothing is moved
        raise ConfigError(
            f"checkpoint {os.path.join(str(self.manager.directory), str(step))} holds another "
            f"model's state ({mismatch}); resume it with the config it was trained with (its "
            "run's config.json), or give a new --workdir for this config")
      if problem is None:
        try:
          state, meta = self._restore(abstract_state, step)
          expected = meta.get("digest", {}).get("state")
        except Exception as e:  # any unreadable checkpoint: orbax, tensorstore, JSON, OS errors
          problem = _unreadable(e)
        problem = agreed_problem(problem)
      if problem is None:  # a collective: the same verdict on every process
        problem = problems(state, expected)
      if problem is None:
        return state, meta
      self.move_aside(step, problem)
    if steps:
      raise CorruptCheckpointError(
          f"no intact checkpoint under {self.manager.directory}: steps {steps} failed and were "
          f"moved to {os.path.join(self.workdir, 'checkpoints_corrupt')}; nothing was deleted")
    return None

  def read_problem(self, step: int, item: str) -> Optional[str]:
    """Why ``step``'s ``item`` or its metadata does not read back (:func:`read_problem`)."""
    try:
      json.loads((self.manager.directory / str(step) / "meta" / "metadata").read_text())
    except Exception as e:  # missing, truncated or not JSON
      return _unreadable(e)
    return read_problem(self.manager.directory / str(step) / item)

  def tree_mismatch(self, step: int, abstract_state) -> Optional[str]:
    """How ``step``'s saved state tree differs from ``abstract_state`` (names and shapes, up to
    3 differences), or None if they agree or the saved tree cannot be read (then the restore
    decides whether the checkpoint is corrupt)."""
    try:
      saved = ocp.StandardCheckpointHandler().metadata(
          self.manager.directory / str(step) / "state").tree
    except Exception:  # unreadable metadata: a corrupt checkpoint, handled by the restore
      return None
    return _shape_differences(_shapes(saved), _shapes(abstract_state))

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
    steps = sorted(self.all_steps())
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    where = os.path.join(str(self.manager.directory), str(step))
    targets = _targets(abstract_params)
    problem = agreed_problem(self.read_problem(step, "export"))
    if problem is None:
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            export=ocp.args.StandardRestore(targets),
            meta=ocp.args.JsonRestore()))
        expected = out["meta"].get("digest", {}).get("export")
      except (KeyError, ValueError, OSError) as e:  # a missing item or file, bad bytes or tree
        problem = _unreadable(e)
      problem = agreed_problem(problem)
    if problem is None:  # a collective: the same verdict on every process
      problem = problems(out["export"], expected)
    if problem is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint {step} under {self.manager.directory} (its "
                              f"checkpoints: {steps})")
    if problem is not None and not os.path.exists(where) and "://" not in where:
      raise FileNotFoundError(f"checkpoint {where} was deleted while being read")
    if problem is not None:
      raise CorruptCheckpointError(f"checkpoint {where}: its exported params are {problem}; "
                                   "use another step (or restore this one from a backup)")
    return out["export"], step

  def close(self):
    self.manager.close()


def _shapes(tree) -> dict:
  """``{dotted leaf name: shape}`` of an array tree (orbax's names: keys, indices, fields)."""
  def key_name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _shape_differences(saved: dict, wanted: dict) -> Optional[str]:
  differences = (
      [f"{name}: saved {saved[name]}, config {wanted[name]}"
       for name in wanted if name in saved and saved[name] != wanted[name]] +
      [f"{name}: not in the checkpoint" for name in wanted if name not in saved] +
      [f"{name}: not in the config's model" for name in saved if name not in wanted])
  if not differences:
    return None
  more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
  return "; ".join(differences[:3]) + more


def _write_cause(error) -> str:
  """What made a write fail, in a few words and what to do (the disk-full case named)."""
  text = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
  if getattr(error, "errno", None) == errno.ENOSPC or any(
      mark in str(error) for mark in ("No space left", "RESOURCE_EXHAUSTED", "ENOSPC")):
    return f"the disk is full ({text}); free space there and restart"
  return f"the write failed ({text}); check the storage and restart"


def _targets(abstract):
  """ShapeDtypeStructs of ``abstract``, each with its target sharding (required)."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract)
  missing = [l for l in jax.tree_util.tree_leaves(abstract) if getattr(l, "sharding", None) is None]
  if missing:  # restoring without target shardings would reuse the saving run's topology
    raise ValueError("restore needs a sharding on every leaf of the target (see with_shardings)")
  return abstract


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
    raise ConfigError(f"{path} is not valid JSON ({e}); restore it from a copy, or rewrite it "
                      "from the run's config file") from None


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs of ``abstract_state`` carrying the target ``shardings`` (same tree)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)

"""Regex -> PartitionSpec rules for parameter-like pytrees, with an FSDP default.

Rules are ``(regex, spec)`` pairs matched against the '/'-joined path of each
leaf (e.g. ``gen/opt_state/1/0/mu/blocks_3/attn/qkv/kernel``); the first match
wins. A leaf no rule matches gets the FSDP default: its largest dimension
divisible by the ``fsdp`` axis size is split over ``fsdp``, unless the leaf is
smaller than ``min_size`` elements (biases, norms, counters), which stay
replicated because sharding them saves little and costs a collective each.

The same rules apply to every state pytree, so a parameter, its Adam moments
and its EMA copy (same shape, same path suffix) are always sharded alike, and
the generator, fake score, discriminator and the frozen teacher all get them.
"""
import re
from typing import Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fdistill.errors import ConfigError
from fdistill.parallel import mesh as mesh_lib


def path_str(path) -> str:
  """'/'-joined readable names of a pytree key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def replicate(shape) -> P:
  del shape
  return P()


def fsdp_spec(shape, fsdp_size: int, min_size: int, axis: str = "fsdp") -> P:
  """Splits the largest dimension divisible by ``fsdp_size`` over ``axis`` (ties: the last);
  leaves under ``min_size`` elements (``config.mesh.fsdp_min_size``) stay replicated."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda i: (shape[i], i))
  return P(*([None] * best + [axis]))


def match_specs(tree, rules: Sequence[Tuple[str, P]], default=replicate):
  """A pytree of PartitionSpecs for ``tree`` (arrays or ShapeDtypeStructs).

  ``default(shape)`` gives the spec of a leaf no rule matches.
  """

  def spec_for(path, leaf):
    name = path_str(path)
    for pattern, spec in rules:
      if re.search(pattern, name):
        return spec
    return default(np.shape(leaf))

  return jax.tree_util.tree_map_with_path(spec_for, tree)


def check_specs(tree, specs, mesh) -> None:
  """A ConfigError naming the leaf where a spec does not fit its shape on ``mesh``."""

  def check(path, leaf, spec):
    shape = np.shape(leaf)
    if len(spec) > len(shape):
      raise ConfigError(f"partition rule {spec} has more entries than {path_str(path)} has "
                        f"dimensions {shape}")
    for dim, axes in zip(shape, spec):
      if axes is not None and dim % mesh_lib.axis_size(mesh, axes):
        raise ConfigError(f"partition rule {spec} does not divide {path_str(path)} {shape} on "
                          f"mesh {dict(mesh.shape)}")

  jax.tree_util.tree_map_with_path(check, tree, specs,
                                   is_leaf=lambda x: isinstance(x, P) or x is None)


def shardings(tree, mesh, rules=(), min_size=None):
  """NamedShardings for every leaf of ``tree`` under ``rules``.

  ``min_size=None`` replicates unmatched leaves; an int applies the FSDP
  default (:func:`fsdp_spec`) to unmatched leaves of at least that size.
  """
  default = replicate
  if min_size is not None:
    default = lambda shape: fsdp_spec(shape, mesh.shape.get("fsdp", 1), min_size)
  specs = match_specs(tree, rules, default)
  check_specs(tree, specs, mesh)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def spec_from_config(entry) -> P:
  """``("fsdp", None)`` / ``[["data", "fsdp"]]`` (config form) -> PartitionSpec."""
  return P(*(tuple(a) if isinstance(a, (list, tuple)) else a for a in entry))


def rules_from_config(mesh_config):
  """``config.mesh.rules`` [(regex, spec entries)] -> [(regex, PartitionSpec)]."""
  return [(pattern, spec_from_config(spec)) for pattern, spec in mesh_config.rules]


def config_shardings(tree, mesh, mesh_config):
  """Shardings of a state-like ``tree`` under a complete ``config.mesh``: its rules, then the
  FSDP default for leaves of at least ``fsdp_min_size`` elements."""
  return shardings(tree, mesh, rules_from_config(mesh_config), mesh_config.fsdp_min_size)


def place(tree, tree_shardings):
  """Puts host values (identical on every process) or global arrays onto ``tree_shardings``.

  Host values are cut shard by shard, so no process ever needs a device
  buffer of the full array and the result is a valid multi-process array.
  """

  def put(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree_util.tree_map(put, tree, tree_shardings)


def _fsdp_mesh(x):
  """The (abstract) mesh ``x`` lives on if it has an fsdp axis worth gathering, else None."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty or mesh.shape.get("fsdp", 1) == 1:
    return None
  if mesh.shape.get("tensor", 1) > 1:  # tensor-parallel rules: leave placement to XLA
    return None
  return mesh


def gather_fsdp(tree, enabled: bool = True):
  """FSDP's all-gather: ``tree`` (params inside a jitted step) unsharded for the compute.

  Called on the params inside the differentiated function, so the forward
  pass sees whole weights with batch-sharded activations (pure data-parallel
  compute, no weight-shaped resharding of activations) and the transpose
  reduces the gradient back onto the fsdp shards. A no-op off a mesh, on an
  fsdp axis of 1, with a tensor axis > 1 (then XLA places everything) and
  for ``enabled=False``.

  ``enabled`` is ``config.mesh.fsdp_gather``, passed explicitly from the config
  through the objective's :class:`fdistill.optim.update.Updater`. False leaves
  weight placement to XLA's sharding propagation, which may move activations
  instead of weights; for huge models at a small per-device batch its peak
  memory can be much lower (benchmarks/sharding_memory.py --no_gather), at the
  price of less predictable communication.
  """
  if not enabled:
    return tree

  def gather(x):
    mesh = _fsdp_mesh(x)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))

  return jax.tree_util.tree_map(gather, tree)

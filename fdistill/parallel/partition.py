"""Regex -> PartitionSpec rules for parameter-like pytrees.

Rules are ``(regex, spec)`` pairs matched against the '/'-joined path of each
leaf; the first match wins. Without a match a leaf is replicated.
"""
import re
from typing import Sequence, Tuple

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


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


def match_specs(tree, rules: Sequence[Tuple[str, P]]):
  """A pytree of PartitionSpecs for ``tree`` (arrays or ShapeDtypeStructs)."""

  def spec_for(path, leaf):
    name = path_str(path)
    for pattern, spec in rules:
      if re.search(pattern, name):
        return spec
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, tree)


def shardings(tree, mesh, rules=()):
  """NamedShardings for every leaf of ``tree`` under ``rules``."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), match_specs(tree, rules))

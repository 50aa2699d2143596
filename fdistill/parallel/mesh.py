"""Device mesh from ``config.mesh``.

Axes are ``data`` and ``fsdp`` (sizes from the config, -1 = all remaining
devices). Axis types are Auto on purpose: ``jax.make_mesh`` defaults to
Explicit axes in new JAX, under which ``with_sharding_constraint`` raises.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every mesh axis


def resolve_axis_sizes(sizes, num_devices):
  """Replaces a single -1 by the devices left over; checks the product."""
  sizes = [int(s) for s in sizes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: axis sizes {dict(zip(AXES, sizes))} need {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return sizes


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """Mesh over ``devices`` (default: all) with axes (data, fsdp)."""
  devices = jax.devices() if devices is None else list(devices)
  data = mesh_config.get("data", -1) if mesh_config is not None else -1
  fsdp = mesh_config.get("fsdp", 1) if mesh_config is not None else 1
  sizes = resolve_axis_sizes([data, fsdp], len(devices))
  return jax.make_mesh(sizes, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch, mesh: Mesh):
  """Assembles each process's numpy slice into one global jax.Array sharded over the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def maybe_initialize_distributed():
  """Starts jax.distributed when this is one process of several (env-detected); else no-op."""
  import os
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("FDISTILL_DISTRIBUTED"):
    jax.distributed.initialize()

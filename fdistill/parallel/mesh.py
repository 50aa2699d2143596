"""Device mesh from ``config.mesh``, multi-process start-up and process-0-only output.

Axes are ``data``, ``fsdp`` and ``tensor`` (sizes from ``config.mesh``, -1 = all
remaining devices; ``tensor`` is only used by explicit partition rules). For
multi-slice TPU pods the ``dcn_*`` sizes split each axis
into a slow data-centre-network part (across slices) and a fast ICI part
(within a slice), so FSDP all-gathers stay on ICI and only the data-parallel
gradient reduction crosses slices.

Axis types are Auto on purpose: ``jax.make_mesh`` defaults to Explicit axes in
new JAX, under which ``with_sharding_constraint`` raises.

Multi-process runs (TPU pods, SLURM clusters, N CPU processes on one machine)
use JAX's own multi-controller runtime: every process runs the same program,
``jax.distributed.initialize`` connects them, and jitted steps over global
arrays do the communication.
"""
import math
import os
from typing import Mapping, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdistill.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over the data-parallel axes


def _fields(names, sizes):
  return ", ".join(f"mesh.{n}={s}" for n, s in zip(names, sizes))


def _check_size(name, size, remaining):
  """``mesh.<name>`` is a positive integer (or -1 = the remaining devices, where allowed)."""
  if isinstance(size, bool) or not isinstance(size, int) or not (
      size >= 1 or (remaining and size == -1)):
    raise ConfigError(f"mesh.{name}={size!r} is not valid; accepted: a positive integer"
                      + (", or -1 for the remaining devices" if remaining else
                         " (1 = one slice)"))


def resolve_axis_sizes(sizes, num_devices, names=AXES):
  """Replaces a single -1 by the devices left over; checks the product.

  ``names`` are the ``config.mesh`` fields of ``sizes``: every error names them and the fix.
  """
  for name, size in zip(names, sizes):
    _check_size(name, size, remaining=True)
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ConfigError(f"{_fields(names, sizes)}: at most one axis may be -1 (the remaining "
                      f"devices); give the others sizes, e.g. --config.mesh.{names[1]}=1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      fixed = [n for n, s in zip(names, sizes) if s > 1]
      raise ConfigError(f"{_fields(names, sizes)}: {num_devices} devices are not divisible by "
                        f"the fixed axes (product {known}); accepted: sizes whose product "
                        f"divides {num_devices}, e.g. --config.mesh.{fixed[0]}=1")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"{_fields(names, sizes)} need {math.prod(sizes)} devices, but "
                      f"{num_devices} are available; accepted: sizes whose product is "
                      f"{num_devices}, or -1 for one of them, e.g. --config.mesh.{names[0]}=-1")
  return sizes


def mesh_shapes(mesh_config, num_devices):
  """(ici sizes, dcn sizes), one entry per axis of AXES, from a complete ``config.mesh``.

  The dcn sizes (``dcn_data`` ...) multiply to the number of slices (granules);
  the ici sizes, with -1 resolved, multiply to the devices per slice.
  """
  dcn_names = tuple("dcn_" + a for a in AXES)
  dcn = [mesh_config[n] for n in dcn_names]
  for name, size in zip(dcn_names, dcn):
    _check_size(name, size, remaining=False)
  num_slices = math.prod(dcn)
  if num_devices % num_slices:
    raise ConfigError(f"{_fields(dcn_names, dcn)}: {num_devices} devices do not split into "
                      f"{num_slices} slices; accepted: dcn sizes whose product (the number of "
                      f"slices) divides {num_devices}, e.g. --config.mesh.dcn_data=1")
  ici = resolve_axis_sizes([mesh_config[a] for a in AXES], num_devices // num_slices)
  return ici, dcn


def _auto(n):
  return (jax.sharding.AxisType.Auto,) * n


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh over ``devices`` (default: all, across processes) with axes AXES, sized by
  ``mesh_config`` (a complete ``config.mesh``: configs/common.py)."""
  devices = jax.devices() if devices is None else list(devices)
  ici, dcn = mesh_shapes(mesh_config, len(devices))
  if math.prod(dcn) == 1:
    return jax.make_mesh(ici, AXES, axis_types=_auto(len(AXES)), devices=devices)
  # Multi-slice: slices are TPU slices where the runtime numbers them, else processes.
  by_process = len({getattr(d, "slice_index", None) for d in devices}) != math.prod(dcn)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  return Mesh(grid, AXES, axis_types=_auto(len(AXES)))


def axis_size(mesh: Mesh, axes) -> int:
  """Product of the sizes of mesh ``axes`` (a name or a tuple of names)."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """A clear error where the global batch cannot be split evenly over devices and processes."""
  shards = axis_size(mesh, BATCH_AXES)
  if batch_size % shards or batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={batch_size} must be divisible by the data-parallel "
                      f"devices (data*fsdp = {shards}) and the process count "
                      f"({jax.process_count()})")


def global_batch(local_batch, mesh: Mesh):
  """Assembles each process's numpy slice into one global jax.Array sharded over the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


# --- Multi-process start-up.

def _int_env(env, name, default=0):
  try:
    return int(env.get(name, default))
  except ValueError:
    return default


def cluster_detected(env: Mapping[str, str]) -> Optional[str]:
  """Name of the multi-process launcher this process runs under, or None.

  Only launches with more than one process count: ``srun`` job steps, Open MPI,
  multi-host TPU VMs (several worker hostnames, or a multi-slice coordinator).
  """
  if _int_env(env, "SLURM_STEP_NUM_TASKS", 1) > 1:  # set inside an srun job step
    return "slurm"
  if _int_env(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return "openmpi"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def distributed_kwargs(mode="auto", coordinator_address=None, num_processes=None,
                       process_id=None, env=None):
  """Arguments for ``jax.distributed.initialize``, or None to stay single-process.

  mode: "off" never initialises; "on" always does (JAX auto-detects TPU pods,
  SLURM, Open MPI, ... for what is not given); "auto" does when a coordinator
  is given (flag or ``JAX_COORDINATOR_ADDRESS``) or a multi-process launcher is
  detected (:func:`cluster_detected`). ``FDISTILL_DISTRIBUTED=1`` means "on".
  """
  env = os.environ if env is None else env
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"--distributed={mode!r}; valid values: auto, on, off")
  if mode == "off":
    return None
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  explicit = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                    num_processes=num_processes, process_id=process_id).items()
              if v is not None}
  wanted = (mode == "on" or explicit or env.get("FDISTILL_DISTRIBUTED", "") in ("1", "true")
            or cluster_detected(env))
  return explicit if wanted else None


def maybe_initialize_distributed(mode="auto", coordinator_address=None, num_processes=None,
                                 process_id=None):
  """Starts jax.distributed when this is one process of several; else a no-op.

  Must run before any JAX computation. Returns True if it initialised.
  """
  kwargs = distributed_kwargs(mode, coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_main_process() -> bool:
  """Process 0 alone writes metrics, configs and sample images."""
  return jax.process_index() == 0


def quiet_other_processes() -> None:
  """Only process 0 logs below WARNING, so N hosts do not print N copies of each line."""
  if not is_main_process():
    logging.set_verbosity(logging.WARNING)

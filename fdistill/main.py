"""Command-line entry point.

  python -m fdistill.main --config=configs/toy2d_teacher.py --workdir=runs/t --mode=train_teacher
Modes: train_teacher | distill | eval | sample.

Multi-process (TPU pods, SLURM, N local CPU processes): every process runs this
same command; ``--distributed`` and the coordinator flags start
``jax.distributed`` (see launch/ and README "Sharded and multi-host training").
"""
from absl import app, flags
from ml_collections import config_flags

from fdistill.modes import MODES, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_MODE = flags.DEFINE_enum("mode", "train_teacher", MODES, "What to run.")
_NUM = flags.DEFINE_integer("num_samples", 0, "sample mode: how many (0 = eval.num_plot_samples).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize: auto = when a coordinator is given or srun / Open MPI / a "
    "multi-host TPU is detected; on = always (JAX auto-detects the cluster); off = never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: detected or "
                                   "$JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (default: detected).")


def load_config_file(spec):
  """``path[:arg]`` -> ``get_config(arg)`` of that file (what --config does)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_fdistill_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def unknown_override(config, override):
  """For ``--config.a.b=v``: a message naming the unknown field and the valid ones, or None."""
  keys = override.split("=", 1)[0][len("--config."):].split(".")
  node, prefix = config, "config"
  for key in keys:
    if not hasattr(node, "keys") or key not in node:
      valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
      return f"unknown config field {prefix}.{key}; valid fields of {prefix}: {valid}"
    node, prefix = node[key], f"{prefix}.{key}"
  return None


def parse_flags(argv):
  """absl flag parsing with a clear error for overrides of unknown config fields."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec:
      config = load_config_file(spec)
      for arg in argv:
        message = arg.startswith("--config.") and unknown_override(config, arg)
        if message:
          raise SystemExit(f"FATAL: {message}") from e
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  from fdistill.parallel import mesh as mesh_lib
  mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                        _NUM_PROCESSES.value, _PROCESS_ID.value)
  mesh_lib.quiet_other_processes()
  run(_CONFIG.value, _WORKDIR.value, _MODE.value, _NUM.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)

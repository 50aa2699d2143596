"""Command-line entry point.

  python -m fdistill.main --config=configs/toy2d_teacher.py --workdir=runs/t --mode=train_teacher
Modes: train_teacher | distill | eval | sample.

Every user error (config, flags, workdir, teacher, data, checkpoints) ends
the run with one line ``FATAL: <what>`` on stderr and exit status 2, before
anything is written; ``--traceback`` (or ``FDISTILL_TRACEBACK=1``) shows the
traceback instead. Bugs (any other exception) keep their traceback.

Multi-process (TPU pods, SLURM, N local CPU processes): every process runs this
same command; ``--distributed`` and the coordinator flags start
``jax.distributed`` (see launch/ and docs/usage.md, "Sharded and multi-host training").
"""
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no TensorFlow banner (before any import)

from absl import app, flags
from ml_collections import config_flags

from fdistill.configfile import load_config_file
from fdistill.errors import USER_ERRORS
from fdistill.modes import MODES, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_MODE = flags.DEFINE_string("mode", "train_teacher", f"What to run: {' | '.join(MODES)}.")
_NUM = flags.DEFINE_integer("num_samples", 0, "sample mode: how many (0 = eval.num_plot_samples).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "sample / eval: sampler steps (0 = "
                                  "eval.sampler_steps; few-step generators take 1..4).")
_CACHE = flags.DEFINE_string(
    "compile_cache", "", "Persistent XLA compilation cache directory, so a restarted run "
    "reuses its compiled steps: default $JAX_COMPILATION_CACHE_DIR, else <workdir>/compile_cache; "
    "'none' turns it off. On pods use a shared filesystem or bucket path.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of user errors too "
                               "(also FDISTILL_TRACEBACK=1).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize: auto = when a coordinator is given or srun / Open MPI / a "
    "multi-host TPU is detected; on = always (JAX auto-detects the cluster); off = never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: detected or "
                                   "$JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (default: detected).")


def show_tracebacks(argv=()) -> bool:
  return (os.environ.get("FDISTILL_TRACEBACK", "") in ("1", "true") or
          "--traceback" in argv or (flags.FLAGS.is_parsed() and _TRACEBACK.value))


def fatal(message: str, argv=(), hard: bool = False):
  """One line on stderr and exit status 2 (the traceback too where asked for).

  ``hard``: after the run started (JAX, orbax and tensorstore threads alive), leave with
  ``os._exit`` once the streams are flushed. A failed orbax read abandons its sibling reads,
  which tensorstore later delivers to a closed asyncio loop; at interpreter shutdown they
  print ``Event loop is closed`` tracebacks after the FATAL line. Nothing is lost by
  skipping the shutdown: every file is written atomically and locks are released by then.
  """
  if show_tracebacks(argv):
    traceback.print_exc()
  first = " ".join(str(message).split())  # one line, whatever the exception held
  print(f"FATAL: {first}", file=sys.stderr, flush=True)
  if hard:
    sys.stdout.flush()
    os._exit(2)
  sys.exit(2)


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
  """absl flag parsing; every error in the flags or the config is one FATAL line."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  try:
    if spec is not None:
      load_config_file(spec)  # the config's own errors (missing file, bad variant) first
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError,
          FileNotFoundError) as e:
    message = str(e)
    if spec is not None and isinstance(e, (KeyError, AttributeError)):
      config = load_config_file(spec)
      message = next((m for m in (arg.startswith("--config.") and unknown_override(config, arg)
                                  for arg in argv) if m), message)
    fatal(message, argv)


def enable_compile_cache(flag_value, workdir):
  """Turns JAX's persistent compilation cache on (before anything compiles); returns the dir."""
  import jax
  path = flag_value or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      workdir, "compile_cache")
  if path == "none":
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def missing_dirs(*paths):
  """The local directories among ``paths`` that do not exist yet: what this command creates."""
  return [p for p in paths if p and "://" not in p and not os.path.exists(p)]


def remove_created(created, cache_dir, workdir):
  """After a failed command: the compile cache it created, then its workdir if it created
  that and nothing else is in it (a failed command leaves nothing on disk)."""
  import shutil
  if cache_dir in created:
    shutil.rmtree(cache_dir, ignore_errors=True)
  if workdir in created and os.path.isdir(workdir) and not os.listdir(workdir):
    os.rmdir(workdir)


def main(argv):
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    from fdistill.io import console
    console.quiet_libraries()  # the run's own lines only; --verbosity=0 shows library logs
  if len(argv) > 1:
    fatal(f"unexpected arguments {argv[1:]}; flags are --name=value")
  if _CONFIG.value is None:
    fatal("--config is required (e.g. --config=configs/toy2d_teacher.py:gmm25)")
  if _WORKDIR.value is None:
    fatal("--workdir is required (a directory; created if missing)")
  if _MODE.value not in MODES:
    fatal(f"--mode={_MODE.value!r}; valid values: {', '.join(MODES)}")
  from fdistill.io import plotting
  from fdistill.parallel import mesh as mesh_lib
  plotting.use_headless_backend()
  cache_dir = enable_compile_cache(_CACHE.value, _WORKDIR.value)
  created = missing_dirs(_WORKDIR.value, cache_dir)
  try:
    mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                          _NUM_PROCESSES.value, _PROCESS_ID.value)
    mesh_lib.quiet_other_processes()
    config = _CONFIG.value
    if _NUM_STEPS.value:
      config = config.copy_and_resolve_references()
      config.eval.sampler_steps = _NUM_STEPS.value
    run(config, _WORKDIR.value, _MODE.value, _NUM.value)
  except USER_ERRORS as e:
    remove_created(created, cache_dir, _WORKDIR.value)
    fatal(e, hard=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

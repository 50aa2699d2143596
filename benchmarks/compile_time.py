"""Where the time to a first step goes: compile seconds of a network's forward, its backward,
and each distillation step the trainer runs, under XLA flag sets; and a restart's compile with
the persistent compilation cache.

  python benchmarks/compile_time.py                           # reduced DDPM++, b16, fp32
  python benchmarks/compile_time.py --net=ddpmpp --full        # full-width DDPM++ (minutes)
  python benchmarks/compile_time.py --net=adm --objectives=fdistill --flag_sets=default
  python benchmarks/compile_time.py --quick                    # toy MLP: the CPU test's setting

Every row runs in its own process (XLA flags are read once per process, and the peak
resident memory of a process is the peak of what it compiled): it builds the program from
shapes alone (``jax.jit(...).lower(...)``, no weights, nothing run), then

  compile_s    wall seconds of ``lowered.compile()``
  compile_cpu  CPU seconds of the process during that compile (all threads): the work,
               robust to other load on the machine, where wall time is not
  peak_GB      the process's peak resident memory (``ru_maxrss``) after the compile
  hit          with the cache on: whether the executable came from the persistent cache
  hlo_s, llvm_s  XLA:CPU's own timers (its compiler's VLOG lines) of the program's module:
               the HLO pass pipeline, and code generation (LLVM) with the JIT: where the
               compile time goes

Programs: ``forward`` (the denoiser), ``backward`` (the gradient of a scalar of the denoiser's
output w.r.t. its params and input), and per objective every kind of step of
``fdistill.experiment.build`` (the jitted programs the loop runs; configs of
``benchmarks/distill_step.py``). Flag sets (``--flag_sets``): ``default``, ``no_expensive``
(LLVM's expensive passes off), ``o0`` (XLA:CPU backend optimisation level 0: what the CPU tests
use). ``--restart`` adds, per step, a first compile into an empty persistent cache and a
second process's compile of the same program: the time a resumed run pays.
Rows print as a markdown table and go to ``--out`` as JSON.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # benchmarks/: compile_time, distill_step

FLAG_SETS = {
    "default": "",
    "no_expensive": "--xla_llvm_disable_expensive_passes=true",
    "o0": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
}


def cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def toy_config(objective):
  """The toy MLP of the demo with ``objective``'s toy config (analytic teacher: no run needed)."""
  import importlib
  module, variant = {"fdistill": ("toy2d_fdistill", "js"),
                     "expanded": ("toy2d_uni_instruct", "forward_kl"),
                     "rcm": ("toy2d_rcm", "rcm")}[objective]
  return importlib.import_module(f"configs.{module}").get_config(f"{variant},teacher=analytic")


def build_programs(spec):
  """{program name: (jitted fn, abstract args)} of one row's network and objective."""
  import jax
  import jax.numpy as jnp
  from fdistill import experiment, models, teachers
  from fdistill.parallel import mesh as mesh_lib
  if spec["net"] == "toy":
    config = toy_config(spec["objective"])
    x_shape, cond_dim = (2,), 0
    teacher = teachers.spec(config, x_shape, cond_dim)
    dataset = None
  else:
    import distill_step as ds  # benchmarks/: the step benchmark's configs of each objective
    config, x_shape, cond_dim = ds.make_config(dict(
        net=spec["net"], small=not spec["full"], dit_size="B", dtype="float32",
        attn_impl="", objective=spec["objective"] or "fdistill", batch=spec["batch"]))
    teacher, _ = ds.random_teacher(config, x_shape, cond_dim)
    dataset = ds.ShapeOnlyData(x_shape, cond_dim)
  config.train.batch_size = spec["batch"]
  b = spec["batch"]
  x = jax.ShapeDtypeStruct((b,) + tuple(x_shape), jnp.float32)
  sigma = jax.ShapeDtypeStruct((b,), jnp.float32)
  cond = jax.ShapeDtypeStruct((b, cond_dim), jnp.float32) if cond_dim else None
  programs = {}
  if spec["program"] in ("forward", "backward"):
    apply = teacher.apply
    if spec["program"] == "forward":
      programs["forward"] = (jax.jit(apply), (teacher.abstract, x, sigma, cond))
    else:
      scalar = lambda p, x, s, c: jnp.sum(apply(p, x, s, c) ** 2)
      programs["backward"] = (jax.jit(jax.grad(scalar, argnums=(0, 1))),
                              (teacher.abstract, x, sigma, cond))
    return programs
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  exp = experiment.build(config, mesh, teacher_params=False, dataset=dataset, teacher_spec=teacher)
  batch = {"x": x} if not cond_dim else {"x": x, "cond": cond}
  key = jax.eval_shape(lambda: jax.random.key(0))
  state = exp.abstract_state
  kinds = [spec["program"]] if spec["program"] in exp.steps else list(exp.steps)
  for kind in kinds:
    programs[f"{spec['objective']}:{kind}"] = (exp.steps[kind],
                                               (state, teacher.abstract, batch, key))
  return programs


def run_row(spec):
  """Compiles one program in this process; returns its row."""
  import jax
  if spec.get("cache_dir"):
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  (name, (fn, args)), = build_programs(spec).items()
  lowered = fn.lower(*args)
  cache_before = _cache_files(spec.get("cache_dir"))
  cpu, wall = cpu_seconds(), time.perf_counter()
  lowered.compile()
  row = dict(spec, program=name, compile_s=round(time.perf_counter() - wall, 2),
             compile_cpu=round(cpu_seconds() - cpu, 2),
             peak_GB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
  if spec.get("cache_dir"):
    # A hit writes nothing new; a miss stores the executable.
    row["hit"] = _cache_files(spec["cache_dir"]) == cache_before
  return row


def _cache_files(cache_dir):
  if not cache_dir or not os.path.isdir(cache_dir):
    return set()
  return set(os.listdir(cache_dir))


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_PHASES = {"hlo_s": r"Running HLO passes on \[(\S+)\] for CPU time: ([\d.]+) (us|ms|s) ",
           "llvm_s": r"Compiling \[(\S+)\] for CPU using JIT time: ([\d.]+) (us|ms|s) "}


def compile_phases(log):
  """{"hlo_s", "llvm_s"} of the module with the longest code generation in ``log`` (XLA:CPU's
  ``cpu_compiler`` VLOG lines): the program compiled, not the small helpers beside it."""
  times = {phase: {} for phase in _PHASES}
  for phase, pattern in _PHASES.items():
    for module, value, unit in re.findall(pattern, log):
      times[phase][module] = times[phase].get(module, 0.0) + float(value) * _UNITS[unit]
  if not times["llvm_s"]:
    return {}
  module = max(times["llvm_s"], key=times["llvm_s"].get)
  return {phase: round(times[phase].get(module, 0.0), 2) for phase in _PHASES}


def in_subprocess(spec, timeout):
  """``run_row(spec)`` in a fresh process with the row's XLA flags (one CPU device)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FLAG_SETS[spec["flags"]],
             PYTHONPATH=os.pathsep.join([HERE, *filter(None, [os.environ.get("PYTHONPATH")])]),
             TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="cpu_compiler=1")
  with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
    code = ("import json; import compile_time as ct; "
            f"json.dump(ct.run_row(json.loads({json.dumps(json.dumps(spec))})), "
            f"open({out.name!r}, 'w'))")
    try:
      proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return dict(spec, status=f"timeout {timeout} s")
    if proc.returncode:
      return dict(spec, status="error: " + proc.stderr.strip().splitlines()[-1][:200])
    return dict(json.load(open(out.name)), **compile_phases(proc.stderr))


def row_specs(args):
  base = dict(net=args.net, full=args.full, batch=args.batch)
  specs = []
  for flags in args.flag_sets.split(","):
    if flags not in FLAG_SETS:
      raise SystemExit(f"FATAL: --flag_sets: {flags!r} is not valid; valid values: "
                       f"{', '.join(FLAG_SETS)}")
    if args.net != "toy":
      specs += [dict(base, flags=flags, objective="", program=p) for p in ("forward", "backward")]
    for objective in args.objectives.split(","):
      for kind in args.kinds.split(","):
        specs.append(dict(base, flags=flags, objective=objective, program=kind))
  return specs


def markdown(rows):
  cols = ("net", "batch", "flags", "program", "compile_s", "compile_cpu", "hlo_s", "llvm_s",
          "peak_GB", "hit")
  head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
  body = "".join("| " + " | ".join(str(r.get(c, r.get("status", ""))) if c != "net" else
                                   r["net"] + ("" if r.get("full") or r["net"] == "toy"
                                               else " (reduced)") for c in cols) + " |\n"
                 for r in rows)
  return head + body


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--net", default="ddpmpp", help="ddpmpp | adm | dit | toy")
  p.add_argument("--full", action="store_true", help="full-width networks (default: reduced)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--objectives", default="fdistill", help="fdistill,sid,expanded,rcm")
  p.add_argument("--kinds", default="generator,critic", help="kinds of step to compile")
  p.add_argument("--flag_sets", default="default,o0")
  p.add_argument("--restart", action="store_true",
                 help="per step: compile into an empty persistent cache, then again in a new "
                      "process (the restart)")
  p.add_argument("--quick", action="store_true", help="toy MLP, f-distill, default flags")
  p.add_argument("--timeout", type=int, default=1800)
  p.add_argument("--out", default="runs/compile_time.json")
  args = p.parse_args(argv)
  if args.quick:
    args.net, args.batch, args.objectives, args.flag_sets = "toy", 64, "fdistill", "default"
  rows = []
  for spec in row_specs(args):
    if args.restart and spec["objective"]:
      cache = tempfile.mkdtemp(prefix="fdistill_compile_cache_")
      for attempt in ("fresh", "restart"):
        rows.append(dict(in_subprocess(dict(spec, cache_dir=cache), args.timeout),
                         flags=f"{spec['flags']} ({attempt})"))
    else:
      rows.append(in_subprocess(spec, args.timeout))
    print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  print(markdown(rows))
  return rows


if __name__ == "__main__":
  main()

"""The demo's quality frontier: precision against distillation steps and wall time, per family.

  python benchmarks/toy2d_frontier.py --teacher_dir=runs/demo/teacher --steps=8000 --every=1000
  python benchmarks/toy2d_frontier.py --steps=2000 --every=2000 --seeds=0,1,2   # the demo's rows, 3 seeds
  python benchmarks/toy2d_frontier.py --steps=4000 --every=4000 \
      --students=toy2d_uni_instruct:reverse_kl:1 --set=optim.ema_decay=0.999  # other settings

For each of the demo's students (``fdistill.demo.STUDENTS``: the best measured setting of each
family) this trains one run of ``--steps`` steps from the demo's teacher with the normal CLI
modes, saving a checkpoint every ``--every`` steps, then the eval job scores every checkpoint
against the exact mixture (5000 samples; rCM rows with their own sampler-step count). The
seconds column is the run's training wall time up to that checkpoint (steps cost the same, so
the time of the whole run times the share of its steps; compile included in the first).
With several ``--seeds`` (``config.seed``: the students' init and noise; the teacher stays the
demo's) each cell is the mean +- standard deviation over seeds. Prints one markdown table and
writes it to ``--out``/frontier.md.
"""
import argparse
import os
import shutil
import time

import numpy as np

import toy2d_divergences as study  # benchmarks/ (the script's folder): the 2-D study's --set
from fdistill import demo, modes
from fdistill.io import console


def run_family(students, config_name, variant, teacher_dir, workdir, steps, every, seed=0,
               overrides=None):
  """(training seconds, {row name: {step: metrics}}) of one run; ``overrides``:
  {"SECTION.FIELD": value} (``--set``, parsed as in the 2-D study)."""
  config = demo.student_config(config_name, variant, teacher_dir, steps)
  config.seed = seed
  study.apply_overrides(config, overrides)
  config.train.update(dict(save_every=every, keep_checkpoints=steps // every + 1))
  start = time.time()
  modes.run(config, workdir, "distill")
  seconds = time.time() - start
  results = {}
  for name, cfg, var, sampler_steps, *_ in students:
    if (cfg, var) != (config_name, variant):
      continue
    config.eval.sampler_steps = sampler_steps
    eval_dir = os.path.join(workdir, "eval")
    if os.path.exists(eval_dir):
      shutil.rmtree(eval_dir)
    results[name] = modes.run(config, workdir, "eval")
  return seconds, results


def mean_sd(values, fmt):
  """``fmt`` of the mean, and ``+- sd`` (sample standard deviation) with several values."""
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return format(values[0], fmt)
  return f"{format(values.mean(), fmt)} +- {format(values.std(ddof=1), fmt)}"


def table_rows(cells, seeds):
  """Markdown rows of ``cells``: {(name, step): [(seconds, metrics) per seed]}."""
  rows = []
  for (name, step), runs in cells.items():
    seconds = [s for s, _ in runs]
    metric = lambda key: [m[key] for _, m in runs]
    rows.append(f"| {name} | {step} | {len(seeds)} | {np.mean(seconds):.0f} | "
                f"{mean_sd(metric('eval/modes_covered'), '.1f')}/{runs[0][1]['eval/num_modes']}"
                f" | {mean_sd(metric('eval/precision'), '.3f')} | "
                f"{mean_sd(metric('eval/weight_recall'), '.3f')} |")
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher_dir", default="runs/demo/teacher")
  p.add_argument("--steps", type=int, default=8000)
  p.add_argument("--every", type=int, default=1000)
  p.add_argument("--seeds", default="0", help="comma list of config.seed values")
  p.add_argument("--only", default="", help="only the students whose row name contains this")
  p.add_argument("--students", default="",
                 help="instead of the demo's: comma list of config:variant:sampler_steps, e.g. "
                      "toy2d_uni_instruct:reverse_kl:1")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="a config field of every run, e.g. --set=optim.ema_decay=0.999 "
                      "(as toy2d_divergences.py's --set)")
  p.add_argument("--out", default="runs/toy2d_frontier")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  console.quiet_libraries()
  cells = {}
  students = demo.STUDENTS
  if args.students:
    students = tuple((f"{cfg}:{var} ({n} step{'s' * (n != '1')})", cfg, var, int(n))
                     for cfg, var, n in (item.split(":") for item in args.students.split(",")))
  families = dict.fromkeys((cfg, var) for name, cfg, var, *_ in students if args.only in name)
  for config_name, variant in families:
    for seed in seeds:
      workdir = os.path.join(args.out, f"{config_name}_{variant}_seed{seed}")
      if os.path.exists(workdir):
        shutil.rmtree(workdir)
      with console.silenced():  # one line per run here, not the runs' own lines
        seconds, results = run_family(students, config_name, variant, args.teacher_dir,
                                      workdir, args.steps, args.every, seed,
                                      study.parse_overrides(args.set))
      for name, by_step in results.items():
        for step, m in sorted(by_step.items()):
          cells.setdefault((name, step), []).append((step * seconds / args.steps, m))
      print(f"{config_name}:{variant} seed {seed}: {seconds:.0f} s", flush=True)
  table = ("| student | steps | seeds | seconds | modes | precision | weight recall |\n"
           "|---|---|---|---|---|---|---|\n" + "\n".join(table_rows(cells, seeds)) + "\n")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "frontier.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()

"""The demo's quality frontier: precision against distillation steps and wall time, per family.

  python benchmarks/toy2d_frontier.py --teacher_dir=runs/demo/teacher --steps=8000 --every=1000

For each of the demo's students (``fdistill.demo.STUDENTS``: the best measured setting of each
family) this trains one run of ``--steps`` steps from the demo's teacher with the normal CLI
modes, saving a checkpoint every ``--every`` steps, then the eval job scores every checkpoint
against the exact mixture (5000 samples; rCM rows with their own sampler-step count). The
seconds column is the run's training wall time up to that checkpoint (steps cost the same, so
the time of the whole run times the share of its steps; compile included in the first).
Prints one markdown table and writes it to ``--out``/frontier.md.
"""
import argparse
import importlib
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fdistill import demo, modes  # noqa: E402
from fdistill.io import console  # noqa: E402


def run_family(config_name, variant, teacher_dir, workdir, steps, every):
  """(training seconds, {sampler steps: {step: metrics}}) of one run."""
  module = importlib.import_module(f"configs.{config_name}")
  config = module.get_config(f"{variant},teacher_dir={teacher_dir},steps={steps}")
  config.train.update(dict(save_every=every, keep_checkpoints=steps // every + 1))
  start = time.time()
  modes.run(config, workdir, "distill")
  seconds = time.time() - start
  results = {}
  for name, cfg, var, sampler_steps in demo.STUDENTS:
    if (cfg, var) != (config_name, variant):
      continue
    config.eval.sampler_steps = sampler_steps
    eval_dir = os.path.join(workdir, "eval")
    if os.path.exists(eval_dir):
      shutil.rmtree(eval_dir)
    results[name] = modes.run(config, workdir, "eval")
  return seconds, results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher_dir", default="runs/demo/teacher")
  p.add_argument("--steps", type=int, default=8000)
  p.add_argument("--every", type=int, default=1000)
  p.add_argument("--out", default="runs/toy2d_frontier")
  args = p.parse_args(argv)
  console.quiet_libraries()
  console.ENABLED = False
  rows = []
  families = dict.fromkeys((cfg, var) for _, cfg, var, _ in demo.STUDENTS)
  for config_name, variant in families:
    workdir = os.path.join(args.out, f"{config_name}_{variant}")
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    seconds, results = run_family(config_name, variant, args.teacher_dir, workdir, args.steps,
                                  args.every)
    for name, by_step in results.items():
      for step, m in sorted(by_step.items()):
        rows.append(f"| {name} | {step} | {step * seconds / args.steps:.0f} | "
                    f"{m['eval/modes_covered']}/{m['eval/num_modes']} | "
                    f"{m['eval/precision']:.3f} | {m['eval/weight_recall']:.3f} |")
    print("\n".join(rows[-len(results) * (args.steps // args.every):]), flush=True)
  table = ("| student | steps | seconds | modes | precision | weight recall |\n"
           "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "frontier.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()

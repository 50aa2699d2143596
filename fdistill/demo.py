"""The embedded default main job (``make demo``): CPU, no download, a few minutes.

Stages, each a normal CLI mode on a config from configs/:
  1. train a teacher by DSM on the 25-mode 2-D GMM (configs/toy2d_teacher.py);
  2. sample it with the Heun sampler (scatter PNG) and score it against the exact mixture;
  3. (when available) distil it into a one-step generator and score that the same way.
Writes ``<workdir>/summary.md``: one table, teacher and students side by side.
"""
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.getcwd())  # configs/ lives at the repo root

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings (tests).")

COLUMNS = ("modes_covered", "precision", "weight_recall", "log_density")


def teacher_stage(workdir, quick):
  """Trains, samples and evaluates the toy teacher; returns its final eval metrics."""
  from configs import toy2d_teacher
  from fdistill import modes
  config = toy2d_teacher.get_config("gmm25")
  if quick:
    config.train.num_steps, config.train.save_every, config.eval.num_samples = 200, 200, 500
  modes.run(config, workdir, "train_teacher")
  modes.run(config, workdir, "sample")
  results = modes.run(config, workdir, "eval")
  return results[config.train.num_steps]


def exact_data_row(num=5000):
  """The metrics of true samples: the ceiling every model is compared with."""
  import jax
  from fdistill.diffusion import gmm as gmm_lib
  from fdistill.eval import toy_metrics
  gmm = gmm_lib.gmm25()
  stats = toy_metrics.mode_statistics(gmm, gmm_lib.sample(gmm, jax.random.key(1), num))
  return {"eval/" + k: v for k, v in stats.items()}


# Distillation stages: for each divergence, the same three CLI modes a user would run
# (distill, sample, eval) on configs/toy2d_fdistill.py:<divergence>,teacher_dir=<teacher>.
DIVERGENCES = ("reverse_kl", "js", "forward_kl")
STEPS, QUICK_STEPS = 2000, 20


def distill_one(divergence, teacher_dir, workdir, steps):
  """Distils, samples and evaluates one divergence; returns the final eval metrics."""
  from configs import toy2d_fdistill
  from fdistill import modes
  config = toy2d_fdistill.get_config(f"{divergence},teacher_dir={teacher_dir},steps={steps}")
  if steps < STEPS:  # quick: fewer eval samples too
    config.eval.num_samples = 500
  modes.run(config, workdir, "distill")
  modes.run(config, workdir, "sample")
  return modes.run(config, workdir, "eval")[steps]


def distill_stages(teacher_dir, workdir, quick=False):
  """{row name: eval metrics} of one-step generators distilled from ``teacher_dir``."""
  steps = QUICK_STEPS if quick else STEPS
  return {f"f-distill {name} (1 step)": distill_one(name, teacher_dir,
                                                    os.path.join(workdir, f"fdistill_{name}"),
                                                    steps)
          for name in DIVERGENCES}


def summary_table(rows):
  """Markdown table of {name: metrics}."""
  head = "| model | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
  body = "".join(
      f"| {name} | " + " | ".join(f"{m.get('eval/' + c, float('nan')):.3f}" if c != "modes_covered"
                                  else f"{m.get('eval/' + c, 0)}/{m.get('eval/num_modes', 0)}"
                                  for c in COLUMNS) + " |\n"
      for name, m in rows.items())
  return head + body


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  workdir = _WORKDIR.value
  teacher_dir = os.path.join(workdir, "teacher")
  rows = {"data (exact samples)": exact_data_row(),
          "teacher (Heun, 32 steps)": teacher_stage(teacher_dir, _QUICK.value)}
  rows.update(distill_stages(teacher_dir, workdir, _QUICK.value))
  table = summary_table(rows)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table)
  print(f"\nfdistill demo: 25-mode 2-D GMM, exact metrics of 5000 samples ({time.time() - start:.0f} s)\n")
  print(table)
  print(f"Samples and metrics under {workdir}/")


if __name__ == "__main__":
  app.run(main)

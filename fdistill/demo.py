"""The embedded default main job (``make demo``): CPU, no download, a few minutes.

Stages, each a normal CLI mode on a config from configs/:
  1. train a teacher by DSM on the 25-mode 2-D GMM (configs/toy2d_teacher.py: an MLP with
     random Fourier features of its input, which the students copy);
  2. sample it with the Heun sampler (scatter PNG) and score it against the exact mixture;
  3. distil it into students of every family (f-distill, Uni-Instruct, rCM with 1 and 2
     steps; ``STUDENTS``) and score each the same way.
Prints one line per stage and writes ``<workdir>/summary.md``: one table, the exact data,
the teacher and the students side by side.
"""
import os
import sys
import time

from absl import app, flags

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


# Distillation stages: for each student, the same three CLI modes a user would run
# (distill, sample, eval) on a configs/ file, teacher_dir=<the demo's teacher>.
# (row name, config module, variant, sampler steps); one row per family at least.
STUDENTS = (
    ("f-distill reverse KL (1 step)", "toy2d_fdistill", "reverse_kl", 1),
    ("f-distill JS (1 step)", "toy2d_fdistill", "js", 1),
    ("f-distill forward KL (1 step)", "toy2d_fdistill", "forward_kl", 1),
    ("Uni-Instruct forward KL (1 step)", "toy2d_uni_instruct", "forward_kl", 1),
    ("rCM (1 step)", "toy2d_rcm", "rcm", 1),
    ("rCM (2 steps)", "toy2d_rcm", "rcm", 2),
)
STEPS, QUICK_STEPS = 2000, 20


def distill_one(config_name, variant, teacher_dir, workdir, steps, sampler_steps):
  """Distils (once per workdir), samples and evaluates one student; its final eval metrics."""
  import importlib
  from fdistill import modes
  module = importlib.import_module(f"configs.{config_name}")
  config = module.get_config(f"{variant},teacher_dir={teacher_dir},steps={steps}")
  config.eval.sampler_steps = sampler_steps
  if steps < STEPS:  # quick: fewer eval samples too
    config.eval.num_samples = 500
  modes.run(config, workdir, "distill")  # a second row of the same run resumes at the end
  modes.run(config, workdir, "sample")
  eval_dir = os.path.join(workdir, "eval")
  if os.path.exists(eval_dir):  # another sampler-step count of the same run: evaluate afresh
    os.rename(eval_dir, f"{eval_dir}_{int(time.time() * 1000)}")
  return modes.run(config, workdir, "eval")[steps]


def distill_stages(teacher_dir, workdir, quick=False):
  """{row name: eval metrics} of the students distilled from ``teacher_dir``."""
  steps = QUICK_STEPS if quick else STEPS
  rows = {}
  for name, config_name, variant, sampler_steps in STUDENTS:
    start = time.time()
    rows[name] = distill_one(config_name, variant, teacher_dir,
                             os.path.join(workdir, f"{config_name}_{variant}"), steps,
                             sampler_steps)
    print(f"{name}: {time.time() - start:.0f} s", flush=True)
  return rows


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
  from fdistill.io import console
  console.quiet_libraries()
  console.ENABLED = False  # one line per stage here, not the runs' own progress lines
  start = time.time()
  workdir = _WORKDIR.value
  teacher_dir = os.path.join(workdir, "teacher")
  rows = {"data (exact samples)": exact_data_row()}
  rows["teacher (Heun, 32 steps)"] = teacher_stage(teacher_dir, _QUICK.value)
  print(f"teacher: {time.time() - start:.0f} s", flush=True)
  rows.update(distill_stages(teacher_dir, workdir, _QUICK.value))
  table = summary_table(rows)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table)
  print(f"\nfdistill demo: 25-mode 2-D GMM, exact metrics of 5000 samples ({time.time() - start:.0f} s)\n")
  print(table)
  print(f"Samples and metrics under {workdir}/")


if __name__ == "__main__":
  app.run(main)

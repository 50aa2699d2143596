"""The embedded default main job (``make demo``): CPU, no download, a few minutes.

Stages, each a normal CLI mode on a config from configs/:
  1. train a teacher by DSM on the 25-mode 2-D GMM (configs/toy2d_teacher.py: an MLP with
     random Fourier features of its input, which the students copy);
  2. sample it with the Heun sampler (scatter PNG) and score it against the exact mixture;
  3. distil it into students of every family (f-distill, Uni-Instruct, rCM with 1 and 2
     steps; ``STUDENTS``) and score each the same way.
Prints one line per stage and writes ``<workdir>/summary.md`` (one table: the exact data,
the teacher and the students, with their training steps and seconds) and
``<workdir>/summary.png`` (their samples side by side).
"""
import os
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings (tests).")

COLUMNS = ("modes_covered", "precision", "weight_recall", "log_density")


def timed(fn, *args):
  """(fn(*args), seconds)."""
  start = time.time()
  return fn(*args), time.time() - start


def run_stage(config, workdir, train_mode, sampler_steps=None):
  """Trains (once per workdir: a second call resumes at the end), samples and evaluates one
  model with the normal CLI modes. Returns (final eval metrics, plot samples, train seconds)."""
  import numpy as np
  from fdistill import modes
  if sampler_steps is not None:
    config.eval.sampler_steps = sampler_steps
  _, seconds = timed(modes.run, config, workdir, train_mode)
  samples = np.load(modes.run(config, workdir, "sample").replace(".png", ".npy"))
  eval_dir = os.path.join(workdir, "eval")
  if os.path.exists(eval_dir):  # another sampler-step count of the same run: evaluate afresh
    os.rename(eval_dir, f"{eval_dir}_{int(time.time() * 1000)}")
  metrics = modes.run(config, workdir, "eval")[config.train.num_steps]
  return dict(metrics, steps=config.train.num_steps, seconds=seconds), samples


def shrink(config, steps):
  """The ``--quick`` setting of a stage's config (tests): small networks, ``steps`` steps,
  500 samples."""
  config.model.hidden, config.model.emb_dim, config.model.input_fourier = (64, 64), 32, 32
  config.train.batch_size, config.train.num_steps, config.train.save_every = 128, steps, steps
  config.eval.num_samples = config.eval.num_plot_samples = 500
  return config


def teacher_stage(workdir, quick):
  """Trains, samples and evaluates the toy teacher: (metrics row, plot samples)."""
  from configs import toy2d_teacher
  config = toy2d_teacher.get_config("gmm25")
  if quick:
    shrink(config, QUICK_TEACHER_STEPS)
  return run_stage(config, workdir, "train_teacher")


def exact_data_row(num=5000):
  """The metrics and plot samples of true samples: the ceiling every model is compared with."""
  import jax
  from fdistill.diffusion import gmm as gmm_lib
  from fdistill.eval import toy_metrics
  gmm = gmm_lib.gmm25()
  samples = gmm_lib.sample(gmm, jax.random.key(1), num)
  stats = toy_metrics.mode_statistics(gmm, samples)
  return {"eval/" + k: v for k, v in stats.items()}, samples[:2000]


# Distillation stages: for each student, the same three CLI modes a user would run
# (distill, sample, eval) on a configs/ file, teacher_dir=<the demo's teacher>.
# (row name, config module, variant, sampler steps, training steps): the best measured setting
# of each family within the demo's time (docs/toy_results.md, "The demo's students"); rows of
# one (module, variant) share one run. The Uni-Instruct family's best here is DMD2 (reverse
# KL + GAN term: 0.688 against the expanded reverse KL's 0.656 and forward KL's 0.433 at 4000
# steps, 3 seeds); the rCM family's is its sCM setting (no DMD part: 0.764 one-step against
# rCM's 0.723 at 4000 steps, and twice the steps per second), so it gets most of the time.
STUDENTS = (
    ("f-distill JS (1 step)", "toy2d_fdistill", "js", 1, 3000),
    ("DMD2, Uni-Instruct family (1 step)", "toy2d_uni_instruct", "dmd2", 1, 3000),
    ("sCM, rCM family (1 step)", "toy2d_rcm", "scm", 1, 20000),
    ("sCM, rCM family (2 steps)", "toy2d_rcm", "scm", 2, 20000),
    ("sCM, rCM family (4 steps)", "toy2d_rcm", "scm", 4, 20000),
)
# The sCM student's intermediate sampler times (objective.sampler_times; the config's are
# sCM's (1.3, 1.0, 0.6)): low times, i.e. the later steps are small denoising steps. Chosen on
# seed 0 of the demo's run (2 steps: 0.942 precision at t = 0.2 against 0.867 at 1.3;
# docs/toy_results.md)
# and checked on 3 seeds.
SAMPLER_TIMES = {("toy2d_rcm", "scm"): (0.2, 0.1, 0.05)}
# The whole job takes about 2.5 minutes on 2 quiet cores (README).
QUICK_STEPS, QUICK_TEACHER_STEPS = 300, 600


def student_config(config_name, variant, teacher_dir, steps):
  """The config of a demo student: ``configs/<config_name>.py:<variant>`` distilling
  ``teacher_dir`` for ``steps`` steps, with the demo's sampler times (:data:`SAMPLER_TIMES`)."""
  import importlib
  module = importlib.import_module(f"configs.{config_name}")
  config = module.get_config(f"{variant},teacher_dir={teacher_dir},steps={steps}")
  if (config_name, variant) in SAMPLER_TIMES:
    config.objective.sampler_times = SAMPLER_TIMES[(config_name, variant)]
  return config


def distill_stages(teacher_dir, workdir, quick=False):
  """({row name: metrics}, {row name: plot samples}) of the students of ``teacher_dir``."""
  rows, samples, train_seconds = {}, {}, {}
  for name, config_name, variant, sampler_steps, steps in STUDENTS:
    steps = QUICK_STEPS if quick else steps
    config = student_config(config_name, variant, teacher_dir, steps)
    if quick:
      shrink(config, steps)
    run_dir = os.path.join(workdir, f"{config_name}_{variant}")
    rows[name], samples[name] = run_stage(config, run_dir, "distill", sampler_steps)
    # A second row of one run resumed at its end: it reports the run's training time.
    rows[name]["seconds"] = train_seconds.setdefault(run_dir, rows[name]["seconds"])
    print(f"{name}: {rows[name]['seconds']:.0f} s training", flush=True)
  return rows, samples


def summary_table(rows):
  """Markdown table of {name: metrics}: the quality columns, training steps and seconds."""
  head = ("| model | " + " | ".join(COLUMNS) + " | steps | seconds |\n|---|"
          + "---|" * (len(COLUMNS) + 2) + "\n")
  body = ""
  for name, m in rows.items():
    cells = [f"{m.get('eval/modes_covered', 0)}/{m.get('eval/num_modes', 0)}"]
    cells += [f"{m.get('eval/' + c, float('nan')):.3f}" for c in COLUMNS[1:]]
    cells += [str(m["steps"]) if "steps" in m else "", f"{m['seconds']:.0f}" if "seconds" in m
              else ""]
    body += f"| {name} | " + " | ".join(cells) + " |\n"
  return head + body


def main(argv):
  del argv
  from fdistill.io import console, plotting
  plotting.use_headless_backend()
  console.quiet_libraries()
  with console.silenced():  # one line per stage here, not the runs' own progress lines
    run_demo(_WORKDIR.value, _QUICK.value)


def run_demo(workdir, quick):
  """Every stage, then the summary table and picture under ``workdir``."""
  from fdistill.diffusion import gmm as gmm_lib
  from fdistill.io import plotting
  start = time.time()
  rows, samples = {}, {}
  rows["data (exact samples)"], samples["data"] = exact_data_row()
  teacher_row = "teacher (Heun, 32 steps)"
  rows[teacher_row], samples["teacher"] = teacher_stage(os.path.join(workdir, "teacher"), quick)
  print(f"teacher: {rows[teacher_row]['seconds']:.0f} s training", flush=True)
  student_rows, student_samples = distill_stages(os.path.join(workdir, "teacher"), workdir, quick)
  rows.update(student_rows)
  samples.update(student_samples)
  table = summary_table(rows)
  plotting.save_panels(os.path.join(workdir, "summary.png"), samples, gmm_lib.gmm25(), cols=3)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n![samples](summary.png)\n")
  print(f"\nfdistill demo: 25-mode 2-D GMM, exact metrics of 5000 samples "
        f"({time.time() - start:.0f} s)\n")
  print(table)
  print(f"Samples and metrics under {workdir}/ (side by side: {workdir}/summary.png)")


if __name__ == "__main__":
  app.run(main)

"""Distillation stage of the embedded demo (``make demo``): the toy teacher -> one-step generators.

Called by :mod:`fdistill.demo` after the teacher stage. For each divergence in
``DIVERGENCES`` it runs the same three CLI modes a user would
(``configs/toy2d_fdistill.py:<divergence>,teacher_dir=<teacher>``):

  distill  train the generator (initialised from the teacher) for ``STEPS`` steps;
  sample   write its samples as a scatter PNG;
  eval     score 5000 samples against the exact mixture, like the teacher's row.

Budget: about 60 s on two idle CPU cores for the three divergences (each
compiles its generator and critic steps, ~10 s, then trains at ~3 ms per
step). Reverse KL (DMD), Jensen-Shannon and forward KL: from the
mode-seeking to the mass-covering end of the family.
"""
import os

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


def run(teacher_dir, workdir, quick=False):
  """{row name: eval metrics} of one-step generators distilled from ``teacher_dir``."""
  steps = QUICK_STEPS if quick else STEPS
  return {f"f-distill {name} (1 step)": distill_one(name, teacher_dir,
                                                    os.path.join(workdir, f"fdistill_{name}"),
                                                    steps)
          for name in DIVERGENCES}

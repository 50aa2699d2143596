"""The 2-D study: one-step distillation of the exact 25-mode GMM teacher, every method.

  python benchmarks/toy2d_divergences.py                       # f-distill, every divergence
  python benchmarks/toy2d_divergences.py --steps=500 --seeds=1 --divergences=reverse_kl,js
  python benchmarks/toy2d_divergences.py --config=toy2d_uni_instruct \
      --divergences=forward_kl,reverse_kl,js,sid,sim_huber,dmd,dmd2   # the Uni-Instruct family
  python benchmarks/toy2d_divergences.py --config=toy2d_rcm --divergences=scm,rcm \
      --sampler_steps=1,2,4 [--set objective.adaptive_weight=True]   # rCM, 1/2/4-step rows

For each divergence and seed: distil the analytic (exact) teacher of
``configs/toy2d_fdistill.py:<divergence>,teacher=analytic`` into a one-step MLP
generator, draw ``--num_samples`` samples and score them against the exact
mixture (``fdistill.eval.toy_metrics``): modes covered, precision (share within
3 std of a mode), recall of the mode weights (1 - total variation of the
per-mode shares) and the mean exact log-density of the samples (the data's
own value, minus its entropy, is printed as the reference). Prints a markdown
table (mean +- std over seeds), writes it to ``--out``/table.md and one PNG
with a panel per divergence (first seed).

Each divergence compiles once per phase of its schedule (:func:`phases`: lead-in
warm-ups, then a periodic tail scanned over chunks of 250 steps; ``--steps`` is
rounded up to a multiple) and the seeds reuse the compiled scans. With
``--sampler_steps`` each trained network is sampled once per step count (rCM's
N-step sampler), a row each; ``--set`` overrides a config field for every row.
"""
import argparse
import os
import time

from fdistill.eval import toy_metrics
from fdistill.io import plotting
# The study's library (the notebooks use it too); apply_overrides and phases re-exported for
# toy2d_frontier and the tests.
from fdistill.study import (apply_overrides, draw, markdown_table,  # noqa: F401
                            parse_overrides, phases, summarise, train)

DEFAULT_DIVERGENCES = ("reverse_kl", "softened_rkl", "js", "squared_hellinger", "forward_kl",
                       "jeffreys", "alpha")


def main(argv=None):
  plotting.use_headless_backend()  # here, not at import: a notebook may import this module
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--divergences", default=",".join(DEFAULT_DIVERGENCES))
  parser.add_argument("--alpha", type=float, default=2.0, help="for divergence alpha")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6000)
  parser.add_argument("--num_samples", type=int, default=5000)
  parser.add_argument("--out", default="runs/toy2d_divergences")
  parser.add_argument("--config", default="toy2d_fdistill",
                      help="configs/ module whose variants --divergences names")
  parser.add_argument("--sampler_steps", default="",
                      help="e.g. 1,2,4: one row per count of the N-step sampler (rCM), each "
                           "from the same trained networks ('' = eval.sampler_steps)")
  parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                      help="a config override for every row (repeatable; value as a Python "
                           "literal, e.g. objective.adaptive_weight=False); named in the labels")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  step_counts = [int(n) for n in args.sampler_steps.split(",") if n] or [None]
  extra = parse_overrides(args.set)
  rows, panels, gmm = {}, {}, None
  seeds = list(range(args.seeds))
  for name in args.divergences.split(","):
    start = time.time()
    overrides = dict(extra, **({"objective.alpha": args.alpha} if name == "alpha" else {}))
    config, objective, exported, gmm = train(name, seeds, args.steps, overrides=overrides,
                                             config_name=args.config)
    for n in step_counts:
      label = (f"alpha ({args.alpha:g})" if name == "alpha" else name) + "".join(
          f", {item}" for item in args.set) + ("" if n is None else f", {n} step(s)")
      samples = draw(config, objective, exported, seeds, args.num_samples, n)
      rows[label] = summarise(samples, gmm)
      panels[label] = samples[0]
      print(f"{label}: {time.time() - start:.0f} s", rows[label], flush=True)
  table = markdown_table(rows, int(gmm.weights.shape[0]))
  reference = toy_metrics.reference_log_density(gmm)
  table += f"\nData reference log-density (minus the entropy): {reference:.3f}.\n"
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  plotting.save_panels(os.path.join(args.out, "samples.png"), panels, gmm)
  print(table)
  return rows


if __name__ == "__main__":
  main()

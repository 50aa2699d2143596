"""The 2-D study: one-step distillation of the exact 25-mode GMM teacher, every method.

  python benchmarks/toy2d_divergences.py                       # f-distill, every divergence
  python benchmarks/toy2d_divergences.py --steps=500 --seeds=1 --divergences=reverse_kl,js
  python benchmarks/toy2d_divergences.py --config=toy2d_uni_instruct \
      --divergences=forward_kl,reverse_kl,js,sid,sim_huber,dmd,dmd2   # the Uni-Instruct family

For each divergence and seed: distil the analytic (exact) teacher of
``configs/toy2d_fdistill.py:<divergence>,teacher=analytic`` into a one-step MLP
generator, draw ``--num_samples`` samples and score them against the exact
mixture (``fdistill.eval.toy_metrics``): modes covered, precision (share within
3 std of a mode), recall of the mode weights (1 - total variation of the
per-mode shares) and the mean exact log-density of the samples (the data's
own value, minus its entropy, is printed as the reference). Prints a markdown
table (mean +- std over seeds), writes it to ``--out``/table.md and one PNG
with a panel per divergence (first seed).

Each divergence compiles once: the step is scanned over chunks of 250 steps
(``--steps`` is rounded up to a multiple) and the seeds reuse the compiled scan.
"""
import argparse
import importlib
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fdistill import objectives  # noqa: E402
from fdistill import teachers  # noqa: E402
from fdistill.io import plotting  # noqa: E402
from fdistill.eval import toy_metrics  # noqa: E402
from fdistill.diffusion import gmm as gmm_lib  # noqa: E402

COLUMNS = ("modes_covered", "precision", "weight_recall", "log_density")
DEFAULT_DIVERGENCES = ("reverse_kl", "softened_rkl", "js", "squared_hellinger", "forward_kl",
                       "jeffreys", "alpha")


def make_objective(divergence, steps, overrides=None, teacher_dir="", config_name="toy2d_fdistill"):
  """(config, objective, teacher params, gmm): the exact teacher, or a DSM teacher run's.

  ``config_name``: the configs/ module whose variant is ``divergence`` (a method name for
  ``toy2d_uni_instruct``)."""
  teacher = f"teacher_dir={teacher_dir}" if teacher_dir else "teacher=analytic"
  module = importlib.import_module(f"configs.{config_name}")
  config = module.get_config(f"{divergence},{teacher},steps={steps}")
  for key, value in (overrides or {}).items():
    section, field = key.split(".", 1)
    config[section][field] = value
  gmm = gmm_lib.named(config.data.distribution)
  teacher = teachers.spec(config, (2,), 0)
  task = objectives.Task((2,), 0, teacher.apply, teacher.abstract)
  params = teacher.load(jax.tree_util.tree_map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), teacher.abstract))
  return config, objectives.build(config, task), params, gmm


def distill(divergence, seeds, steps, num_samples, chunk=250, overrides=None, teacher_dir="",
            config_name="toy2d_fdistill"):
  """Samples [len(seeds), num_samples, 2] of each seed's EMA generator after ``steps`` steps."""
  config, objective, teacher, gmm = make_objective(divergence, steps, overrides, teacher_dir,
                                                   config_name)
  batch_size = config.train.batch_size
  warmup, period = min(config.objective.warmup_critic_steps, steps), config.objective.gen_every
  # The schedule is critic-only for ``warmup`` steps, then periodic: one scan iteration runs
  # one period of the objective's own steps (kinds from its schedule), so the whole run is a
  # few compiled scans with no host round trip per step.
  cycle = tuple(objective.schedule(warmup + i) for i in range(period))
  chunk = max(period, min(chunk, steps) // period * period)

  def run_kinds(kinds):
    def body(state, key):
      for i, kind in enumerate(kinds):
        data_key, step_key = jax.random.split(jax.random.fold_in(key, i))
        batch = {"x": gmm_lib.sample(gmm, data_key, batch_size)}
        state = objective.steps[kind](state, teacher, batch, step_key)[0]
      return state, None
    return jax.jit(lambda state, keys: jax.lax.scan(body, state, keys)[0], donate_argnums=0)

  run_warmup, run_cycles = run_kinds(("critic",)), run_kinds(cycle)
  init = jax.jit(objective.init)
  sample = jax.jit(lambda p, k: objective.sampler.sample(p, k, num_samples))
  out = []
  for seed in seeds:
    key = jax.random.key(seed)
    state = init(jax.random.fold_in(key, 0), teacher)
    if warmup:
      state = run_warmup(state, jax.random.split(jax.random.fold_in(key, 1), warmup))
    for start in range(warmup, steps, chunk):  # equal chunks: one compiled scan
      keys = jax.random.split(jax.random.fold_in(key, 2 + start), chunk // period)
      state = run_cycles(state, keys)
    out.append(np.asarray(sample(objective.export(state), jax.random.fold_in(key, 2**31))))
  return np.stack(out), gmm


def summarise(samples, gmm):
  """{column: (mean, std)} over seeds."""
  per_seed = [toy_metrics.mode_statistics(gmm, s) for s in samples]
  return {c: (float(np.mean([m[c] for m in per_seed])), float(np.std([m[c] for m in per_seed])))
          for c in COLUMNS}


def markdown_table(rows, num_modes):
  head = ("| divergence | modes covered (of %d) | precision | weight recall | log-density |\n"
          "|---|---|---|---|---|\n" % num_modes)
  fmt = lambda mean, std, p: f"{mean:.{p}f} ± {std:.{p}f}"
  body = "".join(f"| {name} | " + " | ".join(fmt(*m[c], 1 if c == "modes_covered" else 3)
                                            for c in COLUMNS) + " |\n"
                 for name, m in rows.items())
  return head + body


def plot_panels(path, samples_by_name, gmm):
  import matplotlib.pyplot as plt  # plotting sets the Agg backend
  names = list(samples_by_name)
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    plotting.scatter_2d(ax, samples_by_name[name], gmm, title=name)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--divergences", default=",".join(DEFAULT_DIVERGENCES))
  parser.add_argument("--alpha", type=float, default=2.0, help="for divergence alpha")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6000)
  parser.add_argument("--num_samples", type=int, default=5000)
  parser.add_argument("--out", default="runs/toy2d_divergences")
  parser.add_argument("--config", default="toy2d_fdistill",
                      help="configs/ module whose variants --divergences names")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows, panels, gmm = {}, {}, None
  for name in args.divergences.split(","):
    start = time.time()
    overrides = {"objective.alpha": args.alpha} if name == "alpha" else None
    samples, gmm = distill(name, list(range(args.seeds)), args.steps, args.num_samples,
                           overrides=overrides, config_name=args.config)
    label = f"alpha ({args.alpha:g})" if name == "alpha" else name
    rows[label] = summarise(samples, gmm)
    panels[label] = samples[0]
    print(f"{label}: {time.time() - start:.0f} s", rows[label], flush=True)
  table = markdown_table(rows, int(gmm.weights.shape[0]))
  reference = toy_metrics.reference_log_density(gmm)
  table += f"\nData reference log-density (minus the entropy): {reference:.3f}.\n"
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  plot_panels(os.path.join(args.out, "samples.png"), panels, gmm)
  print(table)
  return rows


if __name__ == "__main__":
  main()

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
import importlib
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fdistill import configfile  # noqa: E402
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
  apply_overrides(config, overrides)
  gmm = gmm_lib.named(config.data.distribution)
  teacher = teachers.spec(config, (2,), 0)
  task = objectives.Task((2,), 0, teacher.apply, teacher.abstract)
  params = teacher.load(jax.tree_util.tree_map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), teacher.abstract))
  return config, objectives.build(config, task), params, gmm


def phases(schedule, steps, period):
  """(lead, (start, cycle)): the schedule as uniform lead-in runs, then a periodic tail.

  ``lead``: [(start, kind, length)], maximal runs of one kind (f-distill's critic warm-up;
  rCM's sCM-only warm-up, then its critic warm-up); the tail from ``start`` repeats
  ``cycle`` (``period`` kinds) to the end. Each part is one compiled scan, so a run has no
  host round trip per step.
  """
  kinds = [schedule(i) for i in range(steps)]
  lead, start = [], 0
  while start < steps:
    cycle = tuple(kinds[start:start + period])
    if all(k == cycle[i % period] for i, k in enumerate(kinds[start:])):
      break
    length = next(i for i, k in enumerate(kinds[start:]) if k != kinds[start])
    lead.append((start, kinds[start], length))
    start += length
  return lead, (start, tuple(kinds[start:start + period]))


def train(divergence, seeds, steps, chunk=250, overrides=None, teacher_dir="",
          config_name="toy2d_fdistill"):
  """(config, objective, [exported params per seed], gmm) after ``steps`` steps of each seed."""
  config, objective, teacher, gmm = make_objective(divergence, steps, overrides, teacher_dir,
                                                   config_name)
  batch_size = config.train.batch_size
  period = config.objective.gen_every
  # One scan iteration of the tail runs one period of the objective's own steps.
  lead, (tail_start, cycle) = phases(objective.schedule, steps, period)
  chunk = max(period, min(chunk, steps) // period * period)

  def run_kinds(kinds):
    def body(state, key):
      for i, kind in enumerate(kinds):
        data_key, step_key = jax.random.split(jax.random.fold_in(key, i))
        batch = {"x": gmm_lib.sample(gmm, data_key, batch_size)}
        state = objective.steps[kind](state, teacher, batch, step_key)[0]
      return state, None
    return jax.jit(lambda state, keys: jax.lax.scan(body, state, keys)[0], donate_argnums=0)

  runs = {kinds: run_kinds(kinds) for kinds in {(k,) for _, k, _ in lead} | {cycle}}
  init = jax.jit(objective.init)
  out = []
  for seed in seeds:
    key = jax.random.key(seed)
    state = init(jax.random.fold_in(key, 0), teacher)
    for start, kind, length in lead:  # the first lead-in's keys as before rCM: tables reproduce
      keys = jax.random.split(jax.random.fold_in(key, 1 if start == 0 else 2 + start), length)
      state = runs[(kind,)](state, keys)
    for start in range(tail_start, steps, chunk):  # equal chunks: one compiled scan
      keys = jax.random.split(jax.random.fold_in(key, 2 + start), chunk // period)
      state = runs[cycle](state, keys)
    out.append(objective.export(state))
  return config, objective, out, gmm


def draw(config, objective, exported, seeds, num_samples, sampler_steps=None):
  """Samples [len(seeds), num_samples, 2] of each seed's exported params; ``sampler_steps``
  (rCM's N-step sampler) replaces ``eval.sampler_steps``."""
  sampler = objective.sampler
  if sampler_steps is not None:
    config = config.copy_and_resolve_references()
    config.eval.sampler_steps = sampler_steps
    sampler = objectives.sampler(config, objectives.Task((2,), 0))
  sample = jax.jit(lambda p, k: sampler.sample(p, k, num_samples))
  return np.stack([np.asarray(sample(params, jax.random.fold_in(jax.random.key(seed), 2**31)))
                   for seed, params in zip(seeds, exported)])


def distill(divergence, seeds, steps, num_samples, chunk=250, overrides=None, teacher_dir="",
            config_name="toy2d_fdistill"):
  """Samples [len(seeds), num_samples, 2] of each seed's EMA generator after ``steps`` steps."""
  config, objective, exported, gmm = train(divergence, seeds, steps, chunk, overrides,
                                           teacher_dir, config_name)
  return draw(config, objective, exported, seeds, num_samples), gmm


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


def apply_overrides(config, overrides):
  """Sets each ``SECTION.FIELD`` of ``overrides`` (:func:`parse_overrides`) on ``config``."""
  for key, value in (overrides or {}).items():
    section, field = key.split(".", 1)
    config[section][field] = value


def parse_overrides(items):
  """``["objective.x=1", ...]`` -> ``{"objective.x": 1}`` (values as Python literals, else str)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
      raise ValueError(f"--set={item!r} must be SECTION.FIELD=VALUE")
    out[key] = configfile.literal(value)
  return out


def main(argv=None):
  plotting.use_headless_backend()  # here, not at import: the notebooks import this module
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

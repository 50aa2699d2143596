"""The 2-D study's library: distil the exact (or a DSM-trained) 25-mode GMM teacher, fast.

``train`` runs a toy objective's steps as compiled scans (no checkpoints, no host round
trip per step; the seeds reuse the compiled scans), ``draw`` samples the exported networks
(rCM's N-step sampler with ``sampler_steps``), ``summarise`` scores them against the exact
mixture (``fdistill.eval.toy_metrics``) and ``markdown_table`` prints the rows. Used by
``benchmarks/toy2d_divergences.py`` (the study's command), ``benchmarks/toy2d_frontier.py``
and the notebooks. Config names are modules of the ``configs`` package (installed with
fdistill by setup.py).
"""
import importlib

import jax
import numpy as np

from fdistill import configfile
from fdistill import objectives
from fdistill import teachers
from fdistill.diffusion import gmm as gmm_lib
from fdistill.eval import toy_metrics

COLUMNS = ("modes_covered", "precision", "weight_recall", "log_density")


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
  task = objectives.Task((2,), 0, teacher.apply, teacher.abstract,
                         teacher_is_network=config.teacher.kind in teachers.NETWORK_KINDS)
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
  """Sets each ``SECTION.FIELD`` (or ``SECTION.SUB.FIELD``) of ``overrides``
  (:func:`parse_overrides`) on ``config``, leaving the section's other fields as they are."""
  for key, value in (overrides or {}).items():
    *path, field = key.split(".")
    node = config
    for name in path:
      node = node[name]
    node[field] = value


def parse_overrides(items):
  """``["objective.x=1", ...]`` -> ``{"objective.x": 1}`` (values as Python literals, else str)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
      raise ValueError(f"--set={item!r} must be SECTION.FIELD=VALUE")
    out[key] = configfile.literal(value)
  return out

"""The training loop shared by every objective (teacher training and distillation).

Reads top to bottom: set-up, state (restored or created sharded), the jitted
step, then the loop with its periodic actions (metrics, samples, checkpoints).
"""
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from fdistill import checkpoint, data, objectives, teachers
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import partition


class JsonlWriter(metric_writers.interface.MetricWriter):
  """Plain ``metrics.jsonl`` log beside the TensorBoard files (one JSON object per write)."""

  def __init__(self, path):
    self._path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)

  def write_scalars(self, step, scalars):
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def make_writer(workdir):
  """TensorBoard + JSONL on process 0, logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


def setup(config, mesh=None):
  """(dataset, objective, mesh, ctx) for ``config``; no state yet. ``ctx`` holds the teacher."""
  mesh = mesh_lib.make_mesh(config.get("mesh")) if mesh is None else mesh
  dataset = data.build(config.data)
  ctx = objectives.Context(tuple(dataset.x_shape), dataset.cond_dim)
  teacher_apply, teacher_params = teachers.load(config, ctx)
  ctx = objectives.Context(tuple(dataset.x_shape), dataset.cond_dim, teacher_apply, teacher_params)
  return dataset, objectives.build(config, ctx), mesh, ctx


def frozen_params(ctx, mesh):
  """Teacher params placed replicated on the mesh (None stays None)."""
  if ctx.teacher_params is None:
    return None
  return jax.device_put(ctx.teacher_params, mesh_lib.replicated(mesh))


def state_shardings(objective, mesh, config):
  """(abstract state, NamedShardings) from the config's partition rules."""
  abstract = jax.eval_shape(objective.init, jax.random.key(0))
  rules = [(r, jax.sharding.PartitionSpec(*spec)) for r, spec in config.mesh.get("rules", [])]
  return abstract, partition.shardings(abstract, mesh, rules)


def init_or_restore(objective, mesh, config, ckpt, rng):
  """Restores the latest checkpoint, else initialises the state directly sharded."""
  abstract, shardings = state_shardings(objective, mesh, config)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(checkpoint.with_shardings(abstract, shardings))
    logging.info("Restored step %d from %s", meta["step"], ckpt.manager.directory)
    return state, shardings
  return jax.jit(objective.init, out_shardings=shardings)(rng), shardings


def train(config, workdir: str, mesh=None):
  """Runs ``config.train.num_steps`` steps of ``config.objective``; resumes from ``workdir``."""
  # --- Set-up.
  dataset, objective, mesh, ctx = setup(config, mesh)
  frozen = frozen_params(ctx, mesh)
  tc = config.train
  if jax.process_index() == 0:
    checkpoint.save_config(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.get("keep_checkpoints", 3))
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)

  # --- State: restored or created sharded (never a full copy on one host).
  state, state_sh = init_or_restore(objective, mesh, config, ckpt, init_rng)
  start = int(jax.device_get(state["step"]))
  repl = mesh_lib.replicated(mesh)
  step_fn = jax.jit(objective.step,
                    in_shardings=(state_sh, repl, mesh_lib.batch_sharding(mesh), repl),
                    out_shardings=(state_sh, repl), donate_argnums=0)

  # --- Periodic actions.
  writer = make_writer(workdir)
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                                 every_steps=tc.get("log_every", 100)))
  batches = dataset.iterator(tc.batch_size, start, jax.process_index(), jax.process_count())

  # --- The loop. Only logging steps sync with the host.
  metrics = {}
  for step in range(start, tc.num_steps):
    batch = mesh_lib.global_batch(next(batches), mesh)
    state, metrics = step_fn(state, frozen, batch, jax.random.fold_in(train_rng, step))
    done = step + 1
    for hook in hooks:
      hook(done)
    if done % tc.get("log_every", 100) == 0 or done == tc.num_steps:
      metrics = jax.device_get(metrics)
      writer.write_scalars(done, metrics)
    if done % tc.get("save_every", 1000) == 0 or done == tc.num_steps:
      ckpt.save(done, state)
    if tc.get("sample_every", 0) and done % tc.sample_every == 0:
      write_samples(objective, state, jax.random.fold_in(sample_rng, done), config,
                    os.path.join(workdir, f"samples_{done:07d}.png"), dataset)
  ckpt.wait()
  ckpt.close()
  writer.flush()
  return state, objective, jax.device_get(metrics)


def write_samples(objective, state, rng, config, path, dataset, num=None):
  """Samples of the model being trained as a PNG: scatter for 2-D data, a grid for images."""
  from fdistill import plotting
  num = num or config.eval.get("num_plot_samples", 64)
  cond = None
  if dataset.cond_dim:
    cond = jax.nn.one_hot(jnp.arange(num) % dataset.cond_dim, dataset.cond_dim)
  samples = np.asarray(jax.device_get(jax.jit(objective.sample, static_argnums=2)(
      state, rng, num, cond)))
  if jax.process_index() == 0:
    plotting.save_samples(path, samples, reference=getattr(dataset, "gmm", None))
  return samples

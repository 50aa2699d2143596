"""The training loop shared by every objective (teacher training and distillation).

Reads top to bottom: set-up, state (restored or created sharded), the jitted
step, then the loop with its periodic actions (metrics, samples, checkpoints)
and preemption handling (SIGTERM / maintenance event: save, then return).
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
from fdistill.parallel import preemption


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
  if not mesh_lib.is_main_process():
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


def frozen_params(ctx, mesh, mesh_config=None):
  """Teacher params on the mesh, sharded by the same rules as the state (None stays None)."""
  if ctx.teacher_params is None:
    return None
  return partition.place(ctx.teacher_params,
                         partition.config_shardings(ctx.teacher_params, mesh, mesh_config))


def shardings_of(tree, mesh):
  """The shardings of a placed pytree (replicated for None, which jit needs a prefix for)."""
  if tree is None:
    return mesh_lib.replicated(mesh)
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def state_shardings(objective, mesh, config):
  """(abstract state, NamedShardings) from the config's partition rules and FSDP default."""
  abstract = jax.eval_shape(objective.init, jax.random.key(0))
  return abstract, partition.config_shardings(abstract, mesh, config.get("mesh"))


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
  tc = config.train
  mesh_lib.check_batch_size(tc.batch_size, mesh)
  frozen = frozen_params(ctx, mesh, config.get("mesh"))
  if mesh_lib.is_main_process():
    checkpoint.save_config(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.get("keep_checkpoints", 3))
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)

  # --- State: restored or created sharded (never a full copy on one host).
  state, state_sh = init_or_restore(objective, mesh, config, ckpt, init_rng)
  start = int(jax.device_get(state["step"]))
  repl = mesh_lib.replicated(mesh)
  # One jitted function per branch of an alternating objective (see objectives.Objective).
  step_fns = [jax.jit(fn, in_shardings=(state_sh, shardings_of(frozen, mesh),
                                        mesh_lib.batch_sharding(mesh), repl),
                      out_shardings=(state_sh, repl), donate_argnums=0)
              for fn in (objective.branches or (objective.step,))]
  branch_of = objective.branch_of or (lambda step: 0)

  # --- Periodic actions.
  writer = make_writer(workdir)
  hooks = []
  if mesh_lib.is_main_process():
    hooks.append(periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                                 every_steps=tc.get("log_every", 100)))
  batches = dataset.iterator(tc.batch_size, start, jax.process_index(), jax.process_count())

  # --- The loop. Only logging steps sync with the host. A preemption notice
  # saves after the step in flight and leaves; a restart resumes from there.
  metrics = {}
  gather = config.mesh.get("fsdp_gather", True)  # read when the first step traces
  with preemption.PreemptionWatch() as watch, partition.fsdp_gather(gather):
    for step in range(start, tc.num_steps):
      batch = mesh_lib.global_batch(next(batches), mesh)
      state, metrics = step_fns[branch_of(step)](state, frozen, batch,
                                                 jax.random.fold_in(train_rng, step))
      done = step + 1
      for hook in hooks:
        hook(done)
      if done % tc.get("log_every", 100) == 0 or done == tc.num_steps:
        metrics = jax.device_get(metrics)
        writer.write_scalars(done, metrics)
      if watch.reached(done):
        ckpt.save(done, state, force=True)
        logging.warning("Preempted: saved step %d to %s; exiting", done, ckpt.manager.directory)
        break
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
  from fdistill.io import plotting
  num = num or config.eval.get("num_plot_samples", 64)
  cond = None
  if dataset.cond_dim:
    cond = jax.nn.one_hot(jnp.arange(num) % dataset.cond_dim, dataset.cond_dim)
  # Replicated output: every process can read it, also when the state spans hosts.
  mesh = getattr(jax.tree_util.tree_leaves(state)[0].sharding, "mesh", None)
  out = {"out_shardings": mesh_lib.replicated(mesh)} if mesh is not None else {}
  sample_fn = jax.jit(objective.sample, static_argnums=2, **out)
  samples = np.asarray(jax.device_get(sample_fn(state, rng, num, cond)))
  if mesh_lib.is_main_process():
    plotting.save_samples(path, samples, reference=getattr(dataset, "gmm", None))
  return samples

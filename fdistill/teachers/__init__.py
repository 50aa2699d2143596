"""Where a frozen score model comes from (``config.teacher.kind``):

  none        no teacher (teacher training itself);
  analytic    the exact noised GMM of ``config.data.distribution`` (toy data);
  checkpoint  the EMA denoiser of a ``--mode=train_teacher`` run in ``config.teacher.workdir``.

``load`` returns ``(apply_fn, params)`` with ``apply_fn(params, x, sigma, cond) -> D``.
"""
import jax

from fdistill.registry import lookup


def _none(config, ctx):
  return None, None


def _analytic(config, ctx):
  from fdistill.data import toy
  from fdistill.teachers import analytic
  return analytic.as_apply_fn(), toy.toy_gmm(config.data.distribution)


def _checkpoint(config, ctx):
  """Rebuilds the teacher run's objective from its saved config and restores its EMA params."""
  from fdistill import checkpoint, objectives
  from fdistill.parallel import mesh as mesh_lib
  workdir = config.teacher.workdir
  if not workdir:
    raise ValueError("teacher.kind='checkpoint' needs teacher.workdir (a train_teacher workdir)")
  teacher_config = checkpoint.load_config(workdir)
  teacher_obj = objectives.build(teacher_config, ctx)
  abstract = jax.eval_shape(teacher_obj.init, jax.random.key(0))
  # Replicated on every device of this run, whatever mesh the teacher was trained on.
  repl = mesh_lib.replicated(mesh_lib.make_mesh())
  abstract = checkpoint.with_shardings(abstract, jax.tree_util.tree_map(lambda _: repl, abstract))
  ckpt = checkpoint.Checkpointer(workdir)
  step = config.teacher.get("step", -1)  # -1 (the config default) or None: the latest
  state, _ = ckpt.restore(abstract, step=None if step is None or step < 0 else step)
  ckpt.close()
  return teacher_obj.denoiser(state)


TEACHERS = {"none": _none, "analytic": _analytic, "checkpoint": _checkpoint}


def load(config, ctx):
  kind = config.teacher.get("kind", "none") if "teacher" in config else "none"
  return lookup(TEACHERS, kind, "teacher.kind")(config, ctx)

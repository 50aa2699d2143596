"""Where a frozen score model comes from (``config.teacher.kind``):

  none        no teacher (teacher training itself);
  analytic    the exact noised GMM of ``config.data.distribution`` (toy data);
  checkpoint  the EMA denoiser of a ``--mode=train_teacher`` run in ``config.teacher.workdir``;
  edm_pickle  a published NVlabs/edm network pickle at ``config.teacher.path`` (local; no torch).

``load`` returns ``(apply_fn, params)`` with ``apply_fn(params, x, sigma, cond) -> D``.
"""
import jax

from fdistill.registry import lookup


def _none(config, ctx):
  return None, None


def _analytic(config, ctx):
  from fdistill.diffusion import gmm as gmm_lib
  return gmm_lib.as_apply_fn(), gmm_lib.named(config.data.distribution)


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
  step = config.teacher.get("step", -1)  # -1 (the config default) or None: the latest
  state, _ = checkpoint.restore_from(workdir, abstract,
                                     jax.tree_util.tree_map(lambda _: repl, abstract),
                                     step=None if step is None or step < 0 else step)
  return teacher_obj.denoiser(state)


def _edm_pickle(config, ctx):
  """An EDM ``.pkl`` (e.g. edm-cifar10-32x32-cond-vp.pkl): architecture and weights from the file.

  Compute settings (dtype, attn_impl, remat) come from ``config.model`` when it
  names the same network; everything else comes from the pickle.
  """
  from fdistill import models
  from fdistill.teachers import edm_pickle
  path = config.teacher.get("path", "")
  if not path:
    raise ValueError("teacher.kind='edm_pickle' needs teacher.path (a local EDM .pkl)")
  teacher = edm_pickle.load(path)
  model_config = teacher.model_config
  if "model" in config and config.model.get("name") == model_config.name:
    for field in ("dtype", "attn_impl", "remat"):
      if field in config.model:
        model_config[field] = config.model[field]
  apply_fn = models.make_denoiser(models.build(model_config), model_config.sigma_data)
  return apply_fn, teacher.params


TEACHERS = {"none": _none, "analytic": _analytic, "checkpoint": _checkpoint,
            "edm_pickle": _edm_pickle}


def load(config, ctx):
  kind = config.teacher.get("kind", "none") if "teacher" in config else "none"
  return lookup(TEACHERS, kind, "teacher.kind")(config, ctx)

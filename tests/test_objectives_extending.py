"""docs/design.md, "Extending fdistill": each case walked once, in the files the section names,
and trained for one step. (a) a divergence: one entry of ``objectives/divergences.py``;
(b) an objective family: a module built from the student toolkit (``objectives/student.py``)
and one entry of ``objectives.OBJECTIVES``; (c) a network: a linen module with the models'
call convention and one entry of ``models.MODELS``; (d) a data set: a builder and one entry
of ``data.DATASETS``. Each registers its piece as a contributor would, through monkeypatch
so the registries are left as they were, and checks its step against values computed
outside it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import toy2d_teacher
from fdistill import data, models, objectives
from fdistill.data import images
from fdistill.diffusion import edm
from fdistill.objectives import divergences, dmd, noise, scaffold, student
from fdistill.optim import update
from support import toy


def moved(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                      jax.tree_util.tree_leaves(b)))


# (a) A divergence: f and h = r^2 f''; f-distill and Uni-Instruct pick it by name.
def pearson():
  return divergences.Divergence("pearson_example", lambda r: (r - 1)**2, lambda r: 2 * r**2)


def test_a_divergence_is_one_registry_entry(monkeypatch):
  """The generator step of f-distill with the new divergence weights by ``h = 2 r^2``: with
  h normalised by its batch mean, ``h_max / h_min`` is the squared ratio of the extreme
  ratios (reverse KL's is 1), and the loss differs from reverse KL's from the same state."""
  monkeypatch.setitem(divergences.DIVERGENCES, "pearson_example", pearson)
  losses = {}
  for name in ("pearson_example", "reverse_kl"):
    config = toy.tiny_fdistill_config(divergence=name, normalise_h=True, ratio_bins=0)
    step = toy.Stepper(objectives.build(config, toy.analytic_task()))
    state = step.init(jax.random.key(0), toy.GMM)
    # A discriminator that is not constant, so r varies over the batch.
    state["disc"]["params"] = jax.tree_util.tree_map(lambda p: p + 0.3, state["disc"]["params"])
    assert step.objective.schedule(0) == "generator"
    new, metrics = step(state, toy.GMM, toy.batch(0), jax.random.key(1))
    assert moved(state["gen"]["params"], new["gen"]["params"]) and int(new["skipped"]) == 0
    losses[name] = float(metrics["gen_loss"])
    spread = float(metrics["h_max"]) / float(metrics["h_min"])
    if name == "reverse_kl":
      np.testing.assert_allclose(spread, 1.0, rtol=1e-6)
    else:
      assert spread > 1.0 + 1e-4, spread
  assert losses["pearson_example"] != losses["reverse_kl"]


# (b) An objective family: score distillation without a fake score (SDS-like), written with
# the student toolkit: teacher checks, the copy-the-teacher init and the generator step.
class TeacherPull:
  """``G(z)`` pulled toward the teacher's denoised estimate at one noise level: the DMD
  surrogate with ``step = G(z) - D_T(G(z) + s eps; s)`` (``config.objective.sigma``)."""

  sampler = staticmethod(scaffold.sampler)  # one-step G(z) from the generator's EMA

  @staticmethod
  def build(config, task, settings=None):  # pylint: disable=unused-argument
    student.require_teacher(task, "teacher_pull")
    sample = scaffold.sampler(config, task)
    student.check_architecture(task, jax.eval_shape(sample.init_params, jax.random.key(0)),
                               "teacher_pull")
    gen_apply = models.make_denoiser(models.build(config.model), config.model.sigma_data)
    sigma, sigma_init = float(config.objective.sigma), float(config.generator.sigma_init)
    gen_update = update.updater(config, ema=True, name=student.GEN)

    def loss(params, teacher, batch, rng):
      (z, eps), _ = noise.draw_noise(rng, batch["x"].shape[0], task.x_shape, 2, 0)
      x = edm.one_step_generate(gen_apply, params, z, None, sigma_init)
      levels = jnp.full(x.shape[:1], sigma)
      d_teacher = jax.lax.stop_gradient(task.teacher_apply(teacher, x + sigma * eps, levels))
      return jnp.mean(dmd.surrogate(x, x - d_teacher)), {}

    return objectives.Objective(
        init=lambda rng, teacher=None: student.initial_state(
            task, teacher, lambda: sample.init_params(rng), gen_update),
        steps={"generator": student.generator_step(gen_update, loss, lambda s, t: t)},
        schedule=lambda i: "generator", export=lambda state: state["gen"]["ema"],
        sampler=sample)


def test_b_objective_family_from_the_student_toolkit(monkeypatch):
  """One step of the new family: the student moves, its metrics are the toolkit's names and
  gen_loss is ``mean_b mean_d (G(z) - D_T(x_s; s))^2`` recomputed from the same draws."""
  monkeypatch.setitem(objectives.OBJECTIVES, "teacher_pull", TeacherPull)
  assert all(isinstance(m, objectives.ObjectiveModule) for m in objectives.OBJECTIVES.values())
  assert not isinstance(object(), objectives.ObjectiveModule)  # the check can fail
  config = toy.tiny_fdistill_config()
  config.objective = ml_collections.ConfigDict({"name": "teacher_pull", "sigma": 1.0})
  objective = objectives.build(config, toy.analytic_task())
  state = jax.jit(objective.init)(jax.random.key(0), toy.GMM)
  batch, rng = toy.batch(0), jax.random.key(3)
  new, metrics = jax.jit(objective.steps["generator"])(state, toy.GMM, batch, rng)
  assert set(metrics) == {"gen_loss", "gen_grad_norm"}
  assert moved(state["gen"]["params"], new["gen"]["params"]) and int(new["step"]) == 1

  (z, eps), _ = noise.draw_noise(rng, toy.BATCH, (2,), 2, 0)
  gen_apply = models.make_denoiser(models.build(config.model), config.model.sigma_data)
  x = np.asarray(edm.one_step_generate(gen_apply, state["gen"]["params"], z, None,
                                       float(config.generator.sigma_init)), np.float64)
  x_s = jnp.asarray(x + np.asarray(eps), jnp.float32)
  d_teacher = np.asarray(toy.analytic_task().teacher_apply(toy.GMM, x_s, jnp.ones((toy.BATCH,))))
  np.testing.assert_allclose(float(metrics["gen_loss"]), np.mean(np.square(x - d_teacher)),
                             rtol=1e-5)


# (c) A network: a linen module called as every model is, ``(x_in, c_noise, cond, train,
# return_features)``, registered by name.
class TinyNet(nn.Module):
  """Two dense layers on the flattened input and ``c_noise``; zero output layer."""
  hidden: int = 16

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, return_features=False):
    flat = x.reshape(x.shape[0], -1)
    h = nn.silu(nn.Dense(self.hidden)(jnp.concatenate([flat, c_noise[:, None]], -1)))
    out = nn.Dense(flat.shape[-1], kernel_init=nn.initializers.zeros)(h).reshape(x.shape)
    return (out, [h]) if return_features else out


def dsm_config(model_name, data_section=None):
  config = toy2d_teacher.get_config("gmm8")
  config.model = ml_collections.ConfigDict({"name": model_name, "sigma_data": 0.5,
                                            "hidden": 16})
  if data_section is not None:
    config.data = ml_collections.ConfigDict(data_section)
  config.train.batch_size = toy.BATCH
  config.optim.warmup_steps = 0  # a first step with lr > 0
  return config


def test_c_network_is_one_module_and_one_registry_entry(monkeypatch):
  """The new network as a denoiser (EDM preconditioning) and as a TrigFlow F: at init (zero
  output layer) D = c_skip x and F = 0; one DSM step trains it."""
  monkeypatch.setitem(models.MODELS, "tiny_example", TinyNet)
  config = dsm_config("tiny_example")
  module = models.build(config.model)
  params = models.init_params(module, jax.random.key(0), (4, 2))
  x, sigma = jnp.ones((4, 2)), jnp.full((4,), 2.0)
  c_skip = 0.25 / (4.0 + 0.25)
  np.testing.assert_allclose(models.make_denoiser(module, 0.5)(params, x, sigma), c_skip * x,
                             rtol=1e-6)
  np.testing.assert_array_equal(models.make_F(module, 0.5)(params, x, jnp.full((4,), 1.0)), 0.0)
  objective = objectives.build(config, objectives.Task((2,)))
  state = jax.jit(objective.init)(jax.random.key(0))
  new, metrics = jax.jit(objective.steps["dsm"])(state, None, toy.batch(0), jax.random.key(1))
  assert moved(state["net"]["params"], new["net"]["params"])
  assert np.isfinite(float(metrics["loss"])) and int(new["skipped"]) == 0


# (d) A data set: a builder returning the registry's protocol (x_shape, cond_dim, iterator).
PIXELS = np.random.default_rng(0).uniform(-1, 1, (40, 4, 4, 1)).astype(np.float32)


def build_example(data_config):
  return images.ArrayImageDataset(PIXELS, np.zeros(len(PIXELS)), 10, seed=data_config.seed)


def test_d_data_set_is_a_builder_and_one_registry_entry(monkeypatch):
  """The registered data set by name: deterministic batches of its rows (the same for a
  restart at that step), and one DSM step of a network on them."""
  monkeypatch.setitem(data.DATASETS, "example", build_example)
  monkeypatch.setitem(models.MODELS, "tiny_example", TinyNet)
  config = dsm_config("tiny_example", {"name": "example", "seed": 0})
  dataset = data.build(config.data)
  assert dataset.x_shape == (4, 4, 1) and dataset.cond_dim == 0
  first = next(dataset.iterator(8, start_step=3))["x"]
  np.testing.assert_array_equal(first, next(data.build(config.data).iterator(8, 3))["x"])
  assert all(any(np.array_equal(row, p) for p in PIXELS) for row in first)
  objective = objectives.build(config, objectives.Task(dataset.x_shape))
  state = jax.jit(objective.init)(jax.random.key(0))
  new, _ = jax.jit(objective.steps["dsm"])(state, None, {"x": jnp.asarray(first)},
                                           jax.random.key(1))
  assert moved(state["net"]["params"], new["net"]["params"]) and int(new["skipped"]) == 0

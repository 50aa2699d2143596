"""f-distill objective: normalisers, update schedule, NaN guard, determinism, teacher init, configs.

Tiny networks (one hidden layer) on the 8-mode toy mixture; the compiled steps
are cached at module level and shared by the tests (compiling a step is most
of the cost on CPU).
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common, toy2d_fdistill
from fdistill import models
from fdistill import objectives
from fdistill.objectives import divergences
from fdistill.objectives import fdistill
from fdistill.objectives import noise
from fdistill.objectives import ratio
from support import toy

GMM, batch, tiny_config = toy.GMM, toy.batch, toy.tiny_fdistill_config


def run(seed, num_steps, teacher=GMM):
  """``num_steps`` steps from ``init``; the seed sets the init, the data and the step keys."""
  step = toy.analytic_fdistill()
  key = jax.random.key(seed)
  state, history = step.init(key, teacher), []
  for i in range(num_steps):
    state, metrics = step(state, teacher, batch(i, seed=seed),
                          jax.random.fold_in(jax.random.fold_in(key, 1), i))
    history.append(jax.device_get(metrics))
  return state, history


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                      jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------------
# Update schedule, determinism, NaN guard.


def test_generator_every_kth_step_critics_otherwise():
  """Steps 3..8, after every branch has run once."""
  state, _ = run(0, 3)
  step = toy.analytic_fdistill()
  for i in range(3, 9):
    new, _ = step(state, GMM, batch(i), jax.random.key(i))
    is_gen = i % 3 == 0
    assert changed(state["gen"]["params"], new["gen"]["params"]) == is_gen, i
    assert changed(state["gen"]["ema"], new["gen"]["ema"]) == is_gen, i
    assert changed(state["ratio_bins"], new["ratio_bins"]) == is_gen, i
    assert changed(state["fake"]["params"], new["fake"]["params"]) != is_gen, i
    assert changed(state["disc"]["params"], new["disc"]["params"]) != is_gen, i
    assert int(new["step"]) == i + 1 and int(new["skipped"]) == 0
    state = new


def test_generator_moves_toward_the_data():
  """Sanity of the sign: a few hundred steps on the exact teacher spread the initial tiny blob
  (G(z) ~ 0.1 z, median radius 0.11) out toward the mixture's modes at radius 1 (measured:
  median radius 0.22 after 300 steps, 100 of them generator updates)."""
  step = toy.analytic_fdistill()
  obj = step.objective
  median_radius = lambda state: float(jnp.median(jnp.linalg.norm(
      obj.sampler.sample(obj.export(state), jax.random.key(5), 512), axis=-1)))
  before = median_radius(step.init(jax.random.key(0), GMM))
  after = median_radius(run(0, 300)[0])
  assert after > 1.5 * before, (before, after)


def test_schedule_with_critic_warmup():
  obj = objectives.build(tiny_config(gen_every=4, warmup_critic_steps=3),
                         toy.analytic_task())
  assert [i for i in range(12) if obj.schedule(i) == "generator"] == [3, 7, 11]
  assert {obj.schedule(i) for i in range(12)} == {"generator", "critic"}


def test_same_seed_same_losses():
  _, first = run(0, 4)
  _, again = run(0, 4)
  _, other = run(1, 4)
  for a, b in zip(first, again):
    assert a == b  # bit-for-bit
  assert first[1]["fake_loss"] != other[1]["fake_loss"]  # step 1 is a critic step
  assert all(np.isfinite(v) for m in first for v in m.values())


def test_non_finite_updates_are_skipped_and_counted():
  """A NaN teacher poisons the generator step (step 0), NaN data the discriminator step
  (step 1): those updates are skipped, the step counted, the rest of the state intact."""
  step = toy.analytic_fdistill()
  state = step.init(jax.random.key(0), GMM)
  bad_teacher = GMM._replace(means=jnp.full_like(GMM.means, jnp.nan))
  new, metrics = step(state, bad_teacher, batch(0), jax.random.key(0))
  assert int(new["skipped"]) == 1 and not np.isfinite(float(metrics["gen_loss"]))
  assert not changed(state["gen"], new["gen"])
  assert not changed(state["ratio_bins"], new["ratio_bins"])
  state = new
  new, _ = step(state, GMM, batch(1, nan=True), jax.random.key(1))
  assert int(new["skipped"]) == 2 and int(new["step"]) == 2
  assert not changed(state["disc"], new["disc"])
  assert changed(state["fake"], new["fake"])  # its own loss was finite: optimiser state moved


def test_checkpoint_teacher_initialises_generator_and_fake_score():
  """With teacher.kind='checkpoint' init copies the teacher's params into the generator
  (params and EMA) and the fake score; learning rates 0 keep them there after a step."""
  config = tiny_config("js,teacher=checkpoint", fake_optim={"lr": 0.0}, disc_optim={"lr": 0.0})
  config.optim.lr = 0.0
  module = models.build(config.model)
  teacher = models.init_params(module, jax.random.key(7), (1, 2))
  teacher = jax.tree_util.tree_map(lambda x: x + 0.1, teacher)  # output layer no longer zero
  task = objectives.Task((2,), 0, models.make_denoiser(module), jax.eval_shape(lambda: teacher),
                         teacher_is_network=True)
  step = toy.Stepper(objectives.build(config, task))
  fresh = models.init_params(module, jax.random.split(jax.random.key(0))[0], (1, 2))
  assert changed(fresh, teacher)
  state = step.init(jax.random.key(0), teacher)
  state, _ = step(state, teacher, batch(0), jax.random.key(0))
  for tree in (state["gen"]["params"], state["gen"]["ema"], state["fake"]["params"]):
    assert not changed(tree, teacher)
  obj = step.objective
  samples = obj.sampler.sample(obj.export(state), jax.random.key(1), 4)
  z = jax.random.normal(jax.random.key(1), (4, 2))
  np.testing.assert_allclose(samples, task.teacher_apply(teacher, 2.5 * z, jnp.full((4,), 2.5)),
                             rtol=1e-5, atol=1e-6)


def test_generator_must_match_teacher_architecture():
  config = tiny_config("js,teacher=checkpoint")
  other_config = config.model.copy_and_resolve_references()
  other_config.hidden = (16,)
  other = models.build(other_config)
  teacher = models.init_params(other, jax.random.key(0), (1, 2))
  task = objectives.Task((2,), 0, models.make_denoiser(other), jax.eval_shape(lambda: teacher),
                         teacher_is_network=True)
  with pytest.raises(ValueError, match="teacher's architecture"):
    objectives.build(config, task)


# ---------------------------------------------------------------------------
# The weight and its normalisers.


def settings(**overrides):
  """f-distill Settings: the configs' defaults with ``overrides``."""
  return fdistill.Settings.from_config(common.fdistill_objective(**overrides))


def test_ratio_is_clipped_logit_mean_exponentiated_and_clipped():
  st = settings()
  logits = jnp.array([[0.0, 2.0], [30.0, 30.0], [-30.0, -30.0], [0.5, 0.5]])
  np.testing.assert_allclose(ratio.density_ratio(logits, st),
                             [np.e, st.ratio_upper, st.ratio_lower, np.exp(0.5)], rtol=1e-6)


def test_ratio_bins_follow_an_ema_of_bin_means_and_skip_empty_bins():
  bins = jnp.array([1.0, 2.0, 3.0])
  r = jnp.array([4.0, 6.0, 10.0])
  idx = jnp.array([0, 0, 2])
  new = ratio.update_ratio_bins(bins, r, idx, ema=0.25)
  np.testing.assert_allclose(new, [0.25 * 1 + 0.75 * 5, 2.0, 0.25 * 3 + 0.75 * 10], rtol=1e-5)


def test_bin_normalised_ratios_average_one_per_bin():
  """With ratio_ema = 0 each bin's ratios are divided by this batch's bin mean."""
  st = settings(ratio_bins=4, ratio_ema=0.0, normalise_h=False, divergence="forward_kl")
  rng_l, rng_u = jax.random.split(jax.random.key(0))
  logits = jax.random.normal(rng_l, (512, 1))
  u = jax.random.uniform(rng_u, (512,))
  h, bins, _ = ratio.f_weight(logits, u, jnp.ones((4,)), divergences.get("forward_kl"), st)
  idx = np.asarray(ratio.bin_index(u, 4))
  for b in range(4):  # forward KL: h = r, so h is the normalised ratio itself
    np.testing.assert_allclose(np.mean(np.asarray(h)[idx == b]), 1.0, rtol=1e-4)
  assert not np.allclose(bins, 1.0)


def test_h_is_normalised_to_mean_one_and_weight_uses_abs_mean():
  st = settings(divergence="js", ratio_bins=0)
  logits = jax.random.normal(jax.random.key(0), (64, 3))
  h, _, stats = ratio.f_weight(logits, jnp.zeros((64,)), jnp.ones((1,)),
                                  divergences.get("js"), st)
  np.testing.assert_allclose(jnp.mean(h), 1.0, rtol=1e-5)
  assert float(stats["h_max"]) > 1.0 > float(stats["h_min"])
  x = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  d = jnp.array([[0.0, 0.0], [0.5, -0.5]])
  np.testing.assert_allclose(fdistill._abs_mean_weight(x, d, None, st), [1 / 1.5, 1 / 0.5],
                             rtol=1e-5)


def test_h_normaliser_is_the_global_batch_mean_across_devices():
  """Under jit on an 8-device mesh with the batch sharded, the mean is over all devices
  (every device's rows are divided by the same global mean), not per device."""
  devices = jax.devices()
  assert len(devices) >= 8, "conftest.py provides 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:8])
  h = jnp.repeat(jnp.arange(1.0, 9.0), 4)  # device i holds only the value i + 1
  sharded = jax.device_put(h, NamedSharding(mesh, P("data")))
  out = jax.jit(ratio.normalise_by_batch_mean)(sharded)
  np.testing.assert_allclose(out, h / (4.5 + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("dist", ["karras", "lognormal"])
def test_noise_level_bins_are_equally_populated(dist):
  """Bins are over the sampler's own uniform coordinate, so each gets ~1/num_bins of the batch
  (FastGen's linear bins in sigma put ~2/3 of Karras samples in the first)."""
  st = settings(sigma_dist=dist)
  sigma, u = noise.sample_sigma(jax.random.normal(jax.random.key(0), (20000,)), st)
  counts = np.bincount(np.asarray(ratio.bin_index(u, 10)), minlength=10) / 20000
  np.testing.assert_allclose(counts, 0.1, atol=0.012)
  if dist == "karras":
    assert float(sigma.min()) >= st.sigma_min and float(sigma.max()) <= st.sigma_max


# ---------------------------------------------------------------------------
# Configs.

CONFIGS = ["toy2d_fdistill", "digits_fdistill", "cifar10_fdistill", "imagenet64_fdistill"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("divergence", [d for d in divergences.DIVERGENCES if d != "alpha"])
def test_configs_build_settings_for_every_divergence(name, divergence):
  config = importlib.import_module(f"configs.{name}").get_config(divergence)
  st = fdistill.Settings.from_config(config.objective)
  assert st.divergence == divergence and config.objective.name == "fdistill"
  assert config.teacher.kind in ("checkpoint", "analytic", "edm_pickle")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_reject_unknown_divergence(name):
  config = importlib.import_module(f"configs.{name}").get_config("kl")
  with pytest.raises(ValueError, match="forward_kl"):
    fdistill.Settings.from_config(config.objective)


def test_settings_have_one_default_each_in_the_configs():
  """The defaults live in configs/common.py alone; Settings needs every field."""
  names = {f.name for f in __import__("dataclasses").fields(fdistill.Settings)}
  assert names | set(fdistill.SECTIONS) == set(common.FDISTILL_OBJECTIVE)
  section = common.fdistill_objective()
  del section["rho"]
  with pytest.raises(ValueError, match="objective.rho is missing"):
    fdistill.Settings.from_config(section)


def test_alpha_variant_and_unknown_settings():
  config = toy2d_fdistill.get_config("alpha,alpha=1.5")
  st = fdistill.Settings.from_config(config.objective)
  assert divergences.get(st.divergence, st.alpha).name == "alpha(1.5)"
  with pytest.raises(ValueError, match="objective.ratio_clip is not"):
    common.fdistill_objective(ratio_clip=3.0)
  config.objective.sigma_dist = "uniform"
  with pytest.raises(ValueError, match="karras"):
    fdistill.Settings.from_config(config.objective)


# ---------------------------------------------------------------------------
# The discriminator's loss runs fake and real rows through one teacher pass.


def test_pair_interleaves_rows_and_unpair_inverts_it():
  from fdistill.objectives import critics
  a, b = jnp.arange(6.0).reshape(3, 2), -jnp.arange(6.0).reshape(3, 2) - 1
  paired = critics.pair(a, b)
  np.testing.assert_array_equal(paired, np.stack([a, b], 1).reshape(6, 2))
  np.testing.assert_array_equal(paired[::2], a)
  back = critics.unpair(paired)
  np.testing.assert_array_equal(back[0], a)
  np.testing.assert_array_equal(back[1], b)


def test_discriminator_loss_in_one_pass_equals_two_separate_passes():
  """Against the loss written out with a teacher call per half: a pairing that mixed rows
  up (fake logits on real rows) would change it."""
  from fdistill.models import discriminator as disc_lib
  from fdistill.objectives import critics
  calls = []

  def teacher_apply(params, x, sigma, cond, return_features=False):
    calls.append(x.shape[0])
    d = params * x / (1.0 + sigma[:, None] ** 2)
    return (d, [jnp.tanh(x + sigma[:, None])]) if return_features else d

  def disc_apply(params, x_t, sigma, feats):
    return (feats[0] @ params + 0.1 * x_t[:, :1] * sigma[:, None]).astype(jnp.float32)

  nets = critics.Nets(None, teacher_apply, None, disc_lib.Discriminator(None, disc_apply, True),
                      (2,), 1.0)
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.normal(size=(8, 2)), jnp.float32) for k in ("x_t", "real_t")}
  batch.update(sigma=jnp.asarray(rng.uniform(0.1, 2, 8), jnp.float32),
               real_sigma=jnp.asarray(rng.uniform(0.1, 2, 8), jnp.float32))
  head = jnp.asarray([[0.7], [-1.3]], jnp.float32)
  value, aux = critics.make_discriminator_loss(nets)(head, 0.5, batch, None)
  assert calls == [16]  # one teacher pass over both halves

  def logits(x, s):
    return disc_apply(head, x, s, teacher_apply(0.5, x, s, None, return_features=True)[1])
  fake, real = logits(batch["x_t"], batch["sigma"]), logits(batch["real_t"], batch["real_sigma"])
  expected = np.mean(np.logaddexp(0, fake)) + np.mean(np.logaddexp(0, -real))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(aux["disc_accuracy"],
                             0.5 * (np.mean(real > 0) + np.mean(fake < 0)), rtol=1e-6)

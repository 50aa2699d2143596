"""The Uni-Instruct objective (the expanded f-divergence, SiD, SIM) and DMD / DMD2 as configs:
steps, which networks each kind of step moves, and DMD's gradient written independently.

The loss-level oracle (every divergence against quadrature, negative controls,
SiD = half the reverse-KL member) is tests/test_objectives_uni_instruct_loss.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, toy2d_uni_instruct
from fdistill import objectives
from fdistill.objectives import critics, fdistill, noise, scaffold, uni_instruct
from support import toy


def tiny_config(method):
  c = toy2d_uni_instruct.get_config(f"{method},teacher=analytic,distribution=gmm8,steps=8")
  c.model.hidden, c.model.emb_dim = (32,), 16
  c.objective.discriminator.update(hidden=(16,), emb_dim=16)
  c.objective.update(dict(warmup_critic_steps=0))
  c.train.batch_size = toy.BATCH
  return c


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                      jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("method, trains_disc", [
    ("forward_kl", True), ("reverse_kl", False), ("sid", False), ("sim_huber", False),
    ("dmd2", True)])
def test_each_method_steps_and_moves_the_right_networks(method, trains_disc):
  step = toy.Stepper(objectives.build(tiny_config(method), toy.analytic_task()))
  state = step.init(jax.random.key(0), toy.GMM)
  for i in range(2):  # a generator step, then a critic step
    kind = step.objective.schedule(i)
    new, metrics = step(state, toy.GMM, toy.batch(i), jax.random.key(i))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert changed(state["gen"]["params"], new["gen"]["params"]) == (kind == "generator")
    assert changed(state["fake"]["params"], new["fake"]["params"]) == (kind == "critic")
    assert changed(state["disc"]["params"], new["disc"]["params"]) == (
        kind == "critic" and trains_disc)
    assert int(new["skipped"]) == 0
    state = new
  assert [step.objective.schedule(i) for i in range(2)] == ["generator", "critic"]


def test_dmd_generator_gradient_equals_an_independent_dmd():
  """DMD (Yin et al. 2024): the generator's gradient is ``(D_fake - D_T) / mean|x - D_T|`` at
  ``x_t = G(z) + s eps``, pushed through dG/dtheta. Written here from that formula with
  jax.vjp, it equals the f-distill objective's reverse-KL loss gradient (the 'dmd' config)."""
  config = tiny_config("dmd")
  task = toy.analytic_task()
  obj = objectives.build(config, task)
  state = obj.init(jax.random.key(0), toy.GMM)
  fake = jax.tree_util.tree_map(lambda x: x + 0.05, state["fake"]["params"])  # D_fake != G's
  st = fdistill.Settings.from_config(config.objective)
  nets = scaffold.build(config, task, st, "fdistill").nets
  loss = fdistill.make_generator_loss(nets, fdistill.divergences.get("reverse_kl"), st)
  inputs = {"teacher": toy.GMM, "fake": fake, "disc": state["disc"]["params"],
            "bins": jnp.ones((1,))}
  batch, rng = toy.batch(0), jax.random.key(3)
  got = jax.grad(lambda p: loss(p, inputs, batch, rng)[0])(state["gen"]["params"])

  (z, eps), (e,) = noise.draw_noise(rng, toy.BATCH, (2,), 2, 1)  # the loss's own noise
  sigma, _ = noise.sample_sigma(e, st)
  x, pullback = jax.vjp(lambda p: critics.generate(nets, p, z), state["gen"]["params"])
  x_t = x + sigma[:, None] * eps
  d_t = nets.teacher_apply(toy.GMM, x_t, sigma)
  d_fake = nets.fake_apply(fake, x_t, sigma)
  # DMD's weighting factor mean|x - D_T| (plus the 1e-6 this codebase adds against 0).
  grad_x = (d_fake - d_t) / (jnp.mean(jnp.abs(x - d_t), axis=-1, keepdims=True) + 1e-6)
  want, = pullback(grad_x / x.size)  # the surrogate averages over batch and dimensions
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("method", toy2d_uni_instruct.METHODS)
def test_every_method_config_builds_its_settings(method):
  config = toy2d_uni_instruct.get_config(method)
  module = objectives.module(config)
  st = module.Settings.from_config(config.objective)
  assert st.gen_every >= 1


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match="objective.loss='nope'"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(loss="nope"))
  with pytest.raises(ValueError, match="objective.ratio_bins is not a Uni-Instruct setting"):
    common.uni_instruct_objective(ratio_bins=3)
  with pytest.raises(ValueError, match="variant='nope'"):
    toy2d_uni_instruct.get_config("nope")

"""The Uni-Instruct objective (the expanded f-divergence, SiD, SIM, SiDA, the divergence switch)
and DMD / DMD2 / Diff-Instruct as configs: steps, which networks each kind of step moves,
DMD's and Diff-Instruct's gradients and SiDA's losses written independently, every config.

The loss-level oracle (every divergence against quadrature, negative controls,
SiD = half the reverse-KL member) is tests/test_objectives_uni_instruct_loss.py.
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, toy2d_uni_instruct
from fdistill import experiment, objectives
from fdistill.objectives import critics, fdistill, noise, scaffold, uni_instruct
from support import toy


tiny_config = toy.tiny_uni_instruct_config


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                      jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("method, trains_disc", [
    ("forward_kl", True), ("reverse_kl", False), ("sid", False), ("sim_huber", False),
    ("dmd2", True), ("sida", False)])
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


# DMD's weighting factor mean|x - D_T| (DMD2's code adds no epsilon); Diff-Instruct's
# EDM code weighs D_fake - D_T by 1 (training/di_loss.py: ``(Dg - Dd) * images``, weight 1.0).
GRADIENT_WEIGHTS = {
    "dmd": lambda x, d_t: jnp.mean(jnp.abs(x - d_t), axis=-1, keepdims=True),
    "diff_instruct": lambda x, d_t: jnp.ones_like(x[:, :1])}


@pytest.mark.parametrize("method", sorted(GRADIENT_WEIGHTS))
def test_generator_gradient_equals_an_independent_formula(method):
  """DMD (Yin et al. 2024) and Diff-Instruct (Luo et al. 2023): the generator's gradient is
  ``(D_fake - D_T) / w`` at ``x_t = G(z) + s eps``, pushed through dG/dtheta. Written here from
  that formula with jax.vjp, it equals the f-distill objective's loss gradient of the config.
  Diff-Instruct also draws its levels from EDM's lognormal (-1.2, 1.2), not the toy ramp."""
  config = tiny_config(method)
  if method == "diff_instruct":
    assert (config.objective.sigma_dist, config.objective.p_mean, config.objective.p_std) == (
        "lognormal", -1.2, 1.2)
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
  grad_x = (d_fake - d_t) / GRADIENT_WEIGHTS[method](x, d_t)
  want, = pullback(grad_x / x.size)  # the surrogate averages over batch and dimensions
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


CONFIG_FILES = [("toy2d_uni_instruct", ""), ("digits_uni_instruct", ""),
                ("cifar10_uni_instruct", ",cond=True"), ("cifar10_uni_instruct", ",cond=False"),
                ("imagenet64_uni_instruct", "")]


@pytest.mark.parametrize("name, extra", CONFIG_FILES)
@pytest.mark.parametrize("method", toy2d_uni_instruct.METHODS)
def test_every_method_config_of_every_scale_is_valid(name, extra, method):
  """Every (config file, variant) passes the checks a run makes before it starts, and the
  variant sets what its method needs."""
  config = importlib.import_module(f"configs.{name}").get_config(method + extra)
  experiment.validate(config)
  st = objectives.module(config).Settings.from_config(config.objective)
  expected = {"diff_instruct": ("fdistill", "unit"), "dmd": ("fdistill", "abs_mean"),
              "dmd2": ("fdistill", "abs_mean")}
  if method in expected:
    assert (config.objective.name, st.weight) == expected[method]
    assert st.divergence == "reverse_kl" and not st.normalise_h
  else:
    assert config.objective.name == "uni_instruct"
  if method == "sida":
    assert (st.loss, st.sid_alpha, st.adv_weight, st.same_noise_real) == ("sida", 1.0, 0.5, True)
  if method == "rkl_then_fkl":
    assert st.switch_step == config.train.num_steps // 2
    assert [p.divergence for p in st.phases()] == ["reverse_kl", "forward_kl"]


# ---------------------------------------------------------------------------
# SiDA.


def sida_parts(adv_weight=0.5):
  """(nets, settings, inputs) of the tiny toy SiDA config, the fake score moved off G's."""
  config = tiny_config("sida")
  config.objective.adv_weight = adv_weight
  task = toy.analytic_task()
  st = uni_instruct.Settings.from_config(config.objective)
  parts = scaffold.build(config, task, st, "uni_instruct", encoder_disc=True)
  state = jax.jit(parts.init)(jax.random.key(0), toy.GMM)
  fake = jax.tree_util.tree_map(lambda x: x + 0.05, state["fake"]["params"])
  inputs = {"teacher": toy.GMM, "fake": fake, "disc": state["disc"]["params"]}
  return parts.nets, st, inputs, state["gen"]["params"]


def test_sida_without_its_gan_term_is_sid_at_alpha_1():
  """adv_weight = 0 leaves SiD at alpha = 1 with SiD's normaliser: the same gradient as the
  'sid' member built through uni_instruct_loss.generator_loss_fn (scale 'sid')."""
  nets, st, inputs, gen = sida_parts(adv_weight=0.0)
  sid_st = dataclasses.replace(st, loss="sid")
  batch, rng = toy.batch(0), jax.random.key(5)
  grads = [jax.grad(lambda p, s=s: uni_instruct.make_generator_loss(nets, s)(
      p, inputs, batch, rng)[0])(gen) for s in (st, sid_st)]
  for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(grads[0])) > 1e-4


def test_sida_gan_term_uses_the_fake_scores_last_hidden_layer():
  """adv_weight = 1: the loss is SiDA's scaled GAN term, numel * mean(softplus(-clip(logit))) *
  mean(1 / max(mean|G - D_T|, 1e-5)) (SiDA's batch-mean BCE), the logit being the mean of the
  fake MLP's last hidden layer at x_t, computed here in numpy from the network's features."""
  nets, st, inputs, gen = sida_parts(adv_weight=1.0)
  batch, rng = toy.batch(0), jax.random.key(5)
  value, aux = uni_instruct.make_generator_loss(nets, st)(gen, inputs, batch, rng)
  (z, eps), (e,) = noise.draw_noise(rng, toy.BATCH, (2,), 2, 1)  # the loss's own noise
  sigma, _ = noise.sample_sigma(e, st)
  x = critics.generate(nets, gen, z)
  x_t = x + sigma[:, None] * eps
  d_t = np.asarray(nets.teacher_apply(toy.GMM, x_t, sigma), np.float64)
  _, feats = nets.fake_apply(inputs["fake"], x_t, sigma, return_features=True)
  x = np.asarray(x, np.float64)
  logit = np.clip(np.asarray(feats[-1]).mean(-1), -st.logit_clip, st.logit_clip)
  gan = 2 * np.log1p(np.exp(-logit)).mean() * np.mean(
      1 / np.maximum(np.abs(x - d_t).mean(-1), 1e-5))
  np.testing.assert_allclose(float(value), st.sida_gan_scale * gan, rtol=1e-4)
  np.testing.assert_allclose(float(aux["gan_gen"]), gan, rtol=1e-4)


def test_sida_fake_score_loss_adds_the_lambda_weighted_discriminator_loss():
  """The fake score's loss = its DSM loss summed over dimensions + mean lambda(s) (mean
  softplus(fake logit) + mean softplus(-real logit)) / 2, the data noised with the generator
  samples' (s, eps) (same_noise_real); SiDA's weighting (tests/test_reference_equivalence.py
  checks it against SiDA's code in float64)."""
  nets, st, inputs, gen = sida_parts()
  cb = critics.critic_batch(nets, st, gen, toy.batch(0), jax.random.key(2))
  np.testing.assert_allclose(cb["real_t"] - toy.batch(0)["x"], cb["x_t"] - cb["x_gen"],
                             atol=1e-5)
  value, aux = critics.make_fake_score_loss(nets, "edm", encoder_disc=True)(
      inputs["fake"], None, cb, None)
  dsm, _ = critics.make_fake_score_loss(nets, "edm")(inputs["fake"], None, cb, None)
  logits = [np.asarray(nets.fake_apply(inputs["fake"], x, cb["sigma"],
                                       return_features=True)[1][-1]).mean(-1)
            for x in (cb["x_t"], cb["real_t"])]
  s = np.asarray(cb["sigma"], np.float64)
  lam = (s**2 + 0.25) / (s * 0.5)**2
  adv = np.mean(lam) * (np.log1p(np.exp(logits[0])).mean() + np.log1p(np.exp(-logits[1])).mean()) / 2
  np.testing.assert_allclose(float(aux["adv_disc_loss"]), adv, rtol=1e-4)
  np.testing.assert_allclose(float(value), 2 * float(dsm) + adv, rtol=1e-4)  # numel = 2


# ---------------------------------------------------------------------------
# The recipe "reverse KL, then forward KL".


def test_divergence_switch_runs_the_second_generator_step_from_switch_step():
  """rkl_then_fkl: generator steps before switch_step are the reverse-KL member's, from it on
  the forward-KL member's (their losses on one state, batch and key), chosen by the host."""
  config = tiny_config("rkl_then_fkl")
  config.objective.switch_step = 4
  obj = objectives.build(config, toy.analytic_task())
  assert [obj.schedule(i) for i in range(8)] == ["generator", "critic"] * 2 + [
      uni_instruct.SWITCHED, "critic"] * 2
  state = jax.jit(obj.init)(jax.random.key(0), toy.GMM)
  batch, rng = toy.batch(1), jax.random.key(7)
  got = {kind: float(jax.jit(obj.steps[kind])(state, toy.GMM, batch, rng)[1]["gen_loss"])
         for kind in ("generator", uni_instruct.SWITCHED)}
  st = uni_instruct.Settings.from_config(config.objective)
  nets = scaffold.build(config, toy.analytic_task(), st, "uni_instruct").nets
  inputs = {"teacher": toy.GMM, "fake": state["fake"]["params"], "disc": state["disc"]["params"]}
  for kind, divergence in (("generator", "reverse_kl"), (uni_instruct.SWITCHED, "forward_kl")):
    member = dataclasses.replace(st, divergence=divergence, switch_divergence="")
    want = uni_instruct.make_generator_loss(nets, member)(state["gen"]["params"], inputs,
                                                          batch, rng)[0]
    np.testing.assert_allclose(got[kind], float(want), rtol=1e-5)
  assert abs(got["generator"] - got[uni_instruct.SWITCHED]) > 1e-3


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match="objective.loss='nope'"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(loss="nope"))
  with pytest.raises(ValueError, match="objective.ratio_bins is not a Uni-Instruct setting"):
    common.uni_instruct_objective(ratio_bins=3)
  with pytest.raises(ValueError, match="variant='nope'"):
    toy2d_uni_instruct.get_config("nope")
  with pytest.raises(ValueError, match="objective.switch_divergence='forward_kl' needs"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(
        loss="sid", switch_step=5, switch_divergence="forward_kl"))
  with pytest.raises(ValueError, match="objective.switch_divergence='forward_kl' needs"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(
        switch_divergence="forward_kl"))
  with pytest.raises(ValueError, match="objective.critic_noise.sigma_dist='uniform'"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(
        critic_noise=dict(sigma_dist="uniform")))
  with pytest.raises(ValueError, match="objective.critic_noise.sigma is not a noise-level"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(critic_noise=dict(sigma=1)))
  with pytest.raises(ValueError, match="objective.gan_weight=0.1 must be 0 with loss='sida'"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(loss="sida", gan_weight=0.1))
  with pytest.raises(ValueError, match="objective.adv_weight=2"):
    uni_instruct.Settings.from_config(common.uni_instruct_objective(adv_weight=2.0))


def test_cifar10_sid_critic_step_augments_the_fake_scores_inputs():
  """The CIFAR-10 SiD recipe (augment_p 0.12) on the tiny 8x8 DDPM++ (augment_dim 9): a critic
  step runs with EDM's labels in its batch (that they reach the loss is checked in float64 by
  tests/test_reference_equivalence.py); a network without augment_dim is refused."""
  from configs import architectures, cifar10_uni_instruct
  from fdistill import models
  from fdistill.objectives.base import Task
  config = cifar10_uni_instruct.get_config("sid,cond=False")
  config.model = architectures.tiny_songunet()
  config.model.label_dim = 0
  config.objective.discriminator = dict(name="mlp", hidden=(8,), emb_dim=8)
  module = models.build(config.model)
  apply_fn = models.make_denoiser(module, 0.5)
  teacher = models.init_params(module, jax.random.key(1), (1, 8, 8, 3))
  task = Task((8, 8, 3), 0, apply_fn, jax.eval_shape(lambda: teacher), teacher_is_network=True)
  batch = {"x": jax.random.normal(jax.random.key(2), (4, 8, 8, 3))}
  obj = objectives.build(config, task)
  state = obj.init(jax.random.key(0), teacher)
  assert obj.schedule(1) == "critic"
  new, metrics = jax.jit(obj.steps["critic"])(state, teacher, batch, jax.random.key(3))
  assert np.isfinite(float(metrics["fake_loss"])) and int(new["skipped"]) == 0
  assert changed(state["fake"]["params"], new["fake"]["params"])
  st = uni_instruct.Settings.from_config(config.objective)
  nets = scaffold.build(config, task, st, "uni_instruct").nets
  cb = critics.critic_batch(nets, st, state["gen"]["params"], batch, jax.random.key(3),
                            augment_p=st.augment_p)
  assert cb["augment_labels"].shape == (4, 9) and cb["real_augment_labels"].shape == (4, 9)
  config.model.augment_dim = 0
  config.objective.augment_p = 0.12
  with pytest.raises(ValueError, match="objective.augment_p=0.12 .* model.augment_dim=9"):
    objectives.build(config, task)


def test_fake_score_is_stochastic_only_with_dropout_or_augmentation():
  """DMD2's one-pass guidance loss is exact only when the fake score's training call draws
  nothing from its rng; any dropout field or augmentation keeps the two passes."""
  import ml_collections as mc
  from fdistill.objectives import scaffold
  stochastic = scaffold.fake_score_is_stochastic
  assert not stochastic(mc.ConfigDict(dict(name="mlp")))  # no dropout fields at all
  assert not stochastic(mc.ConfigDict(dict(dropout=0.0, label_dropout=0.0)))
  assert stochastic(mc.ConfigDict(dict(dropout=0.13)))
  assert stochastic(mc.ConfigDict(dict(dropout=0.0, label_dropout=0.1)))
  assert stochastic(mc.ConfigDict(dict(dropout=0.0)), augment_p=0.12)

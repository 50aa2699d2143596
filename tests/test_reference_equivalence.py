"""Each member's training signal against its reference code's, in float64 (docs/reference_equivalence.md).

For every member the reference computation is written here from the paper and the
published behaviour of its code (weighting, reductions over pixels and batch,
stop-gradients, loss scales), and fed the same tiny networks and the same z / eps /
sigma / t draws as this project's step loss. Compared: the loss value and the
per-sample gradient with respect to the generated sample (generator losses) or the
parameter gradient (critics), after ONE documented constant per loss, to a relative
error <= 1e-6. Each test has a negative control: the reference with one detail changed
(a stop-gradient, a loss scale, a reduction, the warm-up) must miss by orders of
magnitude, so the comparison can fail.

The networks: an EDM-preconditioned one-hidden-layer MLP on 2x4x4 images whose hidden
layer, reshaped to a 2x2 map of 8 channels, is its "encoder features" (SiDA's logit map
is their channel mean); a linear discriminator on the teacher's features; and a
generator whose params ARE its samples, so d loss / d params is d loss / d G(z) per
sample.
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, toy2d_uni_instruct
from fdistill.diffusion import edm
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import critics, divergences, dsm, fdistill, noise, scm_loss
from fdistill.objectives import uni_instruct

X_SHAPE = (2, 4, 4)
NUMEL = math.prod(X_SHAPE)
B = 6
HIDDEN = 32
SD = 0.5
TOL = 1e-6
MISS = 1e-3  # a negative control must miss by at least this (1000x the tolerance)


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-300))


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


# The worst error of the comparisons and the smallest miss of the negative controls of the
# running test; FDISTILL_PRINT_EQUIVALENCE=1 prints them (the table of
# docs/reference_equivalence.md: pytest -s tests/test_reference_equivalence.py).
RECORD = {}


def assert_close(got, want):
  err = rel_err(flat(got), flat(want))
  RECORD["worst"] = max(RECORD.get("worst", 0.0), err)
  assert err < TOL, err


def assert_misses(got, want):
  err = rel_err(flat(got), flat(want))
  RECORD["control"] = min(RECORD.get("control", np.inf), err)
  assert err > MISS, err


@pytest.fixture(autouse=True)
def record(request):
  RECORD.clear()
  yield
  if os.environ.get("FDISTILL_PRINT_EQUIVALENCE"):
    print(f"\nEQUIVALENCE {request.node.name}: worst {RECORD.get('worst', float('nan')):.1e}, "
          f"control {RECORD.get('control', float('nan')):.1e}")


# ---------------------------------------------------------------------------
# Tiny networks (float64).


def mlp_params(key, d_in=NUMEL, d_out=NUMEL):
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  return {"w1": jax.random.normal(k1, (d_in, HIDDEN)) / math.sqrt(d_in),
          "wt": jax.random.normal(k2, (HIDDEN,)), "b1": 0.1 * jax.random.normal(k3, (HIDDEN,)),
          "w2": jax.random.normal(k4, (HIDDEN, d_out)) / math.sqrt(HIDDEN),
          "wa": jax.random.normal(k5, (9, HIDDEN)) / 3}


def denoiser(params, x, sigma, cond=None, rng=None, return_features=False,
             augment_labels=None):
  """EDM preconditioning around an MLP; features: the hidden layer as [B, 2, 2, 8]; EDM's
  augmentation labels enter the hidden layer linearly (zero labels: no contribution)."""
  del cond, rng
  s = jnp.reshape(sigma, (-1, 1))
  flat = x.reshape(x.shape[0], -1)
  c_in, c_noise = 1 / jnp.sqrt(s**2 + SD**2), jnp.log(s) / 4
  pre = (c_in * flat) @ params["w1"] + c_noise * params["wt"] + params["b1"]
  if augment_labels is not None:
    pre = pre + augment_labels @ params["wa"]
  hidden = jnp.tanh(pre)
  out = (SD**2 / (s**2 + SD**2)) * flat + (s * SD / jnp.sqrt(s**2 + SD**2)) * (
      hidden @ params["w2"])
  out = out.reshape(x.shape)
  if return_features:
    return out, [hidden.reshape(x.shape[0], 2, 2, HIDDEN // 4)]
  return out


def sample_generator(params, x_in, sigma, cond=None, **kw):
  """G(z) = params["x"]: the loss's gradient w.r.t. the params is its gradient w.r.t. G(z)."""
  del x_in, sigma, cond, kw
  return params["x"]


HEADS = 2
linear_disc = disc_lib.Discriminator(
    init=lambda rng: {"w": jax.random.normal(rng, (HIDDEN, HEADS)) / math.sqrt(HIDDEN)},
    apply=lambda p, x_t, sigma, feats: feats[-1].reshape(x_t.shape[0], -1) @ p["w"],
    uses_features=True)

NETS = critics.Nets(sample_generator, denoiser, denoiser, linear_disc, X_SHAPE, 2.5)


def networks(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x_gen = 0.5 * jax.random.normal(k[0], (B,) + X_SHAPE)
  teacher = mlp_params(k[1])
  fake = jax.tree_util.tree_map(lambda a, b: a + 0.3 * b, teacher, mlp_params(k[2]))
  disc = linear_disc.init(k[3])
  real = 0.5 * jax.random.normal(k[4], (B,) + X_SHAPE)
  return {"x": x_gen}, teacher, fake, disc, {"x": real}


RNG = jax.random.key(7)


def generator_draws(st, n_x=2):
  """The (z, eps), sigma the step loss draws from RNG (same call as the loss)."""
  xs, (e,) = noise.draw_noise(RNG, B, X_SHAPE, n_x, 1)
  sigma, _ = noise.sample_sigma(e, st)
  return xs, sigma


def bcast(v):
  return v.reshape((-1,) + (1,) * len(X_SHAPE))


def sum_pix(v):
  return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def per_sample_grad(loss_fn, x):
  """d loss / d x for a loss of the generated batch x [B, ...] (loss returns a scalar)."""
  return jax.grad(loss_fn)(x)


# ---------------------------------------------------------------------------
# Member settings as the shipped configs build them.


def ui_settings(method, **overrides):
  objective = toy2d_uni_instruct.method_objective(method, 8, sigma_max=80.0, **overrides)
  return uni_instruct.Settings.from_config(objective), objective


def fd_settings(method=None, **overrides):
  if method is None:
    objective = common.fdistill_objective(**overrides)
  else:
    objective = toy2d_uni_instruct.method_objective(method, 8, **overrides)
  return fdistill.Settings.from_config(objective), objective


# ---------------------------------------------------------------------------
# SiD (Zhou et al. 2024, mingyuanzhou/SiD training/sid_loss.py + sid_training_loop.py).


def sid_reference(x, teacher, fake, eps, sigma, alpha, detach_teacher=False):
  """SiD's generator loss: ``lsg * sum_{b,pix} Delta (D_T - x - alpha Delta) / wf_b / B`` with
  lsg = 100, ``wf = max(mean|x - D_T|, 1e-5)`` without gradient, teacher and fake score at
  ``x_t = x + s eps`` (their inputs on the gradient path)."""
  x_t = x + bcast(sigma) * eps
  d_t = denoiser(teacher, x_t, sigma)
  d_f = denoiser(fake, x_t, sigma)
  if detach_teacher:
    d_t = jax.lax.stop_gradient(d_t)
  wf = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x - d_t).reshape(B, -1), -1), 1e-5))
  per = sum_pix((d_t - d_f) * ((d_t - x) - alpha * (d_t - d_f))) / wf
  return 100 * jnp.sum(per) / B


def project_generator_loss(make_loss, st, gen, inputs):
  loss = make_loss(NETS, st)
  batch = {"x": jnp.zeros((B,) + X_SHAPE)}
  value = loss(gen, inputs, batch, RNG)[0]
  grad = jax.grad(lambda p: loss(p, inputs, batch, RNG)[0])(gen)["x"]
  return value, grad


def check_against_sids_code(method, reference, alpha):
  """The member's loss and gradient x 100 (SiD's lsg) against ``reference(x, teacher, fake,
  eps, sigma, alpha, **control)``; returns (the gradient x 100, a control's gradient)."""
  st, _ = ui_settings(method)
  gen, teacher, fake, disc, _ = networks()
  inputs = {"teacher": teacher, "fake": fake, "disc": disc}
  value, grad = project_generator_loss(uni_instruct.make_generator_loss, st, gen, inputs)
  (_, eps), sigma = generator_draws(st)
  ref = lambda x, **kw: reference(x, teacher, fake, eps, sigma, alpha, **kw)
  assert_close(100 * value, ref(gen["x"]))
  assert_close(100 * grad, per_sample_grad(ref, gen["x"]))
  return 100 * grad, lambda **kw: per_sample_grad(lambda x: ref(x, **kw), gen["x"])


def test_sid_generator_equals_sids_code_over_100():
  st, _ = ui_settings("sid")
  assert (st.loss, st.sid_alpha, st.scale) == ("sid", 1.2, "sid")
  grad, control = check_against_sids_code("sid", sid_reference, 1.2)
  assert_misses(grad, control(detach_teacher=True))  # SiD differentiates through D_T's input


# ---------------------------------------------------------------------------
# SiDA (Zhou et al. 2024, mingyuanzhou/SiD sida_training/sida_loss.py + sida_training_loop.py).


def sida_reference(x, teacher, fake, eps, sigma, alpha, per_sample_bce=False, gan_scale=0.01):
  """``0.5 lsg SiD + 0.5 lsg_gan GAN``, lsg = 100, lsg_gan = 0.01; GAN: ``C H W`` times the
  BCE(clamp(logit, +-10), 1) averaged over the batch AND the logit map (one scalar), divided
  by each sample's ``wf``, summed over the batch / B. ``per_sample_bce``: each sample's own BCE
  (this project's earlier weighting; a negative control)."""
  sid = sid_reference(x, teacher, fake, eps, sigma, alpha)
  x_t = x + bcast(sigma) * eps
  d_t = denoiser(teacher, x_t, sigma)
  _, feats = denoiser(fake, x_t, sigma, return_features=True)
  logit = jnp.clip(jnp.mean(feats[-1], axis=-1), -10, 10)  # the channel mean: [B, 2, 2]
  wf = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x - d_t).reshape(B, -1), -1), 1e-5))
  bce = jax.nn.softplus(-logit)
  bce = jnp.mean(bce.reshape(B, -1), -1) if per_sample_bce else jnp.mean(bce)
  gan = jnp.sum(NUMEL * bce / wf) / B
  return 0.5 * sid + 0.5 * gan_scale * gan


def test_sida_generator_equals_sidas_code_over_100():
  st, _ = ui_settings("sida")
  assert (st.loss, st.sid_alpha, st.adv_weight, st.sida_gan_scale) == ("sida", 1.0, 0.5, 1e-4)
  grad, control = check_against_sids_code("sida", sida_reference, 1.0)
  # Negative controls: the GAN term mixed 1:1 with SiD's (1e4 too heavy), per-sample BCE.
  assert_misses(grad, control(gan_scale=100.0))
  assert_misses(grad, control(per_sample_bce=True))


def critic_batch_of(st_levels, gen, real, same_noise):
  """The critic batch of the project's step (one call of critics.critic_batch)."""

  st = dataclasses.replace(st_levels, same_noise_real=same_noise)
  return critics.critic_batch(NETS, st, gen, real, RNG)


def sida_critic_reference(fake, cb, dsm_mean=False):
  """SiDA's fake-score + discriminator loss: ``sum_b lambda_b sum_pix (D_fake(x_t) - x)^2 / B +
  sum_b lambda_b (BCE_real + BCE_fake) / 2 / B``, each BCE (no clamp) the mean over batch and
  logit map; the real rows share (s, eps) with the fakes. ``dsm_mean``: the DSM part averaged
  over pixels instead (this project's earlier weighting; a negative control)."""
  lam = (cb["sigma"]**2 + SD**2) / (cb["sigma"] * SD)**2
  d, feats = denoiser(fake, cb["x_t"], cb["sigma"], return_features=True)
  _, real_feats = denoiser(fake, cb["real_t"], cb["real_sigma"], return_features=True)
  err = sum_pix((d - cb["x_gen"])**2) / (NUMEL if dsm_mean else 1)
  logit_fake, logit_real = jnp.mean(feats[-1], -1), jnp.mean(real_feats[-1], -1)
  bce = jnp.mean(jax.nn.softplus(logit_fake)) + jnp.mean(jax.nn.softplus(-logit_real))
  return jnp.sum(lam * err) / B + jnp.sum(lam * bce / 2) / B


def test_sida_fake_score_and_discriminator_loss_equals_sidas_code():
  st, _ = ui_settings("sida")
  assert st.same_noise_real
  gen, teacher, fake, _, real = networks()
  cb = critic_batch_of(noise.critic_levels(st, {"sigma_dist": "lognormal"}), gen, real, True)
  np.testing.assert_array_equal(cb["sigma"], cb["real_sigma"])
  loss = critics.make_fake_score_loss(NETS, st.fake_loss_weight, encoder_disc=True)
  value = loss(fake, None, cb, None)[0]
  grad = jax.grad(lambda p: loss(p, None, cb, None)[0])(fake)
  ref = lambda p, **kw: sida_critic_reference(p, cb, **kw)
  assert_close(value, ref(fake))
  assert_close(grad, jax.grad(ref)(fake))
  assert_misses(grad, jax.grad(lambda p: ref(p, dsm_mean=True))(fake))


# ---------------------------------------------------------------------------
# The fake score's DSM (SiD, DMD2, Diff-Instruct, rCM) and teacher training (EDM).


def dsm_reference(params, x_t, sigma, x0, weight="edm"):
  """EDM's / SiD's ``sum_b lambda_b sum_pix (D(x_t) - x0)^2 / B`` (DMD2's mean over every
  element is the same over NUMEL); ``weight='none'`` drops lambda (a negative control)."""
  lam = (sigma**2 + SD**2) / (sigma * SD)**2 if weight == "edm" else jnp.ones_like(sigma)
  return jnp.sum(lam * sum_pix((denoiser(params, x_t, sigma) - x0)**2)) / B


def test_fake_score_loss_equals_sids_code_over_numel():
  st, _ = ui_settings("sid")
  gen, _, fake, _, real = networks()
  cb = critic_batch_of(noise.critic_levels(st, {}), gen, real, False)
  loss = critics.make_fake_score_loss(NETS, "edm")
  grad = jax.grad(lambda p: loss(p, None, cb, None)[0])(fake)
  ref = lambda p, w="edm": dsm_reference(p, cb["x_t"], cb["sigma"], cb["x_gen"], w)
  assert_close(NUMEL * loss(fake, None, cb, None)[0], ref(fake))
  assert_close(jax.tree_util.tree_map(lambda g: NUMEL * g, grad), jax.grad(ref)(fake))
  unweighted = jax.grad(lambda p: ref(p, "none"))(fake)
  assert_misses(jax.tree_util.tree_map(lambda g: NUMEL * g, grad), unweighted)


def test_augmented_fake_score_loss_equals_sids_code():
  """SiD's CIFAR-10 fake-score loss with EDM's augmentation (p = 0.12 there; 1 here so every
  transform runs): ``y, labels = augment_pipe(G(z))``, ``sum_b lambda_b sum_pix (D_fake(y + s n;
  labels) - y)^2 / B``: the target is the AUGMENTED sample and the network sees its labels."""
  from configs import cifar10_uni_instruct
  assert cifar10_uni_instruct.get_config("sid").objective.augment_p == 0.12
  from fdistill.data import augment
  st, _ = ui_settings("sid")
  gen, _, fake, _, real = networks()
  levels = noise.critic_levels(st, {"sigma_dist": "lognormal"})
  cb = critics.critic_batch(NETS, levels, gen, real, RNG, augment_p=1.0)
  plain = critics.critic_batch(NETS, levels, gen, real, RNG)
  np.testing.assert_array_equal(cb["sigma"], plain["sigma"])  # the same noise draws
  y, labels = augment.augment(jax.random.fold_in(RNG, 1), gen["x"], 1.0)
  x_t = y + bcast(cb["sigma"]) * (plain["x_t"] - plain["x_gen"]) / bcast(plain["sigma"])
  loss = critics.make_fake_score_loss(NETS, "edm")
  grad = jax.grad(lambda p: loss(p, None, cb, None)[0])(fake)

  def ref(p, with_labels=True):
    lam = (cb["sigma"]**2 + SD**2) / (cb["sigma"] * SD)**2
    d = denoiser(p, x_t, cb["sigma"], augment_labels=labels if with_labels else None)
    return jnp.sum(lam * sum_pix((d - y)**2)) / B

  assert_close(NUMEL * loss(fake, None, cb, None)[0], ref(fake))
  assert_close(jax.tree_util.tree_map(lambda g: NUMEL * g, grad), jax.grad(ref)(fake))
  assert_misses(jax.tree_util.tree_map(lambda g: NUMEL * g, grad),
                jax.grad(lambda p: ref(p, with_labels=False))(fake))


def test_rcm_fake_score_weight_is_rcms_one_over_sin_squared():
  """rCM's critic: ``sum_pix (G_x0 - D_fake)^2 / sin^2 t`` at ``sigma = sd tan t``; EDM's
  lambda(sigma) there is ``1 / (sd^2 sin^2 t)``, so the project's loss is rCM's over sd^2 D."""
  t = jnp.linspace(0.05, 1.5, 7)
  sigma = SD * jnp.tan(t)
  assert_close(edm.loss_weight(sigma, SD), 1 / (SD**2 * jnp.sin(t)**2))
  assert_misses(edm.loss_weight(sigma, SD), 1 / jnp.sin(t)**2)


def test_teacher_dsm_equals_edms_loss_over_numel():
  _, teacher, _, _, real = networks()
  loss = dsm.make_loss(denoiser, SD, -1.2, 1.2)
  value, grad = loss(teacher, None, real, RNG)[0], jax.grad(
      lambda p: loss(p, None, real, RNG)[0])(teacher)
  s_rng, e_rng, _ = jax.random.split(RNG, 3)  # EDM's draws, as the loss makes them
  sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(s_rng, (B,)))
  x_t = real["x"] + bcast(sigma) * jax.random.normal(e_rng, real["x"].shape)
  ref = lambda p, w="edm": dsm_reference(p, x_t, sigma, real["x"], w)
  assert_close(NUMEL * value, ref(teacher))
  scaled = jax.tree_util.tree_map(lambda g: NUMEL * g, grad)
  assert_close(scaled, jax.grad(ref)(teacher))
  assert_misses(scaled, jax.grad(lambda p: ref(p, "none"))(teacher))


# ---------------------------------------------------------------------------
# DMD / DMD2 (tianweiy/DMD2 main/edm/edm_guidance.py) and Diff-Instruct (training/di_loss.py).


def dm_reference(x, teacher, fake, eps, sigma, normaliser, logits_fn=None, gan_weight=0.0):
  """DMD2's ``0.5 mse(x, sg(x - grad))`` (mean over B * numel), ``grad = (D_fake - D_T) / wf``
  with both denoisers under no_grad at ``x + s eps``; plus ``gan_weight softplus(-logit).mean()``
  (DMD2's gen_cls_loss). ``normaliser``: 'dmd2' (wf = mean|x - D_T|, no epsilon), 'one'
  (Diff-Instruct's weight 1: ``sum_pix (D_fake - D_T) x / B``, the same gradient as 0.5 mse
  over B only, i.e. NUMEL times), 'fake' (wf from D_fake, a negative control)."""
  x_t = x + bcast(sigma) * eps
  d_t = jax.lax.stop_gradient(denoiser(teacher, x_t, sigma))
  d_f = jax.lax.stop_gradient(denoiser(fake, x_t, sigma))
  if normaliser == "one":
    return jnp.sum((d_f - d_t) * x) / B
  ref = d_t if normaliser == "dmd2" else d_f
  wf = jax.lax.stop_gradient(jnp.mean(jnp.abs(x - ref).reshape(B, -1), -1))
  grad = (d_f - d_t) / bcast(wf)
  value = 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - grad))**2)
  if gan_weight:
    value = value + gan_weight * jnp.mean(jax.nn.softplus(-logits_fn(x_t)))
  return value


@pytest.mark.parametrize("method", ["dmd", "dmd2", "diff_instruct"])
def test_dmd_members_equal_their_reference_code(method):
  st, _ = fd_settings(method)
  gen, teacher, fake, disc, _ = networks()
  inputs = {"teacher": teacher, "fake": fake, "disc": disc, "bins": jnp.ones((1,))}
  make = lambda nets, s: fdistill.make_generator_loss(nets, divergences.get("reverse_kl"), s)
  _, grad = project_generator_loss(make, st, gen, inputs)
  (_, eps), sigma = generator_draws(st)
  logits_fn = lambda x_t: linear_disc.apply(
      disc, x_t, None, denoiser(teacher, x_t, sigma, return_features=True)[1])
  normaliser = "one" if method == "diff_instruct" else "dmd2"
  ref = lambda x, n=normaliser: dm_reference(x, teacher, fake, eps, sigma, n, logits_fn,
                                             st.gan_weight)
  constant = NUMEL if method == "diff_instruct" else 1.0  # DI sums over pixels, FastGen means
  want = per_sample_grad(ref, gen["x"])
  assert_close(constant * grad, want)
  if method == "diff_instruct":
    assert_misses(constant * grad, per_sample_grad(lambda x: ref(x, "dmd2"), gen["x"]))
  else:
    assert_misses(grad, per_sample_grad(lambda x: ref(x, "fake"), gen["x"]))


# ---------------------------------------------------------------------------
# f-distill (Xu et al. 2025; NVlabs/FastGen f_distill.py, common_loss.py), per divergence.

H_CLOSED_FORM = {  # h(r) = r^2 f''(r), written out per divergence (the paper's table)
    "reverse_kl": lambda r: jnp.ones_like(r), "forward_kl": lambda r: r,
    "js": lambda r: r / (1 + r), "squared_hellinger": lambda r: jnp.sqrt(r) / 4,
    "jeffreys": lambda r: r + 1}


def fdistill_reference(x, teacher, fake, disc, eps, sigma, h, st, gan_weight, bins=0,
                       drop_ratio_clip=False):
  """The f-distill generator loss as FastGen computes it: the heads' mean logit clipped to
  +-10, ``r = clip(exp(logit), 0.1, 20)``, divided by the mean r of its LINEAR sigma bin
  on [sigma_min, sigma_max] (this batch's means, ``bins`` bins), ``h(r)`` over its batch
  mean, times DMD's ``1 / (mean|x - D_T| + 1e-6)``, in DMD's ``0.5 mse`` surrogate; plus the
  GAN term."""
  x_t = x + bcast(sigma) * eps
  d_t, feats = denoiser(teacher, x_t, sigma, return_features=True)
  d_t = jax.lax.stop_gradient(d_t)
  d_f = jax.lax.stop_gradient(denoiser(fake, x_t, sigma))
  logits = feats[-1].reshape(B, -1) @ disc["w"]
  log_r = jax.lax.stop_gradient(jnp.clip(jnp.mean(logits, -1), -10, 10))
  r = jnp.exp(log_r) if drop_ratio_clip else jnp.clip(jnp.exp(log_r), 0.1, 20)
  if bins:
    idx = jnp.clip(jnp.floor((sigma - st.sigma_min) / (st.sigma_max - st.sigma_min) * bins),
                   0, bins - 1).astype(int)
    means = np.array([np.mean(r[idx == k]) if np.any(idx == k) else 1.0 for k in range(bins)])
    r = r / (means[np.asarray(idx)] + 1e-6)
  hr = h(r)
  hr = hr / (jnp.mean(hr) + 1e-6)
  w = hr / (jnp.mean(jnp.abs(x - d_t).reshape(B, -1), -1) + 1e-6)
  grad = bcast(w) * (d_f - d_t)
  value = 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - grad))**2)
  return value + gan_weight * jnp.mean(jax.nn.softplus(-logits))


@pytest.mark.parametrize("name", sorted(H_CLOSED_FORM))
def test_fdistill_generator_equals_fastgens_per_divergence(name):
  # FastGen's linear sigma bins (ratio_bin_by='sigma'), 3 bins with this batch's means; logits
  # scaled up so that the ratio clip [0.1, 20] is active on some rows.
  st, _ = fd_settings(divergence=name, ratio_bins=3, ratio_ema=0.0, ratio_bin_by="sigma")
  gen, teacher, fake, disc, _ = networks()
  disc = {"w": 8 * disc["w"]}
  inputs = {"teacher": teacher, "fake": fake, "disc": disc, "bins": jnp.ones((3,))}
  div = divergences.get(name)
  make = lambda nets, s: fdistill.make_generator_loss(nets, div, s)
  value, grad = project_generator_loss(make, st, gen, inputs)
  (_, eps), sigma = generator_draws(st)
  ref = lambda x, **kw: fdistill_reference(x, teacher, fake, disc, eps, sigma,
                                           H_CLOSED_FORM[name], st, st.gan_weight, bins=3, **kw)
  assert_close(value, ref(gen["x"]))
  assert_close(grad, per_sample_grad(ref, gen["x"]))
  if name != "reverse_kl":  # h = 1 ignores r, so the ratio's clip cannot show
    wrong = per_sample_grad(lambda x: ref(x, drop_ratio_clip=True), gen["x"])
    assert_misses(grad, wrong)


def test_fdistill_discriminator_loss_equals_the_logistic_loss():
  """FastGen's discriminator: ``softplus(logit_fake).mean() + softplus(-logit_real).mean()`` on
  the teacher's features at the noised rows (r = p/q at the optimum)."""
  st, _ = fd_settings()
  gen, teacher, _, disc, real = networks()
  cb = critic_batch_of(noise.critic_levels(st, {}), gen, real, False)
  loss = critics.make_discriminator_loss(NETS)
  grad = jax.grad(lambda p: loss(p, teacher, cb, None)[0])(disc)

  def ref(p, swap=False):
    logit = lambda x, s: denoiser(teacher, x, s, return_features=True)[1][-1].reshape(B, -1) @ p["w"]
    fake, real_ = logit(cb["x_t"], cb["sigma"]), logit(cb["real_t"], cb["real_sigma"])
    if swap:
      fake, real_ = real_, fake
    return jnp.mean(jax.nn.softplus(fake)) + jnp.mean(jax.nn.softplus(-real_))

  assert_close(loss(disc, teacher, cb, None)[0], ref(disc))
  assert_close(grad, jax.grad(ref)(disc))
  assert_misses(grad, jax.grad(lambda p: ref(p, swap=True))(disc))


# ---------------------------------------------------------------------------
# Uni-Instruct's expanded members and SIM (no public code: the papers' losses).


def uni_instruct_reference(x, teacher, fake, disc, eps, sigma, h, dh, ratio_input_grad=True):
  """Uni-Instruct's per-sample surrogate (its paper, eq. of the expanded f-divergence gradient),
  ``[h(r) - r h'(r)] |Delta|^2 + 2 h(r) Delta^T (D_fake - x) / s^2`` with
  ``Delta = (D_T - D_fake) / s^2``, every network's input ``x_t`` live and its params frozen,
  times SiD's scale ``s^4 / max(mean|x - D_T|, 1e-5)``, averaged over the batch."""
  x_t = x + bcast(sigma) * eps
  d_t, feats = denoiser(teacher, x_t, sigma, return_features=True)
  d_f = denoiser(fake, x_t, sigma)
  if not ratio_input_grad:
    feats = [jax.lax.stop_gradient(f) for f in feats]
  r = jnp.exp(jnp.clip(jnp.mean(feats[-1].reshape(B, -1) @ disc["w"], -1), -10, 10))
  delta = (d_t - d_f) / bcast(sigma**2)
  per = (h(r) - r * dh(r)) * sum_pix(delta**2) + 2 * h(r) * sum_pix(delta * (d_f - x)) / sigma**2
  wf = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x - d_t).reshape(B, -1), -1), 1e-5))
  return jnp.mean(per * sigma**4 / wf)


DH = {"forward_kl": (lambda r: r, lambda r: jnp.ones_like(r)),
      "reverse_kl": (lambda r: jnp.ones_like(r), lambda r: jnp.zeros_like(r)),
      "pearson": (lambda r: 2 * r**2, lambda r: 4 * r),
      "js": (lambda r: r / (1 + r), lambda r: 1 / (1 + r)**2)}


@pytest.mark.parametrize("name", sorted(DH))
def test_uni_instruct_expanded_member_equals_its_paper(name):
  st, _ = ui_settings(name)
  gen, teacher, fake, disc, _ = networks()
  inputs = {"teacher": teacher, "fake": fake, "disc": disc}
  value, grad = project_generator_loss(uni_instruct.make_generator_loss, st, gen, inputs)
  (_, eps), sigma = generator_draws(st)
  h, dh = DH[name]
  ref = lambda x, **kw: uni_instruct_reference(x, teacher, fake, disc, eps, sigma, h, dh, **kw)
  assert_close(value, ref(gen["x"]))
  assert_close(grad, per_sample_grad(ref, gen["x"]))
  if name != "reverse_kl":  # reverse KL's h is constant: it reads no ratio
    wrong = per_sample_grad(lambda x: ref(x, ratio_input_grad=False), gen["x"])
    assert_misses(grad, wrong)


def sim_reference(x, teacher, fake, eps, sigma, c=1.0, delta_grad=True):
  """SIM (Luo et al. 2024) with the pseudo-Huber distance: ``d'(y)^T (D_T - x) / s^2`` with
  ``y = (D_T - D_fake) / s^2``, ``d'(y) = y / sqrt(|y|^2 + c^2)``, times SiD's scale."""
  x_t = x + bcast(sigma) * eps
  d_t, d_f = denoiser(teacher, x_t, sigma), denoiser(fake, x_t, sigma)
  y = (d_t - d_f) / bcast(sigma**2)
  if not delta_grad:
    y = jax.lax.stop_gradient(y)
  dprime = y / bcast(jnp.sqrt(sum_pix(y**2) + c**2))
  per = sum_pix(dprime * (d_t - x)) / sigma**2
  wf = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x - d_t).reshape(B, -1), -1), 1e-5))
  return jnp.mean(per * sigma**4 / wf)


def test_sim_equals_its_paper():
  st, _ = ui_settings("sim_huber")
  gen, teacher, fake, disc, _ = networks()
  inputs = {"teacher": teacher, "fake": fake, "disc": disc}
  value, grad = project_generator_loss(uni_instruct.make_generator_loss, st, gen, inputs)
  (_, eps), sigma = generator_draws(st)
  ref = lambda x, **kw: sim_reference(x, teacher, fake, eps, sigma, st.sim_c, **kw)
  assert_close(value, ref(gen["x"]))
  assert_close(grad, per_sample_grad(ref, gen["x"]))
  assert_misses(grad, per_sample_grad(lambda x: ref(x, delta_grad=False), gen["x"]))


# ---------------------------------------------------------------------------
# sCM / rCM (Lu & Song 2024; NVlabs/rcm t2v_model_distill_rcm.py training_step_generator).


def F_net(params, y, t, cond=None):
  """A TrigFlow F-network: an MLP of ``(y, c_noise = log(tan t) / 4)``."""
  del cond
  flat = y.reshape(y.shape[0], -1)
  c_noise = jnp.log(jnp.tan(t)).reshape(-1, 1) / 4
  hidden = jnp.tanh(flat @ params["w1"] + c_noise * params["wt"] + params["b1"])
  return (hidden @ params["w2"]).reshape(y.shape)


def rcm_target_reference(F_student, F_teacher_fn, x_t, t, r, sd, x_term_only=False):
  """rCM's target with its tangent warm-up ratio r (its code, sd = 1 there; here written for
  any sd by x -> x / sd): ``g = -cos t sqrt(1 - r^2 sin^2 t) (F_sg - F_T) - r (cos t sin t x_t / sd
  + cos t sin t dF/dt)``, dF/dt the total derivative along ``(dx_t/dt, 1)`` by a CENTRAL
  DIFFERENCE (no jvp), then ``g / (|g| + 0.1)``. ``x_term_only``: r on the x_t term alone (the
  form issue 21 proposed; a negative control)."""
  cos, sin = bcast(jnp.cos(t)), bcast(jnp.sin(t))
  F_T = F_teacher_fn(x_t / sd, t)
  dxdt = sd * F_T
  h = 1e-6
  dF = (F_student(x_t / sd + h * dxdt / sd, t + h) - F_student(x_t / sd - h * dxdt / sd, t - h)) / (
      2 * h)
  F_sg = F_student(x_t / sd, t)
  first = -cos * jnp.sqrt(1 - r**2 * sin**2) * (F_sg - F_T)
  if x_term_only:
    g = first - (r * cos * sin * x_t / sd + cos * sin * dF)
  else:
    g = first - r * (cos * sin * x_t / sd + cos * sin * dF)
  norm = jnp.sqrt(sum_pix(g**2))
  return g / bcast(norm + 0.1)


@pytest.mark.parametrize("r", [0.3, 1.0])
def test_rcm_scm_loss_equals_rcms_code(r):
  """rCM's ``loss_scale * sum_d (F - F_sg - g)^2`` (loss_scale 100, batch mean) is the
  project's ``mean_d`` loss times ``100 D``; the adaptive weight (sCM's Algorithm 1,
  ``exp(w) |.|^2 / D - w``) enters the same way. sd = 1, as rCM's code."""
  sd = 1.0
  k = jax.random.split(jax.random.key(3), 4)
  student = mlp_params(k[0])
  teacher = jax.tree_util.tree_map(lambda a, b: a + 0.2 * b, student, mlp_params(k[1]))
  x0 = sd * jax.random.normal(k[2], (B,) + X_SHAPE)
  eps = jax.random.normal(k[3], (B,) + X_SHAPE)
  t = jnp.linspace(0.1, 1.45, B)
  logvar = jnp.linspace(-0.5, 0.5, B)
  loss = lambda p: scm_loss.scm_loss(F_net, p, x0, eps, t, F_net, teacher, sigma_data=sd, r=r,
                                     c=0.1, tangent_mode="jvp", warmup="rcm", logvar=logvar)[0]
  x_t = bcast(jnp.cos(t)) * x0 + bcast(jnp.sin(t)) * sd * eps
  g = rcm_target_reference(lambda y, tt: F_net(student, y, tt), lambda y, tt: F_net(teacher, y, tt),
                           x_t, t, r, sd)

  def ref(p, target=g):
    F = F_net(p, x_t / sd, t)
    err = sum_pix((F - jax.lax.stop_gradient(F) - target)**2)
    return 100 * jnp.mean(jnp.exp(logvar) * err / NUMEL - logvar)  # rCM's scale; sCM's weight

  grad = jax.tree_util.tree_map(lambda a: 100 * a, jax.grad(loss)(student))
  assert_close(100 * loss(student), ref(student))
  # The central difference's own error (~h^2 and ulp / h) sets this tolerance, not the code.
  assert_close(grad, jax.grad(ref)(student))
  if r < 1:
    g_wrong = rcm_target_reference(lambda y, tt: F_net(student, y, tt),
                                   lambda y, tt: F_net(teacher, y, tt), x_t, t, r, sd,
                                   x_term_only=True)
    assert_misses(grad, jax.grad(lambda p: ref(p, g_wrong))(student))


def test_rcm_dmd_regulariser_equals_rcms_code_over_d():
  """rCM's DMD term: ``sum_d (x - sg(x - grad))^2`` with ``grad = (D_fake - D_T) /
  max(mean|x - D_T|, 1e-5)`` (loss_scale_dmd 1), batch mean: the project's ``mean_d`` times D."""
  k = jax.random.split(jax.random.key(4), 3)
  x, x_fake, x_teacher = (jax.random.normal(kk, (B,) + X_SHAPE) for kk in k)

  def ref(x, wf_from=None):
    wf_from = x_teacher if wf_from is None else wf_from
    wf = jnp.maximum(jnp.mean(jnp.abs(jax.lax.stop_gradient(x) - wf_from).reshape(B, -1), -1),
                     1e-5)
    grad = (x_fake - x_teacher) / bcast(wf)
    return jnp.mean(sum_pix((x - jax.lax.stop_gradient(x - grad))**2))

  ours = lambda x: scm_loss.dmd_loss(x, x_fake, x_teacher)[0]
  assert_close(NUMEL * ours(x), ref(x))
  assert_close(NUMEL * jax.grad(ours)(x), jax.grad(ref)(x))
  assert_misses(NUMEL * jax.grad(ours)(x), jax.grad(lambda y: ref(y, x_fake))(x))


# ---------------------------------------------------------------------------
# DMD2's classifier on the fake score's bottleneck (tianweiy/DMD2 edm_unified_model.py,
# edm_guidance.py: compute_cls_logits, guidance cls loss, gen_cls_loss).

FAKE_NETS = dataclasses.replace(NETS, disc_features="fake")


def dmd2_settings():
  st, objective = fd_settings("dmd2", discriminator=dict(name="unet_heads"))
  assert (st.disc_features, st.disc_loss_weight, st.gan_weight) == ("fake", 1e-2, 3e-3)
  return st, noise.critic_levels(st, objective.critic_noise)


def test_dmd2_generator_gan_term_reads_the_fake_score_at_its_own_noise():
  """DMD2: ``dm_loss + 3e-3 softplus(-cls(fake_unet bottleneck at x + s' eps')).mean()``, s'
  drawn over the whole grid (``diffusion_gan``), the fake U-Net frozen, its input live."""
  st, levels = dmd2_settings()
  gen, teacher, fake, disc, _ = networks()
  inputs = {"teacher": teacher, "fake": fake, "disc": disc, "bins": jnp.ones((1,))}
  loss = fdistill.make_generator_loss(FAKE_NETS, divergences.get("reverse_kl"), st, levels)
  batch = {"x": jnp.zeros((B,) + X_SHAPE)}
  grad = jax.grad(lambda p: loss(p, inputs, batch, RNG)[0])(gen)["x"]
  (_, eps, eps_gan), (e, e_gan) = noise.draw_noise(RNG, B, X_SHAPE, 3, 2)
  sigma, s_gan = noise.sample_sigma(e, st)[0], noise.sample_sigma(e_gan, levels)[0]

  def ref(x, features_of=fake, at_own_noise=True):
    dm = dm_reference(x, teacher, fake, eps, sigma, "dmd2")
    x_gan = x + bcast(s_gan) * eps_gan if at_own_noise else x + bcast(sigma) * eps
    s = s_gan if at_own_noise else sigma
    feats = denoiser(features_of, x_gan, s, return_features=True)[1]
    return dm + 3e-3 * jnp.mean(jax.nn.softplus(-(feats[-1].reshape(B, -1) @ disc["w"])))

  assert_close(grad, per_sample_grad(ref, gen["x"]))
  assert_misses(grad, per_sample_grad(lambda x: ref(x, features_of=teacher), gen["x"]))
  assert_misses(grad, per_sample_grad(lambda x: ref(x, at_own_noise=False), gen["x"]))


@pytest.mark.parametrize("stochastic", [False, True])
def test_dmd2_guidance_loss_trains_fake_score_and_classifier_jointly(stochastic):
  """DMD2's guidance loss ``mean(lambda (D_fake - x)^2) + 1e-2 (softplus(l_fake).mean() +
  softplus(-l_real).mean())``, logits from the fake U-Net's bottleneck: its gradient w.r.t. the
  fake score and w.r.t. the head are those of the project's two updates (constant 1); in one
  paired pass and (``stochastic``: a fake score with dropout) in two."""
  st, levels = dmd2_settings()
  gen, _, fake, disc, real = networks()
  cb = critic_batch_of(levels, gen, real, False)
  fake_loss, disc_loss = critics.make_joint_fake_score_loss(FAKE_NETS, "edm", st.disc_loss_weight,
                                                            stochastic)

  def ref(fake_p, disc_p, cls_weight=1e-2):
    lam = (cb["sigma"]**2 + SD**2) / (cb["sigma"] * SD)**2
    d, feats = denoiser(fake_p, cb["x_t"], cb["sigma"], return_features=True)
    _, real_feats = denoiser(fake_p, cb["real_t"], cb["real_sigma"], return_features=True)
    dsm = jnp.mean(bcast(lam) * (d - cb["x_gen"])**2)
    logit = lambda f: f[-1].reshape(B, -1) @ disc_p["w"]
    cls = jnp.mean(jax.nn.softplus(logit(feats))) + jnp.mean(jax.nn.softplus(-logit(real_feats)))
    return dsm + cls_weight * cls

  got_fake = jax.grad(lambda p: fake_loss(p, {"disc": disc}, cb, None)[0])(fake)
  got_disc = jax.grad(lambda p: disc_loss(p, {"fake": fake}, cb, None)[0])(disc)
  assert_close(fake_loss(fake, {"disc": disc}, cb, None)[0], ref(fake, disc))
  assert_close(got_fake, jax.grad(ref)(fake, disc))
  assert_close(got_disc, jax.grad(ref, argnums=1)(fake, disc))
  # The fake score's encoder must learn the classifier too (without it: DSM alone).
  assert_misses(got_fake, jax.grad(lambda p: ref(p, disc, cls_weight=0.0))(fake))


def test_dmd2_guidance_loss_in_one_pass_equals_its_two_passes():
  """The joint fake-score loss's one call at x_t (D_fake for the DSM and the classifier's
  features) and feature call at real_t, against the formulation it replaced,
  written out: the DSM's own call at x_t, then the classifier's feature calls at x_t and
  real_t. Value, parts and gradient; taking the DSM's output from the real rows misses."""
  st, levels = dmd2_settings()
  gen, _, fake, disc, real = networks()
  cb = critic_batch_of(levels, gen, real, False)
  calls = []

  def counted(params, x, *args, **kw):
    calls.append(x.shape[0])
    return denoiser(params, x, *args, **kw)

  nets = dataclasses.replace(FAKE_NETS, fake_apply=counted)
  fake_loss, _ = critics.make_joint_fake_score_loss(nets, "edm", st.disc_loss_weight)
  value, aux = fake_loss(fake, {"disc": disc}, cb, RNG)
  assert calls == [B, B]  # x_t once (not a DSM call and a feature call), then real_t

  def two_passes(fake_p, dsm_rows="x_t"):
    lam = (cb["sigma"]**2 + SD**2) / (cb["sigma"] * SD)**2
    d = denoiser(fake_p, cb[dsm_rows], cb["sigma"])  # the DSM's pass
    feats = denoiser(fake_p, cb["x_t"], cb["sigma"], return_features=True)[1]  # the features'
    real_feats = denoiser(fake_p, cb["real_t"], cb["real_sigma"], return_features=True)[1]
    dsm = jnp.mean(lam * jnp.mean((d - cb["x_gen"])**2, axis=(1, 2, 3)))
    logit = lambda f: f[-1].reshape(B, -1) @ disc["w"]
    cls = jnp.mean(jax.nn.softplus(logit(feats))) + jnp.mean(jax.nn.softplus(-logit(real_feats)))
    return dsm + st.disc_loss_weight * cls, (dsm, cls)

  (want, (dsm, cls)), want_grad = jax.value_and_grad(two_passes, has_aux=True)(fake)
  got_grad = jax.grad(lambda p: fake_loss(p, {"disc": disc}, cb, RNG)[0])(fake)
  assert_close(value, want)
  assert_close([aux["fake_loss"], aux["dsm_loss"], aux["adv_disc_loss"]], [want, dsm, cls])
  assert_close(got_grad, want_grad)
  wrong = jax.grad(lambda p: two_passes(p, dsm_rows="real_t")[0])(fake)
  assert_misses(got_grad, wrong)

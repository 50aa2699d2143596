"""Discriminators: the logistic-loss optimum is the log density ratio; feature heads' shapes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import architectures, common
from fdistill import models
from fdistill.models import discriminator as disc_lib
from fdistill.objectives import critics
from fdistill.diffusion import gmm as gmm_lib

# Two known 2-D Gaussians standing in for noised data (p) and noised generator samples (q).
P_MEAN, P_STD = np.array([0.0, 0.0]), 1.0
Q_MEAN, Q_STD = np.array([0.8, -0.4]), 0.7
SIGMA = 0.5  # the noise level the discriminator is conditioned on (both sides)


def disc_config(**fields):
  """A complete ``objective.discriminator`` section (configs/common.py) with ``fields`` set."""
  return ml_collections.ConfigDict(common.discriminator(**fields))


def _log_normal(x, mean, std):
  return -0.5 * jnp.sum((x - mean)**2, -1) / std**2 - x.shape[-1] * jnp.log(std)


def true_log_ratio(x):
  """log p(x) - log q(x), both isotropic Gaussians (the 2 pi terms cancel)."""
  return _log_normal(x, P_MEAN, P_STD) - _log_normal(x, Q_MEAN, Q_STD)


def train_mlp_discriminator(steps=1500, batch=512, lr=3e-3):
  disc = disc_lib.build(disc_config(name="mlp", hidden=(64, 64)), (2,))
  tx = optax.adam(lr)
  params = disc.init(jax.random.key(0))
  sigma = jnp.full((batch,), SIGMA)

  def loss(params, rng):
    r_rng, f_rng = jax.random.split(rng)
    real = P_MEAN + P_STD * jax.random.normal(r_rng, (batch, 2))
    fake = Q_MEAN + Q_STD * jax.random.normal(f_rng, (batch, 2))
    return critics.discriminator_loss(disc.apply(params, real, sigma),
                                       disc.apply(params, fake, sigma))

  def step(carry, rng):
    params, opt = carry
    grads = jax.grad(loss)(params, rng)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), None

  (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
      (params, tx.init(params)), jax.random.split(jax.random.key(1), steps))
  return disc, params


def test_logit_approaches_true_log_density_ratio():
  """Optimum of the logistic loss with equal class sizes: logit = log p/q. Checked on samples
  of the mixture (p + q)/2, where the discriminator is trained; the log ratio spans [-1.5, 15]
  there. Measured: median error 0.05, mean 0.07, correlation 0.999."""
  disc, params = train_mlp_discriminator()
  rng_p, rng_q = jax.random.split(jax.random.key(2))
  x = jnp.concatenate([P_MEAN + P_STD * jax.random.normal(rng_p, (2000, 2)),
                       Q_MEAN + Q_STD * jax.random.normal(rng_q, (2000, 2))])
  logit = disc.apply(params, x, jnp.full((x.shape[0],), SIGMA))[:, 0]
  truth = true_log_ratio(x)
  err = np.asarray(jnp.abs(logit - truth))
  assert np.median(err) < 0.1, np.median(err)
  assert np.mean(err) < 0.15, np.mean(err)
  assert np.corrcoef(np.asarray(logit), np.asarray(truth))[0, 1] > 0.99


@pytest.mark.parametrize("arch,indices", [(architectures.tiny_songunet, (0, 1, -1)),
                                          (architectures.tiny_adm, (-1,))])
def test_feature_heads_give_one_logit_per_head(arch, indices):
  """Heads on the teacher U-Net's encoder features (CIFAR: every resolution; ImageNet-64 ADM:
  the bottleneck), shapes from ``jax.eval_shape`` of the teacher as in the f-distill objective's build."""
  model_config = arch()
  module = models.build(model_config)
  teacher_apply = models.make_denoiser(module)
  x_shape = (8, 8, 3)
  params = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0), (1,) + x_shape,
                                                     10))
  shapes = disc_lib.teacher_feature_shapes(teacher_apply, params, x_shape, 10)
  assert [s.shape[1:] for s in shapes] == [(8, 8, 16), (4, 4, 32), (4, 4, 32)]
  cfg = disc_config(name="unet_heads", feature_indices=indices)
  disc = disc_lib.build(cfg, x_shape, shapes)
  assert disc.uses_features
  d_params = disc.init(jax.random.key(1))
  feats = [jax.random.normal(jax.random.key(i), (3,) + s.shape[1:]) for i, s in enumerate(shapes)]
  logits = disc.apply(d_params, None, None, feats)
  assert logits.shape == (3, len(indices))
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_feature_heads_need_a_network_teacher():
  shapes = disc_lib.teacher_feature_shapes(gmm_lib.as_apply_fn(),
                                           gmm_lib.make_gmm([1.0], [[0.0, 0.0]], 1.0), (2,))
  assert shapes is None
  with pytest.raises(ValueError, match="encoder features"):
    disc_lib.build(disc_config(name="unet_heads"), (2,), shapes)


def test_unknown_discriminator_lists_valid_names():
  with pytest.raises(ValueError, match="mlp.*unet_heads"):
    disc_lib.build(disc_config(name="patchgan"), (2,))


def test_mlp_discriminator_accepts_images():
  """The default discriminator on an image config gives one logit per image (it used to fail
  with a broadcasting error)."""
  disc = disc_lib.build(disc_config(name="mlp", hidden=(16,)), (8, 8, 3))
  params = disc.init(jax.random.key(0))
  logits = disc.apply(params, jnp.ones((5, 8, 8, 3)), jnp.full((5,), 0.7))
  assert logits.shape == (5, 1) and bool(jnp.all(jnp.isfinite(logits)))
  other = disc.apply(params, -jnp.ones((5, 8, 8, 3)), jnp.full((5,), 0.7))
  assert not np.allclose(logits, other)


@pytest.mark.parametrize("channels", [16, 32, 128])
def test_feature_heads_learn_on_narrow_feature_maps(channels):
  """The heads' gradient is not zero on 16- and 32-channel maps (a 1x1 GroupNorm of one channel
  per group zeroed every activation: the digits discriminators never trained)."""
  import jax
  import jax.numpy as jnp
  from fdistill.models import discriminator as disc_lib
  module = disc_lib.FeatureDiscriminator((-1,), 0)
  feats = [jax.random.normal(jax.random.key(0), (6, 4, 4, channels))]
  params = module.init(jax.random.key(1), feats)["params"]
  loss = lambda p: jnp.mean(jax.nn.softplus(module.apply({"params": p}, feats)))
  grads = jax.grad(loss)(params)
  norms = {"/".join(str(k) for k in path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert all(v > 0 for k, v in norms.items() if "kernel" in k), norms
  logits = module.apply({"params": params}, feats)
  assert float(jnp.std(logits)) > 1e-3  # samples are told apart

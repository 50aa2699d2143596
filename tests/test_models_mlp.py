"""The toy MLP's input Fourier features and residual blocks: what they change, and that the
network still trains with them."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fdistill import models
from fdistill.diffusion import gmm as gmm_lib
from fdistill.objectives import dsm


def build(**fields):
  config = ml_collections.ConfigDict(dict(name="mlp", hidden=(32, 32), emb_dim=16, **fields))
  module = models.build(config)
  return module, models.init_params(module, jax.random.key(0), (1, 2))


def count(params):
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_fourier_features_add_the_projection_and_widen_the_first_layer():
  plain_module, plain = build()
  module, params = build(input_fourier=8, input_fourier_scale=3.0)
  b = params["input_fourier_b"]
  assert b.shape == (2, 8) and 1.0 < float(jnp.std(b)) < 6.0  # N(0, 3^2) draws
  # First layer sees 2 + 2 * 8 inputs: (18 - 2) * 32 more weights, plus B itself.
  assert count(params) - count(plain) == 16 * 32 + 16
  x, c = jnp.ones((3, 2)), jnp.zeros((3,))
  feats = module.apply({"params": params}, x, c, return_features=True)[1]
  plain_feats = plain_module.apply({"params": plain}, x, c, return_features=True)[1]
  assert feats[0].shape == plain_feats[0].shape == (3, 32)
  assert not np.allclose(feats[0], plain_feats[0])


def test_fourier_matrix_is_not_trained():
  module, params = build(input_fourier=8)
  apply = models.make_denoiser(module)
  grads = jax.grad(lambda p: jnp.sum(apply(p, jnp.ones((4, 2)), jnp.full((4,), 0.5))**2))(params)
  assert float(jnp.abs(grads["input_fourier_b"]).max()) == 0.0


def test_residual_adds_each_layers_input_where_widths_match():
  module, params = build(residual=True)
  plain_module, _ = build()
  x, c = jnp.full((2, 2), 0.3), jnp.zeros((2,))
  res = module.apply({"params": params}, x, c, return_features=True)[1]
  plain = plain_module.apply({"params": params}, x, c, return_features=True)[1]
  np.testing.assert_allclose(res[0], plain[0], rtol=1e-6)  # 2 -> 32: no skip possible
  assert not np.allclose(res[1], plain[1])  # 32 -> 32: input added


def test_both_options_train_on_the_toy_mixture():
  """DSM on gmm8 with Fourier features and residual blocks: the loss falls over 150 steps."""
  module, params = build(input_fourier=16, residual=True)
  loss = jax.jit(dsm.make_loss(models.make_denoiser(module)))
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  data = gmm_lib.named("gmm8")

  @jax.jit
  def step(params, opt, key):
    batch = {"x": gmm_lib.sample(data, key, 256)}
    value, grads = jax.value_and_grad(lambda p: loss(p, None, batch, key)[0])(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, value

  values = []
  for i in range(150):
    params, opt, value = step(params, opt, jax.random.key(i))
    values.append(float(value))
  assert np.mean(values[-20:]) < 0.7 * np.mean(values[:20]), (values[:5], values[-5:])

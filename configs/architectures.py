"""``config.model`` sections for the image networks (``fdistill.models.MODELS``).

Each function returns a ConfigDict with ``name`` (the registry key), the
module's fields and ``sigma_data``; a config file does
``c.model = architectures.ddpmpp_cifar10()`` and overrides fields after.
The published ones reproduce NVlabs/edm ``train.py`` exactly (so imported EDM
checkpoints fit); the ``tiny_*`` ones are for CPU tests. The U-Nets'
``double_norm`` (sCM's adaptive double normalisation, models/unet.py) is off:
EDM's networks do not have it.
"""
import ml_collections

from configs import common

SIGMA_DATA = 0.5

# DiT-{S,B,L,XL} (Peebles & Xie 2023, Table 1): hidden_size, depth, num_heads.
DIT_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def _model(name, **fields):
  return ml_collections.ConfigDict(dict(name=name, sigma_data=SIGMA_DATA, dtype="float32",
                                        attn_impl="xla", remat=False,
                                        remat_policy="nothing_saveable", **fields))


def _song_unet(**fields):
  """DDPM++ defaults of EDM ``train.py --arch=ddpmpp`` (dropout 0.13 and augment_dim 9 are its
  defaults: ``--dropout=0.13 --augment=0.12`` turns on the 9-dim augmentation labels)."""
  defaults = dict(
      img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9,
      model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
      attn_resolutions=(16,), dropout=0.13, label_dropout=0.0, embedding_type="positional",
      channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
      resample_filter=(1, 1), double_norm=False)
  defaults.update(fields)
  return _model("songunet", **defaults)


def _dhariwal_unet(**fields):
  """ADM defaults of EDM ``train.py --arch=adm``."""
  defaults = dict(
      img_resolution=64, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
      model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
      attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0, channels_per_head=64,
      double_norm=False)
  defaults.update(fields)
  return _model("dhariwalunet", **defaults)


def ddpmpp_cifar10(cond: bool = True):
  """EDM's CIFAR-10 32x32 DDPM++ (``--arch=ddpmpp [--cond=1]``, edm-cifar10-32x32-*-vp)."""
  return _song_unet(label_dim=10 if cond else 0)


def ncsnpp_cifar10(cond: bool = True):
  """EDM's CIFAR-10 32x32 NCSN++ (``--arch=ncsnpp``, edm-cifar10-32x32-*-ve)."""
  return _song_unet(label_dim=10 if cond else 0, embedding_type="fourier", channel_mult_noise=2,
                    encoder_type="residual", resample_filter=(1, 3, 3, 1))


def adm_imagenet64():
  """EDM's class-conditional ImageNet 64x64 ADM.

  EDM README: ``--cond=1 --arch=adm --dropout=0.10 --augment=0`` (no augmentation labels).
  """
  return _dhariwal_unet(label_dim=1000)


def dit(size: str = "XL", img_resolution: int = 32, in_channels: int = 4, label_dim: int = 1000):
  """DiT-{S,B,L,XL}/2 on ``img_resolution``^2 x ``in_channels`` inputs (default: SD-VAE latents
  of 256^2 ImageNet)."""
  hidden_size, depth, num_heads = DIT_SIZES[common.check_choice(size, list(DIT_SIZES), "size")]
  return _model("dit", img_resolution=img_resolution, in_channels=in_channels,
                out_channels=in_channels, label_dim=label_dim, patch_size=2,
                hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
                pos_embedding="sincos", noise_channels=256, dropout=0.0, label_dropout=0.0)


def tiny_songunet():
  """Two-level 8x8 DDPM++ with attention at 4x4 and the augmentation mapping, for tests."""
  return _song_unet(img_resolution=8, label_dim=10, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,), dropout=0.1)


def tiny_adm():
  """Two-level 8x8 ADM with attention at 4x4 (8 channels per head), for tests."""
  return _dhariwal_unet(img_resolution=8, label_dim=10, model_channels=16, channel_mult=(1, 2),
                        num_blocks=1, attn_resolutions=(4,), channels_per_head=8, dropout=0.1)


def tiny_dit():
  """Two-block DiT on 8x8x3 images with 2x2 patches, for tests."""
  c = dit("S", img_resolution=8, in_channels=3, label_dim=10)
  c.update(dict(hidden_size=32, depth=2, num_heads=2, noise_channels=32, dropout=0.1))
  return c

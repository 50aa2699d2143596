"""f-distill of EDM's CIFAR-10 teacher into a one-step DDPM++ generator (published recipe).

  python -m fdistill.main --config=configs/cifar10_fdistill.py:forward_kl --workdir=gs://.../fd_cifar \
      --config.teacher.path=/path/to/edm-cifar10-32x32-cond-vp.pkl --config.data.data_dir=/path/to/tfds
  python -m fdistill.main --config=configs/cifar10_fdistill.py:forward_kl --workdir=gs://.../fd_cifar --mode=eval

Variant = the divergence (``toy2d_fdistill.py`` lists them); keys: ``alpha``, ``teacher``
(edm_pickle: a published EDM .pkl at ``teacher.path``; checkpoint: a ``train_teacher`` run
of ``configs/cifar10_teacher.py`` in ``teacher_dir``), ``cond`` (class-conditional, as the
published f-distill CIFAR-10 result).

Hyper-parameters from the public implementation of the paper, NVlabs/FastGen
(its ``FastGen/configs/experiments/EDM/config_f_distill_cifar10.py`` on top of
``config_f_distill.py`` and ``config_dmd2.py``): global batch 2048, 100k iterations, AdamW
lr 1e-4 (weight decay 0.01, betas 0.9/0.999, no warm-up) for generator, fake score and discriminator; generator
update every 5th step; GAN weight 1e-3; noise levels uniform on EDM's 1000-step Karras grid
over [0.002, 80] (steps 2..998); one-step generator at sigma 80; ratio clip [0.1, 20], 10
ratio bins with EMA rate 0; gradient clipping at 10 for the generator only; generator EMA
0.9999; fake score by plain x0 regression; discriminator heads on the 32, 16 and 8 (bottleneck)
feature maps. FastGen's CIFAR-10 config picks forward KL.
"""
from configs import architectures
from configs import cifar10_teacher
from configs import common


def fastgen_recipe(c, a, *, lr, gan_weight, ratio_ema, feature_indices, batch_size, num_steps):
  """FastGen's EDM f-distill recipe on ``c`` (CIFAR-10 and ImageNet-64 differ only in the
  keyword arguments); ``a``: the parsed config argument (variant, alpha, teacher, teacher_dir)."""
  common.network_teacher(c, a.teacher, a.teacher_dir)
  c.generator.sigma_init = 80.0
  c.objective = common.fdistill_objective(
      divergence=a.variant, alpha=a.alpha, gen_every=5, gan_weight=gan_weight,
      sigma_dist="karras", sigma_min=0.002, sigma_max=80.0, ratio_lower=0.1, ratio_upper=20.0,
      ratio_bins=10, ratio_ema=ratio_ema, fake_loss_weight="none",
      discriminator=dict(name="unet_heads", feature_indices=feature_indices),
      fake_optim=dict(grad_clip=0.0), disc_optim=dict(grad_clip=0.0))
  c.optim.update(dict(lr=lr, warmup_steps=0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                      grad_clip=10.0, ema_decay=0.9999))
  c.train.update(dict(batch_size=batch_size, num_steps=num_steps, log_every=500, save_every=5_000,
                      sample_every=5_000))
  c.eval.num_samples = 50_000
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, variant="forward_kl", alpha=0.5, teacher="edm_pickle", teacher_dir="",
                       cond=True)
  c = common.base_config()
  c.data = cifar10_teacher.get_config(f"cond={a.cond}").data
  c.model = architectures.ddpmpp_cifar10(cond=a.cond)
  return fastgen_recipe(c, a, lr=1e-4, gan_weight=1e-3, ratio_ema=0.0,
                        feature_indices=(0, 1, -1), batch_size=2048, num_steps=100_000)

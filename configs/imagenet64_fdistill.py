"""f-distill of EDM's ImageNet-64 ADM teacher into a one-step generator (published recipe).

  python -m fdistill.main --config=configs/imagenet64_fdistill.py:js --workdir=gs://.../fd_in64 \
      --config.teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl --config.data.data_dir=/path/to/tfds

Variant = the divergence (``toy2d_fdistill.py`` lists them); keys: ``alpha``, ``teacher``
(edm_pickle at ``teacher.path``, or checkpoint: a ``configs/imagenet64_teacher.py`` run in
``teacher_dir``).

Hyper-parameters from NVlabs/FastGen ``configs/experiments/EDM/config_f_distill_in64.py``
(over ``config_f_distill.py`` / ``config_dmd2.py``): global batch 512, lr 2e-6 (AdamW,
weight decay 0.01) for generator, fake score and discriminator; generator update every 5th
step; GAN weight 3e-3; ratio EMA rate 0.5 (10 bins, clip [0.1, 20]); Karras-grid noise levels
over [0.002, 80]; generator at sigma 80; gradient clipping at 10 for the generator; EMA 0.9999;
600k iterations; the discriminator is one head on the 8x8 bottleneck (768 channels). FastGen's
default divergence here is JS. Compute in bfloat16 and FSDP over 8 devices, as the teacher.
"""
from configs import architectures
from configs import common
from configs import imagenet64_teacher
from fdistill.objectives import divergences
from fdistill.objectives import fdistill


def get_config(arg=None):
  a = common.parse_arg(arg, variant="js", alpha=0.5, teacher="edm_pickle", teacher_dir="")
  c = common.base_config()
  teacher = imagenet64_teacher.get_config()
  c.data = teacher.data
  c.data.conditional = True
  c.model = architectures.adm_imagenet64()
  c.model.dtype = "bfloat16"
  c.mesh = teacher.mesh
  c.teacher.kind = common.check_choice(a.teacher, ["edm_pickle", "checkpoint"], "teacher")
  c.teacher.workdir = a.teacher_dir
  c.generator.sigma_init = 80.0
  c.objective = fdistill.objective_config(
      divergence=common.check_choice(a.variant, list(divergences.DIVERGENCES), "variant"),
      alpha=a.alpha, gen_every=5, gan_weight=3e-3, sigma_dist="karras", sigma_min=0.002,
      sigma_max=80.0, ratio_lower=0.1, ratio_upper=20.0, ratio_bins=10, ratio_ema=0.5,
      fake_loss_weight="none", discriminator=dict(name="unet_heads", feature_indices=(-1,)),
      fake_optim=dict(grad_clip=0.0), disc_optim=dict(grad_clip=0.0))
  c.optim.update(dict(lr=2e-6, warmup_steps=0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                      grad_clip=10.0, ema_decay=0.9999))
  c.train.batch_size = 512
  c.train.num_steps = 600_000
  c.train.log_every = 500
  c.train.save_every = 5_000
  c.train.sample_every = 5_000
  c.eval.num_samples = 50_000
  return c

"""f-distill of EDM's ImageNet-64 ADM teacher into a one-step generator (published recipe).

  python -m fdistill.main --config=configs/imagenet64_fdistill.py:js --workdir=gs://.../fd_in64 \
      --config.teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl --config.data.data_dir=/path/to/tfds

Variant = the divergence (``toy2d_fdistill.py`` lists them); keys: ``alpha``, ``teacher``
(edm_pickle at ``teacher.path``, or checkpoint: a ``configs/imagenet64_teacher.py`` run in
``teacher_dir``).

Hyper-parameters from ``NVlabs/FastGen/configs/experiments/EDM/config_f_distill_in64.py``
(over ``config_f_distill.py`` / ``config_dmd2.py``): global batch 512, lr 2e-6 (AdamW,
weight decay 0.01) for generator, fake score and discriminator; generator update every 5th
step; GAN weight 3e-3; ratio EMA rate 0.5 (10 bins, clip [0.1, 20]); Karras-grid noise levels
over [0.002, 80]; generator at sigma 80; gradient clipping at 10 for the generator; EMA 0.9999;
600k iterations; the discriminator is one head on the 8x8 bottleneck (768 channels). FastGen's
default divergence here is JS. Compute in bfloat16 and FSDP over 8 devices, as the teacher.
"""
from configs import cifar10_fdistill
from configs import common
from configs import imagenet64_teacher


def get_config(arg=None):
  a = common.parse_arg(arg, variant="js", alpha=0.5, teacher="edm_pickle", teacher_dir="")
  c = imagenet64_teacher.student_base()
  return cifar10_fdistill.fastgen_recipe(c, a, lr=2e-6, gan_weight=3e-3, ratio_ema=0.5,
                                         feature_indices=(-1,), batch_size=512,
                                         num_steps=600_000)

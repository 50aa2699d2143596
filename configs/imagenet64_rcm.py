"""rCM (sCM + DMD regulariser) of EDM's ImageNet-64 ADM teacher into a few-step student.

  python -m fdistill.main --config=configs/imagenet64_rcm.py:rcm --workdir=gs://.../rcm_in64 \
      --config.teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl --config.data.data_dir=/path/to/tfds

Variant: ``scm`` | ``rcm`` (default) | ``dmd_only``; key ``teacher`` (edm_pickle at
``teacher.path``, or checkpoint: a ``configs/imagenet64_teacher.py`` run in ``teacher_dir``).

Hyper-parameters: the recipe of ``cifar10_rcm.py`` (sCM's consistency part, rCM's DMD
regulariser and schedule) with sCM's ImageNet 64x64 training times ``log(sd tan t) ~
N(-0.8, 1.6^2)`` (also rCM's p_G); batch 512, learning rate 2e-6, EMA 0.9999 and 600k
iterations as FastGen's ImageNet-64 f-distill (configs/imagenet64_fdistill.py), not sCM's
own (not checked here). Compute in bfloat16 with FSDP over 8 devices, as the teacher; the
attention layers at 32, 16 and 8 use the fused JVP kernel on GPU (attn_impl="auto"). Not run
in this repository.
"""
from configs import cifar10_rcm
from configs import common
from configs import imagenet64_teacher


def get_config(arg=None):
  a = common.parse_arg(arg, variant="rcm", teacher="edm_pickle", teacher_dir="")
  c = imagenet64_teacher.student_base()
  c.model.attn_impl = "auto"
  common.network_teacher(c, a.teacher, a.teacher_dir)
  return cifar10_rcm.rcm_recipe(c, a.variant, p_mean=-0.8, p_std=1.6, lr=2e-6, batch_size=512,
                                num_steps=600_000)

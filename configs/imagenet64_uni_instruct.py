"""Uni-Instruct / SiD / SIM / DMD on EDM's ImageNet-64 teacher (one-step ADM), published recipes.

  python -m fdistill.main --config=configs/imagenet64_uni_instruct.py:forward_kl --workdir=gs://.../ui64 \
      --config.teacher.path=/path/to/edm-imagenet-64x64-cond-adm.pkl --config.data.data_dir=/path/to/tfds

SiD's recipe of ``cifar10_uni_instruct.py`` with SiD's ImageNet-64 learning rate 4e-6, bf16
compute and FSDP over 8 devices as the teacher config. Published one-step FIDs
(ImageNet-64): SiD 1.524; Uni-Instruct 1.02; DMD 2.62; DMD2 1.28; Diff-Instruct 5.57;
SiDA (SiD^2A) 1.110. The global batch is a
budget choice (SiD used large batches; raise it with the device count).
"""
from configs import cifar10_uni_instruct
from configs import common
from configs import imagenet64_teacher


def get_config(arg=None):
  a = common.parse_arg(arg, variant="forward_kl", teacher="edm_pickle", teacher_dir="")
  c = imagenet64_teacher.student_base()
  common.network_teacher(c, a.teacher, a.teacher_dir)
  return cifar10_uni_instruct.sid_recipe(c, a.variant, lr=4e-6, batch_size=1024,
                                         num_steps=400_000, feature_indices=(-1,),
                                         augment_p=0.0)

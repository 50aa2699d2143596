"""EDM ImageNet-64 class-conditional teacher (ADM), EDM's published hyper-parameters.

  python -m fdistill.main --config=configs/imagenet64_teacher.py --workdir=gs://.../edm_in64 --mode=train_teacher \
      --config.data.data_dir=/path/to/tensorflow_datasets
EDM ``train.py --cond=1 --arch=adm --duration=2500 --batch=4096 --lr=2e-4 --ema=50
--dropout=0.10 --augment=0 --fp16=1 --ls=100``; compute in bfloat16 here.
"""
from configs import architectures, common
from configs.cifar10_teacher import ema_decay_for_halflife


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.data.name = "imagenet64"
  c.data.data_dir = ""
  c.data.conditional = True
  c.data.random_flip = False
  c.model = architectures.adm_imagenet64()
  c.model.dtype = "bfloat16"
  c.objective.name = "dsm"
  c.train.batch_size = 4096
  c.train.num_steps = 2_500_000_000 // 4096
  c.train.log_every = 500
  c.train.save_every = 5_000
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 10_000_000 // 4096
  c.optim.grad_clip = 0.0
  c.optim.ema_decay = ema_decay_for_halflife(50_000_000, 4096)
  c.mesh.fsdp = 8
  return c


def student_base():
  """The base config of a distilled ImageNet-64 run: the teacher's data (class-conditional),
  mesh and ADM network, computed in bfloat16 as the teacher."""
  teacher = get_config()
  c = common.base_config()
  c.data = teacher.data
  c.model = architectures.adm_imagenet64()
  c.model.dtype = "bfloat16"
  c.mesh = teacher.mesh
  return c

"""EDM CIFAR-10 32x32 teacher (DDPM++ VP), EDM's published training hyper-parameters.

  python -m fdistill.main --config=configs/cifar10_teacher.py:cond=True --workdir=gs://.../edm_cifar --mode=train_teacher \
      --config.data.data_dir=/path/to/tensorflow_datasets
EDM ``train.py --cond=1 --arch=ddpmpp``: batch 512, lr 1e-3 with a 10 Mimg ramp-up, EMA
half-life 0.5 Mimg, 200 Mimg total, dropout 0.13. Usually one imports the published
checkpoint instead of retraining (teacher.kind=checkpoint for our own runs).
"""
from configs import architectures, common


def ema_decay_for_halflife(halflife_images, batch_size):
  """EDM's EMA: decay = 0.5 ** (batch / half-life in images)."""
  return 0.5**(batch_size / halflife_images)


def get_config(arg=None):
  a = common.parse_arg(arg, cond=True)
  c = common.base_config()
  c.data.name = "cifar10"
  c.data.data_dir = ""
  c.data.conditional = a.cond
  c.data.random_flip = False  # EDM uses its own (non-leaking) augmentation pipeline instead
  c.model = architectures.ddpmpp_cifar10(cond=a.cond)
  c.objective.name = "dsm"
  c.train.batch_size = 512
  c.train.num_steps = 200_000_000 // 512
  c.train.log_every = 500
  c.train.save_every = 10_000
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10_000_000 // 512
  c.optim.grad_clip = 0.0
  c.optim.eps = 1e-8
  c.optim.ema_decay = ema_decay_for_halflife(500_000, 512)
  c.mesh.data = -1
  return c

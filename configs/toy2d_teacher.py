"""Teacher on a 2-D Gaussian mixture by denoising score matching.

  python -m fdistill.main --config=configs/toy2d_teacher.py:gmm25 --workdir=runs/toy_teacher --mode=train_teacher
Variants: gmm8 | gmm25 (default) | checkerboard.
"""
from configs import common



def get_config(arg=None):
  a = common.parse_arg(arg, variant="gmm25")
  c = common.base_config()
  c.data.name = "toy2d"
  c.data.distribution = common.check_choice(a.variant, common.TOY_DISTRIBUTIONS, "variant")
  c.model.name = "mlp"
  c.model.hidden = (256, 256, 256)
  c.model.emb_dim = 64
  # Random Fourier features of the input (ScoreMLP): the one-step students copy this network,
  # and a plain MLP cannot map one Gaussian onto 25 sharp modes (docs/toy_results.md, demo study).
  c.model.input_fourier = 64
  c.model.input_fourier_scale = 3.0
  c.model.residual = False
  c.objective.name = "dsm"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.995
  c.train.batch_size = 512
  c.train.num_steps = 4000
  c.train.log_every = 500
  c.train.save_every = 2000
  c.eval.num_samples = 5000
  c.eval.num_plot_samples = 2000
  c.eval.sampler_steps = 32
  return c

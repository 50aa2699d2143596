"""f-distill of the digits teacher (scikit-learn's 8x8 digits at 16x16) into a one-step U-Net.

Two commands on a CPU (the teacher first; on two cores each takes tens of minutes):

  python -m fdistill.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/digits_fdistill.py:js --workdir=runs/digits_js --mode=distill

Sample grids land in ``<workdir>/samples_<step>.png`` every ``train.sample_every`` steps.
Variant = the divergence (as in ``toy2d_fdistill.py``); keys: ``alpha``, ``teacher_dir``
(default runs/digits_teacher), ``steps``, ``resolution`` and ``conditional`` (must match the
teacher run's). The generator and the fake score copy the teacher's U-Net; the
discriminator is CIFAR-style (one head per encoder resolution, bottleneck included).
Noise levels: the teacher's own lognormal training levels (a teacher trained for minutes is
only accurate there); everything else follows FastGen's CIFAR-10 f-distill recipe at small
scale.
"""
from configs import common
from configs import digits_teacher


def get_config(arg=None):
  a = common.parse_arg(arg, variant="js", alpha=0.5, teacher_dir="runs/digits_teacher",
                       steps=2000, resolution=16, conditional=False, data="digits")
  c = common.base_config()
  teacher = digits_teacher.get_config(f"resolution={a.resolution},conditional={a.conditional},"
                                        f"data={a.data}")
  c.data = teacher.data
  c.model = teacher.model
  c.teacher.kind = "checkpoint"
  c.teacher.workdir = a.teacher_dir
  c.generator.sigma_init = 2.5
  c.objective = common.fdistill_objective(
      divergence=a.variant, alpha=a.alpha, gen_every=5, gan_weight=1e-3,
      sigma_dist="lognormal", p_mean=-1.2, p_std=1.2, ratio_ema=0.5, fake_loss_weight="edm",
      discriminator=dict(name="unet_heads", feature_indices=(0, 1, -1)),
      fake_optim=dict(grad_clip=0.0), disc_optim=dict(grad_clip=0.0))
  c.optim.update(dict(lr=2e-4, warmup_steps=0, weight_decay=0.0, grad_clip=10.0, ema_decay=0.99,
                      ema_warmup=True))
  c.train.update(dict(batch_size=64, num_steps=a.steps, log_every=100, save_every=500,
                      sample_every=500))
  c.eval.num_plot_samples = 64
  return c

"""rCM (sCM + DMD regulariser) of the digits teacher into a few-step student, U-Net or DiT.

Two commands on a CPU (the teacher first; on two cores each takes tens of minutes):

  python -m fdistill.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/digits_rcm.py:rcm --workdir=runs/digits_rcm --mode=distill

The ``dit`` variant is rCM with a tiny DiT (attention through ``ops.attention`` with
``attn_impl="auto"``: the fused Pallas JVP kernel for the tangent on GPU, XLA attention
elsewhere). The student copies its teacher, so the teacher is a DiT too, trained by this file
with ``dsm_teacher=True`` (a DSM config of the same architecture and data):

  python -m fdistill.main --config=configs/digits_rcm.py:dit,dsm_teacher=True --workdir=runs/digits_dit_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/digits_rcm.py:dit --workdir=runs/digits_dit_rcm --mode=distill

Variant: ``scm`` | ``rcm`` (default) | ``dmd_only`` | ``dit``. Keys: ``teacher_dir`` (default
runs/digits_teacher, runs/digits_dit_teacher for dit), ``steps``, ``resolution`` and
``conditional`` (must match the teacher run's), ``dsm_teacher``. Sample grids land in
``<workdir>/samples_<step>.png`` (one consistency step; ``--config.eval.sampler_steps`` for more).

Hyper-parameters: rCM's recipe (``configs/common.py:rcm_objective``) at small scale: the
teacher's own lognormal training levels as sCM times (a teacher trained for minutes is only
accurate there), short warm-ups (200 steps), the student every 5th step, DMD weight 0.01;
optimiser as ``digits_fdistill.py`` (lr 2e-4, EMA 0.99).
"""
from configs import architectures
from configs import common
from configs import digits_teacher

VARIANTS = ("scm", "rcm", "dmd_only", "dit")


def dit_model(resolution, conditional):
  """A tiny DiT/2 on ``resolution``^2 x 1 digits (64 tokens at 16x16)."""
  m = architectures.dit("S", img_resolution=resolution, in_channels=1,
                        label_dim=10 if conditional else 0)
  m.update(dict(hidden_size=64, depth=4, num_heads=4, noise_channels=64, dropout=0.0,
                attn_impl="auto"))
  return m


def get_config(arg=None):
  a = common.parse_arg(arg, variant="rcm", teacher_dir="", steps=2000, resolution=16,
                       conditional=False, data="digits", dsm_teacher=False)
  common.check_choice(a.variant, VARIANTS, "variant")
  dit = a.variant == "dit"
  teacher = digits_teacher.get_config(f"resolution={a.resolution},conditional={a.conditional},"
                                        f"data={a.data}")
  if dit:
    teacher.model = dit_model(a.resolution, a.conditional)
  if a.dsm_teacher:
    return teacher
  c = common.base_config()
  c.data = teacher.data
  c.model = teacher.model
  c.teacher.kind = "checkpoint"
  c.teacher.workdir = a.teacher_dir or ("runs/digits_dit_teacher" if dit else "runs/digits_teacher")
  member = "rcm" if dit else a.variant
  warmup = 200
  c.objective = common.rcm_objective(
      p_mean=-1.2, p_std=1.2, tangent_warmup_steps=warmup,
      dmd_weight=0.0 if member == "scm" else 0.01, dmd_only=member == "dmd_only",
      adaptive_weight=member != "dmd_only",
      scm_warmup_steps=warmup if member == "rcm" else 0, gen_every=5, rollout_max_steps=4,
      sigma_max=80.0, fake_loss_weight="edm", fake_optim=dict(grad_clip=0.0))
  c.optim.update(dict(lr=2e-4, warmup_steps=0, weight_decay=0.0, grad_clip=10.0, ema_decay=0.99,
                      ema_warmup=True))
  c.train.update(dict(batch_size=64, num_steps=a.steps, log_every=100, save_every=500,
                      sample_every=500))
  c.eval.update(dict(num_plot_samples=64, sampler_steps=1))
  return c

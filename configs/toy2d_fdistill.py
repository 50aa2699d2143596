"""f-distill of the 2-D Gaussian-mixture teacher into a one-step generator.

  python -m fdistill.main --config=configs/toy2d_teacher.py:gmm25 --workdir=runs/toy_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/toy2d_fdistill.py:js --workdir=runs/toy_js --mode=distill
  python -m fdistill.main --config=configs/toy2d_fdistill.py:js --workdir=runs/toy_js --mode=eval

Variant = the divergence: reverse_kl | softened_rkl | js (default) | squared_hellinger |
forward_kl | jeffreys | alpha (with ``alpha=<a>``, e.g. ``:alpha,alpha=0.5``). Other keys:
``teacher=checkpoint`` (default: the DSM teacher in ``teacher_dir``, same MLP as the
generator) or ``teacher=analytic`` (the exact noised mixture, no teacher run needed), ``steps``,
``distribution`` (gmm8 | gmm25 | checkerboard).

Hyper-parameters: FastGen's f-distill defaults (update ratio 5, ratio clip [0.1, 20], 10
ratio bins, logit clip 10, Karras-grid noise levels, DMD's |x - D_T| normaliser) at toy
scale: a small MLP discriminator, larger learning rates, noise levels capped at 10 (the data
spans [-1, 1]; a DSM-trained MLP teacher is unreliable far above that) and a GAN weight of
1e-2.
"""
from configs import common
from configs import toy2d_teacher


def get_config(arg=None):
  a = common.parse_arg(arg, variant="js", alpha=0.5, teacher="checkpoint",
                       teacher_dir="runs/toy_teacher", steps=3000, distribution="gmm25")
  c = common.base_config()
  teacher = toy2d_teacher.get_config(a.distribution)
  c.data = teacher.data
  c.model = teacher.model  # the generator and the fake score copy the teacher
  c.teacher.kind = common.check_choice(a.teacher, ["checkpoint", "analytic"], "teacher")
  c.teacher.workdir = a.teacher_dir if a.teacher == "checkpoint" else ""
  c.generator.sigma_init = 2.5
  c.objective = common.fdistill_objective(
      divergence=a.variant, alpha=a.alpha, gen_every=5, gan_weight=1e-2, sigma_dist="karras",
      sigma_max=10.0, ratio_ema=0.9, fake_loss_weight="edm",
      warmup_critic_steps=200 if a.teacher == "analytic" else 0,
      discriminator=dict(name="mlp", hidden=(128, 128), emb_dim=32),
      fake_optim=dict(lr=1e-3), disc_optim=dict(lr=1e-3))
  c.optim.update(dict(lr=5e-4, warmup_steps=0, weight_decay=0.0, grad_clip=10.0, ema_decay=0.99))
  c.train.update(dict(batch_size=256, num_steps=a.steps, log_every=500, save_every=a.steps))
  c.eval.update(dict(num_samples=5000, num_plot_samples=2000))
  return c

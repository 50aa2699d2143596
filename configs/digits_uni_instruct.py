"""The score-distillation family on the digits teacher (16x16 digits, one-step U-Net).

  python -m fdistill.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/digits_uni_instruct.py:forward_kl --workdir=runs/digits_ui --mode=distill

Variant = the method of ``configs/toy2d_uni_instruct.py`` (Uni-Instruct divergences, sid,
sid_half, sim_l2, sim_huber, dmd, dmd2, diff_instruct, sida, rkl_then_fkl); other keys as
``digits_fdistill.py``; SiDA's logit is the channel mean of the fake U-Net's bottleneck. The recipe is
``digits_fdistill.py``'s (optimisers, U-Net feature heads as the discriminator) with each
member's own noise levels, as its paper's code draws them (SiD's ramp to t_max = 800 for the
generator and EDM's lognormal for the fake score; DMD2's and Diff-Instruct's their own;
docs/reference_equivalence.md) and SiD's one fake-score update per generator update. The
family's members (not DMD/DMD2/Diff-Instruct, which keep the f-distill optimiser) use SiD's
Adam betas (0, 0.999) with lr 2e-5: with the digits f-distill optimiser (lr 2e-4, b1 0.9) SiD
reached digits_fd 25.6 after 400 steps, with SiD's 1.74 (8x8, 16-channel teacher;
benchmarks/image_results.py, docs/results.md).
"""
from configs import common
from configs import digits_fdistill
from configs import toy2d_uni_instruct


def get_config(arg=None):
  a = common.parse_arg(arg, variant="forward_kl", teacher_dir="runs/digits_teacher", steps=2000,
                       resolution=16, conditional=False, data="digits")
  c = digits_fdistill.get_config(f"js,teacher_dir={a.teacher_dir},steps={a.steps},"
                                 f"resolution={a.resolution},conditional={a.conditional},data={a.data}")
  base = c.objective
  c.objective = toy2d_uni_instruct.method_objective(
      a.variant, a.steps, fake_loss_weight="edm", discriminator=dict(base.discriminator),
      fake_optim=dict(base.fake_optim), disc_optim=dict(base.disc_optim))
  if c.objective.name == "uni_instruct":  # SiD's code base: its optimiser
    c.optim.update(dict(lr=2e-5, b1=0.0))
  return c

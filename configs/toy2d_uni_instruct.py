"""The score-distillation family on the 2-D Gaussian-mixture teacher (one-step generators).

  python -m fdistill.main --config=configs/toy2d_teacher.py:gmm25 --workdir=runs/toy_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/toy2d_uni_instruct.py:forward_kl --workdir=runs/toy_ui_fkl --mode=distill
  python -m fdistill.main --config=configs/toy2d_uni_instruct.py:sid --workdir=runs/toy_sid --mode=eval

Variant = the method (``METHODS`` below): Uni-Instruct's expanded divergences
(``forward_kl`` (the paper's CIFAR-10 choice), ``reverse_kl``, ``js``, ``jeffreys``,
``squared_hellinger``, ``pearson``), ``sid`` (alpha 1.2), ``sid_half`` (alpha 0.5, half the
reverse-KL member), ``sim_l2`` and ``sim_huber`` (SIM), and from the f-distill objective
``dmd`` (reverse KL, DMD's ``1/mean|x - D_T|``, no GAN term, one fake-score update per
generator update) and ``dmd2`` (DMD plus the GAN term, generator every 5th step). Other keys as in ``toy2d_fdistill.py``: ``teacher`` (checkpoint | analytic),
``teacher_dir``, ``steps``, ``distribution``.

Hyper-parameters: the toy f-distill recipe (MLP networks, noise levels capped at 10, learning
rates 5e-4 / 1e-3, generator EMA 0.99) with SiD's one fake-score update per generator update
(``gen_every=2``) and SiD's normalised scale for the family's members.
"""
from configs import common
from configs import toy2d_fdistill

EXPANDED = ("forward_kl", "reverse_kl", "js", "jeffreys", "squared_hellinger", "pearson")
METHODS = EXPANDED + ("sid", "sid_half", "sim_l2", "sim_huber", "dmd", "dmd2")


def method_objective(method, **overrides):
  """``config.objective`` of ``method`` (one of METHODS) over ``overrides`` (scale-specific)."""
  common.check_choice(method, METHODS, "variant")
  if method in ("dmd", "dmd2"):
    shared = {k: v for k, v in overrides.items() if k in common.FDISTILL_OBJECTIVE}
    return common.fdistill_objective(**dict(
        shared, divergence="reverse_kl", gen_every=5 if method == "dmd2" else 2,
        gan_weight=3e-3 if method == "dmd2" else 0.0, ratio_bins=0, normalise_h=False))
  fields = dict(expanded=dict(loss="expanded", divergence=method),
                sid=dict(loss="sid", sid_alpha=1.2), sid_half=dict(loss="sid", sid_alpha=0.5),
                sim_l2=dict(loss="sim", sim_distance="l2"),
                sim_huber=dict(loss="sim", sim_distance="pseudo_huber"))
  return common.uni_instruct_objective(**dict(
      overrides, **fields["expanded" if method in EXPANDED else method]))


def get_config(arg=None):
  a = common.parse_arg(arg, variant="forward_kl", teacher="checkpoint",
                       teacher_dir="runs/toy_teacher", steps=3000, distribution="gmm25")
  c = toy2d_fdistill.get_config(f"js,teacher={a.teacher},teacher_dir={a.teacher_dir},"
                                f"steps={a.steps},distribution={a.distribution}")
  toy = c.objective
  c.objective = method_objective(
      a.variant, gen_every=2, sigma_dist="karras", sigma_max=toy.sigma_max,
      fake_loss_weight="edm", warmup_critic_steps=toy.warmup_critic_steps,
      discriminator=dict(toy.discriminator), fake_optim=dict(toy.fake_optim),
      disc_optim=dict(toy.disc_optim))
  return c

"""The score-distillation family on the 2-D Gaussian-mixture teacher (one-step generators).

  python -m fdistill.main --config=configs/toy2d_teacher.py:gmm25 --workdir=runs/toy_teacher --mode=train_teacher
  python -m fdistill.main --config=configs/toy2d_uni_instruct.py:forward_kl --workdir=runs/toy_ui_fkl --mode=distill
  python -m fdistill.main --config=configs/toy2d_uni_instruct.py:sid --workdir=runs/toy_sid --mode=eval

Variant = the method (``METHODS`` below): Uni-Instruct's expanded divergences
(``forward_kl`` (the paper's CIFAR-10 choice), ``reverse_kl``, ``js``, ``jeffreys``,
``squared_hellinger``, ``pearson``), ``sid`` (alpha 1.2), ``sid_half`` (alpha 0.5, half the
reverse-KL member), ``sim_l2`` and ``sim_huber`` (SIM), and from the f-distill objective
``dmd`` (reverse KL, DMD's ``1/mean|x - D_T|``, no GAN term, one fake-score update per
generator update), ``dmd2`` (DMD plus the GAN term, generator every 5th step) and
``diff_instruct`` (Luo et al. 2023, "Diff-Instruct: A Universal Approach for Transferring
Knowledge From Pre-trained Diffusion Models", NeurIPS; published one-step FID CIFAR-10 4.53
uncond, ImageNet-64 5.57 cond: the integral KL, i.e. the reverse-KL gradient with weight 1 on
the denoiser difference = ``s^2`` on the score difference, EDM's lognormal levels, no GAN);
``sida`` (Zhou et al. 2024, "Adversarial Score identity Distillation: Rapidly Surpassing the
Teacher in One Step": half SiD at alpha 1, half a GAN term whose logit is the channel mean of
the fake score's last encoder features, the discriminator loss weighted by EDM's lambda(s) in
the fake score's loss, data noised with the generator samples' (s, eps); on this MLP the
"encoder" is the fake score's last hidden layer); ``rkl_then_fkl`` (the recipe "reverse KL
first, then forward KL": the switch at half of ``steps``, ``objective.switch_step``).
Other keys as in ``toy2d_fdistill.py``: ``teacher`` (checkpoint | analytic),
``teacher_dir``, ``steps``, ``distribution``.

Hyper-parameters: the toy f-distill recipe (MLP networks, noise levels capped at 10, learning
rates 5e-4 / 1e-3, generator EMA 0.99) with SiD's one fake-score update per generator update
(``gen_every=2``) and SiD's normalised scale for the family's members.
"""
from configs import common
from configs import toy2d_fdistill

EXPANDED = ("forward_kl", "reverse_kl", "js", "jeffreys", "squared_hellinger", "pearson")
METHODS = EXPANDED + ("sid", "sid_half", "sim_l2", "sim_huber", "dmd", "dmd2", "diff_instruct",
                      "sida", "rkl_then_fkl")

# The members that are settings of the f-distill objective (reverse KL, h = 1, no ratio).
# DMD2's code (main/edm/edm_guidance.py): the distribution-matching loss on positions 2-98 %
# of EDM's 1000-level Karras grid, the fake score on the whole grid, no epsilon in the
# normaliser; DMD (its first version) on the same levels.
DMD_LEVELS = dict(sigma_dist="karras", ramp_min=0.02, ramp_max=0.98, abs_mean_eps=0.0,
                  critic_noise=dict(sigma_dist="karras", ramp_min=0.0, ramp_max=1.0))
FDISTILL_MEMBERS = dict(
    dmd=dict(gen_every=2, gan_weight=0.0, **DMD_LEVELS),
    dmd2=dict(gen_every=5, gan_weight=3e-3, **DMD_LEVELS),
    # Diff-Instruct's EDM code: weight 1 on D_fake - D_T, levels log s ~ N(-1.2, 1.2^2), one
    # fake-score update per generator update, no GAN term.
    diff_instruct=dict(gen_every=2, gan_weight=0.0, weight="unit", sigma_dist="lognormal",
                       p_mean=-1.2, p_std=1.2))
# DMD2's classifier (main/edm/edm_unified_model.py, edm_guidance.py): one head on the fake
# U-Net's bottleneck, trained with the fake score by its guidance loss (cls_loss_weight 1e-2),
# the generator's term at its own noise draw. Where the networks have no features (the toy's
# MLP discriminator), dmd2 keeps the heads on the teacher's side (FastGen's placement).
DMD2_CLASSIFIER = dict(disc_features="fake", disc_loss_weight=1e-2,
                       discriminator=dict(name="unet_heads", feature_indices=(-1,)))
UNI_INSTRUCT_MEMBERS = dict(
    sid=dict(loss="sid", sid_alpha=1.2), sid_half=dict(loss="sid", sid_alpha=0.5),
    sim_l2=dict(loss="sim", sim_distance="l2"),
    sim_huber=dict(loss="sim", sim_distance="pseudo_huber"),
    # SiDA's code: alpha 1 (its CIFAR-10 runs), 0.5 SiD + 0.5 GAN (sida_gan_scale: its 0.01 /
    # 100 loss scales), real data noised like fakes; the fake score (and so its discriminator
    # loss, weighted by lambda(s)) on EDM's lognormal levels, the family's critic_noise.
    sida=dict(loss="sida", sid_alpha=1.0, adv_weight=0.5, same_noise_real=True),
    rkl_then_fkl=dict(loss="expanded", divergence="reverse_kl", switch_divergence="forward_kl"))


def method_objective(method, num_steps, **overrides):
  """``config.objective`` of ``method`` (one of METHODS) over ``overrides`` (scale-specific);
  ``num_steps`` (the run's length) places the switch of ``rkl_then_fkl`` at its middle."""
  common.check_choice(method, METHODS, "variant")
  if method in FDISTILL_MEMBERS:
    shared = {k: v for k, v in overrides.items() if k in common.FDISTILL_OBJECTIVE}
    fields = dict(FDISTILL_MEMBERS[method])
    if method == "dmd2" and dict(shared.get("discriminator", {})).get("name") == "unet_heads":
      fields.update(DMD2_CLASSIFIER)
    return common.fdistill_objective(**dict(
        shared, divergence="reverse_kl", ratio_bins=0, normalise_h=False, **fields))
  fields = UNI_INSTRUCT_MEMBERS.get(method, dict(loss="expanded", divergence=method))
  if method == "rkl_then_fkl":
    fields = dict(fields, switch_step=max(num_steps // 2, 1))
  return common.uni_instruct_objective(**dict(overrides, **fields))


def get_config(arg=None):
  a = common.parse_arg(arg, variant="forward_kl", teacher="checkpoint",
                       teacher_dir="runs/toy_teacher", steps=3000, distribution="gmm25")
  c = toy2d_fdistill.get_config(f"js,teacher={a.teacher},teacher_dir={a.teacher_dir},"
                                f"steps={a.steps},distribution={a.distribution}")
  toy = c.objective
  c.objective = method_objective(
      a.variant, a.steps, gen_every=2, sigma_dist="karras", sigma_max=toy.sigma_max,
      fake_loss_weight="edm", warmup_critic_steps=toy.warmup_critic_steps,
      discriminator=dict(toy.discriminator), fake_optim=dict(toy.fake_optim),
      disc_optim=dict(toy.disc_optim))
  return c

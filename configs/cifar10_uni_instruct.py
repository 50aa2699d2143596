"""Uni-Instruct / SiD / SIM / DMD on EDM's CIFAR-10 teacher (one-step DDPM++), published recipes.

  python -m fdistill.main --config=configs/cifar10_uni_instruct.py:forward_kl --workdir=gs://.../ui \
      --config.teacher.path=/path/to/edm-cifar10-32x32-cond-vp.pkl --config.data.data_dir=/path/to/tfds

Variant = the method of ``configs/toy2d_uni_instruct.py``; keys: ``teacher`` (edm_pickle |
checkpoint), ``teacher_dir``, ``cond`` (default True).

Recipe: SiD's (Zhou et al. 2024, "Score identity Distillation"; Uni-Instruct, Wang, Luo et
al. 2025, trains on SiD's code base with the same settings): generator initialised from the
teacher at ``sigma_init = 2.5``, Adam with betas (0, 0.999), lr 1e-5 for generator and fake
score, one fake-score update per generator update, the generator's noise levels on EDM's
Karras ramp from t = 0 to t_max = 800 of 1000 (``ramp_min = 0.2, ramp_max = 1``), the fake
score's on EDM's lognormal(-1.2, 1.2) (``critic_noise``), SiD's alpha 1.2, SiD's normalised
scale. Batch 256. DMD and DMD2 keep DMD2's own levels (``toy2d_uni_instruct.DMD_LEVELS``).
SiD's CIFAR-10 code also augments the fake score's inputs (EDM's augment pipe, p = 0.12, the
fake score conditioned on its 9 labels): ``augment_p = 0.12`` for the family's members here
(``fdistill/data/augment.py``; ImageNet-64: 0, as SiD's).
Published one-step FIDs (CIFAR-10, 50k samples): SiD 1.923 uncond / 1.710 cond; Uni-Instruct
1.46 uncond / 1.38 cond (forward KL); DMD 2.66 cond; SIM 2.06 uncond; Diff-Instruct 4.53 uncond
(its own recipe: batch 128, lr 1e-5, init_sigma 1.0; this config keeps SiD's batch and noise
ramp for its generator's optimiser but uses Diff-Instruct's levels, weight and init_sigma);
SiDA 1.499 uncond / 1.396 cond (Zhou et al. 2024; as we recall the abstract these are for
SiD^2A, SiDA started from a SiD generator: ``--config.generator.init_workdir=<SiD run>``;
SiDA from the teacher is reported slightly higher -- not re-checked against the paper here). ``train.num_steps``
is a budget: the papers train for hundreds of millions of generator images.
"""
from configs import architectures
from configs import cifar10_teacher
from configs import common
from configs import toy2d_uni_instruct


def sid_recipe(c, method, *, lr, batch_size, num_steps, feature_indices, augment_p):
  """SiD's optimiser and noise levels on ``c`` (CIFAR-10 and ImageNet-64 differ in lr, batch and
  the fake score's augmentation: 0.12 and 0)."""
  # Diff-Instruct's published command starts the generator at init_sigma 1.0; SiD's family 2.5.
  c.generator.sigma_init = 1.0 if method == "diff_instruct" else 2.5
  c.objective = toy2d_uni_instruct.method_objective(
      method, num_steps, sigma_dist="karras", sigma_min=0.002, sigma_max=80.0, ramp_min=0.2,
      ramp_max=1.0, fake_loss_weight="edm", augment_p=augment_p,
      discriminator=dict(name="unet_heads", feature_indices=feature_indices),
      fake_optim={}, disc_optim={})
  c.optim.update(dict(lr=lr, warmup_steps=0, weight_decay=0.0, b1=0.0, b2=0.999, eps=1e-8,
                      grad_clip=10.0, ema_decay=0.9999))
  c.train.update(dict(batch_size=batch_size, num_steps=num_steps, log_every=500,
                      save_every=5_000, sample_every=5_000))
  c.eval.num_samples = 50_000
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, variant="forward_kl", teacher="edm_pickle", teacher_dir="", cond=True)
  c = common.base_config()
  c.data = cifar10_teacher.get_config(f"cond={a.cond}").data
  c.model = architectures.ddpmpp_cifar10(cond=a.cond)
  common.network_teacher(c, a.teacher, a.teacher_dir)
  return sid_recipe(c, a.variant, lr=1e-5, batch_size=256, num_steps=400_000,
                    feature_indices=(0, 1, -1), augment_p=0.12)

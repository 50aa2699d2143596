"""rCM (sCM + DMD regulariser) of EDM's CIFAR-10 teacher into a few-step DDPM++ student.

  python -m fdistill.main --config=configs/cifar10_rcm.py:rcm --workdir=gs://.../rcm_cifar \
      --config.teacher.path=/path/to/edm-cifar10-32x32-cond-vp.pkl --config.data.data_dir=/path/to/tfds
  python -m fdistill.main --config=configs/cifar10_rcm.py:rcm --workdir=gs://.../rcm_cifar --mode=eval \
      --config.eval.sampler_steps=2

Variant: ``scm`` (sCM only), ``rcm`` (default), ``dmd_only``. Keys: ``teacher`` (edm_pickle:
a published EDM .pkl at ``teacher.path``; checkpoint: a ``configs/cifar10_teacher.py`` run in
``teacher_dir``), ``cond``. The student and the fake score copy the teacher (EDM time
embedding: the student starts as the teacher exactly).

Hyper-parameters. From sCM (Lu & Song 2024, ICLR 2025), the consistency part: TrigFlow with
sd = 0.5; training times ``log(sd tan t) ~ N(-1.0, 1.4^2)`` (its CIFAR-10 setting); the
tangent normalisation c = 0.1; the tangent warm-up over 10k iterations (sCM's Algorithm 1
form); its 2-step sampler's intermediate time 1.1. From rCM (Zheng et al. 2025, NVlabs/rcm
Wan2.1 recipe), the regulariser: DMD weight 0.01 relative to the sCM loss (its loss scales 100
and 1), the student every 5th step after the sCM-only warm-up, rollouts of up to 4 steps,
DMD times by timestep shift 5, the fake score's learning rate 0.2x the student's, AdamW
betas (0, 0.999) and weight decay 0.01. Batch, learning rate, EMA and length are FastGen's
CIFAR-10 f-distill values (configs/cifar10_fdistill.py), not sCM's (sCM trains its own
TrigFlow networks from scratch; the values of its hyper-parameter table were not checked
here). Not run in this repository (needs the EDM pickle and a GPU).
"""
from configs import architectures
from configs import cifar10_teacher
from configs import common

VARIANTS = ("scm", "rcm", "dmd_only")


def rcm_recipe(c, variant, *, p_mean, p_std, lr, batch_size, num_steps):
  """sCM's consistency part and rCM's regulariser on ``c`` (CIFAR-10 and ImageNet-64 differ in
  the keyword arguments)."""
  common.check_choice(variant, VARIANTS, "variant")
  c.objective = common.rcm_objective(
      p_mean=p_mean, p_std=p_std, tangent="jvp", warmup="scm", tangent_warmup_steps=10_000,
      norm_c=0.1, time_embedding="edm", dmd_weight=0.0 if variant == "scm" else 0.01,
      dmd_only=variant == "dmd_only", adaptive_weight=variant != "dmd_only",
      scm_warmup_steps=10_000 if variant == "rcm" else 0,
      warmup_critic_steps=0, gen_every=5, rollout_max_steps=4, dmd_time="shift",
      dmd_shift=5.0, sigma_min=0.002, sigma_max=80.0, sampler_times=(1.1,),
      fake_loss_weight="edm", fake_optim=dict(lr=0.2 * lr, grad_clip=0.0))
  c.optim.update(dict(lr=lr, warmup_steps=0, weight_decay=0.01, b1=0.0, b2=0.999, eps=1e-8,
                      grad_clip=10.0, ema_decay=0.9999))
  c.train.update(dict(batch_size=batch_size, num_steps=num_steps, log_every=500,
                      save_every=5_000, sample_every=5_000))
  c.eval.update(dict(num_samples=50_000, sampler_steps=2))
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, variant="rcm", teacher="edm_pickle", teacher_dir="", cond=True)
  c = common.base_config()
  c.data = cifar10_teacher.get_config(f"cond={a.cond}").data
  c.model = architectures.ddpmpp_cifar10(cond=a.cond)
  c.model.attn_impl = "auto"  # the fused JVP attention kernel on GPU, XLA elsewhere
  common.network_teacher(c, a.teacher, a.teacher_dir)
  return rcm_recipe(c, a.variant, p_mean=-1.0, p_std=1.4, lr=1e-4, batch_size=2048,
                    num_steps=100_000)

"""Shared defaults for every config and the ``:variant`` argument parser.

Every config file defines ``get_config(arg=None)``; ``arg`` is what follows
':' on the command line (``--config=configs/toy2d_fdistill.py:js``), either
a single variant name or ``key=value,key=value`` pairs.
"""
import ml_collections

# data.distribution of toy2d (fdistill/diffusion/gmm.py; configs import no fdistill module,
# tests/test_layout.py checks the two lists agree).
TOY_DISTRIBUTIONS = ("gmm8", "gmm25", "checkerboard")


# Every field a data set reads (fdistill/data/; each reads the fields of its kind).
# distribution: toy2d's mixture (TOY_DISTRIBUTIONS). resolution: image side in pixels, 0 = the
# data set's own (digits 16, mnist5k 32, cifar10 32, imagenet64 64). conditional: one-hot class
# labels. random_flip: horizontal flips (tfds sets only; digits refuse it). data_dir, download,
# split: tfds sets, prepared in array_record (data_dir "" = tfds' default; nothing is downloaded
# unless download=True, which needs the `prepare` extra).
DATA = dict(name="toy2d", seed=0, distribution="gmm25", resolution=0, conditional=False,
            random_flip=False, data_dir="", download=False, split="train")

# data/fsdp/tensor: mesh axis sizes within a slice (-1 = the remaining devices); dcn_*: the
# same axes across slices of a multi-slice pod (their product = number of slices).
# rules: [(regex, spec tuple)] matched first; other leaves of at least fsdp_min_size
# elements are split over fsdp along their largest divisible dimension. fsdp_gather: whole
# weights for the compute (FSDP) or, False, weight placement left to XLA (partition.py).
MESH = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, fsdp_min_size=2**14,
            fsdp_gather=True, rules=[])

# objective.discriminator of f-distill and Uni-Instruct (fdistill/models/discriminator.py):
# name mlp (hidden, emb_dim: an MLP on x_t and the noise level) or unet_heads (feature_indices
# of the teacher's or fake score's encoder features, one head each, of channels width; 0 =
# the feature's own width).
DISCRIMINATOR = dict(name="mlp", hidden=(128, 128, 128), emb_dim=64, feature_indices=(-1,),
                     channels=0)


def base_config():
  """All sections a run may read: data, model, teacher, generator, objective, optim, train, eval, mesh."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(DATA)
  c.model = ml_collections.ConfigDict({"name": "mlp", "sigma_data": 0.5})
  # kind: none | analytic | checkpoint | edm_pickle. step: -1 = latest checkpoint of teacher.workdir;
  # path: a local EDM .pkl for kind=edm_pickle (never downloaded).
  c.teacher = ml_collections.ConfigDict({"kind": "none", "workdir": "", "step": -1, "path": ""})
  # init_workdir: "" = the generator starts from the teacher (or fresh); else a distillation
  # run's workdir whose exported generator (checkpoint init_step, -1 = latest) becomes the new
  # run's generator params and EMA (SiD^2A: SiDA started from a SiD generator).
  c.generator = ml_collections.ConfigDict({"sigma_init": 2.5, "init_workdir": "",
                                           "init_step": -1})
  c.objective = ml_collections.ConfigDict({"name": "dsm", "p_mean": -1.2, "p_std": 1.2})
  c.optim = ml_collections.ConfigDict({
      "lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
      "weight_decay": 0.0, "ema_decay": 0.999,
      # ema_warmup: decay min(ema_decay, (1 + step) / (10 + step)) (fdistill/optim/update.py)
      "ema_warmup": False,
      "micro_batches": 1})  # gradient accumulation: the batch in micro-batches via lax.scan
  c.train = ml_collections.ConfigDict({
      "batch_size": 256, "num_steps": 1000, "log_every": 100, "save_every": 500,
      "sample_every": 0, "keep_checkpoints": 3,
      # A run whose updates are non-finite this many steps in a row stops (nothing saved).
      "max_consecutive_skips": 50})
  c.eval = ml_collections.ConfigDict({
      "num_samples": 5000, "sampler_steps": 18, "num_plot_samples": 64, "batch_size": 1000,
      "poll_seconds": 60.0, "timeout_seconds": 0.0,
      # metric: "" = toy for toy2d, digits_fd for digits / mnist5k, fid otherwise (docs/fid.md).
      # step: -1 = poll the workdir; N = evaluate only checkpoint N, once, and return.
      # inception_path: the converted Inception .npz ("" = $FDISTILL_INCEPTION).
      # fid_ref: EDM-format reference statistics (.npz with mu, sigma; "" = not set).
      # digits_classifier_path: digits_fd's cached classifier ("" = the default under ~/.cache).
      "metric": "", "step": -1, "inception_path": "", "fid_ref": "",
      "digits_classifier_path": ""})
  c.mesh = ml_collections.ConfigDict(dict(MESH, rules=[]))  # a list of its own per config
  return c


# f-distill's objective section (fdistill/objectives/fdistill.py:Settings documents each field):
# FastGen's CIFAR-10 recipe, except the EDM-weighted fake-score loss.
FDISTILL_OBJECTIVE = dict(
    name="fdistill", divergence="js", alpha=0.5, gen_every=5, warmup_critic_steps=0,
    gan_weight=1e-3, logit_clip=10.0, ratio_lower=0.1, ratio_upper=20.0, ratio_bins=10,
    ratio_ema=0.0, ratio_bin_by="position", normalise_h=True, weight="abs_mean",
    abs_mean_eps=1e-6, disc_features="teacher", disc_loss_weight=1.0, fake_loss_weight="edm",
    same_noise_real=False, sigma_dist="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0,
    ramp_min=0.002, ramp_max=0.998, p_mean=-1.2, p_std=1.2, sigma_fixed=1.0,
    critic_noise={}, discriminator=dict(name="mlp"), fake_optim={}, disc_optim={})


def fdistill_objective(**overrides) -> ml_collections.ConfigDict:
  """A complete ``config.objective`` for f-distill: the defaults above, then ``overrides``."""
  return _section(FDISTILL_OBJECTIVE, overrides, "f-distill")


# Uni-Instruct's objective section (fdistill/objectives/uni_instruct.py:Settings documents each
# field): SiD's recipe (SiD and Uni-Instruct share it) with the expanded forward KL. SiD's
# code trains the fake score on EDM's lognormal levels whatever the generator's ramp
# (critic_noise), and weighs SiDA's GAN term by lsg_gan / lsg = 0.01 / 100 (sida_gan_scale).
UNI_INSTRUCT_OBJECTIVE = dict(
    name="uni_instruct", loss="expanded", divergence="forward_kl", alpha=0.5, sid_alpha=1.2,
    sim_distance="pseudo_huber", sim_c=1.0, adv_weight=0.5, sida_gan_scale=1e-4, switch_step=0,
    switch_divergence="", scale="sid", gen_every=2, warmup_critic_steps=0,
    gan_weight=0.0, logit_clip=10.0, fake_loss_weight="edm", same_noise_real=False,
    augment_p=0.0, sigma_dist="karras", sigma_min=0.002, sigma_max=80.0, rho=7.0,
    ramp_min=0.2, ramp_max=1.0,  # SiD: t ~ U[0, t_max = 800 / 1000] on EDM's Karras ramp
    p_mean=-1.2, p_std=1.2, sigma_fixed=1.0,
    critic_noise=dict(sigma_dist="lognormal", p_mean=-1.2, p_std=1.2),
    discriminator=dict(name="mlp"), fake_optim={}, disc_optim={})


def uni_instruct_objective(**overrides) -> ml_collections.ConfigDict:
  """A complete ``config.objective`` for Uni-Instruct / SiD / SIM: the defaults, then ``overrides``."""
  return _section(UNI_INSTRUCT_OBJECTIVE, overrides, "Uni-Instruct")


# rCM's objective section (fdistill/objectives/rcm.py:Settings documents each field): NVlabs/rcm's
# Wan2.1 T2V 1.3B recipe (rcm/configs/experiments/rcm/wan2pt1_t2v.py over the model defaults of
# t2v_model_distill_rcm.py; Zheng et al. 2025): sCM times (p_mean, p_std) = (-0.8, 1.6) (p_G),
# tangent_warmup 1000 iterations (both the r warm-up and the sCM-only phase), the student every
# 5th step, rollouts of up to 4 steps, DMD times by timestep_shift 5, loss_scale 100 (sCM) vs
# loss_scale_dmd 1 summed over dims (= dmd_weight 0.01 with this code's means), sigma_max 80,
# the sampler's intermediate times (1.3, 1.0, 0.6), sCM's normalisation c = 0.1 and learned
# adaptive weight w(t) (Lu & Song 2024, Algorithm 1, for distillation too; set it False with
# dmd_only=True). rCM's fake-score optimiser (lr 0.2x the student's) is a config's fake_optim.
RCM_OBJECTIVE = dict(
    name="rcm", p_mean=-0.8, p_std=1.6, tangent="jvp", fd_eps=1e-3, warmup="rcm",
    tangent_warmup_steps=1000, norm_c=0.1, adaptive_weight=True, time_embedding="edm",
    time_scale=1.0,
    dmd_weight=0.01, dmd_only=False, scm_warmup_steps=1000, warmup_critic_steps=0, gen_every=5,
    rollout_max_steps=4, dmd_time="shift", dmd_shift=5.0, dmd_p_mean=0.0, dmd_p_std=1.6,
    sigma_min=0.002, sigma_max=80.0, sampler_times=(1.3, 1.0, 0.6), fake_loss_weight="edm",
    fake_optim={})


def rcm_objective(**overrides) -> ml_collections.ConfigDict:
  """A complete ``config.objective`` for rCM / sCM / DMD-only: the defaults, then ``overrides``."""
  return _section(RCM_OBJECTIVE, overrides, "rCM")


def discriminator(**overrides) -> dict:
  """A complete ``objective.discriminator``: :data:`DISCRIMINATOR`, then ``overrides``."""
  return _complete(DISCRIMINATOR, overrides, "objective.discriminator", "discriminator")


def _section(defaults, overrides, what):
  section = _complete(defaults, overrides, "objective", what)
  if "discriminator" in section:
    section["discriminator"] = discriminator(**section["discriminator"])
  return ml_collections.ConfigDict(section)


def _complete(defaults, overrides, prefix, what):
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f"{prefix}.{unknown[0]} is not a {what} setting; valid: "
                     f"{', '.join(sorted(defaults))}")
  return dict(defaults, **overrides)


def parse_arg(arg, **defaults):
  """Parses ``'a=1,b=x'`` (or a bare variant name into ``variant``) over ``defaults``.

  Values are converted to the type of their default; an unknown key raises a
  ValueError naming it and the accepted keys.
  """
  out = dict(defaults)
  if not arg:
    return ml_collections.ConfigDict(out)
  for item in arg.split(","):
    if "=" not in item:
      key, value = "variant", item
    else:
      key, value = item.split("=", 1)
    if key not in out:
      raise ValueError(f"config argument {key!r} is not accepted; valid keys: {', '.join(sorted(out))}")
    default = out[key]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return ml_collections.ConfigDict(out)


def network_teacher(c, kind, workdir):
  """``c.teacher`` for the image configs: a published EDM pickle or a train_teacher run."""
  c.teacher.kind = check_choice(kind, ["edm_pickle", "checkpoint"], "teacher")
  c.teacher.workdir = workdir
  return c


def check_choice(value, choices, field):
  """Raises a ValueError naming ``field`` and the accepted values when ``value`` is not one."""
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not valid; valid values: {', '.join(choices)}")
  return value

"""The network passes each kind of step cannot do without, per objective: the FLOP
bookkeeping of ``benchmarks/distill_step.py`` (kept here, beside the benchmark that reads it,
not in the objectives' interface).

:func:`of` maps a config to ``{kind: {pass: count}}`` in the vocabulary :data:`PASSES`;
``distill_step.py`` prices each pass with XLA's FLOP count on the step's own network and
batch and prints the step's FLOPs against their sum, so duplicated work (a network run
twice, a backward nobody needs) shows as a ratio above 1 (tests/test_benchmarks_distill_step.py
bounds them). Not counted: the optimiser's elementwise update and the losses (negligible at
real batch sizes). A new objective adds one function to :data:`OBJECTIVES`.
"""
from fdistill.objectives import fdistill, rcm, uni_instruct

# Each pass on the network of the step (generator, teacher and fake score share one
# architecture; the discriminator heads sit on the teacher).
PASSES = {
    "forward": "one denoiser forward",
    "train": "a forward and the backward to the network's params (the network being updated)",
    "input_grad": "the backward of a frozen network to its input only (no weight gradients)",
    "jvp": "the tangent half of a forward-mode pass (sCM's dF/dt; its primal is the forward "
           "of the student's own train pass, which XLA shares)",
    "disc_train": "the discriminator's logit (the teacher up to its feature layers, then the "
                  "heads; or an MLP on x_t) and the backward to the discriminator's params",
    "disc_input_grad": "the backward from the discriminator's logit to x_t (through the "
                       "teacher's feature layers, or the MLP)",
}


def add_passes(*counts):
  """The sum of ``{pass: count}`` dicts, zeros dropped."""
  total = {}
  for c in counts:
    for name, n in c.items():
      if name not in PASSES:
        raise ValueError(f"pass {name!r} is not one of {', '.join(PASSES)}")
      total[name] = total.get(name, 0) + n
  return {k: v for k, v in total.items() if v}


def critic(train_disc: bool, two_fake_passes: bool):
  """The one-step families' critic step: the generator's samples, the fake score's DSM update
  (SiDA and DMD2's joint loss: again on the real rows, counted as a whole network: an upper
  bound) and, with a discriminator, its logits on fake and real rows."""
  return add_passes({"forward": 1, "train": 2 if two_fake_passes else 1},
                    {"disc_train": 2 * train_disc})


def dsm_passes(config):
  return {"dsm": {"train": 1}}


def fdistill_passes(config):
  """Generator: its forward and backward, the fake score's and the teacher's forwards (the
  teacher's features give the ratio) and, for the GAN term, the backward from the logit
  through the teacher's feature layers to x_t; no network but G needs weight gradients.
  With the fake score's features (DMD2) the GAN term is a forward and an input gradient of
  the fake score at its own noised sample."""
  st = fdistill.Settings.from_config(config.objective)
  fake_gan = st.disc_features == "fake" and bool(st.gan_weight)
  generator = add_passes({"train": 1, "forward": 2},
                         {"disc_input_grad": int(bool(st.gan_weight) and not fake_gan)},
                         {"forward": int(fake_gan), "input_grad": int(fake_gan)})
  return {"generator": generator, "critic": critic(True, st.disc_features == "fake")}


def uni_instruct_passes(config):
  """Every member's generator gradient flows through x_t into the teacher and the fake score
  (their inputs, not their weights). The ratio's logit reads the teacher's features at the
  same x_t, so its input gradient rides on the teacher's backward: no pass of its own."""
  st = uni_instruct.Settings.from_config(config.objective)
  generator = {"train": 1, "forward": 2, "input_grad": 2}
  kinds = ["generator"] + ([uni_instruct.SWITCHED] if len(st.phases()) > 1 else [])
  return dict({kind: generator for kind in kinds},
              critic=critic(st.trains_disc, st.loss == "sida"))


def rcm_passes(config):
  """sCM: the teacher's velocity, one tangent (jvp, whose primal is the regression's forward
  at the same params; or the two extra forwards of the central difference) and the
  student's regression. DMD: a batch pays the longest rollout (``rollout_max_steps - 1``
  frozen forwards, :func:`fdistill.objectives.rcm.rollout`), the last step with gradient,
  then fake score and teacher. The critic: a frozen rollout and the fake score's DSM
  update. (The adaptive weight's tiny network is not counted.)"""
  st = rcm.Settings.from_config(config.objective)
  k = st.rollout_max_steps
  scm = add_passes({"forward": 1, "train": 1},
                   {"jvp": 1} if st.tangent == "jvp" else {"forward": 2})
  dmd = {"forward": k - 1 + 2, "train": 1}
  passes = {"generator": add_passes(scm if st.has_scm else {}, dmd if st.has_dmd else {})}
  if st.has_dmd:
    passes.update(critic={"forward": k, "train": 1}, scm_warmup=scm)
  return passes


OBJECTIVES = {"dsm": dsm_passes, "fdistill": fdistill_passes,
              "uni_instruct": uni_instruct_passes, "rcm": rcm_passes}


def of(config):
  """``{kind: {pass: count}}`` of ``config.objective.name`` (empty for an objective not
  listed: its rows then have no minimum)."""
  passes = OBJECTIVES.get(config.objective.name)
  return passes(config) if passes else {}

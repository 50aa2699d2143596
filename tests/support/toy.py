"""Tiny toy configs and an objective stepper shared by the objective and CLI tests."""
import functools

import jax
import jax.numpy as jnp

from configs import toy2d_fdistill, toy2d_teacher, toy2d_uni_instruct
from fdistill import objectives
from fdistill.diffusion import gmm as gmm_lib

GMM = gmm_lib.named("gmm8")
BATCH = 32


def tiny_teacher_config(steps=20):
  """DSM on gmm8 with a small MLP; saves and logs every 10 steps."""
  c = toy2d_teacher.get_config("gmm8")
  c.model.hidden = (32, 32)
  c.model.input_fourier = 0  # the plain MLP the tests' measurements were made with
  c.train.update(dict(batch_size=64, num_steps=steps, save_every=10, log_every=10))
  c.eval.update(dict(num_samples=200, batch_size=100, sampler_steps=4, num_plot_samples=50,
                     timeout_seconds=0.0))
  return c


def tiny_fdistill_config(arg="js,teacher=analytic", **objective):
  """f-distill on gmm8 with one-hidden-layer networks; generator on every 3rd step."""
  c = toy2d_fdistill.get_config(arg + ",distribution=gmm8,steps=8")
  c.model.hidden, c.model.emb_dim, c.model.input_fourier = (32,), 16, 0
  c.objective.discriminator.update(hidden=(16,), emb_dim=16)
  c.objective.update(dict(dict(warmup_critic_steps=0, gen_every=3), **objective))
  c.train.batch_size = BATCH
  return c


def tiny_uni_instruct_config(method):
  """A method of configs/toy2d_uni_instruct.py on gmm8 (exact teacher), one-hidden-layer nets."""
  c = toy2d_uni_instruct.get_config(f"{method},teacher=analytic,distribution=gmm8,steps=8")
  c.model.hidden, c.model.emb_dim = (32,), 16
  c.objective.discriminator.update(hidden=(16,), emb_dim=16)
  c.objective.update(dict(warmup_critic_steps=0))
  c.train.batch_size = BATCH
  return c


def batch(step, nan=False, seed=0):
  x = gmm_lib.sample(GMM, jax.random.fold_in(jax.random.key(seed), step), BATCH)
  return {"x": jnp.full_like(x, jnp.nan) if nan else x}


class Stepper:
  """An objective's jitted init and steps, run as the loop runs them (kind by the schedule)."""

  def __init__(self, objective):
    self.objective = objective
    self.init = jax.jit(objective.init)
    self.steps = {kind: jax.jit(fn) for kind, fn in objective.steps.items()}

  def __call__(self, state, teacher, batch, rng):
    kind = self.objective.schedule(int(state["step"]))
    return self.steps[kind](state, teacher, batch, rng)


def analytic_task():
  """The Task of gmm8 data with its exact (analytic) teacher."""
  return objectives.Task((2,), 0, gmm_lib.as_apply_fn(), jax.eval_shape(lambda: GMM))


@functools.lru_cache(maxsize=None)
def analytic_fdistill():
  """The :class:`Stepper` of f-distill with the exact gmm8 teacher (gen_every = 3)."""
  return Stepper(objectives.build(tiny_fdistill_config(), analytic_task()))

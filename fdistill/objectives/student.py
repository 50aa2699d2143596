"""The student toolkit: what f-distill, Uni-Instruct and rCM do the same way with the network
they train (the one-step generator, or rCM's consistency student).

* :func:`require_teacher` and :func:`check_architecture`: a distillation objective needs a
  teacher, and a network teacher (``Task.teacher_is_network``) must have the student's
  architecture, because
* :func:`initial_state` starts the student (params and EMA), and a fake score when there is
  one, as copies of a network teacher's params (fresh params with the analytic teacher);
* :func:`update_generator` / :func:`generator_step`: the generator step's tail, one guarded
  update of ``state["gen"]`` by the student's :class:`~fdistill.optim.update.Updater` (named
  ``gen``, so its metrics read ``gen_loss`` and ``gen_grad_norm``) and the step count.

An objective family adds its losses and whatever else its state holds.
"""
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from fdistill.errors import ConfigError
from fdistill.optim import state as state_lib
from fdistill.optim import update

GEN = "gen"  # the student's name in the state and in its metrics (gen_loss, gen_grad_norm)


def same_structure(a, b) -> bool:
  """Whether two params pytrees (arrays or ShapeDtypeStructs) have one tree and shapes."""
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
  return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and
          shapes(a) == shapes(b))


def require_teacher(task, what: str):
  """A ConfigError unless ``task`` has a teacher (objective ``what`` distils one)."""
  if task.teacher_apply is None:
    raise ConfigError(f"objective.name={what!r} distils a teacher: set teacher.kind to "
                      "'analytic' (toy data), 'checkpoint' (with teacher.workdir) or "
                      "'edm_pickle' (with teacher.path)")


def check_architecture(task, fresh, what: str, student: str = "generator"):
  """A ConfigError unless a network teacher's params have the shapes ``fresh`` of the
  student's (the student of objective ``what`` starts as a copy of them)."""
  if task.teacher_is_network and not same_structure(fresh, task.teacher_abstract):
    raise ConfigError(f"{what} initialises the {student} from the teacher: config.model must "
                      "be the teacher's architecture (compare with the teacher run's "
                      "config.json)")


def initial_state(task, teacher, fresh: Callable, gen_update: update.Updater,
                  fake_update=None):
  """The step counters, ``gen`` (params and EMA) and, with ``fake_update``, ``fake``: copies
  of ``teacher`` (its params) when it is a network, else of ``fresh()`` (new params)."""
  params = teacher if task.teacher_is_network else fresh()
  copy = lambda: jax.tree_util.tree_map(jnp.array, params)
  state = dict(state_lib.init_counters(), gen=state_lib.init_net_state(copy(), gen_update.tx))
  if fake_update is not None:
    state["fake"] = state_lib.init_net_state(copy(), fake_update.tx, ema=False)
  return state


def update_generator(gen_update: update.Updater, state, loss_fn, inputs, batch, rng):
  """One guarded update of ``state["gen"]`` on ``loss_fn``: ``(gen, ok, metrics)``, metrics
  being the loss's aux with ``gen_loss`` (the loss) and ``gen_grad_norm``."""
  gen, loss, aux, ok = gen_update(state[GEN], loss_fn, inputs, batch, rng, state["step"])
  return gen, ok, dict(aux, **{gen_update.metric("loss"): loss})


def generator_step(gen_update: update.Updater, loss_fn, inputs_of: Callable,
                   carried: Tuple[str, ...] = ()):
  """``step(state, teacher, batch, rng) -> (state, metrics)``: a generator update.

  ``inputs_of(state, teacher)``: the loss's ``inputs``. ``carried``: state entries the loss
  returns, updated, in its aux under the same name (f-distill's ``ratio_bins``); they move
  only when the update is applied and are not logged."""

  def step(state, teacher, batch, rng):
    gen, ok, metrics = update_generator(gen_update, state, loss_fn, inputs_of(state, teacher),
                                        batch, rng)
    new = dict(state, gen=gen)
    for key in carried:
      new[key] = jnp.where(ok, metrics.pop(key), state[key])
    return update.count_step(new, ok), metrics

  return step

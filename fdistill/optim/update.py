"""The guarded optimiser update every objective's step uses.

``jax.grad`` happens here, never inside an objective: a loss is a pure
``loss(params, inputs, batch, rng) -> (loss, aux)`` where ``inputs`` are the
other networks' params (frozen for this update) and statistics.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fdistill.optim import state as state_lib
from fdistill.parallel import partition


def split_micro_batches(batch, micro_batches: int):
  """[B, ...] leaves -> [micro_batches, B / micro_batches, ...], micro-batch i = rows i, i+m, ...

  Strided rather than contiguous: the batch is sharded in contiguous blocks
  over devices, so every device keeps contributing 1/m of its own rows to
  each micro-batch and the split needs no communication.
  """

  def split(x):
    if x.shape[0] % micro_batches:
      raise ValueError(f"batch of {x.shape[0]} does not split into optim.micro_batches="
                       f"{micro_batches}")
    x = x.reshape((x.shape[0] // micro_batches, micro_batches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, batch)


@dataclasses.dataclass(frozen=True)
class Updater:
  """How one network is updated: its optimiser, EMA, gradient accumulation and FSDP gather.

  tx:            the optax transformation (``state.make_optimizer``).
  ema_decay:     EMA rate of ``net_state["ema"]``; None = the network keeps no EMA.
  micro_batches: gradient accumulation: the batch in that many slices scanned one at a
                 time (activation memory of one slice; batch statistics inside the loss
                 are then over one slice, still global across devices).
  fsdp_gather:   all-gather params and inputs over fsdp for the compute
                 (``config.mesh.fsdp_gather``; see ``partition.gather_fsdp``).
  ema_warmup:    the EMA's decay at run step n is ``min(ema_decay, (1 + n) / (10 + n))``
                 (``config.optim.ema_warmup``; TensorFlow's ExponentialMovingAverage with
                 num_updates), so a short run's EMA does not keep most of its weight on the
                 initial params: after 600 steps at 0.999 a plain EMA still holds 55 % of them.
  name:          the network's name in the metrics the update adds (``gen`` ->
                 ``gen_grad_norm``); None: plain ``grad_norm`` (a single-network objective).
  """
  tx: optax.GradientTransformation
  ema_decay: Optional[float] = None
  micro_batches: int = 1
  fsdp_gather: bool = True
  ema_warmup: bool = False
  name: Optional[str] = None

  def metric(self, quantity: str) -> str:
    """The logged name of ``quantity`` of this network (``gen_grad_norm``, ``grad_norm``)."""
    return f"{self.name}_{quantity}" if self.name else quantity

  def ema_rate(self, step):
    """The EMA's decay at run step ``step`` (None: the plain ``ema_decay``)."""
    if not self.ema_warmup or step is None:
      return self.ema_decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(self.ema_decay, (1.0 + step) / (10.0 + step))

  def value_and_grad(self, loss_fn, params, inputs, batch, rng):
    """((loss, aux), grads) of ``loss_fn`` averaged over micro-batches.

    Micro-batch i uses ``fold_in(rng, i)``; ``micro_batches=1`` is the plain
    ``jax.value_and_grad`` with the caller's rng.
    """

    def gathered_loss(params, inputs, batch, rng):
      gather = lambda t: partition.gather_fsdp(t, self.fsdp_gather)
      return loss_fn(gather(params), gather(inputs), batch, rng)

    grad_fn = jax.value_and_grad(gathered_loss, has_aux=True)
    if self.micro_batches == 1:
      return grad_fn(params, inputs, batch, rng)

    def body(total, xs):
      index, micro = xs
      out = grad_fn(params, inputs, micro, jax.random.fold_in(rng, index))
      return jax.tree_util.tree_map(jnp.add, total, out), None

    micro = split_micro_batches(batch, self.micro_batches)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(grad_fn, params, inputs, first, rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(self.micro_batches), micro))
    return jax.tree_util.tree_map(lambda x: x / self.micro_batches, total)

  def __call__(self, net_state, loss_fn, inputs, batch, rng, step=None):
    """One update of ``net_state`` on ``loss_fn``; returns (net_state, loss, aux, ok).

    ``step``: the run's step (the EMA's warm-up reads it; see :meth:`ema_rate`).

    NaN guard: if the loss, a gradient, the gradient norm or the update's RESULT (params,
    optimiser state, EMA: a non-finite learning rate makes finite gradients into
    non-finite params) is non-finite, the whole update is skipped and ``ok`` is False, so
    a saved state is always finite. ``aux`` gains ``grad_norm`` under :meth:`metric`'s name.
    """
    (loss, aux), grads = self.value_and_grad(loss_fn, net_state["params"], inputs, batch, rng)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & state_lib.all_finite(grads) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, net_state["opt_state"], net_state["params"])
    new = dict(net_state, params=optax.apply_updates(net_state["params"], updates),
               opt_state=opt_state)
    if self.ema_decay is not None:
      new["ema"] = state_lib.ema_update(net_state["ema"], new["params"], self.ema_rate(step))
    ok = ok & state_lib.all_finite(new)
    aux = dict(aux, **{self.metric("grad_norm"): grad_norm})
    return state_lib.select_tree(ok, new, net_state), loss, aux, ok


def count_step(state, ok):
  """Advances ``step`` and counts skipped (non-finite) steps, in all and in a row."""
  bad = 1 - ok.astype(jnp.int32)
  return dict(state, step=state["step"] + 1, skipped=state["skipped"] + bad,
              consecutive_skips=(state["consecutive_skips"] + 1) * bad)


def updater(config, optim_config=None, ema: bool = False, name: Optional[str] = None) -> Updater:
  """The :class:`Updater` for ``optim_config`` (default ``config.optim``) under ``config``.

  ``ema``: keep an EMA at ``config.optim.ema_decay``; ``name``: :attr:`Updater.name`.
  """
  optim_config = config.optim if optim_config is None else optim_config
  return Updater(tx=state_lib.make_optimizer(optim_config),
                 ema_decay=float(config.optim.ema_decay) if ema else None,
                 micro_batches=int(config.optim.micro_batches),
                 fsdp_gather=bool(config.mesh.fsdp_gather),
                 ema_warmup=bool(config.optim.ema_warmup) and ema, name=name)

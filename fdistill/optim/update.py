"""Gradient-and-update helpers shared by every objective's step, and step jitting.

``jax.grad`` happens here, never inside an objective (DESIGN section 3).
"""
import jax
import jax.numpy as jnp
import optax

from fdistill.parallel import partition
from fdistill.optim import state as state_lib


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


def accumulated_value_and_grad(loss_fn, params, frozen, batch, rng, micro_batches: int = 1):
  """((loss, aux), grads) of ``loss_fn`` averaged over micro-batches scanned one at a time.

  Activation memory is that of one micro-batch; ``micro_batches=1`` is the
  plain ``jax.value_and_grad`` with the caller's rng. Micro-batch i uses
  ``fold_in(rng, i)``. Batch statistics inside ``loss_fn`` (normalisers) are
  then over one micro-batch, still global across devices. Params and
  ``frozen`` are all-gathered over fsdp for the compute
  (``partition.gather_fsdp``): FSDP, not weight-sharded activations.
  """

  def gathered_loss(params, frozen, batch, rng):
    return loss_fn(partition.gather_fsdp(params), partition.gather_fsdp(frozen), batch, rng)

  grad_fn = jax.value_and_grad(gathered_loss, has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, frozen, batch, rng)

  def body(total, xs):
    index, micro = xs
    out = grad_fn(params, frozen, micro, jax.random.fold_in(rng, index))
    return jax.tree_util.tree_map(jnp.add, total, out), None

  micro = split_micro_batches(batch, micro_batches)
  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grad_fn, params, frozen, first, rng))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(micro_batches), micro))
  return jax.tree_util.tree_map(lambda x: x / micro_batches, total)


def grad_and_update(net_state, loss_fn, frozen, batch, rng, tx, ema_decay=None,
                    micro_batches: int = 1):
  """One optimizer update of ``net_state`` on ``loss_fn(params, frozen, batch, rng)``.

  NaN guard: if the loss or any gradient is non-finite the whole update
  (params, optimizer state, EMA) is skipped. ``micro_batches`` > 1
  accumulates the gradient over that many slices of the batch (see
  :func:`accumulated_value_and_grad`). Returns (net_state, loss, aux, ok).
  """
  (loss, aux), grads = accumulated_value_and_grad(loss_fn, net_state["params"], frozen, batch,
                                                  rng, micro_batches)
  ok = jnp.logical_and(jnp.isfinite(loss), state_lib.all_finite(grads))
  updates, opt_state = tx.update(grads, net_state["opt_state"], net_state["params"])
  new = dict(net_state, params=optax.apply_updates(net_state["params"], updates),
             opt_state=opt_state)
  if ema_decay is not None and "ema" in net_state:
    new["ema"] = state_lib.ema_update(net_state["ema"], new["params"], ema_decay)
  aux = dict(aux, grad_norm=optax.tree.norm(grads))
  return state_lib.select_tree(ok, new, net_state), loss, aux, ok


def count_step(state, ok):
  """Advances ``step`` and counts skipped (non-finite) steps."""
  return dict(state, step=state["step"] + 1,
              skipped=state["skipped"] + (1 - ok.astype(jnp.int32)))


def micro_batch_count(config) -> int:
  """``config.optim.micro_batches`` (gradient accumulation; 1 = off)."""
  return int(config.optim.get("micro_batches", 1))


def init_counters():
  return {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

"""Gradient-and-update helpers shared by every objective's step, and step jitting.

``jax.grad`` happens here, never inside an objective (DESIGN section 3).
"""
import jax
import jax.numpy as jnp
import optax

from fdistill.train import state as state_lib


def grad_and_update(net_state, loss_fn, frozen, batch, rng, tx, ema_decay=None):
  """One optimizer update of ``net_state`` on ``loss_fn(params, frozen, batch, rng)``.

  NaN guard: if the loss or any gradient is non-finite the whole update
  (params, optimizer state, EMA) is skipped. Returns (net_state, loss, aux, ok).
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      net_state["params"], frozen, batch, rng)
  ok = jnp.logical_and(jnp.isfinite(loss), state_lib.all_finite(grads))
  updates, opt_state = tx.update(grads, net_state["opt_state"], net_state["params"])
  new = dict(net_state, params=optax.apply_updates(net_state["params"], updates),
             opt_state=opt_state)
  if ema_decay is not None and "ema" in net_state:
    new["ema"] = state_lib.ema_update(net_state["ema"], new["params"], ema_decay)
  aux = dict(aux, grad_norm=optax.global_norm(grads))
  return state_lib.select_tree(ok, new, net_state), loss, aux, ok


def count_step(state, ok):
  """Advances ``step`` and counts skipped (non-finite) steps."""
  return dict(state, step=state["step"] + 1,
              skipped=state["skipped"] + (1 - ok.astype(jnp.int32)))


def init_counters():
  return {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

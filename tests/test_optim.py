"""The optimiser built from an ``optim`` config section, and the guarded update's NaN guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdistill.optim import update


def test_optimizer_without_warmup_updates_at_full_rate_from_the_first_step():
  """Adam's first step moves each parameter by lr (bias-corrected moments: |m/sqrt(v)| = 1)."""
  from configs import common
  from fdistill.optim import state as state_lib
  for warmup, expected in ((0, 0.1), (10, 0.0)):  # with warm-up the schedule starts at 0
    optim = common.base_config().optim
    optim.update({"lr": 0.1, "warmup_steps": warmup, "grad_clip": 0.0, "eps": 1e-12})
    tx = state_lib.make_optimizer(optim)
    params = jnp.zeros(3)
    updates, _ = tx.update(jnp.array([1.0, -2.0, 3.0]), tx.init(params), params)
    np.testing.assert_allclose(np.abs(updates), expected, rtol=1e-5)


def test_updater_skips_a_non_finite_update_and_keeps_the_ema():
  """A NaN loss leaves params, optimiser state and EMA untouched and reports ok=False."""
  params = {"w": jnp.ones(3)}
  tx = optax.sgd(0.1)
  net = {"params": params, "opt_state": tx.init(params), "ema": {"w": jnp.full(3, 2.0)}}
  loss = lambda p, inputs, batch, rng: (jnp.sum(p["w"] * batch["x"]), {})
  step = update.Updater(tx, ema_decay=0.5)
  new, _, aux, ok = step(net, loss, None, {"x": jnp.array([1.0, 2.0, 3.0])}, jax.random.key(0))
  assert bool(ok) and np.isfinite(float(aux["grad_norm"]))
  np.testing.assert_allclose(new["params"]["w"], 1 - 0.1 * np.array([1.0, 2.0, 3.0]), rtol=1e-6)
  np.testing.assert_allclose(new["ema"]["w"], 0.5 * 2 + 0.5 * new["params"]["w"], rtol=1e-6)
  bad, _, _, ok = step(net, loss, None, {"x": jnp.array([1.0, jnp.nan, 3.0])}, jax.random.key(0))
  assert not bool(ok)
  for a, b in zip(jax.tree_util.tree_leaves(bad), jax.tree_util.tree_leaves(net)):
    np.testing.assert_array_equal(a, b)


def test_ema_warmup_follows_its_formula_and_a_plain_ema_when_off():
  """optim.ema_warmup: at run step n the EMA's decay is min(d, (1 + n) / (10 + n)); written here
  as a NumPy recursion over 30 steps of a 1-parameter SGD-free 'update' (params := step)."""
  import ml_collections
  import numpy as np
  import jax
  import jax.numpy as jnp
  from fdistill.optim import state as state_lib
  from fdistill.optim import update
  optim = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=0, grad_clip=0.0, b1=0.0, b2=0.0,
                                         eps=1e30, weight_decay=0.0))
  tx = state_lib.make_optimizer(optim)  # eps 1e30: the update is ~0, params stay ~1
  for warmup in (True, False):
    upd = update.Updater(tx=tx, ema_decay=0.99, ema_warmup=warmup)
    net = state_lib.init_net_state({"w": jnp.zeros(())}, tx)
    want = 0.0
    for n in range(30):
      target = float(n + 1)
      loss = lambda p, i, b, r, t=target: ((p["w"] - t)**2 * 0.0 + 0.0 * p["w"], {})
      net = dict(net, params={"w": jnp.asarray(target)})  # the params the EMA follows
      net, _, _, ok = upd(net, loss, None, {"x": jnp.zeros((1,))}, jax.random.key(0), n)
      decay = min(0.99, (1 + n) / (10 + n)) if warmup else 0.99
      want = decay * want + (1 - decay) * target
      assert bool(ok)
    np.testing.assert_allclose(float(net["ema"]["w"]), want, rtol=1e-5)
  assert abs(want - 30) > 10  # the plain EMA lags far behind; the warm-up one does not

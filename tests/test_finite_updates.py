"""No step commits a non-finite state, and no non-finite or float32-overflowing setting passes
validation (issue 26: ``lr=nan`` once saved NaN checkpoints and keep-N deleted the good ones)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdistill import experiment
from fdistill.optim import state as state_lib
from fdistill.optim import update
from support import toy


def quadratic(params, inputs, batch, rng):
  del inputs, rng
  value = jnp.sum((params["w"] - batch["x"])**2)
  return value, {}


def optim(lr, grad_clip=1.0):
  return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=0, grad_clip=grad_clip, b1=0.9,
                                        b2=0.999, eps=1e-8, weight_decay=0.0))


@pytest.mark.parametrize("lr, grad_clip", [(1e-2, 1.0), (float("nan"), 1.0), (float("inf"), 1.0),
                                           (1e39, 1.0), (1e-2, float("nan"))])
def test_an_update_whose_result_is_not_finite_is_skipped(lr, grad_clip):
  """Finite loss and gradients, but a learning rate (or clip) that makes the new params
  non-finite: the guard must see the result, skip the update and keep the state bit-for-bit."""
  tx = state_lib.make_optimizer(optim(lr, grad_clip))
  updater = update.Updater(tx=tx, ema_decay=0.9)
  net = state_lib.init_net_state({"w": jnp.ones((3,), jnp.float32)}, tx)
  new, loss, aux, ok = jax.jit(lambda s: updater(s, quadratic, None, {"x": jnp.zeros(3)},
                                                 jax.random.key(0)))(net)
  assert np.isfinite(float(loss)) and np.isfinite(float(aux["grad_norm"]))
  sane = np.isfinite(lr) and lr < 1e38 and np.isfinite(grad_clip)
  assert bool(ok) == sane
  assert state_lib.all_finite(new)
  moved = not np.array_equal(np.asarray(new["params"]["w"]), np.asarray(net["params"]["w"]))
  assert moved == sane


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", float("nan"), "optim.lr=nan must be a finite number"),
    ("optim.lr", float("inf"), "optim.lr=inf must be a finite number"),
    ("optim.lr", 1e39, "optim.lr=1e+39 must be a finite number within float32's range"),
    ("optim.grad_clip", float("nan"), "optim.grad_clip=nan must be a finite number"),
    ("optim.ema_decay", float("nan"), "optim.ema_decay=nan must be a finite number"),
    ("objective.sigma_min", 50.0, "objective.sigma_min=50.0 and sigma_max=10.0 must satisfy"),
    ("objective.p_std", -1.0, "objective.p_std=-1.0 must be > 0"),
    ("objective.ramp_min", 1.5, "objective.ramp_min=1.5 and ramp_max=1.0 must satisfy"),
    ("model.sigma_data", 0.0, "model.sigma_data=0.0 must be > 0"),
    ("objective.critic_noise.p_std", 0.0, "objective.critic_noise.p_std=0.0 must be > 0")])
def test_validation_rejects_non_finite_and_inconsistent_numbers(field, value, message):
  config = toy.tiny_uni_instruct_config("sid")
  experiment.validate(config)  # the unmodified config is valid
  section, key = field.rsplit(".", 1)
  target = config
  for part in section.split("."):
    target = target[part]
  target[key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
    experiment.validate(config)


def test_teacher_sigma_data_and_dsm_levels_are_checked():
  config = toy.tiny_teacher_config()
  experiment.validate(config)
  config.objective.p_std = -1.0
  with pytest.raises(ValueError, match="objective.p_std=-1.0 must be > 0"):
    experiment.validate(config)


def test_a_save_refuses_non_finite_state(tmp_path):
  """The checkpointer refuses a state with a NaN (nothing written, the older checkpoints kept)."""
  from fdistill import errors
  from fdistill.io import checkpoint
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
  good = {"w": jnp.ones((3,))}
  assert ckpt.save(1, good, good)
  with pytest.raises(errors.NonFiniteRunError, match="refusing to save step 2"):
    ckpt.save(2, {"w": jnp.array([1.0, jnp.nan, 0.0])}, good)
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_a_truncated_config_json_names_its_file(tmp_path):
  from fdistill.io import checkpoint
  (tmp_path / "config.json").write_text('{"seed": 0, "data": {"name": "to')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    checkpoint.load_config(str(tmp_path))

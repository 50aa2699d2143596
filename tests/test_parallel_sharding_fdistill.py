"""f-distill's step (generator then critic update) sharded over (data=2, fsdp=4) vs 1 device.

Its batch statistics (h(r) normalised by the global-batch mean, per-bin ratio
means) must be global: the equality of losses, metrics (ratio_mean, h_*) and
ratio bins with the 1-device run checks exactly that.
"""
import numpy as np

from fdistill.objectives import ratio
from support import sharding as checks


def test_fdistill_step_on_8_devices_equals_1_device():
  checks.check_step_on_8_devices_equals_1_device("fdistill")
  state, metrics = checks.stepped("fdistill", True)
  assert {"generator/h_mean", "generator/ratio_mean", "critic/disc_loss"} <= set(metrics)
  assert not np.allclose(state["ratio_bins"], 1.0)  # the bins were updated from the batch


def test_fdistill_state_is_really_sharded():
  checks.check_state_is_really_sharded("fdistill")


def test_fdistill_compiled_step_gathers_only_params_over_fsdp():
  # Each network's weights are used by both kinds of step (generator, critic).
  checks.check_gathers_only_params_over_fsdp("fdistill", uses_per_param=2)


def test_fdistill_sharded_step_arguments_use_less_memory_per_device():
  checks.check_sharded_arguments_use_less_memory("fdistill")


def test_fdistill_normaliser_over_a_sharded_batch_is_the_global_mean():
  import jax
  import jax.numpy as jnp
  from fdistill.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(checks.SHARDED_MESH)
  h = np.random.default_rng(0).uniform(0.1, 3.0, size=(checks.BATCH,)).astype(np.float32)
  sharded = mesh_lib.global_batch({"h": h}, mesh)["h"]
  out = jax.jit(ratio.normalise_by_batch_mean)(sharded)
  np.testing.assert_allclose(out, h / (h.mean() + 1e-6), rtol=1e-5)
  assert not jnp.allclose(out, h)  # a per-shard mean would give the same only by accident

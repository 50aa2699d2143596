"""Sharded training on 8 fake CPU devices: mesh, partition rules, step equivalence, HLO,
global batch statistics, gradient accumulation, mixed precision.

The central check (docs/design.md section 6): the assembly's steps (the programs the
training loop runs) on a 1-device mesh and on a (data=2, fsdp=4) mesh give the same
losses, params and optimizer state (tests/support/sharding.py; f-distill's in
test_parallel_sharding_fdistill.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fdistill import errors, models, objectives
from support import sharding as checks
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import partition
from fdistill.optim import update

BATCH = checks.BATCH
SHARDED_MESH = checks.SHARDED_MESH


# --- Mesh.

def test_resolve_axis_sizes_fills_the_remaining_devices():
  assert mesh_lib.resolve_axis_sizes([-1, 4, 1], 8) == [2, 4, 1]
  assert mesh_lib.resolve_axis_sizes([2, -1, 2], 8) == [2, 2, 2]
  with pytest.raises(ValueError, match="at most one axis"):
    mesh_lib.resolve_axis_sizes([-1, -1, 1], 8)
  with pytest.raises(ValueError, match="need 6 devices"):
    mesh_lib.resolve_axis_sizes([3, 2, 1], 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.resolve_axis_sizes([-1, 3, 1], 8)


@pytest.mark.parametrize("sizes, needles", [
    ([-1, 3, 1], ["mesh.fsdp=3", "8 devices are not divisible", "--config.mesh.fsdp=1"]),
    ([-1, -1, 1], ["mesh.data=-1, mesh.fsdp=-1", "at most one axis", "--config.mesh.fsdp=1"]),
    ([3, 2, 1], ["mesh.data=3, mesh.fsdp=2", "need 6 devices", "--config.mesh.data=-1"]),
    ([0, 1, 1], ["mesh.data=0 is not valid", "positive integer, or -1"]),
    ([-1, "2", 1], ["mesh.fsdp='2' is not valid"]),
])
def test_a_bad_mesh_names_its_field_and_the_accepted_values(sizes, needles):
  """Issue 23: the error names the ``mesh.*`` field, what is accepted and a fix."""
  with pytest.raises(errors.ConfigError) as raised:
    mesh_lib.resolve_axis_sizes(sizes, 8)
  for needle in needles:
    assert needle in str(raised.value)


def test_mesh_shapes_split_ici_and_dcn():
  """dcn sizes count slices; -1 resolves against the devices of one slice."""
  ici, dcn = mesh_lib.mesh_shapes(checks.mesh_section(data=1, fsdp=-1, dcn_data=4), 32)
  assert (ici, dcn) == ([1, 8, 1], [4, 1, 1])
  with pytest.raises(ValueError, match="slices"):
    mesh_lib.mesh_shapes(checks.mesh_section(dcn_data=3), 8)


def test_make_mesh_has_auto_axes_and_the_configured_shape():
  mesh = mesh_lib.make_mesh(checks.mesh_section(data=-1, fsdp=4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert mesh_lib.make_mesh(checks.mesh_section()).shape["data"] == 8
  with pytest.raises(ValueError, match="batch_size=12"):
    mesh_lib.check_batch_size(12, mesh)


@pytest.mark.parametrize("env, args, expected", [
    ({}, {}, None),
    ({}, {"mode": "on"}, {}),
    ({"SLURM_STEP_NUM_TASKS": "4"}, {}, {}),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "7"}, {}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, {}),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}, {}),
    ({"TPU_WORKER_HOSTNAMES": "a"}, {}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {"num_processes": 2, "process_id": 1},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({"FDISTILL_DISTRIBUTED": "1"}, {}, {}),
    ({"SLURM_STEP_NUM_TASKS": "4"}, {"mode": "off"}, None),
])
def test_distributed_kwargs_detects_launchers(env, args, expected):
  assert mesh_lib.distributed_kwargs(env=env, **args) == expected


# --- Partition rules.

def test_fsdp_spec_shards_the_largest_divisible_dimension():
  assert partition.fsdp_spec((256, 1024), 4, min_size=1) == P(None, "fsdp")
  assert partition.fsdp_spec((1024, 6, 256), 4, min_size=1) == P("fsdp")
  assert partition.fsdp_spec((512, 512), 4, min_size=1) == P(None, "fsdp")  # ties: the last
  assert partition.fsdp_spec((1026, 512), 4, min_size=1) == P(None, "fsdp")  # 1026 % 4 != 0
  assert partition.fsdp_spec((3, 5), 4, min_size=1) == P()
  assert partition.fsdp_spec((64,), 4, min_size=1024) == P()  # small: replicated
  assert partition.fsdp_spec((64, 64), 1, min_size=1) == P()


def test_rules_come_first_and_bad_rules_raise():
  mesh = mesh_lib.make_mesh(SHARDED_MESH)
  tree = {"a": {"kernel": jnp.zeros((8, 64))}, "b": jnp.zeros((64, 8)), "c": jnp.zeros((3,))}
  config = checks.mesh_section(rules=[("a/kernel", ("data", None))], fsdp_min_size=16)
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 partition.config_shardings(tree, mesh, config))
  assert specs == {"a": {"kernel": P("data", None)}, "b": P("fsdp"), "c": P()}
  with pytest.raises(ValueError, match="does not divide c"):
    partition.config_shardings(tree, mesh,
                               checks.mesh_section(rules=[("c", (("data", "fsdp"),))]))
  with pytest.raises(ValueError, match="more entries"):
    partition.config_shardings(tree, mesh, checks.mesh_section(rules=[("c", ("fsdp", None))]))


def test_gather_fsdp_constrains_only_fsdp_sharded_traces_and_can_be_switched_off():
  mesh = mesh_lib.make_mesh(SHARDED_MESH)
  x = jax.device_put(jnp.zeros((8, 16)), jax.sharding.NamedSharding(mesh, P(None, "fsdp")))
  # A new function each time: traces are cached per function, the switch is read when tracing.
  traced = lambda enabled: str(jax.make_jaxpr(lambda t: partition.gather_fsdp(t, enabled))(x))
  assert "sharding_constraint" in traced(True)
  assert "sharding_constraint" not in traced(False)
  assert "sharding_constraint" not in str(jax.make_jaxpr(partition.gather_fsdp)(jnp.zeros(3)))


# --- One DSM step on 1 device and on (data=2, fsdp=4) (f-distill: test_sharding_fdistill.py).

def test_dsm_step_on_8_devices_equals_1_device():
  checks.check_step_on_8_devices_equals_1_device("dsm")


def test_dsm_state_is_really_sharded():
  checks.check_state_is_really_sharded("dsm")


def test_dsm_compiled_step_gathers_only_params_over_fsdp():
  checks.check_gathers_only_params_over_fsdp("dsm")


def test_dsm_sharded_step_arguments_use_less_memory_per_device():
  checks.check_sharded_arguments_use_less_memory("dsm")


# --- Global batch statistics, gradient accumulation, mixed precision.

def test_batch_statistics_over_a_sharded_batch_are_global():
  """A jnp.mean inside a jitted function over a globally sharded batch is the full-batch mean:
  the DSM loss (a batch mean) and a normaliser h / mean(h) match the unsharded values."""
  from fdistill.objectives import dsm
  exp, _, batch = checks.compiled_steps("dsm", True)
  config = checks.dsm_config()
  loss = jax.jit(dsm.make_loss(models.make_denoiser(models.build(config.model))))
  params = checks.fresh_state(exp)["net"]["params"]
  host_params, host_batch = jax.device_get((params, batch))
  sharded = loss(params, None, batch, jax.random.key(3))[0]
  single = loss(host_params, None, host_batch, jax.random.key(3))[0]
  np.testing.assert_allclose(sharded, single, rtol=1e-6)
  h = jnp.sum(jnp.square(batch["x"]), axis=-1)
  normalised = jax.jit(lambda h: h / jnp.mean(h))(h)
  host_h = np.sum(np.square(host_batch["x"]), axis=-1)
  np.testing.assert_allclose(normalised, host_h / host_h.mean(), rtol=1e-5)


def _quadratic_loss(params, inputs, batch, rng):
  """Deterministic (ignores rng), so micro-batched and full-batch gradients must agree."""
  del inputs, rng
  err = jnp.mean(jnp.square(batch["x"] @ params["w"] + params["b"]), axis=-1)
  return jnp.mean(err), {"err_max": jnp.max(err)}


def test_gradient_accumulation_equals_the_full_batch_gradient():
  mesh = mesh_lib.make_mesh(SHARDED_MESH)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.ones((3,))}
  batch = mesh_lib.global_batch({"x": rng.normal(size=(BATCH, 4)).astype(np.float32)}, mesh)
  full, micro = [jax.jit(functools.partial(update.Updater(optax.identity(), micro_batches=m)
                                           .value_and_grad, _quadratic_loss))(
                                               params, None, batch, jax.random.key(0))
                 for m in (1, 4)]
  (loss_f, _), grads_f = full
  (loss_m, aux_m), grads_m = micro
  np.testing.assert_allclose(loss_m, loss_f, rtol=1e-6)
  for g_m, g_f in zip(jax.tree_util.tree_leaves(grads_m), jax.tree_util.tree_leaves(grads_f)):
    np.testing.assert_allclose(g_m, g_f, rtol=1e-5, atol=1e-7)
  assert "err_max" in aux_m
  split = update.split_micro_batches({"x": jnp.arange(8)}, 4)["x"]
  np.testing.assert_array_equal(split, [[0, 4], [1, 5], [2, 6], [3, 7]])
  with pytest.raises(ValueError, match="micro_batches=3"):
    update.split_micro_batches({"x": jnp.arange(8)}, 3)


def test_updater_accumulates_and_skips_nothing_when_finite():
  """An Updater with micro-batches applies the same Adam update as one full batch."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros((3,))}
  tx = optax.adam(1e-2)
  net = {"params": params, "opt_state": tx.init(params)}
  batch = {"x": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}
  one, four = jax.jit(lambda net, batch, rng: [
      update.Updater(tx, micro_batches=m)(net, _quadratic_loss, None, batch, rng)
      for m in (1, 4)])(net, batch, jax.random.key(0))
  assert bool(one[3]) and bool(four[3])
  for a, b in zip(jax.tree_util.tree_leaves(one[0]), jax.tree_util.tree_leaves(four[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_loss():
  """model.dtype=bfloat16: activations in bf16; params, optimizer state and loss in float32,
  and the loss close to the float32 model's on the same params."""
  config = checks.dsm_config()
  config.model.dtype = "bfloat16"
  config.teacher.kind = "none"
  objective = objectives.build(config, objectives.Task((2,)))
  exp, _, batch = checks.compiled_steps("dsm", False)
  state = jax.device_get(checks.fresh_state(exp))
  new_state, metrics = jax.jit(objective.steps["dsm"])(state, None, batch, jax.random.key(2))
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(new_state["net"])
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32
  ref = checks.stepped("dsm", False)[1]["dsm/loss"][0]  # float32 model, same params, batch and rng
  np.testing.assert_allclose(metrics["loss"], ref, rtol=3e-2)

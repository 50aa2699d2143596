"""The fused JVP kernel under a mesh (8 fake CPU devices, tests/conftest.py; kernel interpreted).

Attention never mixes examples or heads, so ``ops.attention`` runs the kernel
inside ``shard_map`` over the batch (and heads on a tensor axis). Checked: the
jitted, sharded jvp of the routed attention and a whole rCM student step (tiny
DiT) equal their one-device runs, and their compiled HLO moves no activation
between devices (no all-gather at all: the inputs arrive batch-sharded and the
params replicated); without ``shard_map`` XLA's partitioner gathers the
kernel's operands (the negative control).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import architectures
from fdistill import models, objectives
from fdistill.ops import attention as attention_lib
from fdistill.ops import flash_jvp_tpu
from fdistill.parallel import mesh as mesh_lib
from support import sharding as checks
import test_objectives_rcm as rcm_tests
import test_ops_attention as base
from test_ops_attention import highest_precision  # noqa: F401  (autouse fixture)


def test_kernel_mesh_axes_are_the_parallel_layers():
  assert attention_lib.BATCH_AXES == mesh_lib.BATCH_AXES
  assert attention_lib.HEAD_AXIS in mesh_lib.AXES
  assert attention_lib.HEAD_AXIS not in mesh_lib.BATCH_AXES


def _mesh(data, fsdp, tensor):
  return mesh_lib.make_mesh(checks.mesh_section(data=data, fsdp=fsdp, tensor=tensor))


def _all_gathers(compiled):
  return [c for c in checks.collectives(compiled.as_text()) if c[0] == "all-gather"]


def _sharded_jvp(mesh, args, mask):
  """jit of the routed jvp with q, k, v and tangents split over batch and heads."""
  routed, _ = base.routed_and_xla(mask)
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  placed = [jax.device_put(x, spec) for x in args]
  fn = jax.jit(lambda q, k, v, dq, dk, dv: jax.jvp(routed, (q, k, v), (dq, dk, dv)))
  return fn.lower(*placed).compile(), placed


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_sharded_kernel_equals_one_device_and_gathers_nothing(monkeypatch, platform):
  """Triton's kernel (what CPU routes to) and, with the backend reported as TPU, the Mosaic one
  (in the plain Pallas interpreter: see tests/test_ops_flash_jvp_tpu.py)."""
  if platform == "tpu":
    monkeypatch.setattr(attention_lib, "_platform", lambda: "tpu")
    monkeypatch.setattr(flash_jvp_tpu, "resolve_interpret", lambda interpret: True)
  args, mask = base.inputs(21, 4, 24, 40, 2, 16, jnp.float32, False)
  ref_out, ref_tangent = jax.jit(lambda *a: jax.jvp(base.routed_and_xla(mask)[0], a[:3], a[3:]))(
      *args)
  compiled, placed = _sharded_jvp(_mesh(2, 2, 2), args, mask)
  out, tangent = compiled(*placed)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  np.testing.assert_allclose(tangent, ref_tangent, atol=1e-6)
  assert tangent.sharding.spec[0] == ("data", "fsdp"), "the tangent left the batch sharding"
  assert _all_gathers(compiled) == []
  if platform == "tpu":
    return
  # Negative control: the kernel as a plain call on the mesh gets its operands gathered.
  monkeypatch.setattr(attention_lib, "_mesh_of", lambda x: None)
  assert _all_gathers(_sharded_jvp(_mesh(2, 2, 2), args, mask)[0])


def test_axes_that_do_not_divide_are_replicated():
  """Batch 2 on (data=2, fsdp=4): only data splits it; 3 heads on tensor=2: not split."""
  mesh = _mesh(2, 2, 2)
  assert attention_lib._dividing_axes(mesh, 2, attention_lib.BATCH_AXES) == ("data",)
  assert attention_lib._dividing_axes(mesh, 3, (attention_lib.HEAD_AXIS,)) == ()
  args, mask = base.inputs(22, 2, 16, 16, 3, 16, jnp.float32, True)
  routed, xla = base.routed_and_xla(mask)
  spec = NamedSharding(mesh, P("data"))
  fn = jax.jit(lambda *a: jax.jvp(routed, a[:3], a[3:]))
  out, tangent = fn(*[jax.device_put(x, spec) for x in args])
  ref_out, ref_tangent = jax.jit(lambda *a: jax.jvp(xla, a[:3], a[3:]))(*args)
  np.testing.assert_allclose(out, ref_out, atol=2e-6)
  np.testing.assert_allclose(tangent, ref_tangent, atol=2e-5)


def test_sharded_rcm_student_step_equals_one_device():
  """A whole rCM student step (sCM tangent pass with the kernel, loss, grad, update) of a tiny
  DiT, jitted on a (data=2, fsdp=4) mesh with the batch split, equals the one-device step and
  gathers no activation (the state is replicated here: FSDP's param gathers are
  tests/test_parallel_sharding.py's)."""
  model = architectures.tiny_dit()
  model.update(dict(label_dim=0, dropout=0.0, attn_impl="flash_jvp", depth=1))
  config = rcm_tests.tiny_config("scm")
  config.model = model
  config.teacher.kind = "checkpoint"
  x_shape = (8, 8, 3)
  module = models.build(model)
  teacher_apply = models.make_denoiser(module.clone(attn_impl="xla"), rcm_tests.SD)
  init = jax.jit(lambda key: models.init_params(module, key, (1,) + x_shape))
  teacher = base._perturbed(init(jax.random.key(0)), 2)
  obj = objectives.build(config, objectives.Task(x_shape, 0, teacher_apply, teacher))
  state = jax.jit(obj.init)(jax.random.key(1), teacher)
  batch = {"x": jnp.asarray(np.random.default_rng(24).standard_normal((8,) + x_shape),
                            jnp.float32)}
  step = jax.jit(obj.steps["generator"])
  ref_state, ref_metrics = step(state, teacher, batch, jax.random.key(3))

  mesh = _mesh(2, 4, 1)
  replicated = NamedSharding(mesh, P())
  args = (jax.device_put(state, replicated), jax.device_put(teacher, replicated),
          jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp")))), jax.random.key(3))
  compiled = step.lower(*args).compile()
  new_state, metrics = compiled(*args)
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
  for leaf, ref in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(leaf, ref, rtol=2e-5, atol=2e-6)
  assert _all_gathers(compiled) == [], "activations were gathered"

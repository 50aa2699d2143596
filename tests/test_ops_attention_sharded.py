"""The fused JVP kernel under a mesh (8 fake CPU devices, tests/conftest.py; kernel interpreted).

Attention never mixes examples or heads, so ``ops.attention`` runs the kernel
inside ``shard_map`` over the batch (and heads on a tensor axis). Checked: a
jitted, sharded tangent pass equals the one-device one, and its compiled HLO
moves no activation between devices (no all-gather at all: the inputs arrive
batch-sharded and the params replicated); without ``shard_map`` XLA's
partitioner gathers the kernel's operands (the negative control).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fdistill import models
from fdistill.ops import attention as attention_lib
from fdistill.ops import flash_jvp_tpu
from fdistill.parallel import mesh as mesh_lib
from support import sharding as checks
import test_ops_attention as base


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


def test_sharded_dit_tangent_pass_and_grad_equal_one_device():
  """rCM's two network passes on a (data=2, fsdp=4) mesh, batch-sharded: the tangent pass
  (jvp at stop_gradient(params), kernel under shard_map) and the gradient."""
  rng = np.random.default_rng(23)
  x, dx = (jnp.asarray(rng.standard_normal((8, 8, 8, 3)), jnp.float32) for _ in range(2))
  sigma, dsigma = (jnp.asarray(rng.uniform(0.2, 2.0, 8), jnp.float32) for _ in range(2))
  dit = base._tiny_dit("flash_jvp")
  params = base._perturbed(jax.jit(lambda key: models.init_params(dit, key, x.shape))(
      jax.random.PRNGKey(0)), 1)
  denoise = models.make_denoiser(dit)

  def passes(p, x, dx, sigma, dsigma):
    frozen = jax.lax.stop_gradient(p)
    out, tangent = jax.jvp(lambda x, s: denoise(frozen, x, s), (x, sigma), (dx, dsigma))
    grad = jax.grad(lambda p: jnp.mean((denoise(p, x, sigma) - out - 0.1 * tangent)**2))(p)
    return tangent, grad

  step = jax.jit(passes)
  ref_tangent, ref_grad = step(params, x, dx, sigma, dsigma)
  mesh = _mesh(2, 4, 1)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  placed = [jax.device_put(a, batch) for a in (x, dx, sigma, dsigma)]
  compiled = step.lower(jax.device_put(params, NamedSharding(mesh, P())), *placed).compile()
  tangent, grad = compiled(jax.device_put(params, NamedSharding(mesh, P())), *placed)
  assert base.rel_l2(tangent, np.asarray(ref_tangent, np.float64)) < 1e-5
  for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)
  assert _all_gathers(compiled) == [], "activations were gathered"

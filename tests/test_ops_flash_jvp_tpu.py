"""The TPU (Mosaic) fused JVP attention kernel, in TPU interpret mode on CPU, and its lowering.

Interpret mode (``pltpu.InterpretParams``) simulates the TPU's memories and fills
fresh buffers with NaN: rows of a partial edge block that the kernel reads
past the end of an array, and output tiles it never writes, come out NaN, so
the ragged cases check the masking and the finiteness checks the stores.
References are the float64 closed form of tests/test_ops_attention.py.
What interpret mode cannot show (Mosaic's compiler accepting every op, speed)
needs a TPU: docs/kernels.md.
"""
import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill.ops import attention as attention_lib
from fdistill.ops import flash_jvp_tpu
import test_ops_attention as base
from test_ops_attention import highest_precision  # noqa: F401  (autouse fixture)

# Relative L2 error bounds against float64 (as for the Triton kernel).
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 5e-3}
_BLOCKS = flash_jvp_tpu.TpuConfig(128, 128)


def _check_against_float64(res, args, mask, scale, dtype):
  for x in res:
    if x is not None:
      assert np.isfinite(np.asarray(x, np.float32)).all(), "NaN: a tile unwritten or unmasked"
  out, tangent, lse = base.reference(*args, mask, scale)
  assert base.rel_l2(res.out, out) < _TOL[dtype]
  if res.tangent is not None:
    assert base.rel_l2(res.tangent, tangent) < _TOL[dtype]
  np.testing.assert_allclose(np.asarray(res.lse), lse, atol=1e-4)


# batch, sq, skv, heads, dim, dtype, masked
@pytest.mark.parametrize("batch,sq,skv,heads,dim,dtype,masked", [
    pytest.param(1, 128, 128, 2, 128, jnp.float32, False, id="aligned-f32-d128"),
    pytest.param(1, 200, 130, 1, 64, jnp.float32, True, id="ragged-mask-f32-d64"),
    pytest.param(2, 100, 256, 1, 32, jnp.bfloat16, True, id="cross-mask-bf16-d32"),
    pytest.param(1, 150, 150, 2, 128, jnp.bfloat16, False, id="ragged-bf16-d128"),
])
def test_tpu_kernel_matches_float64(batch, sq, skv, heads, dim, dtype, masked):
  args, mask = base.inputs(sq + skv + dim, batch, sq, skv, heads, dim, dtype, masked)
  scale = 0.7 * dim**-0.5
  res = jax.jit(lambda *a: flash_jvp_tpu.flash_attention_jvp(
      *a, mask=mask, scale=scale, config=_BLOCKS))(*args)
  _check_against_float64(res, args, mask, scale, dtype)


@pytest.mark.parametrize("present", [(True, False, False), (False, True, True),
                                     (False, False, False)], ids=["dq-only", "dk-dv", "none"])
def test_tpu_kernel_skips_absent_tangents(present):
  """None tangents are zero and skip their matmuls; with none the kernel is a forward."""
  (q, k, v, *tangents), mask = base.inputs(5, 1, 70, 140, 1, 32, jnp.float32, True)
  given = [t if p else None for t, p in zip(tangents, present)]
  zeros = [t if p else jnp.zeros_like(t) for t, p in zip(tangents, present)]
  res = flash_jvp_tpu.flash_attention_jvp(q, k, v, *given, mask=mask, config=_BLOCKS)
  assert (res.tangent is None) == (not any(present))
  _check_against_float64(res, (q, k, v, *zeros), mask, 32**-0.5, jnp.float32)


def test_routed_attention_on_the_tpu_path_matches_xla(monkeypatch):
  """impl="flash_jvp" with the backend reported as TPU: jvp runs the Mosaic kernel (interpreted
  here), grad the XLA backward, and both equal XLA attention's.

  The kernel runs in Pallas' plain interpreter here: TPU interpret mode's ordered IO
  callbacks cannot be lowered inside ``linear_call`` (JAX raises KeyError: OrderedIOEffect)."""
  monkeypatch.setattr(attention_lib, "_platform", lambda: "tpu")
  monkeypatch.setattr(flash_jvp_tpu, "resolve_interpret", lambda interpret: True)
  (q, k, v, *tangents), mask = base.inputs(16, 2, 40, 60, 2, 32, jnp.float32, True)
  routed, xla = base.routed_and_xla(mask)
  jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))
  out, tangent = jvp(routed)((q, k, v), tuple(tangents))
  ref_out, ref_tangent = jvp(xla)((q, k, v), tuple(tangents))
  np.testing.assert_allclose(out, ref_out, atol=2e-6)
  np.testing.assert_allclose(tangent, ref_tangent, atol=2e-5)
  jaxpr = str(jax.make_jaxpr(lambda p, t: jax.jvp(routed, p, t))((q, k, v), tuple(tangents)))
  assert "flash_attention_jvp_tpu" in jaxpr
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  grads = jax.jit(jax.grad(loss(routed), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(g, r, atol=1e-5)
  assert "pallas_call" not in str(jax.make_jaxpr(jax.grad(loss(routed)))(q, k, v))
  assert "custom_jvp" in str(jax.make_jaxpr(lambda q: attention_lib.attention(
      q, k, v, impl="auto"))(q)), "auto must route to flash_jvp on TPU"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("tangents", [(True, True, True), (True, False, False)],
                         ids=["all-tangents", "dq-only"])
def test_tpu_kernel_lowers_to_mosaic_without_a_tpu(monkeypatch, dtype, tangents):
  """Export for TPU runs the Pallas -> Mosaic lowering (block shapes checked against the
  (8, 128) tiling, every op lowered); Mosaic's own compiler runs only on a TPU."""
  monkeypatch.setattr(flash_jvp_tpu, "resolve_interpret", lambda interpret: False)
  q = jax.ShapeDtypeStruct((2, 300, 4, 64), dtype)
  k = jax.ShapeDtypeStruct((2, 200, 4, 64), dtype)
  mask = jax.ShapeDtypeStruct((2, 200), jnp.bool_)

  def fused(q, k, v, dq, dk, dv, mask):
    given = [t if p else None for t, p in zip((dq, dk, dv), tangents)]
    return flash_jvp_tpu.flash_attention_jvp(q, k, v, *given, mask=mask)

  exported = export.export(jax.jit(fused), platforms=["tpu"])(q, k, k, q, k, k, mask)
  assert "tpu_custom_call" in exported.mlir_module()


def test_tpu_kernel_errors():
  q = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="TpuConfig.block_k must be a positive multiple of 128"):
    flash_jvp_tpu.TpuConfig(128, 64)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    flash_jvp_tpu.flash_attention_jvp(q.astype(jnp.float16), q, q)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a TPU"):
      flash_jvp_tpu.flash_attention_jvp(q, q, q, interpret=False)

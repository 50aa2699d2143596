"""The fused JVP attention kernel (interpret mode on CPU) and the attention routing.

Kernel outputs are checked against an independent float64 NumPy reference and
against ``jax.jvp`` of plain XLA attention, on freshly drawn inputs, with the
output buffers pre-filled with NaN so a tile the kernel never writes shows.
"""
import jax
from jax import export
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import models
from fdistill.ops import attention as attention_lib
from fdistill.ops import flash_jvp

@pytest.fixture(autouse=True)
def highest_precision():
  """XLA references at full fp32 (GPUs default to TF32, TPUs to bf16 passes), so a test sees
  the kernel's own error, not the reference's (the kernels run fp32 dots at HIGHEST)."""
  with jax.default_matmul_precision("highest"):
    yield


# Relative L2 error bounds against the float64 reference (the targets
# for bf16 and fp32; fp16 has 3 more mantissa bits than bf16).
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 5e-3, jnp.float16: 1e-3}


def reference(q, k, v, dq, dk, dv, mask, scale):
  """O, dO, LSE in float64 from the closed form (not from the kernel's recurrences)."""
  q, k, v, dq, dk, dv = (np.asarray(x, np.float64) for x in (q, k, v, dq, dk, dv))
  s = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
  ds = scale * (np.einsum("bqhd,bkhd->bhqk", dq, k) + np.einsum("bqhd,bkhd->bhqk", q, dk))
  if mask is not None:
    s = np.where(np.asarray(mask)[:, None, None, :], s, -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.exp(s - m)
  lse = (m + np.log(e.sum(-1, keepdims=True)))[..., 0]
  p = e / e.sum(-1, keepdims=True)
  dp = p * (ds - (p * ds).sum(-1, keepdims=True))
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  tangent = np.einsum("bhqk,bkhd->bqhd", dp, v) + np.einsum("bhqk,bkhd->bqhd", p, dv)
  return out, tangent, lse


def rel_l2(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def inputs(seed, batch, sq, skv, heads, dim, dtype, masked):
  rng = np.random.default_rng(seed)
  shapes = [(batch, s, heads, dim) for s in (sq, skv, skv, sq, skv, skv)]
  q, k, v, dq, dk, dv = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
  mask = None
  if masked:
    keep = rng.random((batch, skv)) > 0.3
    keep[:, 0] = True  # every query row keeps at least one key
    mask = jnp.asarray(keep)
  return (q, k, v, dq, dk, dv), mask


def _poisoned(q, tangent=True):
  """NaN-filled output buffers (out, [tangent], lse) for the kernel to write into."""
  b, sq, h, _ = q.shape
  bufs = [jnp.full(q.shape, jnp.nan, q.dtype)] * (2 if tangent else 1)
  return tuple(bufs) + (jnp.full((b, h, sq), jnp.nan, jnp.float32),)


# batch, sq, skv, heads, dim, dtype, masked, (block_q, block_k)
KERNEL_CASES = [
    pytest.param(2, 64, 64, 2, 64, jnp.float32, False, (32, 32), id="aligned-f32-d64"),
    pytest.param(1, 50, 50, 2, 32, jnp.float32, True, (16, 16), id="ragged-mask-f32-d32"),
    pytest.param(2, 37, 75, 1, 48, jnp.bfloat16, True, (16, 32), id="cross-mask-bf16-d48"),
    pytest.param(1, 24, 40, 2, 128, jnp.float16, False, (16, 16), id="cross-f16-d128"),
    pytest.param(1, 90, 90, 2, 64, jnp.bfloat16, False, (32, 32), id="ragged-bf16-d64"),
]


@pytest.mark.parametrize("batch,sq,skv,heads,dim,dtype,masked,blocks", KERNEL_CASES)
def test_kernel_matches_float64_and_xla_jvp(batch, sq, skv, heads, dim, dtype, masked, blocks):
  (q, k, v, dq, dk, dv), mask = inputs(sq * dim + skv, batch, sq, skv, heads, dim, dtype, masked)
  scale = 0.7 * dim**-0.5
  config = flash_jvp.KernelConfig(*blocks)
  run = jax.jit(lambda *a: flash_jvp.flash_attention_jvp(
      *a, mask=mask, scale=scale, config=config, out_init=_poisoned(q)))
  res = run(q, k, v, dq, dk, dv)
  for x in res:
    assert np.isfinite(np.asarray(x, np.float32)).all(), "a tile was left unwritten (NaN)"
  out, tangent, lse = reference(q, k, v, dq, dk, dv, mask, scale)
  tol = _TOL[dtype]
  assert rel_l2(res.out, out) < tol
  assert rel_l2(res.tangent, tangent) < tol
  np.testing.assert_allclose(np.asarray(res.lse), lse, atol=1e-4)
  # And against jax.jvp of the XLA attention, which rounds differently.
  xla_out, xla_tangent = jax.jvp(
      lambda q, k, v: attention_lib.xla_attention(q, k, v, mask=mask, scale=scale),
      (q, k, v), (dq, dk, dv))
  assert rel_l2(res.out, np.asarray(xla_out, np.float64)) < 4 * tol
  assert rel_l2(res.tangent, np.asarray(xla_tangent.astype(jnp.float32), np.float64)) < 4 * tol


@pytest.mark.parametrize("present", [(True, False, False), (False, False, True)],
                         ids=["dq-only", "dv-only"])
def test_kernel_skips_absent_tangents(present):
  """None tangents are zero: cross-attention to constant K/V has only dq."""
  (q, k, v, *tangents), mask = inputs(7, 1, 33, 20, 2, 32, jnp.float32, True)
  given = [t if p else None for t, p in zip(tangents, present)]
  zeros = [t if p else jnp.zeros_like(t) for t, p in zip(tangents, present)]
  config = flash_jvp.KernelConfig(16, 16)
  res = flash_jvp.flash_attention_jvp(q, k, v, *given, mask=mask, config=config,
                                      out_init=_poisoned(q))
  out, tangent, _ = reference(q, k, v, *zeros, mask, 32**-0.5)
  assert rel_l2(res.out, out) < 1e-5
  assert rel_l2(res.tangent, tangent) < 1e-5


def test_forward_only_kernel():
  (q, k, v, *tangents), _ = inputs(3, 1, 40, 40, 1, 64, jnp.float32, False)
  out, lse = flash_jvp.flash_attention(q, k, v, config=flash_jvp.KernelConfig(16, 16))
  ref_out, _, ref_lse = reference(q, k, v, *tangents, None, 64**-0.5)
  assert rel_l2(out, ref_out) < 1e-5
  np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-5)


def test_poisoned_buffers_show_unwritten_tiles():
  """The NaN pre-fill is a real check: a kernel that skips its second tile fails it."""
  (q, *_), _ = inputs(4, 1, 32, 32, 1, 16, jnp.float32, False)

  def first_tile_only(q_ref, init_ref, o_ref):
    del init_ref

    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = q_ref[...]

  spec = pl.BlockSpec((None, 16, None, 16), lambda i: (0, i, 0, 0))
  out = pl.pallas_call(first_tile_only, grid=(2,), in_specs=[spec, spec], out_specs=spec,
                       out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                       input_output_aliases={1: 0}, interpret=True)(q, _poisoned(q, False)[0])
  assert np.isfinite(np.asarray(out[:, :16])).all()
  assert np.isnan(np.asarray(out[:, 16:])).all()


@pytest.mark.parametrize("tangents", [(True, True, True), (True, False, False)],
                         ids=["all-tangents", "dq-only"])
def test_kernel_lowers_to_triton_for_gpu(monkeypatch, tangents):
  """Without a GPU, cross-lower the compiled (non-interpret) path for CUDA.

  This runs the Pallas Triton lowering (power-of-two tiles, masked ragged
  loads, padded head dim), which interpret mode never exercises.
  """
  monkeypatch.setattr(flash_jvp, "resolve_interpret", lambda interpret: False)
  q = jax.ShapeDtypeStruct((2, 100, 4, 80), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 77, 4, 80), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 77), jnp.bool_)

  def fused(q, k, v, dq, dk, dv, mask):
    given = [t if p else None for t, p in zip((dq, dk, dv), tangents)]
    return flash_jvp.flash_attention_jvp(q, k, v, *given, mask=mask,
                                         config=flash_jvp.KernelConfig(64, 32))

  exported = export.export(
      jax.jit(fused), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(q, k, k, q, k, k, mask)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_default_tiles_fit_shared_memory(dtype):
  """Every default fits an H100/H200's 227 KiB by the kernel's shared-memory model, which
  reproduces the overflow measured on an H200 (fp32, D = 64, (128, 64, 4, 3): 256 KiB)."""
  assert flash_jvp.shared_memory_bytes(flash_jvp.KernelConfig(128, 64, 4, 3), 64,
                                       jnp.float32) == 256 * 1024
  for head_dim in range(16, flash_jvp.MAX_HEAD_DIM + 1, 16):
    config = flash_jvp.default_config(head_dim, dtype)
    used = flash_jvp.shared_memory_bytes(config, head_dim, dtype)
    assert used <= flash_jvp.SHARED_MEMORY_BYTES, (head_dim, config, used)
  with pytest.raises(ValueError, match="head dims up to 256"):
    flash_jvp.default_config(288, dtype)


# ---------------------------------------------------------------------------
# Routing: impl="flash_jvp" is a custom_jvp whose tangent is the kernel and
# whose gradient is the differentiable fast path.


def routed_and_xla(mask, scale=None):
  def make(impl):
    return lambda q, k, v: attention_lib.attention(q, k, v, impl=impl, mask=mask, scale=scale)
  return make("flash_jvp"), make("xla")


def test_routed_jvp_uses_kernel_and_matches_xla():
  (q, k, v, *tangents), mask = inputs(11, 2, 21, 30, 2, 32, jnp.float32, True)
  routed, xla = routed_and_xla(mask)
  jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))
  out, tangent = jvp(routed)((q, k, v), tuple(tangents))
  ref_out, ref_tangent = jvp(xla)((q, k, v), tuple(tangents))
  np.testing.assert_allclose(out, ref_out, atol=2e-6)
  np.testing.assert_allclose(tangent, ref_tangent, atol=2e-5)
  assert "pallas_call" in str(jax.make_jaxpr(lambda p, t: jax.jvp(routed, p, t))(
      (q, k, v), tuple(tangents)))


def test_routed_grad_uses_differentiable_path_and_matches_xla():
  (q, k, v, *_), mask = inputs(12, 2, 21, 30, 2, 32, jnp.float32, True)
  routed, xla = routed_and_xla(mask)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  grads = jax.jit(jax.grad(loss(routed), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(g, r, atol=1e-5)
  # The kernel has no transpose: it must not appear in the gradient's program.
  assert "pallas_call" not in str(jax.make_jaxpr(jax.grad(loss(routed)))(q, k, v))
  # Gradients with respect to a subset of inputs (others are symbolic zeros).
  gk = jax.jit(jax.grad(loss(routed), argnums=1))(q, k, v)
  np.testing.assert_allclose(gk, ref[1], atol=1e-5)


def test_stop_gradient_jvp_inside_grad_like_rcm():
  """rCM's loss: a jvp at stop_gradient(params) feeding a target, differentiated by grad."""
  (q, k, v, dq, *_), mask = inputs(13, 1, 16, 16, 2, 16, jnp.float32, False)
  routed, xla = routed_and_xla(mask)

  def loss(f):
    def fn(w):
      frozen = jax.lax.stop_gradient(w)
      _, tangent = jax.jvp(lambda q: f(q, k * frozen, v), (q,), (dq,))
      return jnp.sum(f(q, k * w, v) * jax.lax.stop_gradient(tangent))
    return fn

  g = jax.jit(jax.grad(loss(routed)))(1.3)
  np.testing.assert_allclose(g, jax.jit(jax.grad(loss(xla)))(1.3), rtol=1e-5)


def test_impl_errors():
  q = jnp.zeros((1, 4, 1, 16))
  with pytest.raises(ValueError, match="valid values: xla, cudnn, flash_jvp, auto"):
    attention_lib.attention(q, q, q, impl="flash")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      attention_lib.attention(q, q, q, impl="cudnn")
    with pytest.raises(ValueError, match="Pallas Triton backend"):
      flash_jvp.flash_attention(q, q, q, interpret=False)
  with pytest.raises(ValueError, match="power of two"):
    flash_jvp.KernelConfig(48, 32)
  with pytest.raises(ValueError, match="multiple of 16"):
    flash_jvp.flash_attention(q[..., :8], q[..., :8], q[..., :8])


def test_auto_is_flash_jvp_on_gpu_and_xla_elsewhere():
  (q, k, v, *_), _ = inputs(14, 1, 8, 8, 1, 16, jnp.float32, False)
  jaxpr = str(jax.make_jaxpr(lambda q: attention_lib.attention(q, k, v, impl="auto"))(q))
  assert ("custom_jvp" in jaxpr) == (jax.default_backend() == "gpu")


# ---------------------------------------------------------------------------
# A whole model: the tangent pass (jvp at stop_gradient(params)) of a DiT with
# the routed attention matches the XLA-attention DiT, and so does its gradient.


def _tiny_dit(attn_impl):
  return models.dit.DiT(img_resolution=8, in_channels=3, label_dim=0, patch_size=2,
                        hidden_size=32, depth=1, num_heads=2, noise_channels=32,
                        attn_impl=attn_impl)


def _perturbed(params, seed):
  """adaLN-zero starts every block as the identity; random params make attention matter."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda p: p + 0.2 * rng.standard_normal(p.shape, np.float32),
                                params)


def test_dit_tangent_pass_and_grad_match_xla_dit():
  rng = np.random.default_rng(15)
  x, dx = (jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32) for _ in range(2))
  sigma, dsigma = jnp.asarray([0.5, 2.0]), jnp.asarray([0.3, -0.1])
  init = jax.jit(lambda key: models.init_params(_tiny_dit("xla"), key, x.shape))
  params = _perturbed(init(jax.random.PRNGKey(0)), 1)

  def tangent_pass(impl):
    denoise = models.make_denoiser(_tiny_dit(impl))
    fn = lambda p, x, s: denoise(jax.lax.stop_gradient(p), x, s)
    return jax.jit(lambda p: jax.jvp(lambda x, s: fn(p, x, s), (x, sigma), (dx, dsigma)))(params)

  out, tangent = tangent_pass("flash_jvp")
  ref_out, ref_tangent = tangent_pass("xla")
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  assert rel_l2(tangent, np.asarray(ref_tangent, np.float64)) < 1e-5

  def param_grad(impl):
    denoise = models.make_denoiser(_tiny_dit(impl))
    return jax.jit(jax.grad(lambda p: jnp.mean(denoise(p, x, sigma)**2)))(params)

  for g, r in zip(jax.tree_util.tree_leaves(param_grad("flash_jvp")),
                  jax.tree_util.tree_leaves(param_grad("xla"))):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)

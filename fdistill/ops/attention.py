"""The one attention entry point every model calls.

``attention(q, k, v, impl=..., mask=None, scale=None)`` with q [B, Sq, H, D],
k/v [B, Skv, H, D] and an optional key-padding mask [B, Skv] (True = keep).
Returns [B, Sq, H, D] in q's dtype.

impl:
  "xla"       - plain softmax(QK^T)V; differentiable in both modes, but
                materialises the [B, H, Sq, Skv] matrix (and jax.jvp of it
                materialises two).
  "cudnn"     - jax.nn.dot_product_attention(implementation="cudnn"); GPU
                only, bf16/fp16. A custom_vjp function: jax.jvp of it raises.
  "flash_jvp" - the routed attention below: fast forward, fused Pallas JVP
                (ops/flash_jvp.py), fast gradient. GPU, or CPU in Pallas
                interpret mode (slow; tests).
  "auto"      - "flash_jvp" on GPU, "xla" elsewhere: what model configs
                should set so one setting serves CPU tests and GPU runs.

Routing (docs/design.md section 5). rCM needs two things from one network:
forward-mode tangents (``jax.jvp`` at stop_gradient(params), the tangent pass)
and reverse-mode gradients (``jax.grad`` of the loss). No single JAX primitive
gives both fast: the fast kernels are ``custom_vjp`` (jvp raises) and the
fused Pallas kernel has a JVP but no transpose. "flash_jvp" is therefore a
``jax.custom_jvp`` function whose

  * primal is the differentiable fast forward: cuDNN on GPU for bf16/fp16,
    XLA otherwise;
  * tangent is the fused kernel, wrapped in ``jax.custom_derivatives.linear_call``
    to declare it linear in (dq, dk, dv) and to give it a transpose: the VJP of
    that same fast forward (``jax.vjp`` taken in the JVP rule, so the
    transpose reuses its residuals and cuDNN's forward runs once).

So ``jax.jvp`` runs fast forward + fused kernel, and ``jax.grad`` (which
linearises the JVP rule and transposes it) runs fast forward + the fast
path's backward; the kernel does not run under grad (the transpose replaces
it, see tests/test_ops_attention.py). A model
built with attn_impl="auto" serves both passes and needs no per-pass switch;
a jvp taken under stop_gradient inside a jax.grad also works (rCM's loss).
Zero tangents arrive as symbolic zeros and skip their matmuls in the kernel
(e.g. cross-attention K/V from a constant text embedding).

Costs and limits: under jax.jvp the primal is a second forward next to the
kernel (which computes O too): about 4/3 of the ideal cost, the price of a
primal that grad can differentiate. ``jax.vmap`` of a jvp or grad through it
raises (``linear_call`` has no batching rule); models batch explicitly, and
plain vmap of the forward works. The Triton kernel is an opaque custom call
to XLA's SPMD partitioner, so under a multi-GPU mesh it should run inside
``shard_map`` over the batch axis (not done yet). cuDNN turns the mask into
per-example key lengths, so on GPU a mask must be a prefix (padding at the
end); the XLA and Pallas paths accept any mask.
"""
import functools

import jax
from jax.custom_derivatives import SymbolicZero, linear_call
import jax.numpy as jnp

from fdistill.ops import flash_jvp

IMPLS = ("xla", "cudnn", "flash_jvp", "auto")


def _scale(q, scale):
  return q.shape[-1]**-0.5 if scale is None else scale


def _on_gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def xla_attention(q, k, v, mask=None, scale=None):
  """Reference attention in fp32 softmax; materialises the [B, H, Sq, Skv] matrix."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * _scale(q, scale)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _cudnn_attention(q, k, v, mask=None, scale=None):
  if not _on_gpu():
    raise ValueError(
        f"attention impl='cudnn' needs a GPU backend, found {jax.default_backend()!r}; "
        f"valid impls here: 'xla', 'auto' (and 'flash_jvp' on CPU, interpreted)")
  kv_len = None if mask is None else jnp.sum(mask, axis=-1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=_scale(q, scale), key_value_seq_lengths=kv_len,
      implementation="cudnn")


def _fast_forward(dtype):
  """The fastest differentiable attention here: cuDNN (GPU, half precision) or XLA."""
  if _on_gpu() and dtype in (jnp.bfloat16, jnp.float16):
    return _cudnn_attention
  return xla_attention


def _linear_tangent(present, scale):
  """The kernel's dO as a linear function of the present tangents, and its transpose.

  ``present`` is a static (dq?, dk?, dv?) triple; absent tangents are zero.
  Residuals are (q, k, v, mask, fast_vjp); the transpose is the fast path's VJP.
  """

  def tangent(res, lin):
    q, k, v, mask, _ = res
    lin = iter(lin)
    dq, dk, dv = (next(lin) if p else None for p in present)
    return flash_jvp.flash_attention_jvp(q, k, v, dq, dk, dv, mask=mask, scale=scale).tangent

  def transpose(res, ct):
    grads = res[-1](ct)
    return tuple(g for g, p in zip(grads, present) if p)

  return tangent, transpose


def _flash_jvp_attention(q, k, v, mask=None, scale=None):
  """custom_jvp attention: fast primal, fused Pallas tangent, fast-path gradient."""
  scale = _scale(q, scale)
  forward = functools.partial(_fast_forward(q.dtype), mask=mask, scale=scale)
  # Validates the backend now rather than inside the JVP rule.
  flash_jvp.resolve_interpret(None)

  @jax.custom_jvp
  def routed(q, k, v):
    return forward(q, k, v)

  def routed_jvp(primals, tangents):
    out, fast_vjp = jax.vjp(forward, *primals)
    present = tuple(not isinstance(t, SymbolicZero) for t in tangents)
    if not any(present):
      return out, jnp.zeros_like(out)
    lin = tuple(t for t in tangents if not isinstance(t, SymbolicZero))
    tangent, transpose = _linear_tangent(present, scale)
    return out, linear_call(tangent, transpose, (*primals, mask, fast_vjp), lin)

  routed.defjvp(routed_jvp, symbolic_zeros=True)
  return routed(q, k, v)


def _auto_attention(q, k, v, mask=None, scale=None):
  impl = _flash_jvp_attention if _on_gpu() else xla_attention
  return impl(q, k, v, mask=mask, scale=scale)


_IMPLS = {
    "xla": xla_attention,
    "cudnn": _cudnn_attention,
    "flash_jvp": _flash_jvp_attention,
    "auto": _auto_attention,
}


def attention(q, k, v, impl="xla", mask=None, scale=None):
  """Dispatches to the named implementation; unknown names list the valid ones."""
  if impl not in _IMPLS:
    raise ValueError(f"Unknown attention impl={impl!r}; valid values: {', '.join(_IMPLS)}")
  return _IMPLS[impl](q, k, v, mask=mask, scale=scale)

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
                (ops/flash_jvp.py on GPU, ops/flash_jvp_tpu.py on TPU), fast
                gradient; CPU runs the Triton kernel in Pallas interpret mode
                (slow; tests).
  "auto"      - "flash_jvp" on GPU and TPU, "xla" elsewhere: what model configs
                should set so one setting serves CPU tests and accelerator runs.

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
plain vmap of the forward works. cuDNN turns the mask into per-example key
lengths, so on GPU a mask must be a prefix (padding at the end); the XLA and
Pallas paths accept any mask.

Meshes: a Pallas kernel is an opaque custom call to XLA's SPMD partitioner,
which would gather its operands onto every device. When the inputs live on a
mesh (``jax.typeof(q).sharding.mesh``, as inside a jitted sharded step), the
kernel runs inside ``jax.shard_map``: batch split over the data-parallel axes
(``BATCH_AXES``), heads over ``HEAD_AXIS`` where a tensor axis shards them,
each device running the kernel on its own examples and heads (attention never
mixes examples or heads). An axis whose size does not divide the batch (or
the heads) is left out, i.e. that dimension is replicated over it.
"""
import functools

import jax
from jax.custom_derivatives import SymbolicZero, linear_call
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fdistill.ops import flash_jvp
from fdistill.ops import flash_jvp_tpu
from fdistill.errors import ConfigError

# The mesh axes the kernel splits batch and heads over: the names parallel/mesh.py
# gives them (ops may not import parallel; tests/test_ops_attention_sharded.py
# checks that they agree).
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _scale(q, scale):
  return q.shape[-1]**-0.5 if scale is None else scale


def _platform() -> str:
  return jax.default_backend()


def _on_gpu() -> bool:
  return _platform() in ("gpu", "cuda", "rocm")


def _jvp_kernel():
  """This backend's fused kernel (Mosaic on TPU, Triton elsewhere), its backend checked now."""
  module = flash_jvp_tpu if _platform() == "tpu" else flash_jvp
  module.resolve_interpret(None)
  return module.flash_attention_jvp


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
    raise ConfigError(
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


def _mesh_of(x):
  """The (abstract) mesh ``x`` lives on when it spans more than one device, else None."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  return mesh


def _dividing_axes(mesh, size: int, names) -> tuple:
  """The axes among ``names`` (size > 1 on ``mesh``) whose product divides ``size``, in order."""
  axes, shards = [], 1
  for name in names:
    n = mesh.shape.get(name, 1)
    if n > 1 and size % (shards * n) == 0:
      axes.append(name)
      shards *= n
  return tuple(axes)


def _per_device(kernel, q, has_mask):
  """``kernel(q, k, v, mask, *tangents) -> dO`` run per device under ``shard_map`` when q is on
  a mesh (module docstring, "Meshes"), else ``kernel`` itself."""
  mesh = _mesh_of(q)
  if mesh is None:
    return kernel
  batch = _dividing_axes(mesh, q.shape[0], BATCH_AXES) or None
  heads = _dividing_axes(mesh, q.shape[2], (HEAD_AXIS,)) or None
  spec = P(batch, None, heads, None)

  def run(q, k, v, mask, *tangents):
    in_specs = (spec, spec, spec, P(batch, None) if has_mask else None) + (spec,) * len(tangents)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=False)(q, k, v, mask, *tangents)

  return run


def _linear_tangent(present, scale):
  """The kernel's dO as a linear function of the present tangents, and its transpose.

  ``present`` is a static (dq?, dk?, dv?) triple; absent tangents are zero.
  Residuals are (q, k, v, mask, fast_vjp); the transpose is the fast path's VJP.
  """
  fused = _jvp_kernel()

  def kernel(q, k, v, mask, *lin):
    lin = iter(lin)
    dq, dk, dv = (next(lin) if p else None for p in present)
    return fused(q, k, v, dq, dk, dv, mask=mask, scale=scale).tangent

  def tangent(res, lin):
    q, k, v, mask, _ = res
    return _per_device(kernel, q, mask is not None)(q, k, v, mask, *lin)

  def transpose(res, ct):
    grads = res[-1](ct)
    return tuple(g for g, p in zip(grads, present) if p)

  return tangent, transpose


def _flash_jvp_attention(q, k, v, mask=None, scale=None):
  """custom_jvp attention: fast primal, fused Pallas tangent, fast-path gradient."""
  scale = _scale(q, scale)
  forward = functools.partial(_fast_forward(q.dtype), mask=mask, scale=scale)
  _jvp_kernel()  # checks the backend now rather than inside the JVP rule

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
  impl = _flash_jvp_attention if _on_gpu() or _platform() == "tpu" else xla_attention
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
    raise ConfigError(f"Unknown attention impl={impl!r}; valid values: {', '.join(_IMPLS)}")
  return _IMPLS[impl](q, k, v, mask=mask, scale=scale)

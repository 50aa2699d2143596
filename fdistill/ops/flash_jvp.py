"""Flash attention with a fused forward-mode JVP, as one Pallas kernel.

Given primals ``(q, k, v)`` and tangents ``(dq, dk, dv)`` the kernel computes,
in a single pass over K/V tiles per query tile (docs/design.md section 5),

  O   = P V,                      P  = softmax(S),  S = s Q K^T
  dO  = (P * dS) V + P dV - rowsum(P * dS) O,       dS = s (dQ K^T + Q dK^T)
  LSE = logsumexp(S)  (natural log, per query row)

with online-softmax statistics: the running max ``m``, the running sum ``l``
of ``exp(S - m)`` and the running ``rowsum(exp(S - m) * dS)``, plus three fp32
accumulators (for P V, (P * dS) V + P dV and nothing else of size S x S).
Memory is O(S); FLOPs are 3x the forward's (six tile matmuls instead of two),
fewer when a tangent is absent (cross-attention to constant K/V skips the
``Q dK^T`` and ``P dV`` matmuls).

Layout follows ``ops.attention``: q [B, Sq, H, D], k/v [B, Skv, H, D],
mask [B, Skv] key padding (True = keep). Sequence lengths need not be
multiples of the block sizes and D need not be a power of two: ragged tiles
are handled with masked loads and stores, not by padding copies.

Backends: GPU runs the Pallas Triton lowering; CPU runs the same kernel with
``interpret=True`` (tests). TPU runs the Mosaic version of this kernel,
``ops/flash_jvp_tpu.py`` (same interface and math); here TPU raises.
Tiles: :func:`default_config` fits shared memory by :func:`shared_memory_bytes`
(docs/kernels.md).
The kernel has no transpose rule (``pallas_call`` is not linear to JAX), so it
must never sit under ``jax.grad``; ``ops.attention`` wraps it so the gradient
goes through a differentiable attention instead.
"""
import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

# A finite "minus infinity" (both kernels): exp2 or exp of (MASK - m) is exactly 0 for any real
# row max m, and a row whose keys are all masked so far stays NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Triton's tl.dot needs every tile dimension to be at least 16.
_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile sizes and Triton launch parameters (powers of two; tuned on GPU by the benchmark)."""
  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      size = getattr(self, name)
      if size < _MIN_BLOCK or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK} (Triton tiles); got {size}")


# Hopper's (H100, H200) shared memory per block; Ampere's A100 has 163 KiB.
SHARED_MEMORY_BYTES = 227 * 1024
# What the defaults may use by the model below: the rest of the 227 KiB is headroom for
# what the model leaves out (Triton's layout-conversion scratch, the P tile of P V).
_DEFAULT_BUDGET = 192 * 1024


def shared_memory_bytes(config: KernelConfig, head_dim: int, dtype,
                        tangents=(True, True, True)) -> int:
  """The kernel's shared memory by tile count: ``num_stages`` buffers of each K/V-side tile
  (k, v and the present dk, dv: [block_k, D]) plus the Q-side tiles (q, dq: [block_q, D]),
  D padded to a power of two. It reproduces the one overflow measured: fp32 at D = 64
  with (128, 64, 4 warps, 3 stages) asked Triton for 256 KiB on an H200 (issue #25)."""
  has_dq, has_dk, has_dv = tangents
  tile = _pow2_at_least(head_dim) * jnp.dtype(dtype).itemsize
  kv_tiles = 2 + has_dk + has_dv
  q_tiles = 1 + has_dq
  return config.num_stages * kv_tiles * config.block_k * tile + q_tiles * config.block_q * tile


MAX_HEAD_DIM = 256


def _fit_shared_memory(config: KernelConfig, head_dim: int, dtype) -> KernelConfig:
  """Shrinks ``config`` until the model fits ``_DEFAULT_BUDGET``: fewer pipeline stages first
  (down to 2; costs latency hiding), then narrower K/V tiles, then Q tiles (a Q tile
  amortises every K/V load, so it is kept longest)."""
  while shared_memory_bytes(config, head_dim, dtype) > _DEFAULT_BUDGET:
    if config.num_stages > 2:
      config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    elif config.block_k > _MIN_BLOCK:
      config = dataclasses.replace(config, block_k=config.block_k // 2)
    else:
      config = dataclasses.replace(config, block_q=config.block_q // 2)
  return config


def default_config(head_dim: int, dtype=jnp.bfloat16) -> KernelConfig:
  """Tiles for head dims up to 256 in bf16, fp16 or fp32 that fit shared memory.

  Starts from the bf16 H100 starting points the speed figures of issue #25 were
  measured with ((128, 64) tiles, 3 stages up to D = 64; (64, 64), 2 stages
  above) and shrinks them to the budget (:func:`_fit_shared_memory`); the
  resulting table is in docs/kernels.md. Chosen to fit, not measured for
  speed: a GPU run of `benchmarks/attention_jvp.py --tune` may replace them.
  """
  if head_dim > MAX_HEAD_DIM:
    raise ValueError(f"default_config covers head dims up to {MAX_HEAD_DIM}, got {head_dim}; "
                     f"pass config=KernelConfig(...) for larger heads")
  if head_dim <= 64:
    start = KernelConfig(block_q=128, block_k=64, num_warps=4, num_stages=3)
  else:
    start = KernelConfig(block_q=64, block_k=64, num_warps=4, num_stages=2)
  return _fit_shared_memory(start, head_dim, dtype)


class JvpOut(NamedTuple):
  out: jax.Array        # [B, Sq, H, D], q.dtype
  tangent: jax.Array    # [B, Sq, H, D], q.dtype (None from flash_attention)
  lse: jax.Array        # [B, H, Sq], float32


def _pow2_at_least(n: int) -> int:
  return max(_MIN_BLOCK, 1 << (max(n, 1) - 1).bit_length())


def _fit_block(block: int, length: int) -> int:
  """Shrinks a tile to the (power-of-two) sequence length so short sequences waste no work."""
  return min(block, _pow2_at_least(length))


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """Interpret on CPU, compile with Triton on GPU; a clear error on TPU."""
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and backend not in ("gpu", "cuda", "rocm"):
    raise ValueError(
        f"The flash JVP kernel is written for the Pallas Triton backend (GPU); found backend "
        f"{backend!r}. On TPU use ops.flash_jvp_tpu; elsewhere attention impl='xla' (or "
        f"interpret=True for testing).")
  return interpret


# ---------------------------------------------------------------------------
# Kernel building blocks. Masks are None when statically unnecessary, so the
# common case (lengths multiple of the tile, D a power of two) has no masking.


def _and(a, b):
  if a is None:
    return b
  return a if b is None else jnp.logical_and(a, b)


def _rows_in_bounds(start, size: int, length: int):
  """[size] bool of rows start..start+size that exist, or None if every tile is full."""
  if length % size == 0:
    return None
  return start + jnp.arange(size) < length


def _load_tile(ref, start, size: int, rows, cols):
  """Loads ref[start:start+size, :] (padded head dim included), zeros where rows/cols are invalid.

  Zeros (not garbage) matter: an out-of-range K/V row multiplies a zero
  probability, and 0 * NaN would poison the accumulators.
  """
  view = ref.at[pl.ds(start, size), :]
  shape = (size, ref.shape[-1])
  mask = _and(None if rows is None else jnp.broadcast_to(rows[:, None], shape),
              None if cols is None else jnp.broadcast_to(cols[None, :], shape))
  if mask is None:
    return plgpu.load(view)
  return plgpu.load(view, mask=mask, other=0.0)


def _store_tile(ref, start, value, rows, cols):
  view = ref.at[pl.ds(start, value.shape[0]), :]
  mask = _and(None if rows is None else jnp.broadcast_to(rows[:, None], value.shape),
              None if cols is None else jnp.broadcast_to(cols[None, :], value.shape))
  plgpu.store(view, value.astype(ref.dtype), mask=mask)


def _precision(a):
  """HIGHEST for fp32 operands: Triton's default lowers fp32 dots to TF32, which measured a
  2.6e-4 relative error of the tangent on an H200 (bf16 / fp16 operands are unaffected)."""
  return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _dot(a, b):
  """a @ b with fp32 accumulation (full fp32 for fp32 inputs, not TF32)."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a),
                         preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  """a @ b.T with fp32 accumulation (full fp32 for fp32 inputs, not TF32)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                         preferred_element_type=jnp.float32)


def _key_validity(mask_ref, start, block_k: int, skv: int):
  """[block_k] bool of keys that exist and are kept by the padding mask, or None."""
  valid = _rows_in_bounds(start, block_k, skv)
  if mask_ref is None:
    return valid
  view = mask_ref.at[pl.ds(start, block_k)]
  keep = plgpu.load(view) if valid is None else plgpu.load(view, mask=valid, other=0)
  return keep != 0


def _kernel(*refs, scale, block_q, block_k, sq, skv, head_dim, has_mask, tangents, n_init):
  """One query tile of one (batch, head): O, LSE and (if any tangent) dO.

  ``tangents`` is a static (has_dq, has_dk, has_dv) triple; refs arrive as
  q, k, v, [dq], [dk], [dv], [mask], [n_init aliased output buffers], o, [do], lse.
  """
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  del refs[:3]
  dq_ref, dk_ref, dv_ref = (refs.pop(0) if present else None for present in tangents)
  mask_ref = refs.pop(0) if has_mask else None
  del refs[:n_init]  # aliased to the outputs below; nothing to read.
  has_tangent = any(tangents)
  o_ref = refs.pop(0)
  do_ref = refs.pop(0) if has_tangent else None
  (lse_ref,) = refs

  padded_d = q_ref.shape[-1]
  cols = None if padded_d == head_dim else jnp.arange(padded_d) < head_dim
  q_start = pl.program_id(0) * block_q
  q_rows = _rows_in_bounds(q_start, block_q, sq)
  q = _load_tile(q_ref, q_start, block_q, q_rows, cols)
  dq = None if dq_ref is None else _load_tile(dq_ref, q_start, block_q, q_rows, cols)
  logit_scale = scale * _LOG2E  # softmax in base 2: exp(x) = exp2(x log2 e)

  def body(j, carry):
    m, l, acc_o, *tangent_carry = carry
    k_start = j * block_k
    k_rows = _rows_in_bounds(k_start, block_k, skv)
    k = _load_tile(k_ref, k_start, block_k, k_rows, cols)
    v = _load_tile(v_ref, k_start, block_k, k_rows, cols)
    s = _dot_nt(q, k) * logit_scale
    valid = _key_validity(mask_ref, k_start, block_k, skv)
    if valid is not None:
      s = jnp.where(valid[None, :], s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc_o = alpha[:, None] * acc_o + _dot(p.astype(v.dtype), v)
    if not has_tangent:
      return m_new, l, acc_o
    r, acc_t = tangent_carry
    ds = None
    if dq is not None:
      ds = _dot_nt(dq, k)
    if dk_ref is not None:
      q_dk = _dot_nt(q, _load_tile(dk_ref, k_start, block_k, k_rows, cols))
      ds = q_dk if ds is None else ds + q_dk
    t = None
    if ds is not None:
      p_ds = p * (ds * scale)
      r = alpha * r + jnp.sum(p_ds, axis=1)
      t = _dot(p_ds.astype(v.dtype), v)
    if dv_ref is not None:
      p_dv = _dot(p.astype(v.dtype), _load_tile(dv_ref, k_start, block_k, k_rows, cols))
      t = p_dv if t is None else t + p_dv
    acc_t = alpha[:, None] * acc_t + t
    return m_new, l, acc_o, r, acc_t

  zeros_row = jnp.zeros((block_q,), jnp.float32)
  zeros_tile = jnp.zeros((block_q, padded_d), jnp.float32)
  carry = (zeros_row + MASK_VALUE, zeros_row, zeros_tile)
  if has_tangent:
    carry += (zeros_row, zeros_tile)
  m, l, acc_o, *tangent_carry = lax.fori_loop(0, pl.cdiv(skv, block_k), body, carry)

  out = acc_o / l[:, None]
  _store_tile(o_ref, q_start, out, q_rows, cols)
  plgpu.store(lse_ref.at[pl.ds(q_start, block_q)], (m + jnp.log2(l)) * _LN2, mask=q_rows)
  if has_tangent:
    # dO = [(P*dS) V + P dV] - rowsum(P*dS) O, all normalised by l at the end.
    r, acc_t = tangent_carry
    tangent = acc_t / l[:, None] - (r / l)[:, None] * out
    _store_tile(do_ref, q_start, tangent, q_rows, cols)


def check_shapes(q, k, v, tangents, mask):
  """The layout both kernels (Triton here, Mosaic in flash_jvp_tpu) accept; ValueError otherwise."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"Expected q [B, Sq, H, D] and k, v [B, Skv, H, D]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  for name, t, p in zip(("dq", "dk", "dv"), tangents, (q, k, v)):
    if t is not None and (t.shape != p.shape or t.dtype != p.dtype):
      raise ValueError(f"{name} must match its primal: {t.shape} {t.dtype} vs {p.shape} {p.dtype}")
  if mask is not None and mask.shape != k.shape[:2]:
    raise ValueError(f"mask must be [B, Skv] = {k.shape[:2]}, got {mask.shape}")


def _flash_call(q, k, v, dq, dk, dv, mask, scale, config, interpret, out_init):
  """Builds and runs the pallas_call; returns (out, tangent or None, lse)."""
  tangents = (dq, dk, dv)
  check_shapes(q, k, v, tangents, mask)
  if q.shape[-1] % 16:
    raise ValueError(f"head dim must be a multiple of 16 (Triton tiles), got {q.shape[-1]}")
  batch, sq, heads, head_dim = q.shape
  skv = k.shape[1]
  scale = head_dim**-0.5 if scale is None else float(scale)
  config = config or default_config(head_dim, q.dtype)
  block_q = _fit_block(config.block_q, sq)
  block_k = _fit_block(config.block_k, skv)
  padded_d = _pow2_at_least(head_dim)
  has_tangent = any(t is not None for t in tangents)

  # Whole sequences per (batch, head) as the block: the kernel slices its own
  # tiles with masked loads, which is what keeps ragged lengths in bounds on
  # Triton (a ragged BlockSpec tile would read and write past the array).
  def seq_spec(length):
    return pl.BlockSpec((None, length, None, padded_d), lambda i, b, h: (b, 0, h, 0))

  lse_spec = pl.BlockSpec((None, None, sq), lambda i, b, h: (b, h, 0))
  inputs = [q, k, v] + [t for t in tangents if t is not None]
  in_specs = [seq_spec(sq), seq_spec(skv), seq_spec(skv)]
  in_specs += [seq_spec(sq if t is dq else skv) for t in tangents if t is not None]
  if mask is not None:
    inputs.append(mask.astype(jnp.int32))
    in_specs.append(pl.BlockSpec((None, skv), lambda i, b, h: (b, 0)))

  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [seq_spec(sq)]
  if has_tangent:
    out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
    out_specs.append(seq_spec(sq))
  out_shape.append(jax.ShapeDtypeStruct((batch, heads, sq), jnp.float32))
  out_specs.append(lse_spec)

  aliases = {}
  n_init = 0
  if out_init is not None:
    n_init = len(out_shape)
    aliases = {len(inputs) + i: i for i in range(n_init)}
    inputs += list(out_init)
    in_specs += out_specs

  kernel = functools.partial(
      _kernel, scale=scale, block_q=block_q, block_k=block_k, sq=sq, skv=skv,
      head_dim=head_dim, has_mask=mask is not None,
      tangents=tuple(t is not None for t in tangents), n_init=n_init)
  outs = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(sq, block_q), batch, heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=resolve_interpret(interpret),
      name="flash_attention_jvp" if has_tangent else "flash_attention",
  )(*inputs)
  if has_tangent:
    return JvpOut(*outs)
  return JvpOut(outs[0], None, outs[1])


def flash_attention_jvp(q, k, v, dq=None, dk=None, dv=None, mask=None, scale=None, *,
                        config: Optional[KernelConfig] = None,
                        interpret: Optional[bool] = None, out_init=None) -> JvpOut:
  """O, dO and LSE of softmax attention in one fused pass.

  Args:
    q, k, v: [B, Sq, H, D], [B, Skv, H, D], [B, Skv, H, D]; bf16, fp16 or fp32.
    dq, dk, dv: tangents shaped and typed like their primals; ``None`` means a
      zero tangent and skips the matmuls that use it. With all three ``None``
      this is a plain flash-attention forward (``tangent`` is then ``None``).
    mask: optional [B, Skv] key-padding mask, True = keep. A query row whose
      keys are all masked gets an unspecified (finite) output.
    scale: logit scale, default ``D**-0.5``.
    config: tile sizes and launch parameters (default :func:`default_config`).
    interpret: run the kernel in the Pallas interpreter; default True on CPU.
    out_init: optional (out, [tangent], lse) buffers the outputs alias, so a
      caller (the tests) can pre-fill them with NaN and see unwritten tiles.

  Returns:
    ``JvpOut(out, tangent, lse)`` with ``lse`` [B, H, Sq] in float32.
  """
  return _flash_call(q, k, v, dq, dk, dv, mask, scale, config, interpret, out_init)


def flash_attention(q, k, v, mask=None, scale=None, *, config=None, interpret=None):
  """The same kernel without tangents: (out, lse). Forward only, not differentiable."""
  res = _flash_call(q, k, v, None, None, None, mask, scale, config, interpret, None)
  return res.out, res.lse

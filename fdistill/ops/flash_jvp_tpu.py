"""The fused forward-mode attention kernel of ``ops.flash_jvp`` for TPU (Pallas Mosaic).

Same math and interface as the Triton kernel (``flash_jvp.flash_attention_jvp``):
O, its tangent dO and the log-sum-exp in one pass, online softmax over K/V
blocks, fp32 statistics and accumulators, absent (``None``) tangents skipping
their matmuls, an optional [B, Skv] key-padding mask. What differs is the shape
of the program, which follows Mosaic's rules:

* Grid (B, H, query blocks, K/V blocks) with the K/V axis last and sequential
  ("arbitrary"): Pallas pipelines the K/V tiles into VMEM, and the running
  statistics live in VMEM scratch between grid steps (the Triton kernel loops
  over K/V inside one program instead).
* Tiles must fit the (8, 128) vreg tiling: the lane (last) dimension of every
  block is a multiple of 128 or the whole array dimension, its sublane
  (second to last) dimension a multiple of 8 or the whole dimension. So the
  wrapper moves heads before the sequence ([B, H, S, D]: a [block, D] tile per
  head, D whole), block sizes are multiples of 128, the mask travels as
  [B, 1, Skv] (a lane row per K/V block) and the LSE is written lane-major as
  [B, H, 1, Sq] (one transposed row per query block). The row statistics are
  kept lane-replicated, [block_q, 128], as Mosaic's own flash kernels do.
* Ragged lengths use partial edge blocks, not padding copies: rows past the
  end of an edge block hold garbage (NaN in interpret mode), so key columns
  past Skv are masked in the logits and in dS, and V / dV rows past Skv are
  zeroed before their matmuls (0 * NaN would poison the accumulators);
  query rows past Sq are computed and never stored.
* fp32 matmuls run at ``Precision.HIGHEST`` (the MXU's default for fp32 is a
  bf16 pass); bf16 operands run natively with fp32 accumulation.

Backends: TPU compiles it; on CPU it runs in TPU interpret mode
(``pltpu.InterpretParams``), which is how tests/test_ops_flash_jvp_tpu.py checks
it, and ``jax.export(platforms=("tpu",))`` checks that it lowers to Mosaic
without a TPU. Neither proves Mosaic's compiler accepts every op or that the
default blocks are fast: that needs a TPU (docs/kernels.md).
"""
import dataclasses
import functools
from typing import Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from fdistill.ops import flash_jvp

LANES = 128  # TPU vreg lanes: every block size is a multiple of this.
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  """Query and K/V block sizes (multiples of 128). Untuned starting points: measure on a TPU."""
  block_q: int = 256
  block_k: int = 256

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      size = getattr(self, name)
      if size < LANES or size % LANES:
        raise ValueError(f"TpuConfig.{name} must be a positive multiple of {LANES} "
                         f"(TPU lane tiling); got {size}")


def _fit_block(block: int, length: int) -> int:
  """The block, shrunk to the sequence rounded up to 128 so short sequences waste no work."""
  return min(block, pl.cdiv(length, LANES) * LANES)


def resolve_interpret(interpret):
  """Compile on TPU, TPU interpret mode on CPU, a clear error elsewhere."""
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if interpret is True:
    return pltpu.InterpretParams()
  if not interpret and backend != "tpu":
    raise ValueError(
        f"The TPU flash JVP kernel needs a TPU (Pallas Mosaic); found backend {backend!r}. "
        f"Use attention impl='xla' here, or interpret=True for testing.")
  return interpret


def _lanes(x, width: int):
  """A lane-replicated [rows, 128] statistic widened (or cut) to [rows, width]."""
  return jnp.tile(x, (1, pl.cdiv(width, LANES)))[:, :width]


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kernel(*refs, scale, block_q, block_k, skv, has_mask, tangents):
  """One (batch, head, query block, K/V block) step; the last K/V step writes the outputs.

  refs: q, k, v, [dq], [dk], [dv], [mask], o, [do], lse, then scratch
  m, l, acc_o, [r, acc_t]. Tiles are [block, D]; mask is [1, block_k];
  lse is [1, block_q]; m, l, r are [block_q, 128] lane-replicated.
  """
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  del refs[:3]
  dq_ref, dk_ref, dv_ref = (refs.pop(0) if present else None for present in tangents)
  mask_ref = refs.pop(0) if has_mask else None
  has_tangent = any(tangents)
  o_ref = refs.pop(0)
  do_ref = refs.pop(0) if has_tangent else None
  lse_ref, m_ref, l_ref, acc_o_ref = refs[:4]
  r_ref, acc_t_ref = refs[4:] if has_tangent else (None, None)
  kv_step = pl.program_id(3)
  head_dim = acc_o_ref.shape[-1]

  @pl.when(kv_step == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, flash_jvp.MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_o_ref[...] = jnp.zeros_like(acc_o_ref)
    if has_tangent:
      r_ref[...] = jnp.zeros_like(r_ref)
      acc_t_ref[...] = jnp.zeros_like(acc_t_ref)

  ragged = skv % block_k != 0
  k_start = kv_step * block_k
  valid = None  # [1, block_k] keys that exist and are kept
  if ragged:
    valid = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < skv
  if has_mask:
    keep = mask_ref[...] != 0
    valid = keep if valid is None else jnp.logical_and(valid, keep)

  def kv_tile(ref):
    """A [block_k, D] K/V-side tile, rows past Skv zeroed (they hold garbage)."""
    x = ref[...]
    if not ragged:
      return x
    rows = k_start + lax.broadcasted_iota(jnp.int32, x.shape, 0) < skv
    return jnp.where(rows, x, jnp.zeros_like(x))

  q = q_ref[...]
  k = kv_tile(k_ref)
  v = kv_tile(v_ref)
  s = _dot(q, k, _NT) * scale
  if valid is not None:
    s = jnp.where(valid, s, flash_jvp.MASK_VALUE)
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [block_q, 128]
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.exp(s - _lanes(m_new, block_k))
  row_sum = lambda x: lax.broadcast_in_dim(jnp.sum(x, axis=1), m_prev.shape, (0,))
  l_ref[...] = alpha * l_ref[...] + row_sum(p)
  m_ref[...] = m_new
  alpha_d = _lanes(alpha, head_dim)
  acc_o_ref[...] = alpha_d * acc_o_ref[...] + _dot(p.astype(v.dtype), v, _NN)

  if has_tangent:
    ds = None
    if dq_ref is not None:
      ds = _dot(dq_ref[...], k, _NT)
    if dk_ref is not None:
      q_dk = _dot(q, kv_tile(dk_ref), _NT)
      ds = q_dk if ds is None else ds + q_dk
    t = None
    if ds is not None:
      p_ds = p * (ds * scale)
      r_ref[...] = alpha * r_ref[...] + row_sum(p_ds)
      t = _dot(p_ds.astype(v.dtype), v, _NN)
    if dv_ref is not None:
      p_dv = _dot(p.astype(v.dtype), kv_tile(dv_ref), _NN)
      t = p_dv if t is None else t + p_dv
    acc_t_ref[...] = alpha_d * acc_t_ref[...] + t

  @pl.when(kv_step == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    out = acc_o_ref[...] / _lanes(l, head_dim)
    o_ref[...] = out.astype(o_ref.dtype)
    lse = m_ref[...] + jnp.log(l)  # [block_q, 128], every lane equal
    lse_ref[...] = jnp.transpose(lse)[:1, :]  # the lane-major row [1, block_q]
    if has_tangent:
      # dO = [(P*dS) V + P dV] - rowsum(P*dS) O, all normalised by l at the end.
      tangent = acc_t_ref[...] / _lanes(l, head_dim) - _lanes(r_ref[...] / l, head_dim) * out
      do_ref[...] = tangent.astype(do_ref.dtype)


def flash_attention_jvp(q, k, v, dq=None, dk=None, dv=None, mask=None, scale=None, *,
                        config: Optional[TpuConfig] = None,
                        interpret=None) -> flash_jvp.JvpOut:
  """O, dO and LSE of softmax attention in one fused pass on TPU.

  Arguments and result as ``flash_jvp.flash_attention_jvp`` (q [B, Sq, H, D],
  k/v [B, Skv, H, D], tangents like their primals or ``None``, mask [B, Skv]
  True = keep; ``lse`` [B, H, Sq] float32); bf16 and fp32. ``config`` holds
  the block sizes (default :class:`TpuConfig`); ``interpret`` defaults to TPU
  interpret mode on CPU, or takes ``pltpu.InterpretParams``.
  """
  tangents = (dq, dk, dv)
  flash_jvp.check_shapes(q, k, v, tangents, mask)
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"The TPU flash JVP kernel takes bfloat16 or float32 inputs, got {q.dtype}")
  batch, sq, heads, head_dim = q.shape
  skv = k.shape[1]
  scale = head_dim**-0.5 if scale is None else float(scale)
  config = config or TpuConfig()
  block_q = _fit_block(config.block_q, sq)
  block_k = _fit_block(config.block_k, skv)
  present = tuple(t is not None for t in tangents)
  has_tangent = any(present)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, S, H, D] <-> [B, H, S, D]

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i, j: (b, h, j, 0))
  inputs = [heads_first(x) for x in (q, k, v) + tuple(t for t in tangents if t is not None)]
  in_specs = [q_spec, kv_spec, kv_spec] + [q_spec if t is dq else kv_spec
                                           for t in tangents if t is not None]
  if mask is not None:
    inputs.append(mask.astype(jnp.int32)[:, None, :])
    in_specs.append(pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, j)))

  swapped = jax.ShapeDtypeStruct((batch, heads, sq, head_dim), q.dtype)
  out_shape = [swapped] * (2 if has_tangent else 1)
  out_specs = [q_spec] * len(out_shape)
  out_shape.append(jax.ShapeDtypeStruct((batch, heads, 1, sq), jnp.float32))
  out_specs.append(pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, j: (b, h, 0, i)))

  stat = pltpu.VMEM((block_q, LANES), jnp.float32)
  acc = pltpu.VMEM((block_q, head_dim), jnp.float32)
  scratch = [stat, stat, acc] + ([stat, acc] if has_tangent else [])

  kernel = functools.partial(_kernel, scale=scale, block_q=block_q, block_k=block_k, skv=skv,
                             has_mask=mask is not None, tangents=present)
  outs = pl.pallas_call(
      kernel,
      grid=(batch, heads, pl.cdiv(sq, block_q), pl.cdiv(skv, block_k)),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=resolve_interpret(interpret),
      name="flash_attention_jvp_tpu" if has_tangent else "flash_attention_tpu",
  )(*inputs)
  lse = outs[-1][:, :, 0, :]
  out = heads_first(outs[0])
  return flash_jvp.JvpOut(out, heads_first(outs[1]) if has_tangent else None, lse)

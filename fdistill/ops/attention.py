"""The one attention entry point every model calls.

``attention(q, k, v, impl=..., mask=None, scale=None)`` with q [B, Sq, H, D],
k/v [B, Skv, H, D] and an optional key-padding mask [B, Skv] (True = keep).
Returns [B, Sq, H, D] in q's dtype.

impl:
  "xla"   - plain softmax(QK^T)V; differentiable in both modes (jvp and grad).
  "cudnn" - jax.nn.dot_product_attention(implementation="cudnn"); GPU only.
"""
import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn")


def _scale(q, scale):
  return q.shape[-1]**-0.5 if scale is None else scale


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
  if jax.default_backend() != "gpu":
    raise ValueError(
        f"attention impl='cudnn' needs a GPU backend, found {jax.default_backend()!r}; "
        f"valid impls here: 'xla'")
  kv_len = None if mask is None else jnp.sum(mask, axis=-1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=_scale(q, scale), key_value_seq_lengths=kv_len,
      implementation="cudnn")


_IMPLS = {"xla": xla_attention, "cudnn": _cudnn_attention}


def attention(q, k, v, impl="xla", mask=None, scale=None):
  """Dispatches to the named implementation; unknown names list the valid ones."""
  if impl not in _IMPLS:
    raise ValueError(f"Unknown attention impl={impl!r}; valid values: {', '.join(_IMPLS)}")
  return _IMPLS[impl](q, k, v, mask=mask, scale=scale)

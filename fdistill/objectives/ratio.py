"""The density ratio r = p/q from a discriminator, and the f-divergence weight h(r).

The discriminator's logit estimates ``log r`` (logistic loss, data = 1,
generator = 0). Following the public f-distill implementation (NVlabs/FastGen
``common_loss.py``): logits averaged over heads and clipped, ``r = exp(logit)``
clipped to [ratio_lower, ratio_upper], ``r`` divided by an EMA of its mean in
its noise-level bin (carried in the train state), and ``h(r)`` divided by its
mean over the global batch. Settings read (``config.objective`` fields):
logit_clip, ratio_lower, ratio_upper, ratio_bins, ratio_ema, normalise_h.
"""
import jax
import jax.numpy as jnp

from fdistill.objectives import critics
from fdistill.objectives import divergences


def density_ratio(logits, st):
  """``r = exp(clip(mean_heads(logit)))`` clipped to [ratio_lower, ratio_upper] (FastGen)."""
  log_r = jnp.clip(jnp.mean(critics.at_least_f32(logits), axis=-1), -st.logit_clip,
                   st.logit_clip)
  return jnp.clip(jnp.exp(log_r), st.ratio_lower, st.ratio_upper)


def bin_index(u, num_bins):
  return jnp.clip(jnp.floor(u * num_bins).astype(jnp.int32), 0, num_bins - 1)


def update_ratio_bins(bins, r, idx, ema):
  """EMA of the mean ratio per noise-level bin over the global batch; empty bins keep theirs.

  The sums run over the whole (sharded) batch, so under jit every device sees
  the same global statistics, as FastGen's all-reduce of counts and sums.
  """
  one_hot = jax.nn.one_hot(idx, bins.shape[0], dtype=jnp.float32)
  count = jnp.sum(one_hot, axis=0)
  mean = jnp.sum(one_hot * r[:, None], axis=0) / (count + 1e-6)
  return jnp.where(count > 0, ema * bins + (1 - ema) * mean, bins)


def normalise_by_batch_mean(h):
  """``h / (mean h + 1e-6)``, the mean over the global batch (all devices)."""
  return h / (jnp.mean(h) + 1e-6)


def f_weight(logits, u, bins, div: divergences.Divergence, st):
  """(h [B], new bins, stats) from discriminator logits [B, heads] (no gradient)."""
  logits = jax.lax.stop_gradient(logits)
  r = density_ratio(logits, st)
  new_bins = bins
  if st.ratio_bins:
    idx = bin_index(u, st.ratio_bins)
    new_bins = update_ratio_bins(bins, r, idx, st.ratio_ema)
    r_used = r / (new_bins[idx] + 1e-6)
  else:
    r_used = r
  h = div.h(r_used)
  if st.normalise_h:
    h = normalise_by_batch_mean(h)
  stats = {"ratio_mean": jnp.mean(r), "logit_mean": jnp.mean(logits), "h_min": jnp.min(h),
           "h_mean": jnp.mean(h), "h_max": jnp.max(h)}
  return h, new_bins, stats



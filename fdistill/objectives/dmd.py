"""The DMD surrogate (Yin et al. 2024, "One-step Diffusion with Distribution Matching
Distillation"), the one home of the form f-distill, rCM and SiD's normaliser share.

A generator sample ``x`` should move along ``-step`` (DMD: ``step = w (D_fake - D_T)``, the
score gap in denoiser units at ``x`` noised again, times a per-sample weight). The surrogate
``|x - sg(x - step)|^2`` has the value ``|step|^2`` and the x-gradient ``2 step``, so any
objective whose generator gradient is a known direction is "DMD with another step":

  f-distill   ``step = h(r) / (mean|x - D_T| + eps) (D_fake - D_T)``, loss 0.5 x the mean;
  rCM         ``step = (D_fake - D_T) / max(mean|x - D_T|, 1e-5)`` on student rollouts;
  SiD         the same normaliser :func:`abs_mean` (SiD's ``1 / max(mean|G - D_T|, 1e-5)``).

A new regulariser on top of DMD belongs in the objective that adds it; the step's form
belongs here.
"""
import jax
import jax.numpy as jnp

from fdistill.diffusion import per_sample


def abs_mean(x, d_teacher):
  """DMD's per-sample scale ``mean_d |x - D_T|`` [B] (callers add their floor or epsilon)."""
  return per_sample.mean(jnp.abs(x - d_teacher))


def surrogate(x, step):
  """Per-sample [B] ``mean_d (x - sg(x - step))^2``: the value ``mean_d step^2``, the
  x-gradient ``2 step / D`` per sample (``D`` data dimensions; ``step`` is a constant)."""
  return per_sample.mean(jnp.square(x - jax.lax.stop_gradient(x - step)))

"""fdistill: divergence-based diffusion distillation in JAX.

Notebook entry points: ``fdistill.load(workdir).sample(num)`` (a run's network, see
``fdistill/api.py``) and the pure functions the trainer uses:
``from fdistill import diffusion, models, objectives, teachers``.
"""
__version__ = "0.1.0"


def load(workdir, step=None):
  """The exported network of ``workdir``'s newest intact checkpoint (or ``step``), ready to
  sample: ``fdistill.load(workdir).sample(num)``; see :func:`fdistill.api.load`."""
  from fdistill import api  # here, not at import: `import fdistill.<module>` stays free of JAX
  return api.load(workdir, step)

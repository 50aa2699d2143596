"""fdistill: divergence-based diffusion distillation in JAX.

Colab entry points: ``from fdistill import diffusion, models, objectives, teachers``.
"""
__version__ = "0.1.0"

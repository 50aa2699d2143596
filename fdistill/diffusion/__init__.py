"""Noise processes as pure functions of arrays and an ``apply_fn``."""
from fdistill.diffusion import edm  # noqa: F401

"""Kernels and the single attention entry point."""

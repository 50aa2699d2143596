"""Optimiser helpers called by the objectives: train-state pytrees and the guarded update."""

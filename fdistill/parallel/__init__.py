"""Device meshes, partition rules, multi-process start-up and preemption notices."""

"""Device meshes, partition rules and multi-process start-up."""

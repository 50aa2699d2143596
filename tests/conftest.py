"""8 fake CPU devices for sharding tests; must run before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

# Tests rebuild the same small models and steps many times (each train() call jits
# afresh); a persistent compilation cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("FDISTILL_TEST_JAX_CACHE", "/tmp/fdistill_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

"""8 fake CPU devices for sharding tests; must run before jax is imported."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# configs/ is imported as a package from the repo root, as `python -m fdistill.main` does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

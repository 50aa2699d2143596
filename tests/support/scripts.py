"""Loading a ``benchmarks/`` script (not a package) as a module in tests."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def benchmark(name):
  """The module ``benchmarks/<name>.py``, freshly executed, with ``benchmarks/`` on ``sys.path``
  as when Python runs the script (its sibling imports, e.g. distill_step's minimum_passes)."""
  if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

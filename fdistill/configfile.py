"""Loading a config file the way ``--config=path[:arg]`` does (for tools without absl flags)."""
import os


def load_config_file(spec):
  """``path[:arg]`` -> ``get_config(arg)`` of that file (what --config does)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec}: no such file {path!r} (paths are relative to "
                            f"the repository root, e.g. configs/toy2d_teacher.py)")
  module_spec = importlib.util.spec_from_file_location("_fdistill_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)

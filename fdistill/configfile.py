"""Loading a config file the way ``--config=path[:arg]`` does (for tools without absl flags)."""
import ast
import os

from fdistill.errors import ConfigError


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
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # configs/ imports no fdistill module: its ValueErrors are user errors
    raise ConfigError(str(e)) from e


def literal(text: str):
  """``text`` as a Python literal (``1``, ``(32,)``, ``{'name': 'mlp'}``), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_config_flags(config, flags):
  """Applies ``--config.a.b=value`` strings to ``config`` as ``fdistill.main`` does (values as
  Python literals, else strings); a ConfigError names an unknown field, a non-override
  argument or a value of the wrong type."""
  for flag in flags:
    key, sep, text = flag.partition("=")
    if not (sep and key.startswith("--config.")):
      raise ConfigError(f"unexpected argument {flag!r}; overrides are --config.SECTION.FIELD=VALUE")
    path = key[len("--config."):].split(".")
    node = config
    for part in path[:-1]:
      if part not in node:
        raise ConfigError(f"unknown config field config.{'.'.join(path)}")
      node = node[part]
    if path[-1] not in node:
      raise ConfigError(f"unknown config field config.{'.'.join(path)}")
    value = literal(text)
    try:
      node[path[-1]] = value
    except TypeError as e:
      raise ConfigError(f"{key}={text}: {e}") from None
  return config

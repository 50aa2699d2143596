"""The one registry helper (models, objectives, divergences, datasets, teachers, metrics).

Registries are plain dicts built from explicit imports, so an import error
propagates as itself instead of turning into "unknown name".
"""
from typing import Any, Iterable, Mapping

from fdistill.errors import ConfigError


def lookup(registry: Mapping[str, Any], name: str, field: str) -> Any:
  """Returns ``registry[name]`` or raises a ConfigError naming the field and the valid names."""
  check_choice(name, registry, field)
  return registry[name]


def check_choice(value, choices: Iterable, field: str):
  """``value`` if it is one of ``choices``, else a ConfigError naming ``field`` and the choices."""
  choices = list(choices)
  if value not in choices:
    raise ConfigError(f"Unknown {field}={value!r}; valid values: "
                      f"{', '.join(str(c) for c in sorted(choices, key=str))}")
  return value

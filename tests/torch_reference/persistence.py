"""Test-only mimic of NVlabs/edm ``torch_utils/persistence.py`` (CC BY-NC-SA 4.0; see __init__).

Reproduces the pickle format: a persistent class records its constructor
``_init_args`` / ``_init_kwargs`` and pickles as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=6, module_src=..., class_name=..., state=__dict__)``;
unpickling execs ``module_src`` into a fresh module, as EDM does.
``pickle_as_edm`` dumps with ``torch_utils.persistence`` importable, as EDM's
``training_loop`` does (plain ``pickle.dump``).
"""
import contextlib
import copy
import inspect
import pickle
import sys
import types
import uuid

_VERSION = 6
_module_to_src_dict = {}
_src_to_module_dict = {}


def _module_to_src(module):
  src = _module_to_src_dict.get(module)
  if src is None:
    src = inspect.getsource(module)
    _module_to_src_dict[module] = src
    _src_to_module_dict[src] = module
  return src


def _src_to_module(src):
  module = _src_to_module_dict.get(src)
  if module is None:
    name = "_imported_module_" + uuid.uuid4().hex
    module = types.ModuleType(name)
    sys.modules[name] = module
    _module_to_src_dict[module] = src
    _src_to_module_dict[src] = module
    exec(src, module.__dict__)  # pylint: disable=exec-used
  return module


def _reconstruct_persistent_obj(meta):
  assert meta["version"] == _VERSION and meta["type"] == "class"
  module = _src_to_module(meta["module_src"])
  cls = persistent_class(module.__dict__[meta["class_name"]])
  obj = cls.__new__(cls)
  setstate = getattr(obj, "__setstate__", None)
  if callable(setstate):
    setstate(dict(meta["state"]))
  else:
    obj.__dict__.update(meta["state"])
  return obj


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


def persistent_class(orig_class):
  if getattr(orig_class, "_is_persistent", False):
    return orig_class
  module_src = _module_to_src(sys.modules[orig_class.__module__])

  class Decorator(orig_class):
    _is_persistent = True
    _orig_module_src = module_src
    _orig_class_name = orig_class.__name__

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self._init_args = copy.deepcopy(args)
      self._init_kwargs = copy.deepcopy(kwargs)

    def __reduce__(self):
      fields = list(super().__reduce__())
      fields += [None] * max(3 - len(fields), 0)
      if fields[0] is not _reconstruct_persistent_obj:
        meta = dict(type="class", version=_VERSION, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
        fields[0] = _reconstruct_persistent_obj
        fields[1] = (meta,)
        fields[2] = None
      return tuple(fields)

  Decorator.__name__ = orig_class.__name__
  Decorator.__qualname__ = orig_class.__qualname__
  Decorator.__module__ = orig_class.__module__
  return Decorator


@contextlib.contextmanager
def edm_modules():
  """Makes ``torch_utils.persistence`` importable (pickle's global lookup) while inside."""
  this = sys.modules[__name__]
  pkg = types.ModuleType("torch_utils")
  pkg.persistence = this
  saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
  sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": this})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def pickle_as_edm(data, path):
  """``pickle.dump(data, f)`` exactly as EDM's training loop writes network snapshots."""
  with edm_modules(), open(path, "wb") as f:
    pickle.dump(data, f)


def unpickle_with_torch(path):
  """``pickle.load`` with torch and the persistence hook (the way EDM's generate.py loads)."""
  with edm_modules(), open(path, "rb") as f:
    return pickle.load(f)

"""A torch-free reader of pickled PyTorch objects (``torch.save`` zip / legacy files and plain
pickles holding tensors), shared by the EDM teacher importer and the Inception weight converter.

Nothing is imported or executed from the file: a restricted unpickler maps the
few torch callables that rebuild tensors and parameters to stand-ins that build
numpy arrays, torch / EDM / dnnlib classes to inert record objects
(:class:`PersistentObject`, :class:`OpaqueObject`), allows numpy scalars and
arrays, ``collections.OrderedDict`` and a handful of builtins, and refuses every
other global. Formats:

* ``torch.save`` zip files (``<root>/data.pkl`` with persistent ids
  ``('storage', type, key, location, numel)`` and ``<root>/data/<key>``), which
  is also the layout of a TorchScript archive's ``constants``/``data`` parts;
* the legacy ``torch.save`` stream: pickles of the magic number, the protocol
  version and sys_info, a main pickle whose persistent id is
  ``('storage', torch.FloatStorage, key, location, numel, None)``, a pickle of
  the storage keys, then per key an int64 element count and the raw bytes;
* plain pickles (EDM's ``.pkl``) where a storage pickles as
  ``torch.storage._load_from_bytes(blob)`` around one of the above.
"""
import _compat_pickle
import codecs
import collections
import dataclasses
import io
import math
import os
import pickle
import zipfile
from typing import Any, Dict, Optional

import numpy as np

from fdistill.errors import UserError


class TorchPickleError(UserError, ValueError):
  """A file that is not a readable torch pickle, or one holding objects we refuse to build."""

# ---------------------------------------------------------------------------
# Stand-ins for the objects a torch / EDM pickle builds.

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}


@dataclasses.dataclass
class StorageType:
  """``torch.FloatStorage`` and friends: only the element dtype matters."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    dtype = _STORAGE_DTYPES[self.name]
    if dtype == "bfloat16":
      import ml_dtypes  # ships with jax
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


class Storage:
  """A flat typed buffer; ``data`` is filled when the bytes are reached (legacy files: later)."""

  def __init__(self, dtype: np.dtype, numel: int, data: Optional[np.ndarray] = None):
    self.dtype, self.numel, self.data = np.dtype(dtype), int(numel), data

  def array(self) -> np.ndarray:
    if self.data is None:
      raise TorchPickleError("a tensor storage was referenced but its bytes were never read")
    return self.data


class Tensor:
  """A torch tensor view (storage, offset, size, stride) materialised on ``np.asarray``."""

  def __init__(self, storage: Storage, offset: int, size, stride):
    if not isinstance(storage, Storage):
      raise TorchPickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    self.storage, self.offset = storage, int(offset)
    self.shape, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  @property
  def dtype(self):
    return self.storage.dtype

  def __array__(self, dtype=None, copy=None):
    flat = self.storage.array()
    itemsize = flat.dtype.itemsize
    if self.shape and math.prod(self.shape):
      last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
      if last >= flat.size or self.offset < 0 or min(self.stride) < 0:
        raise TorchPickleError(f"tensor of shape {self.shape} runs past its storage of "
                             f"{flat.size} elements")
    out = np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.shape, [s * itemsize for s in self.stride], writeable=False)
    out = np.array(out)  # own the memory, contiguous
    return out if dtype is None else out.astype(dtype)

  def __repr__(self):
    return f"Tensor(shape={self.shape}, dtype={self.dtype})"


class PersistentObject:
  """An EDM ``persistence.persistent_class`` instance: its class name and its state dict."""

  def __init__(self, meta):
    if not isinstance(meta, dict) or "class_name" not in meta or "state" not in meta:
      raise TorchPickleError("torch_utils.persistence object without class_name/state")
    self.class_name = meta["class_name"]
    self.version = meta.get("version")
    self.module_src = meta.get("module_src", "")  # kept for inspection, never executed
    self.state = dict(meta["state"] or {})

  @property
  def init_args(self):
    return tuple(self.state.get("_init_args") or ())

  @property
  def init_kwargs(self) -> Optional[dict]:
    return self.state.get("_init_kwargs")

  def __repr__(self):
    return f"PersistentObject({self.class_name})"


class OpaqueObject:
  """Any other torch / EDM object (``torch.nn.ModuleDict``, ``torch.device``...): inert record."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__["_args"] = args
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
      state = {**(state[0] or {}), **(state[1] or {})}
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.__dict__["_state"] = state

  def __repr__(self):
    return f"<{self.qualname}>"


_OPAQUE_CLASSES: Dict[str, type] = {}


def _opaque_class(qualname: str) -> type:
  if qualname not in _OPAQUE_CLASSES:
    _OPAQUE_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (OpaqueObject,),
                                     {"qualname": qualname})
  return _OPAQUE_CLASSES[qualname]


class EasyDict(dict):
  """``dnnlib.util.EasyDict``."""


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


def _reconstructor(cls, base, state):
  """``copyreg._reconstructor`` (protocol 0/1 pickles of plain objects)."""
  if not (isinstance(cls, type) and issubclass(cls, (OpaqueObject, dict))):
    raise TorchPickleError(f"refusing copyreg._reconstructor for {cls!r}")
  return cls.__new__(cls)


def _numpy_global(module: str, name: str):
  """numpy globals allowed in EDM pickles (scalars in init kwargs, arrays); numpy 1 and 2 names."""
  if name not in ("scalar", "_reconstruct", "dtype", "ndarray"):
    return None
  if name in ("dtype", "ndarray"):
    return getattr(np, name)
  try:
    from numpy._core import multiarray  # numpy >= 2
  except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray
  return getattr(multiarray, name)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray, ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 bytes: _codecs.encode(str, 'latin1')
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
}

# Namespaces whose unknown classes become inert OpaqueObjects. torch._utils / torch.storage
# are not among them: an unknown tensor rebuild function means a tensor kind we can't read.
_OPAQUE_NAMESPACES = ("torch", "training", "torch_utils", "dnnlib")
_STRICT_NAMESPACES = ("torch._utils", "torch.storage", "torch._tensor", "torch.serialization")


class _Unpickler(pickle.Unpickler):
  """Unpickler that resolves globals only through ``_ALLOWED`` and the stand-ins above."""

  def __init__(self, file, persistent_load=None):
    super().__init__(file)
    self._persistent_load = persistent_load

  def persistent_load(self, pid):
    if self._persistent_load is None:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a plain pickle")
    return self._persistent_load(pid)

  def find_class(self, module, name):
    # Protocol-2 pickles (torch.save) name Python 2 modules (__builtin__, copy_reg).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    key = (module, name)
    if key in _ALLOWED:
      return _ALLOWED[key]
    if module == "torch" and name in _STORAGE_DTYPES:
      return StorageType(name)
    if module == "torch.storage" and name == "_load_from_bytes":
      return _load_storage_bytes
    if module.split(".")[0] == "numpy":
      fn = _numpy_global(module, name)
      if fn is not None:
        return fn
    root = module.split(".")[0]
    if root in _OPAQUE_NAMESPACES and not module.startswith(_STRICT_NAMESPACES):
      return _opaque_class(f"{module}.{name}")
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not part of an "
                                 "EDM network pickle)")


def _read_legacy_torch_save(f) -> Any:
  """``torch.load`` of the legacy (non-zip) format, from a binary file object."""
  def load_plain():
    return _Unpickler(f).load()

  if load_plain() != _LEGACY_MAGIC:
    raise TorchPickleError("not a torch legacy serialisation (bad magic number)")
  protocol = load_plain()
  if protocol != 1001:
    raise TorchPickleError(f"unsupported torch serialisation protocol {protocol!r}")
  sys_info = load_plain()
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  storages: Dict[str, Storage] = {}

  def persistent_load(pid):
    if not isinstance(pid, tuple) or not pid:
      raise TorchPickleError(f"bad persistent id {pid!r}")
    if pid[0] == "module":  # source of a pickled module class (torch.save of modules)
      return None
    if pid[0] != "storage" or len(pid) != 6:
      raise TorchPickleError(f"unsupported persistent id {pid[:1]!r}")
    storage_type, key, _location, numel, view_metadata = pid[1:]
    if view_metadata is not None:
      raise TorchPickleError("storage views (pre-0.4 torch files) are not supported")
    if not isinstance(storage_type, StorageType):
      raise TorchPickleError(f"unknown storage type {storage_type!r}")
    if key not in storages:
      dtype = storage_type.dtype.newbyteorder("<" if little else ">")
      storages[key] = Storage(dtype, numel)
    return storages[key]

  result = _Unpickler(f, persistent_load).load()
  keys = load_plain()
  for key in keys:
    if key not in storages:
      raise TorchPickleError(f"storage {key!r} listed but never referenced")
    storage = storages[key]
    numel = int.from_bytes(f.read(8), "little" if little else "big")
    raw = f.read(numel * storage.dtype.itemsize)
    if len(raw) != numel * storage.dtype.itemsize:
      raise TorchPickleError("file ends inside a tensor storage (truncated?)")
    storage.data = np.frombuffer(raw, storage.dtype).astype(storage.dtype.newbyteorder("="))
    storage.numel = numel
  return result


def _load_storage_bytes(blob):
  """``torch.storage._load_from_bytes``: a storage serialised with the legacy ``torch.save``."""
  if isinstance(blob, (bytes, bytearray)) and blob[:2] == b"PK":
    return _read_zip_torch_save(io.BytesIO(blob))
  return _read_legacy_torch_save(io.BytesIO(blob))


def load_zip_pickle(zf: zipfile.ZipFile, pkl_name: str, tensor_dirs, unpickler=None) -> Any:
  """Unpickles member ``pkl_name`` of a torch zip archive; tensor bytes are looked up in
  ``tensor_dirs`` (first hit wins). ``unpickler``: the restricted unpickler class (default
  :class:`_Unpickler`; the TorchScript reader passes its subclass)."""
  names = set(zf.namelist())
  unpickler = unpickler or _Unpickler
  root = pkl_name[:pkl_name.rfind("/") + 1]
  order = "little"
  if root + "byteorder" in names:
    order = zf.read(root + "byteorder").decode().strip()
  storages: Dict[str, Storage] = {}

  def persistent_load(pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise TorchPickleError(f"unsupported persistent id {pid!r}")
    storage_type, key, _location, _numel = pid[1:5]
    if not isinstance(storage_type, StorageType):
      raise TorchPickleError(f"unknown storage type {storage_type!r}")
    if key not in storages:
      member = next((d + str(key) for d in tensor_dirs if d + str(key) in names), None)
      if member is None:
        raise TorchPickleError(f"tensor storage {key!r} missing from the archive")
      dtype = storage_type.dtype.newbyteorder("<" if order == "little" else ">")
      raw = zf.read(member)
      count = len(raw) // dtype.itemsize
      storages[key] = Storage(dtype, count,
                              np.frombuffer(raw, dtype, count).astype(dtype.newbyteorder("=")))
    return storages[key]

  with zf.open(pkl_name) as f:
    return unpickler(f, persistent_load).load()


def _read_zip_torch_save(file) -> Any:
  """``torch.load`` of the zip format: ``<root>/data.pkl`` + ``<root>/data/<key>``."""
  with zipfile.ZipFile(file) as zf:
    pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
      raise TorchPickleError("zip file without a data.pkl (not a torch.save file)")
    return load_zip_pickle(zf, pkl[0], (pkl[0][:-len("data.pkl")] + "data/",))


def read(path: str) -> Any:
  """Unpickles an EDM ``.pkl`` (or a ``torch.save`` file) into stand-in objects, without torch.

  Returns whatever the file holds (for EDM pickles a dict with ``'ema'`` a
  :class:`PersistentObject`); tensors are :class:`Tensor` (``np.asarray`` them).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchPickleError(f"{path}: no such file (nothing is downloaded: give a local path)")
  try:
    if zipfile.is_zipfile(path):
      return _read_zip_torch_save(path)
    with open(path, "rb") as f:
      head = f.read(16)
      f.seek(0)
      if head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"):  # legacy torch.save
        return _read_legacy_torch_save(f)
      return _Unpickler(f).load()
  except TorchPickleError as e:
    raise TorchPickleError(f"{path}: {e}") from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError,
          IndexError, zipfile.BadZipFile) as e:
    raise TorchPickleError(f"{path}: not a readable torch pickle "
                         f"({type(e).__name__}: {e})") from e



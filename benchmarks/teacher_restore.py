"""Memory of loading a large teacher: params only, straight into the run's shardings.

  python benchmarks/teacher_restore.py                       # ADM ImageNet-64 (296M) on 8 fake devices
  python benchmarks/teacher_restore.py --model=ddpmpp_cifar10 --fsdp=4

Writes a teacher workdir the way ``--mode=train_teacher`` does (``config.json``
and a checkpoint whose ``export`` item holds the EMA params; the ``state``
item, 4x the params with Adam's moments and the EMA, is not written: the
loader must not need it), then loads it through ``fdistill.teachers`` onto a
(data, fsdp) mesh of fake CPU devices and prints one markdown row: the params'
bytes, the bytes on disk that were read, what one device holds after the load
(ideal: params / fsdp), and what the loader before the assembly held per device
(the teacher run's whole train state, replicated on every device: 4x params).
"""
import argparse
import os
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from configs import architectures, common  # noqa: E402
from fdistill import models, teachers  # noqa: E402
from fdistill.io import checkpoint  # noqa: E402
from fdistill.parallel import mesh as mesh_lib  # noqa: E402
from fdistill.parallel import partition  # noqa: E402

MODELS = {"adm_imagenet64": (architectures.adm_imagenet64, (64, 64, 3), 1000),
          "ddpmpp_cifar10": (lambda: architectures.ddpmpp_cifar10(cond=True), (32, 32, 3), 10)}


def dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def gib(n):
  return f"{n / 2**30:.3f} GiB"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="adm_imagenet64", choices=sorted(MODELS))
  p.add_argument("--fsdp", type=int, default=8)
  args = p.parse_args(argv)
  make_model, x_shape, cond_dim = MODELS[args.model]
  config = common.base_config()
  config.model = make_model()
  config.objective.name = "dsm"
  config.mesh.update(dict(data=jax.device_count() // args.fsdp, fsdp=args.fsdp))
  mesh = mesh_lib.make_mesh(config.mesh)
  module = models.build(config.model)
  init = lambda key: models.init_params(module, key, (1,) + x_shape, cond_dim)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = partition.config_shardings(abstract, mesh, config.mesh)
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))

  with tempfile.TemporaryDirectory() as workdir:
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    checkpoint.save_config(workdir, config)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1, args=ocp.args.Composite(export=ocp.args.StandardSave(params),
                                            meta=ocp.args.JsonSave({"step": 1})))
    manager.wait_until_finished()
    manager.close()
    del params
    on_disk = dir_bytes(os.path.join(workdir, "checkpoints", "1", "export"))

    student = config.copy_and_resolve_references()
    student.teacher.update(dict(kind="checkpoint", workdir=workdir))
    start = time.time()
    spec = teachers.spec(student, x_shape, cond_dim)
    loaded = spec.load(partition.config_shardings(spec.abstract, mesh, student.mesh))
    jax.block_until_ready(loaded)
    seconds = time.time() - start
    device = jax.devices()[0]
    per_device = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(loaded)
                     for s in x.addressable_shards if s.device == device)

  print(f"# {args.model}: {models.param_count(abstract) / 1e6:.1f}M params, mesh "
        f"{dict(mesh.shape)} of {jax.device_count()} {device.platform} devices\n")
  print("| params | read from disk | held per device | ideal (params/fsdp) | "
        "before: train state replicated per device | load time |")
  print("|---|---|---|---|---|---|")
  print(f"| {gib(params_bytes)} | {gib(on_disk)} | {gib(per_device)} | "
        f"{gib(params_bytes / args.fsdp)} | {gib(4 * params_bytes)} | {seconds:.1f} s |")


if __name__ == "__main__":
  main()

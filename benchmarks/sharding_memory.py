"""Per-device memory of the f-distill step of a ~1B-parameter DiT under FSDP, on fake CPU devices.

  python benchmarks/sharding_memory.py                          # fsdp = 1, 2, 4, 8 on 8 devices
  python benchmarks/sharding_memory.py --fsdp=8 --remat --dtype=bfloat16
  python benchmarks/sharding_memory.py --no_gather               # mesh.fsdp_gather=False
  python benchmarks/sharding_memory.py --objective=dsm --depth=4  # quicker

For each fsdp size the mesh is (data = 8 / fsdp, fsdp). The steps are the
assembly's own (``fdistill.experiment.build``: the programs the training loop
runs; f-distill has a generator step and a critic step, the fake score and
discriminator updates, both with the frozen teacher as an argument); they are
lowered from ``jax.eval_shape`` structures and compiled, never run, so nothing
of the model's size is allocated. Prints one markdown row per fsdp and kind of step:

  state+teacher/dev  bytes of this device's shards of the train state (params,
                     Adam moments, EMA of generator, fake score, discriminator)
                     and of the teacher, from the shardings; ideal is total/fsdp
  arguments          XLA's ``argument_size_in_bytes`` (the same plus the batch)
  temp               XLA's ``temp_size_in_bytes`` (activations, gathered weights,
                     whole-size gradients before their reduction; with
                     ``--no_gather`` XLA may keep weights sharded and move
                     activations instead)
  ratio              state+teacher per device relative to fsdp=1
"""
import argparse
import os
import time

# Fake devices; and no LLVM optimisation: memory_analysis comes from buffer assignment, which
# happens before code generation, so this only makes the compiles faster.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import architectures, common  # noqa: E402
from fdistill import experiment, models, teachers  # noqa: E402
from fdistill.io import checkpoint  # noqa: E402
from fdistill.parallel import mesh as mesh_lib  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--objective", default="fdistill", choices=["fdistill", "dsm"])
  p.add_argument("--fsdp", default="1,2,4,8", help="comma-separated fsdp sizes")
  # 2048 x 13 blocks: 1.0B params per network, with half the blocks (and compile time)
  # of a 1536 x 24 model of the same size.
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--depth", type=int, default=13)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--resolution", type=int, default=32, help="latent side (patch 2)")
  p.add_argument("--channels", type=int, default=4)
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  p.add_argument("--remat", action="store_true", help="rematerialise each DiT block")
  p.add_argument("--micro_batches", type=int, default=1)
  p.add_argument("--no_gather", action="store_true",
                 help="mesh.fsdp_gather=False: weight placement left to XLA")
  return p.parse_args(argv)


def make_config(args):
  """A DiT config of the requested size with the objective's defaults."""
  c = common.base_config()
  c.model = architectures.dit("XL", args.resolution, args.channels, label_dim=1000)
  c.model.update(dict(hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                      dtype=args.dtype, remat=args.remat))
  c.optim.micro_batches = args.micro_batches
  c.train.batch_size = args.batch
  c.mesh.fsdp_gather = not args.no_gather
  if args.objective == "fdistill":
    c.teacher.kind = "checkpoint"  # generator and fake score start from the teacher
    c.objective = common.fdistill_objective(discriminator=dict(name="unet_heads"))
  return c


class ShapeOnlyData:
  """A stand-in dataset: the shapes the assembly needs, no data."""

  def __init__(self, x_shape, cond_dim):
    self.x_shape, self.cond_dim = x_shape, cond_dim


def abstract_teacher(config, x_shape, cond_dim):
  """(Teacher whose params are the model's ShapeDtypeStructs (nothing allocated), params)."""
  module = models.build(config.model)
  params = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0),
                                                     (1,) + x_shape, cond_dim))
  if config.objective.name == "dsm":
    return None, params
  return teachers.Teacher(models.make_denoiser(module), params, load=None), params


def shard_bytes(tree):
  """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree))


def compile_steps(config, dataset, teacher, mesh):
  """({kind: compiled step}, abstract state, abstract teacher) of the assembly on ``mesh``."""
  exp = experiment.build(config, mesh, teacher_params=False, dataset=dataset, teacher_spec=teacher)
  state = checkpoint.with_shardings(exp.abstract_state, exp.state_shardings)
  frozen = None
  if teacher is not None:
    frozen = checkpoint.with_shardings(teacher.abstract, exp.teacher_shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  b = config.train.batch_size
  batch = {"x": jax.ShapeDtypeStruct((b,) + dataset.x_shape, jnp.float32, sharding=batch_sh),
           "cond": jax.ShapeDtypeStruct((b, dataset.cond_dim), jnp.float32, sharding=batch_sh)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  compiled = {kind: step.lower(state, frozen, batch, rng).compile()
              for kind, step in exp.steps.items()}
  return compiled, state, frozen


def gib(n):
  return f"{n / 2**30:.2f} GiB"


def main(argv=None):
  args = parse_args(argv)
  config = make_config(args)
  x_shape = (args.resolution, args.resolution, args.channels)
  dataset = ShapeOnlyData(x_shape, 1000)
  teacher, params = abstract_teacher(config, x_shape, 1000)
  print(f"# {args.objective} step, DiT hidden={args.hidden} depth={args.depth} "
        f"({models.param_count(params) / 1e9:.3f}B params per network), batch {args.batch}, "
        f"compute {args.dtype}, remat={args.remat}, micro_batches={args.micro_batches}, "
        f"fsdp_gather={not args.no_gather}, {jax.device_count()} {jax.devices()[0].platform} "
        "devices\n")
  print("| fsdp | mesh (data, fsdp) | step | state+teacher/dev | arguments/dev | temp/dev | "
        "ratio | compile |")
  print("|---|---|---|---|---|---|---|---|")
  base = None
  for fsdp in [int(f) for f in args.fsdp.split(",")]:
    config.mesh.update({"data": jax.device_count() // fsdp, "fsdp": fsdp})
    mesh = mesh_lib.make_mesh(config.mesh)
    start = time.time()
    compiled, state, frozen = compile_steps(config, dataset, teacher, mesh)
    seconds = time.time() - start
    held = shard_bytes(state) + (shard_bytes(frozen) if frozen is not None else 0)
    base = base or held
    for kind, program in compiled.items():
      memory = program.memory_analysis()
      print(f"| {fsdp} | ({mesh.shape['data']}, {fsdp}) | {kind} | {gib(held)} | "
            f"{gib(memory.argument_size_in_bytes)} | {gib(memory.temp_size_in_bytes)} | "
            f"{held / base:.3f} | {seconds:.0f} s (all steps) |", flush=True)


if __name__ == "__main__":
  main()

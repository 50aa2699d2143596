"""Per-device memory of the f-distill step of a ~1B-parameter DiT under FSDP, on fake CPU devices.

  python benchmarks/sharding_memory.py                          # fsdp = 1, 2, 4, 8 on 8 devices
  python benchmarks/sharding_memory.py --fsdp=8 --remat --dtype=bfloat16
  python benchmarks/sharding_memory.py --no_gather               # mesh.fsdp_gather=False
  python benchmarks/sharding_memory.py --objective=dsm --depth=4  # quicker

For each fsdp size the mesh is (data = 8 / fsdp, fsdp). The step (generator,
fake score and discriminator updates, with the frozen teacher as an argument)
is lowered from ``jax.eval_shape`` structures and compiled, never run, so
nothing of the model's size is allocated. Prints one markdown row per fsdp:

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
import sys
import time

# Fake devices; and no LLVM optimisation: memory_analysis comes from buffer assignment, which
# happens before code generation, so this only makes the compiles faster.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import architectures, common  # noqa: E402
from fdistill import checkpoint, models, objectives  # noqa: E402
from fdistill.objectives import fdistill  # noqa: E402
from fdistill.parallel import mesh as mesh_lib  # noqa: E402
from fdistill.parallel import partition  # noqa: E402
from fdistill.train import loop  # noqa: E402


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
  if args.objective == "fdistill":
    c.teacher.kind = "checkpoint"  # generator and fake score start from the teacher
    c.objective = fdistill.objective_config(discriminator=dict(name="unet_heads"))
  return c


def abstract_context(config, x_shape, cond_dim):
  """Context whose teacher is the model itself, as ShapeDtypeStructs (nothing allocated)."""
  module = models.build(config.model)
  params = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0),
                                                     (1,) + x_shape, cond_dim))
  teacher = models.make_denoiser(module) if config.objective.name != "dsm" else None
  return objectives.Context(x_shape, cond_dim, teacher, params if teacher else None), params


def shard_bytes(tree):
  """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree))


def compile_step(config, ctx, mesh):
  """(compiled step, abstract state, abstract frozen) on ``mesh``, from shapes only."""
  objective = objectives.build(config, ctx)
  abstract, state_sh = loop.state_shardings(objective, mesh, config)
  state = checkpoint.with_shardings(abstract, state_sh)
  frozen = None
  if ctx.teacher_params is not None:
    frozen = checkpoint.with_shardings(
        ctx.teacher_params, partition.config_shardings(ctx.teacher_params, mesh, config.mesh))
  batch_sh = mesh_lib.batch_sharding(mesh)
  b = config.train.batch_size
  batch = {"x": jax.ShapeDtypeStruct((b,) + ctx.x_shape, jnp.float32, sharding=batch_sh),
           "cond": jax.ShapeDtypeStruct((b, ctx.cond_dim), jnp.float32, sharding=batch_sh)}
  repl = mesh_lib.replicated(mesh)
  step = jax.jit(objective.step,
                 in_shardings=(state_sh, loop.shardings_of(frozen, mesh), batch_sh, repl),
                 out_shardings=(state_sh, repl), donate_argnums=0)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return step.lower(state, frozen, batch, rng).compile(), state, frozen


def gib(n):
  return f"{n / 2**30:.2f} GiB"


def main(argv=None):
  args = parse_args(argv)
  config = make_config(args)
  x_shape = (args.resolution, args.resolution, args.channels)
  ctx, params = abstract_context(config, x_shape, 1000)
  print(f"# {args.objective} step, DiT hidden={args.hidden} depth={args.depth} "
        f"({models.param_count(params) / 1e9:.3f}B params per network), batch {args.batch}, "
        f"compute {args.dtype}, remat={args.remat}, micro_batches={args.micro_batches}, "
        f"fsdp_gather={not args.no_gather}, {jax.device_count()} {jax.devices()[0].platform} "
        "devices\n")
  print("| fsdp | mesh (data, fsdp) | state+teacher/dev | arguments/dev | temp/dev | ratio | "
        "compile |")
  print("|---|---|---|---|---|---|---|")
  base = None
  for fsdp in [int(f) for f in args.fsdp.split(",")]:
    config.mesh.update({"data": jax.device_count() // fsdp, "fsdp": fsdp})
    mesh = mesh_lib.make_mesh(config.mesh)
    start = time.time()
    with partition.fsdp_gather(not args.no_gather):
      compiled, state, frozen = compile_step(config, ctx, mesh)
    seconds = time.time() - start
    held = shard_bytes(state) + (shard_bytes(frozen) if frozen is not None else 0)
    base = base or held
    memory = compiled.memory_analysis()
    print(f"| {fsdp} | ({mesh.shape['data']}, {fsdp}) | {gib(held)} | "
          f"{gib(memory.argument_size_in_bytes)} | {gib(memory.temp_size_in_bytes)} | "
          f"{held / base:.3f} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
  main()

"""Speed, memory and FLOPs of every distillation objective's steps, as the trainer runs them.

  python benchmarks/distill_step.py        # GPU: all nets and objectives, b64/b256, fp32/bf16
  python benchmarks/distill_step.py --nets=ddpmpp --objectives=fdistill,sid --batches=64 \\
      --dtypes=float32,bfloat16 --steps=10 --warmup=2
  python benchmarks/distill_step.py --small --nets=ddpmpp --objectives=fdistill,sid \\
      --batches=8 --dtypes=float32 --steps=2 --warmup=1   # CPU, a few minutes

The steps are the assembly's own (``fdistill.experiment.build``: the jitted
programs the training loop runs, one per kind of step: "generator" and
"critic", and rCM's "scm_warmup"), compiled ahead of time from the jitted
function and then run. Networks: EDM's DDPM++ CIFAR-10 (55.7M params), EDM's
ADM ImageNet-64 (295.9M) and a DiT/2 on 32x32x4 latents (``--dit_size``,
default B: 130M). ``--small`` shrinks them (DDPM++ 32 channels and ADM 64, one
block per level; DiT hidden 128, depth 2) and turns LLVM's optimisation off, so
the script runs on a CPU (XLA:CPU needs minutes to compile a full-depth U-Net
step); small rows' times say nothing about speed, their FLOPs and
forward-equivalents do (except with ``--peer``, which keeps XLA's optimisation: its
rows are timed against PyTorch). ``--nets=mlp`` is the 2-D toy's MLP (every
objective's steps in seconds: the suite's check of the minimum). Objectives: ``fdistill`` (f-distill, the DMD/DMD2
family: FastGen's recipe, discriminator heads on the teacher's features),
``sid`` (Uni-Instruct with loss='sid': SiD; no discriminator is trained),
``expanded`` (Uni-Instruct's expanded forward KL, discriminator as f-distill's)
and ``rcm`` (sCM + DMD regulariser).
Precision is ``config.model.dtype`` (params float32, compute as named).

The teacher's params are freshly initialised random params of the same
network, placed on the device (no download): speed does not depend on them.
The state comes from ``exp.init(rng, teacher)`` as in a run (generator and fake
score copy the teacher).

Per (net, objective, kind of step, batch, dtype), one row:

  ms/step, img/s   median wall time of ``--steps`` timed steps after ``--warmup``
                   untimed ones, each ended by ``jax.block_until_ready``; img/s = batch / it
  peak             the device's ``memory_stats()['peak_bytes_in_use']`` of a process that
                   ran only this row (``--isolate``, the default; the peak covers the
                   teacher, the state, the step and the batch); where the device reports
                   no statistics (CPU) or rows share a process, XLA's
                   ``memory_analysis()`` of the step: argument + output + temp - aliased
                   (the donated state), marked ``xla``
  GFLOP/step       ``compiled.cost_analysis()['flops']`` of the step's executable (the
                   lowered module's analysis where the backend reports none; the JSON
                   also has the lowered module's, ``gflops_lowered``, as a cross-check)
  fwd-eq           step FLOPs / FLOPs of one forward of the same network at the same batch
                   and dtype (``cost_analysis`` of a jitted denoiser call): the step's cost
                   in network forwards, independent of the device
  minimum          the forward-equivalents of the passes the step cannot do without
                   (``minimum_passes.of``, each pass priced by XLA's FLOPs on this
                   network and batch: :func:`pass_flops`); ``vs min`` = step FLOPs / those
  compile          seconds to lower and compile the step
  peer, vs peer    ``--peer``: images/s of the PyTorch peer of the step (benchmarks/torch_peer.py:
                   EDM's networks, the public codes' way of writing the step, same batch and
                   precision, its own process) and fdistill / peer

A row that runs out of device memory reads OOM and the script goes on; any
other failure reads ``error`` with the exception. Rows are written to
``--out`` as JSON after every row, so a run cut short keeps what it measured;
``--budget_s`` starts no row after that many seconds (those read "not run").
``--kinds`` picks kinds of step (``generator``) or one objective's
(``sid:critic``), e.g. the issue's three: ``fdistill:generator,sid:generator,sid:critic``.
``--plan=issue`` runs the PyTorch reference's cells, most wanted first (:data:`ISSUE_PLAN`).
``--plan=rcm_attn`` times rCM's DiT student steps with the fused JVP attention kernel
(``attn_impl=flash_jvp``, what ``auto`` picks on a GPU) against XLA attention under
``jax.jvp`` (``xla``), in pairs (:data:`RCM_ATTN_PLAN`); ``--attn_impl=flash_jvp,xla``
does the same for any list of rows. The attention column says which ran.
With ``--cache_dir`` a rerun's compile times are cache hits.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from configs import architectures, common, toy2d_fdistill, toy2d_teacher
from fdistill import experiment, models, teachers
from fdistill.models import discriminator as disc_lib
from fdistill.parallel import mesh as mesh_lib
import minimum_passes  # benchmarks/ (the script's folder)

ALL_OBJECTIVES = ("fdistill", "sid", "expanded", "rcm")
# --small: XLA:CPU compile time is LLVM's; timings of small rows mean nothing anyway.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true",
                      # XLA:CPU's memory-minimising scheduler instead of the concurrency one,
                      # so --compile_only's temp bytes are a peak a memory-aware device
                      # scheduler could approach (-20% on a DDPM++ backward).
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
NETS = ("ddpmpp", "adm", "dit")
# --peer (benchmarks/torch_peer.py): the steps of the issue's PyTorch table, on EDM's networks.
PEER_STEPS = ("fdistill:generator", "fdistill:critic", "sid:generator", "sid:critic")
PEER_NETS = ("ddpmpp", "adm")
NETS_BY_NAME = NETS + ("mlp",)  # --nets=mlp: the toy MLP (every objective's rows in seconds)

# The PyTorch figures of the step-benchmark issue (H100, images/s; peak GB in order of the rows).
REFERENCE = """\
PyTorch reference (the issue; H100, images/s):
  setting                   DMD/f-distill gen  SiD gen  fake-score  peak GB
  CIFAR DDPM++ b64  fp32    455                285      523         22.8
  CIFAR DDPM++ b256 fp32    577                OOM      689         77.2
  CIFAR DDPM++ b256 bf16    695                452      892         76.0
  ADM-64       b64  bf16    104                OOM      129         77.7
(our rows: step 'generator' = gen; 'critic' = fake score, plus the discriminator for
f-distill and expanded)"""

# --plan=issue: the reference's cells first (same net, batch and dtype), most wanted first, so
# a run cut short by --budget_s keeps the comparisons that matter: (net, batch, dtype, rows).
ISSUE_PLAN = (
    ("ddpmpp", 64, "float32", ("fdistill:generator", "sid:generator", "sid:critic")),
    ("adm", 64, "bfloat16", ("fdistill:generator", "sid:critic", "sid:generator")),
    ("ddpmpp", 256, "bfloat16", ("fdistill:generator", "sid:generator", "sid:critic")),
    ("ddpmpp", 256, "float32", ("fdistill:generator", "sid:generator", "sid:critic")),
    ("ddpmpp", 64, "bfloat16", ("fdistill:generator", "sid:generator", "sid:critic")),
)

# --plan=rcm_attn: rCM's student steps on the DiT with the fused JVP attention kernel against
# XLA attention under jax.jvp (same net, batch, dtype; rows in pairs). scm_warmup is the sCM
# part alone (target with the tangent, then the regression), where the kernel runs;
# generator adds the DMD rollouts. The kernel needs a GPU: elsewhere flash_jvp runs in Pallas
# interpret mode (slow, correct), so on a CPU this plan checks only that the rows build.
RCM_ATTN_IMPLS = ("flash_jvp", "xla")
RCM_ATTN_PLAN = (
    ("dit", 64, "bfloat16", ("rcm:scm_warmup", "rcm:generator")),
    ("dit", 64, "float32", ("rcm:scm_warmup", "rcm:generator")),
    ("dit", 256, "bfloat16", ("rcm:scm_warmup", "rcm:generator")),
)


# ---------------------------------------------------------------------------
# Configs.


def net_section(net, small, dit_size="B"):
  """(config.model, per-example shape, class count, config.objective.discriminator)."""
  heads = lambda *indices: dict(name="unet_heads", feature_indices=indices)
  if net == "ddpmpp":
    model = architectures.ddpmpp_cifar10(cond=True)
    if small:
      model.update(dict(model_channels=32, num_blocks=1))
    return model, (32, 32, 3), 10, heads(0, 1, -1)   # FastGen CIFAR-10: heads on 32, 16, 8
  if net == "adm":
    model = architectures.adm_imagenet64()
    if small:                                    # 64..256 channels: whole 64-channel heads
      model.update(dict(model_channels=64, num_blocks=1))
    return model, (64, 64, 3), 1000, heads(-1)  # FastGen ImageNet-64: the bottleneck head
  if net == "dit":
    model = architectures.dit(dit_size, img_resolution=32, in_channels=4, label_dim=1000)
    if small:
      model.update(dict(hidden_size=128, depth=2, num_heads=2))
    return model, (32, 32, 4), 1000, heads(-1)
  if net == "mlp":  # the 2-D toy's networks (configs/toy2d_*.py): every objective in seconds
    return (toy2d_teacher.get_config().model, (2,), 0,
            toy2d_fdistill.get_config().objective.discriminator)
  raise ValueError(f"net={net!r} is not valid; valid values: {', '.join(NETS_BY_NAME)}")


def objective_section(objective, discriminator):
  """``config.objective`` of the published recipe each objective is run with."""
  heads = dict(discriminator)
  if objective == "fdistill":  # configs/cifar10_fdistill.py:fastgen_recipe
    return common.fdistill_objective(
        divergence="forward_kl", gen_every=5, gan_weight=1e-3, sigma_dist="karras",
        ratio_bins=10, fake_loss_weight="none", discriminator=heads,
        fake_optim=dict(grad_clip=0.0), disc_optim=dict(grad_clip=0.0))
  if objective == "sid":       # SiD: no ratio, so no discriminator is trained
    return common.uni_instruct_objective(loss="sid", discriminator=heads)
  if objective == "expanded":  # Uni-Instruct, forward KL: the ratio from f-distill's heads
    return common.uni_instruct_objective(loss="expanded", divergence="forward_kl",
                                         discriminator=heads)
  if objective == "rcm":       # configs/cifar10_rcm.py:rcm_recipe, variant rcm
    return common.rcm_objective(
        p_mean=-1.0, p_std=1.4, tangent="jvp", warmup="scm", tangent_warmup_steps=10_000,
        norm_c=0.1, time_embedding="edm", dmd_weight=0.01, scm_warmup_steps=10_000,
        gen_every=5, rollout_max_steps=4, dmd_time="shift", dmd_shift=5.0,
        sampler_times=(1.1,), fake_loss_weight="edm", fake_optim=dict(lr=2e-5, grad_clip=0.0))
  raise ValueError(f"objective={objective!r} is not valid; valid values: "
                   f"{', '.join(ALL_OBJECTIVES)}")


def make_config(spec):
  """The run config of one row: base defaults, the net, the objective's recipe, the batch."""
  model, x_shape, cond_dim, disc = net_section(spec["net"], spec["small"], spec["dit_size"])
  model.dtype = spec["dtype"]
  if spec.get("remat"):
    if "remat" not in model:
      raise ValueError(f"--remat: model.name={model.name!r} has no remat option")
    model.remat = True
  # The configs' attention: XLA for f-distill / Uni-Instruct, 'auto' (the fused JVP kernel on
  # GPU) for rCM, whose tangent runs through attention.
  if "attn_impl" in model or spec["attn_impl"]:  # the MLP has no attention
    model.attn_impl = spec["attn_impl"] or ("auto" if spec["objective"] == "rcm" else "xla")
  c = common.base_config()
  c.model = model
  c.teacher.kind = "checkpoint"  # a network teacher: generator and fake score copy it
  c.generator.sigma_init = 80.0
  c.objective = objective_section(spec["objective"], disc)
  c.optim.update(dict(lr=1e-4, weight_decay=0.01, grad_clip=10.0, ema_decay=0.9999))
  c.train.batch_size = spec["batch"]
  c.optim.micro_batches = spec.get("micro_batches", 1)
  return c, x_shape, cond_dim


class ShapeOnlyData:
  """A stand-in dataset: the shapes the assembly needs, no data."""

  def __init__(self, x_shape, cond_dim):
    self.x_shape, self.cond_dim = x_shape, cond_dim


def random_teacher(config, x_shape, cond_dim):
  """(Teacher with abstract params, init(rng) -> fresh params of the network): no download."""
  module = models.build(config.model)
  init = lambda rng: models.init_params(module, rng, (1,) + tuple(x_shape), cond_dim)
  abstract = jax.eval_shape(init, jax.random.key(0))
  return teachers.Teacher(models.make_denoiser(module, config.model.sigma_data), abstract,
                          load=None), init


# ---------------------------------------------------------------------------
# Measurements.


def _cost_flops(analysis):
  """FLOPs from a ``cost_analysis()`` result (a dict, a list of dicts, or None)."""
  if analysis is None:
    return 0.0
  if isinstance(analysis, (list, tuple)):
    return float(sum(_cost_flops(a) for a in analysis))
  return float(analysis.get("flops", 0.0))


def program_flops(lowered, compiled):
  """The executable's FLOPs; the lowered module's where the backend reports none."""
  flops = _cost_flops(compiled.cost_analysis())
  return flops if flops > 0 else _cost_flops(lowered.cost_analysis())


def forward_flops(teacher_spec, batch, x_shape, cond_dim):
  """FLOPs of one denoiser forward at ``batch`` (compiled from shapes, nothing allocated)."""
  fn = jax.jit(lambda p, x, s, c: teacher_spec.apply(p, x, s, c))
  lowered = fn.lower(teacher_spec.abstract,
                     jax.ShapeDtypeStruct((batch,) + tuple(x_shape), jnp.float32),
                     jax.ShapeDtypeStruct((batch,), jnp.float32),
                     jax.ShapeDtypeStruct((batch, cond_dim), jnp.float32) if cond_dim else None)
  return program_flops(lowered, lowered.compile())


def pass_flops(config, teacher_spec, batch, x_shape, cond_dim, names):
  """XLA's FLOPs of each pass in ``names`` (:data:`minimum_passes.PASSES`) on the
  row's network at ``batch``, compiled from shapes: the prices of the step's minimum.

  Each is a program of its own, and the backward and tangent halves are differences:
  input_grad = (forward + backward to the input) - forward; jvp = (primal + tangent) -
  forward; disc_train = the discriminator's logit with the backward to its params;
  disc_input_grad = (logit + backward to x_t) - logit.
  """
  apply = teacher_spec.apply
  sd = jax.ShapeDtypeStruct
  x = sd((batch,) + tuple(x_shape), jnp.float32)
  s = sd((batch,), jnp.float32)
  c = sd((batch, cond_dim), jnp.float32) if cond_dim else None
  square = lambda out: jnp.mean(jnp.square(out.astype(jnp.float32)))
  net_args = (teacher_spec.abstract, x, s, c)
  programs = {
      "forward": (lambda p, x, s, c: apply(p, x, s, c), net_args),
      "train": (jax.grad(lambda p, x, s, c: square(apply(p, x, s, c))), net_args),
      "input_grad": (jax.grad(lambda p, x, s, c: square(apply(p, x, s, c)), argnums=1),
                     net_args),
      "jvp": (lambda p, x, s, c: jax.jvp(lambda x, s: apply(p, x, s, c), (x, s), (x, s)),
              net_args),
  }
  if {"disc_train", "disc_input_grad"} & set(names):
    shapes = disc_lib.teacher_feature_shapes(apply, teacher_spec.abstract, x_shape, cond_dim)
    disc = disc_lib.build(config.objective.discriminator, x_shape, shapes,
                          config.model.sigma_data)

    def logit(dp, p, x, s, c):
      feats = apply(p, x, s, c, return_features=True)[1] if disc.uses_features else None
      return square(disc.apply(dp, x, s, feats))

    disc_args = (jax.eval_shape(disc.init, jax.random.key(0)),) + net_args
    programs.update(disc_logit=(logit, disc_args), disc_train=(jax.grad(logit), disc_args),
                    disc_input_grad=(jax.grad(logit, argnums=2), disc_args))
  base = {"input_grad": "forward", "jvp": "forward", "disc_input_grad": "disc_logit"}
  needed = set(names) | {base[n] for n in names if n in base}
  flops = {}
  for name in needed:
    key = (repr(config.model), repr(config.objective.get("discriminator")), batch, name)
    if key not in _PRICES:  # rows of one process share the prices of one network and batch
      fn, args = programs[name]
      lowered = jax.jit(fn).lower(*args)
      _PRICES[key] = program_flops(lowered, lowered.compile())
    flops[name] = _PRICES[key]
  return {n: flops[n] - (flops[base[n]] if n in base else 0.0) for n in names}


_PRICES = {}


def minimum_flops(passes, prices):
  """FLOPs of the minimum: the sum of each pass's count times its price."""
  return sum(n * prices[name] for name, n in passes.items())


def xla_memory(compiled):
  """XLA's buffer assignment of ``compiled`` (known before it runs): argument, output, temp
  and aliased (donated) bytes, and their total ``argument + output + temp - aliased``."""
  m = compiled.memory_analysis()
  if m is None:
    return {"xla_bytes": 0}
  parts = {f"xla_{name}_bytes": int(getattr(m, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "temp", "alias")}
  total = (parts["xla_argument_bytes"] + parts["xla_output_bytes"] + parts["xla_temp_bytes"]
           - parts["xla_alias_bytes"])
  return dict(parts, xla_bytes=total)


def device_peak():
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def is_oom(error):
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OOM", "Resource exhausted"))


def measure(spec, row):
  """Fills ``row``: build the assembly, init the state from a random teacher, compile the step
  of ``spec['kind']``, time it. ``spec['isolated']``: this process runs nothing else, so the
  device's peak memory is this row's. What was measured stays in ``row`` if a later part
  fails (an OOM row keeps its compile-time FLOPs and XLA's bytes)."""
  config, x_shape, cond_dim = make_config(spec)
  b = spec["batch"]
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  teacher_spec, init_teacher = random_teacher(config, x_shape, cond_dim)
  exp = experiment.build(config, mesh, teacher_params=False,
                         dataset=ShapeOnlyData(x_shape, cond_dim), teacher_spec=teacher_spec)
  row.update(params_M=round(models.param_count(teacher_spec.abstract) / 1e6, 1),
             attn_impl=config.model.get("attn_impl", "none"),
             micro_batches=config.optim.micro_batches, device=jax.devices()[0].device_kind,
             steps=spec["steps"], warmup=spec["warmup"])
  if spec["kind"] not in exp.steps:
    raise ValueError(f"{spec['objective']} has no step {spec['kind']!r}; it has "
                     f"{', '.join(exp.steps)}")
  fwd = spec.get("forward_flops") or forward_flops(teacher_spec, b, x_shape, cond_dim)
  row["forward_gflops"] = fwd / 1e9

  if spec.get("compile_only"):
    return compile_only(exp, teacher_spec, spec, row, x_shape, cond_dim, fwd)
  rng = jax.random.key(spec.get("seed", 0))
  t_rng, s_rng, x_rng, c_rng, step_rng = jax.random.split(rng, 5)
  teacher_params = jax.jit(init_teacher, out_shardings=exp.teacher_shardings)(t_rng)
  state = exp.init(s_rng, teacher_params)
  batch_sh = mesh_lib.batch_sharding(mesh)
  batch = {"x": jax.device_put(jax.random.normal(x_rng, (b,) + x_shape), batch_sh)}
  if cond_dim:
    labels = jax.random.randint(c_rng, (b,), 0, cond_dim)
    batch["cond"] = jax.device_put(jax.nn.one_hot(labels, cond_dim), batch_sh)

  start = time.perf_counter()
  lowered = exp.steps[spec["kind"]].lower(state, teacher_params, batch, step_rng)
  compiled = lowered.compile()
  row["compile_s"] = time.perf_counter() - start
  analyse(exp, teacher_spec, spec, row, lowered, compiled, x_shape, cond_dim, fwd)

  times = []
  for i in range(spec["warmup"] + spec["steps"]):
    start = time.perf_counter()
    state, metrics = compiled(state, teacher_params, batch, jax.random.fold_in(step_rng, i))
    jax.block_until_ready((state, metrics))
    if i >= spec["warmup"]:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  peak = device_peak() if spec.get("isolated") else None
  row.update(status="ok", step_ms=1e3 * step_s, images_per_s=b / step_s,
             peak_bytes=peak if peak is not None else row["xla_bytes"],
             peak_source="device" if peak is not None else "xla",
             skipped_updates=int(state["skipped"]))
  return row


def analyse(exp, teacher_spec, spec, row, lowered, compiled, x_shape, cond_dim, fwd):
  """What XLA knows of the compiled step without running it: FLOPs, forward-equivalents,
  the minimum passes' FLOPs and the buffer assignment's bytes."""
  flops = program_flops(lowered, compiled)
  row.update(gflops=flops / 1e9, gflops_lowered=_cost_flops(lowered.cost_analysis()) / 1e9,
             forward_equivalents=flops / fwd if fwd else None, **xla_memory(compiled))
  passes = minimum_passes.of(exp.config).get(spec["kind"], {})
  if passes and fwd:
    prices = pass_flops(exp.config, teacher_spec, spec["batch"], x_shape, cond_dim, tuple(passes))
    minimum = minimum_flops(passes, prices)
    row.update(minimum_passes=dict(passes), minimum_forward_equivalents=minimum / fwd,
               pass_gflops={k: v / 1e9 for k, v in prices.items()},
               passes_ratio=flops / minimum)


def compile_only(exp, teacher_spec, spec, row, x_shape, cond_dim, fwd):
  """``--compile_only``: the step lowered from shapes and compiled, never run (nothing of the
  model's size is allocated), so a GPU-sized step's memory can be read on a CPU."""
  b = spec["batch"]
  batch_sh = mesh_lib.batch_sharding(exp.mesh)
  struct = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
  batch = {"x": struct((b,) + x_shape, batch_sh)}
  if cond_dim:
    batch["cond"] = struct((b, cond_dim), batch_sh)
  with_sh = lambda tree, shs: jax.tree_util.tree_map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shs)
  start = time.perf_counter()
  lowered = exp.steps[spec["kind"]].lower(with_sh(exp.abstract_state, exp.state_shardings),
                                          with_sh(teacher_spec.abstract, exp.teacher_shardings),
                                          batch, jax.random.key(0))
  compiled = lowered.compile()
  row["compile_s"] = time.perf_counter() - start
  analyse(exp, teacher_spec, spec, row, lowered, compiled, x_shape, cond_dim, fwd)
  row.update(status="compiled", peak_bytes=row["xla_bytes"], peak_source="xla")
  return row


def failed_row(spec, status):
  return dict(net=spec["net"], objective=spec["objective"], kind=spec["kind"],
              batch=spec["batch"], dtype=spec["dtype"], attn_impl=spec["attn_impl"] or "config",
              remat=spec.get("remat", False), status=status)


def measure_safely(spec):
  """:func:`measure`, with OOM and other failures as a row."""
  row = failed_row(spec, "running")
  try:
    return measure(spec, row)
  except Exception as e:  # noqa: BLE001  (a failed row must not stop the table)
    row["status"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
    return row
  finally:
    gc.collect()


def measure_peer(spec):
  """The PyTorch peer's step of ``spec`` (:mod:`torch_peer`): ``{status, step_ms,
  images_per_s}``; torch is imported only here (test-only dependency)."""
  try:
    import torch_peer  # noqa: PLC0415  (benchmarks/torch_peer.py; needs torch)
    config, x_shape, cond_dim = make_config(spec)
    return dict(torch_peer.measure(config.model, x_shape, cond_dim, spec["objective"],
                                   spec["kind"], spec["batch"], spec["dtype"], spec["steps"],
                                   spec["warmup"]), status="ok")
  except Exception as e:  # noqa: BLE001  (a failed peer must not stop the table)
    return {"status": "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"}


def add_peer(row, peer):
  """``row`` with the peer's figures and the ratio fdistill / peer (images/s)."""
  row = dict(row, peer_status=peer["status"])
  if peer["status"] == "ok":
    row.update(peer_step_ms=peer["step_ms"], peer_images_per_s=peer["images_per_s"],
               peer_threads=peer.get("threads"))
    if row.get("status") == "ok":
      row["vs_peer"] = row["images_per_s"] / peer["images_per_s"]
  return row


def fast_compile_flags(flags):
  """``flags`` (an XLA_FLAGS value) with :data:`FAST_COMPILE_FLAGS` added."""
  return " ".join([flags] + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]).strip()


def measure_in_subprocess(spec, timeout):
  """The row measured by a fresh Python process (``--_row``), so its device peak is its own
  and an OOM or a crash leaves this process's device untouched."""
  fd, out = tempfile.mkstemp(prefix="distill_step_row_", suffix=".json")
  os.close(fd)
  os.remove(out)  # the child writes it only when it measured something
  cmd = [sys.executable, os.path.abspath(__file__), "--_row", json.dumps(spec), "--_row_out", out]
  env = dict(os.environ)
  if spec["fast_compile"]:
    env["XLA_FLAGS"] = fast_compile_flags(env.get("XLA_FLAGS", ""))
  try:
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env=env)
  except subprocess.TimeoutExpired:
    return failed_row(spec, f"error: over --row_timeout={timeout} s")
  if os.path.exists(out):
    with open(out) as f:
      row = json.load(f)
    os.remove(out)
    return row
  tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
  status = "OOM" if is_oom(proc.stderr) else f"error: exit {proc.returncode}: {' | '.join(tail)}"
  return failed_row(spec, status[:400])


# ---------------------------------------------------------------------------
# Table.

COLUMNS = ("| net | params | objective | step | batch | dtype | attention | remat | ms/step | "
           "img/s | peak GB | GFLOP/step | fwd-eq | minimum | vs min | compile s | peer img/s | "
           "vs peer |")


def markdown_row(r):
  params = f"{r['params_M']}M" if "params_M" in r else ""
  head = (f"| {r['net']} | {params} | {r['objective']} | {r['kind']} | "
          f"{r['batch']} | {r['dtype']} | {r.get('attn_impl', '')} | "
          f"{'yes' if r.get('remat') else 'no'} |")
  if r["status"] not in ("ok", "compiled"):
    return head + f" {r['status']} | | | | | | | | | |"
  timed = (f" {r['step_ms']:.1f} | {r['images_per_s']:.1f} |" if r["status"] == "ok" else
           " compiled only | - |")
  peak = f"{r['peak_bytes'] / 1e9:.2f}" + (" (xla)" if r["peak_source"] == "xla" else "")
  fwd_eq = f"{r['forward_equivalents']:.2f}" if r["forward_equivalents"] else "-"
  minimum = (f"{r['minimum_forward_equivalents']:.2f} | {r['passes_ratio']:.2f}"
             if "passes_ratio" in r else "- | -")
  peer = ("- | -" if "peer_status" not in r else
          f"{r['peer_status']} | -" if r["peer_status"] != "ok" else
          f"{r['peer_images_per_s']:.1f} | {r['vs_peer']:.2f}")
  return head + (f"{timed} {peak} | {r['gflops']:.1f} | {fwd_eq} | {minimum} | "
                 f"{r['compile_s']:.0f} | {peer} |")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--plan", default="", choices=["", "issue", "rcm_attn"],
                 help="issue: the reference's cells in priority order; rcm_attn: rCM's DiT "
                      "student steps, fused JVP attention kernel vs XLA (replace the lists)")
  p.add_argument("--small", action="store_true",
                 help="reduced widths and batches 8,16 (CPU in a few minutes)")
  p.add_argument("--nets", default=",".join(NETS))
  p.add_argument("--objectives", default="", help="default: all of ALL_OBJECTIVES")
  p.add_argument("--kinds", default="",
                 help="kinds of step: generator,critic or objective:kind (default: all)")
  p.add_argument("--batches", default="", help="default 64,256 (--small: 8,16)")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=10, help="timed steps per row")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
  p.add_argument("--dit_size", default="B", choices=sorted(architectures.DIT_SIZES))
  p.add_argument("--attn_impl", default="",
                 help="override model.attn_impl; a list (flash_jvp,xla) gives a row per value "
                      "('' = the configs': auto for rcm, i.e. the kernel on GPU; xla otherwise)")
  p.add_argument("--remat", default="0",
                 help="model.remat per row: 0, 1 or a list 0,1 (a row per value; U-Nets, DiT)")
  p.add_argument("--micro_batches", type=int, default=1,
                 help="config.optim.micro_batches of every row (gradient accumulation)")
  p.add_argument("--compile_only", action="store_true",
                 help="lower from shapes and compile, never run: FLOPs and XLA's memory of "
                      "steps too big for this machine (e.g. ADM-64 on a CPU)")
  p.add_argument("--isolate", type=int, default=1,
                 help="1: each row in a fresh process (its own device peak; the default)")
  p.add_argument("--row_timeout", type=float, default=900.0, help="seconds per isolated row")
  p.add_argument("--budget_s", type=float, default=0.0,
                 help="start no row after this many seconds (0: no limit)")
  p.add_argument("--cache_dir", default="", help="JAX persistent compilation cache (reruns)")
  p.add_argument("--peer", action="store_true",
                 help="also time the PyTorch peer of each row that has one (torch_peer.py; "
                      "needs the test-only torch) and print fdistill / peer")
  p.add_argument("--out", default="/tmp/distill_step.json")
  p.add_argument("--_row", default="", help=argparse.SUPPRESS)
  p.add_argument("--_row_out", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _list(text):
  return [t for t in text.split(",") if t]


def _kinds_of(objective):
  """The kinds of step an objective's assembly has (from its defaults; no device needed)."""
  if objective == "rcm":
    return ["generator", "critic", "scm_warmup"]
  return ["generator", "critic"]


def _remats(args):
  values = _list(args.remat)
  if not values or any(v not in ("0", "1") for v in values):
    raise ValueError(f"--remat={args.remat!r}: valid values are 0, 1 or 0,1")
  return [v == "1" for v in values]


def fast_compile(args):
  """Whether rows compile with :data:`FAST_COMPILE_FLAGS`: ``--small`` (small rows' times mean
  nothing) and ``--compile_only`` (buffer assignment, hence the memory figures, happens before
  LLVM), never with ``--peer`` (timed against PyTorch, the step runs as XLA optimises it)."""
  return (args.small or args.compile_only) and not args.peer


def _spec(args, **row):
  return dict(row, small=args.small, dit_size=args.dit_size, steps=args.steps,
              warmup=args.warmup, cache_dir=args.cache_dir, compile_only=args.compile_only,
              micro_batches=args.micro_batches,
              fast_compile=fast_compile(args))


def _plan_specs(args, plan, impls):
  """Rows of a plan, ``(net, batch, dtype, "objective:kind" rows)``, one per attention impl."""
  return [_spec(args, net=net, objective=row.split(":")[0], kind=row.split(":")[1],
                batch=batch, dtype=dtype, attn_impl=impl)
          for net, batch, dtype, rows in plan for row in rows for impl in impls]


def row_specs(args):
  """The rows to measure, in order: ``--plan``'s, or every combination of the lists."""
  impls = _list(args.attn_impl) or [""]
  if args.plan == "issue":
    return _plan_specs(args, ISSUE_PLAN, impls)
  if args.plan == "rcm_attn":
    small = lambda b: min(b, 8) if args.small else b  # --small: a CPU check of the rows
    plan = tuple((net, small(b), dtype, rows) for net, b, dtype, rows in RCM_ATTN_PLAN)
    return _plan_specs(args, plan, _list(args.attn_impl) or RCM_ATTN_IMPLS)
  objective_names = _list(args.objectives) or list(ALL_OBJECTIVES)
  for name in objective_names:
    if name not in ALL_OBJECTIVES:
      raise ValueError(f"--objectives: {name!r} is not available; valid: "
                       f"{', '.join(ALL_OBJECTIVES)}")
  for net in _list(args.nets):
    if net not in NETS_BY_NAME:
      raise ValueError(f"--nets: {net!r} is not valid; valid: {', '.join(NETS_BY_NAME)}")
  batches = [int(b) for b in _list(args.batches or ("8,16" if args.small else "64,256"))]
  kinds = _list(args.kinds)
  specs = []
  for net in _list(args.nets):
    for objective in objective_names:
      for batch in batches:
        for dtype in _list(args.dtypes):
          for kind in _kinds_of(objective):
            if kinds and kind not in kinds and f"{objective}:{kind}" not in kinds:
              continue
            specs.extend(_spec(args, net=net, objective=objective, kind=kind, batch=batch,
                               dtype=dtype, attn_impl=impl, remat=remat)
                         for impl in impls for remat in _remats(args))
  unmatched = [k for k in kinds
               if not any(k in (s["kind"], f"{s['objective']}:{s['kind']}") for s in specs)]
  if unmatched:
    raise ValueError(f"--kinds: {unmatched[0]!r} matches no step of --objectives")
  return specs


def torch_peer_rows(spec):
  """Whether the row has a PyTorch peer (:data:`PEER_STEPS` on EDM's networks)."""
  return spec["net"] in PEER_NETS and f"{spec['objective']}:{spec['kind']}" in PEER_STEPS


def _use_cache(cache_dir):
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None):
  """Measures every row; prints the table; returns (and writes to ``--out``) the JSON."""
  args = parse_args(argv)
  if args._row:  # a child of --isolate: one row (or its peer), written to --_row_out
    spec = json.loads(args._row)
    _use_cache(spec.get("cache_dir", ""))
    row = measure_peer(spec) if spec.get("peer") else measure_safely(dict(spec, isolated=True))
    with open(args._row_out, "w") as f:
      json.dump(row, f)
    return row

  if args.steps < 1 or args.warmup < 0:
    raise ValueError("--steps must be >= 1 and --warmup >= 0")
  specs = row_specs(args)
  if not args.isolate:
    _use_cache(args.cache_dir)
  print(REFERENCE)
  print(f"\n# distill steps: {len(specs)} rows, {args.steps} timed steps after {args.warmup} "
        f"warm-up, {'small' if args.small else 'full-size'} nets, "
        f"{'one process per row' if args.isolate else 'one process'}\n")
  print(COLUMNS)
  print("|" + "---|" * (COLUMNS.count("|") - 1), flush=True)
  result = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "rows": []}
  fwd_cache = {}  # (net, batch, dtype) -> one forward's FLOPs, so it compiles once
  start = time.time()
  for spec in specs:
    key = (spec["net"], spec["batch"], spec["dtype"])
    spec = dict(spec, forward_flops=fwd_cache.get(key))
    if args.budget_s and time.time() - start > args.budget_s:
      row = failed_row(spec, f"not run (--budget_s={args.budget_s:g})")
    elif args.isolate:
      row = measure_in_subprocess(spec, args.row_timeout)
    else:
      row = measure_safely(spec)
    if row.get("forward_gflops"):
      fwd_cache[key] = row["forward_gflops"] * 1e9
    if args.peer and torch_peer_rows(spec):
      peer_spec = dict(spec, peer=True)
      row = add_peer(row, measure_in_subprocess(peer_spec, args.row_timeout) if args.isolate
                     else measure_peer(peer_spec))
    result["rows"].append(row)
    print(markdown_row(row), flush=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  devices = sorted({r["device"] for r in result["rows"] if "device" in r})
  print(f"\ndevice: {', '.join(devices) or 'unknown'}; jax {jax.__version__}; "
        f"{time.time() - start:.0f} s; rows in {args.out}")
  return result


if __name__ == "__main__":
  # Before the backend starts (an isolated row's child gets them from its parent instead).
  if fast_compile(parse_args()):
    os.environ["XLA_FLAGS"] = fast_compile_flags(os.environ.get("XLA_FLAGS", ""))
  main()

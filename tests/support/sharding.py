"""Shared checks of the sharding tests: an objective's steps on 1 device vs (data=2, fsdp=4).

The programs are the assembly's own (``fdistill.experiment.build``), the ones
the training loop runs: one jitted function per kind of step. Each is compiled
once per mesh (AOT, cached), and the same executables serve the numerics, the
HLO inspection and the memory check.
"""
import functools
import re

import jax
import numpy as np

from configs import common, toy2d_teacher
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import partition
from fdistill import experiment

BATCH = 32


def mesh_section(**fields):
  """A complete ``config.mesh`` (configs/common.py) with ``fields`` set."""
  section = common.base_config().mesh
  section.update(fields)
  return section


SHARDED_MESH = mesh_section(data=2, fsdp=4)
NUM_STEPS = 2  # f-distill: one generator and one critic update (gen_every=2)


def dsm_config():
  c = toy2d_teacher.get_config("gmm8")
  c.model.hidden = (64, 64)
  c.model.emb_dim = 32
  c.teacher.kind = "analytic"  # unused by DSM, but exercises the sharded frozen argument
  return c


def fdistill_config():
  """f-distill of the exact GMM teacher; generator step first, critic step second."""
  from configs import toy2d_fdistill
  c = toy2d_fdistill.get_config("js,teacher=analytic,distribution=gmm8")
  c.model.hidden = (64, 64)
  c.model.emb_dim = 32
  c.objective.discriminator.hidden = (64, 64)
  c.objective.warmup_critic_steps = 0
  c.objective.gen_every = 2
  return c


CONFIGS = {"dsm": dsm_config, "fdistill": fdistill_config}


def _with_mesh(config, mesh_fields):
  config = config.copy_and_resolve_references()
  config.mesh.update(mesh_fields)
  config.mesh.fsdp_min_size = 1024  # shard the toy networks' 64x64 kernels
  return config


@functools.lru_cache(maxsize=None)
def compiled_steps(name, sharded):
  """(experiment, {kind: compiled step}, batch) of objective ``name`` on a 1- or 8-device mesh."""
  config = _with_mesh(CONFIGS[name](), SHARDED_MESH if sharded else {"data": 1, "fsdp": 1})
  devices = jax.devices() if sharded else jax.devices()[:1]
  exp = experiment.build(config, mesh_lib.make_mesh(config.mesh, devices))
  batch = exp.global_batch(next(exp.dataset.iterator(BATCH)))
  state = fresh_state(exp)
  compiled = {kind: step.lower(state, exp.teacher, batch, jax.random.key(2)).compile()
              for kind, step in exp.steps.items()}
  return exp, compiled, batch


def fresh_state(exp):
  return exp.init(jax.random.key(1), exp.teacher)


@functools.lru_cache(maxsize=None)
def stepped(name, sharded):
  """State and metrics after NUM_STEPS steps as the loop runs them (kinds by the schedule)."""
  exp, compiled, batch = compiled_steps(name, sharded)
  state, history = fresh_state(exp), []
  for i in range(NUM_STEPS):
    kind = exp.schedule(i)
    state, metrics = compiled[kind](state, exp.teacher, batch, jax.random.key(2 + i))
    history.append({f"{kind}/{k}": v for k, v in jax.device_get(metrics).items()})
  merged = {}
  for row in history:
    for key, value in row.items():
      merged.setdefault(key, []).append(value)
  return jax.device_get(state), {k: np.stack(v) for k, v in merged.items()}


def check_step_on_8_devices_equals_1_device(name):
  ref_state, ref_metrics = stepped(name, False)
  state, metrics = stepped(name, True)
  assert set(metrics) == set(ref_metrics)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, atol=1e-6, err_msg=key)
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  for (path, leaf), ref in zip(flat, jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(leaf, ref, rtol=2e-5, atol=2e-6, err_msg=partition.path_str(path))
  assert int(state["step"]) == NUM_STEPS


def sharded_leaves(tree, shardings):
  """(path, leaf) of every leaf whose sharding splits it over fsdp."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(partition.path_str(p), x)
          for (p, x), s in zip(flat, jax.tree_util.tree_leaves(shardings))
          if "fsdp" in jax.tree_util.tree_leaves(tuple(s.spec))]


def check_state_is_really_sharded(name):
  """Params, their Adam moments and EMA are split over fsdp: 1/4 of each on every device."""
  exp, _, _ = compiled_steps(name, True)
  state, teacher = fresh_state(exp), exp.teacher
  sharded = sharded_leaves(state, exp.state_shardings)
  assert sharded, "no leaf is sharded over fsdp"
  names = [path for path, _ in sharded]
  for path in names:
    if "/params/" in f"/{path}/" and "opt_state" not in path:
      net, suffix = path.split("/params/", 1)
      twins = ["/mu/" + suffix, "/nu/" + suffix] + (["ema/" + suffix] if "ema" in state[net]
                                                    else [])
      for twin in twins:
        assert any(n.startswith(net) and n.endswith(twin) for n in names), (path, twin)
  for path, leaf in sharded:
    dim = list(leaf.sharding.spec).index("fsdp")
    expected = leaf.shape[:dim] + (leaf.shape[dim] // 4,) + leaf.shape[dim + 1:]
    assert {s.data.shape for s in leaf.addressable_shards} == {expected}, path
    assert len(leaf.addressable_shards) == 8
  assert state["step"].sharding.is_fully_replicated
  if teacher is not None:
    assert all(x.sharding.mesh == state["step"].sharding.mesh
               for x in jax.tree_util.tree_leaves(teacher))


_COLLECTIVE = re.compile(r"= (.+?) (all-gather|reduce-scatter|all-reduce|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def _group_size(line):
  """Devices per replica group, from any of XLA's replica_groups notations."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{('[^}]*)\}", line)
  if named:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2))]))
  iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", line)
  if iota:
    return int(iota.group(1))
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(listed.group(1).split(",")) if listed else None


def collectives(hlo_text):
  """[(op, result shape text, devices per group)] of a compiled module."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      out.append((m.group(2), m.group(1).split("{")[0], _group_size(line)))
  return out


def _shape_text(x):
  return f"f32[{','.join(str(d) for d in x.shape)}]"


def check_gathers_only_params_over_fsdp(name, uses_per_param=1):
  """FSDP needs each sharded weight all-gathered over the fsdp groups (4 devices) where it is
  used (``uses_per_param``: code paths using the same weights) and the gradient reduced over all
  8; it must not gather optimizer state, EMA or activations."""
  exp, compiled, _ = compiled_steps(name, True)
  found = [c for program in compiled.values() for c in collectives(program.as_text())]
  gathers = [(shape, size) for op, shape, size in found if op == "all-gather"]
  state, teacher = fresh_state(exp), exp.teacher
  params = [(p, x) for p, x in sharded_leaves(state, exp.state_shardings)
            if "params/" in p and "opt_state" not in p]
  if teacher is not None:
    params += sharded_leaves(teacher, experiment.shardings_of(teacher, exp.mesh))
  param_shapes = {_shape_text(x) for _, x in params}
  assert gathers, "no all-gather: the sharded params are not gathered for the compute"
  for shape, size in gathers:
    assert shape in param_shapes, f"all-gather of a non-parameter {shape}"
    assert size == SHARDED_MESH["fsdp"], f"all-gather of {shape} over {size} devices"
  assert len(gathers) <= uses_per_param * len(params), (len(gathers), len(params))
  # A reduce-scatter on TPU/GPU; XLA:CPU has no reduce-scatter pass and emits an all-reduce
  # (then keeps the local slice).
  assert any(op in ("reduce-scatter", "all-reduce") and size == 8 for op, _, size in found)


def check_sharded_arguments_use_less_memory(name):
  """Per-device argument bytes (state, teacher, batch) of every step shrink with fsdp=4."""
  for kind, program in compiled_steps(name, False)[1].items():
    one = program.memory_analysis().argument_size_in_bytes
    eight = compiled_steps(name, True)[1][kind].memory_analysis().argument_size_in_bytes
    assert eight < 0.5 * one, (kind, eight, one)

"""Teacher loading reads params only, straight into the run's shardings; a distilled run then
samples and evaluates with the teacher gone."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from fdistill import modes, teachers
from fdistill.parallel import mesh as mesh_lib
from fdistill.parallel import partition
from support import runs, toy


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  modes.run(toy.tiny_teacher_config(10), workdir, "train_teacher")
  return workdir


def distill_config(teacher_dir, steps=4):
  """f-distill of the checkpoint teacher (same MLP as the teacher, as f-distill requires)."""
  c = toy.tiny_fdistill_config(f"js,teacher=checkpoint,teacher_dir={teacher_dir}")
  c.model = toy.tiny_teacher_config().model
  c.train.update(dict(num_steps=steps, save_every=steps, log_every=1))
  c.eval.update(dict(num_samples=200, batch_size=100, num_plot_samples=50))
  return c


def test_checkpoint_teacher_restores_params_only_into_target_shardings(teacher_dir, tmp_path):
  config = distill_config(teacher_dir)
  config.mesh.update(dict(data=2, fsdp=4, fsdp_min_size=1024))  # shard the 32x32 kernels
  mesh = mesh_lib.make_mesh(config.mesh)
  ema = runs.restored_state(teacher_dir, toy.tiny_teacher_config())[0]["net"]["ema"]
  # A copy of the teacher without any train state: loading must not need it.
  copy = str(tmp_path / "teacher")
  shutil.copytree(teacher_dir, copy)
  for state_item in glob.glob(os.path.join(copy, "checkpoints", "*", "state")):
    shutil.rmtree(state_item)
  config.teacher.workdir = copy
  spec = teachers.spec(config, (2,), 0)
  targets = partition.config_shardings(spec.abstract, mesh, config.mesh)
  params = spec.load(targets)
  flat = jax.tree_util.tree_leaves(params)
  for leaf, target in zip(flat, jax.tree_util.tree_leaves(targets)):
    assert leaf.sharding == target
  assert any("fsdp" in str(leaf.sharding.spec) for leaf in flat)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(spec.abstract))
  assert sum(leaf.nbytes for leaf in flat) == nbytes  # params, not the optimiser state
  for got, want in zip(flat, jax.tree_util.tree_leaves(ema)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_distilled_run_logs_per_kind_and_samples_without_its_teacher(teacher_dir, tmp_path):
  copy = str(tmp_path / "teacher")
  shutil.copytree(teacher_dir, copy)
  workdir = str(tmp_path / "student")
  config = distill_config(copy)
  modes.run(config, workdir, "distill")
  records = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
             if "train/skipped" in r}
  # gen_every=3: step 0 generator, steps 1-2 critic, step 3 generator (logged as 1..4).
  for done in (2, 3):  # records of critic steps hold no generator value
    assert not any(k.startswith("train/generator/") for k in records[done]), records[done]
    assert records[done]["train/critic/steps"] == 1
  assert "train/generator/gen_loss" in records[4] and "train/critic/fake_loss" not in records[4]
  shutil.rmtree(copy)
  assert os.path.getsize(modes.run(config, workdir, "sample", num_samples=20)) > 1000
  results = modes.run(config, workdir, "eval")
  assert set(results) == {4} and "eval/precision" in results[4]

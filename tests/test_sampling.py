"""Drawing samples (fdistill/sampling.py): labels cycle over the classes, in batches and in PNGs."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdistill import sampling


class FakeSampling:
  """A 3-class sampler whose samples are their own class index (both columns)."""
  task = type("Task", (), {"cond_dim": 3})()
  calls = []

  @classmethod
  def sample(cls, params, rng, num, cond):
    cls.calls.append(np.argmax(cond, axis=1))
    return jnp.zeros((num, 2)) + cls.calls[-1][:, None]


def test_sample_batches_cycle_class_labels():
  FakeSampling.calls.clear()
  out = sampling.sample_in_batches(FakeSampling, None, jax.random.key(0), 7, 4)
  assert out.shape == (7, 2)
  np.testing.assert_array_equal(out[:, 0], np.arange(7) % 3)
  assert [len(c) for c in FakeSampling.calls] == [4, 4]  # one compiled shape: the last batch is cut


def test_sample_grids_cycle_class_labels_and_name_the_sampler_steps(tmp_path):
  config = ml_collections.ConfigDict({"eval": {"num_plot_samples": 5},
                                      "data": {"name": "digits"}})
  path = sampling.samples_path(str(tmp_path), 12, 2)
  assert os.path.basename(path) == "samples_0000012_2steps.png"
  out = sampling.write_samples(FakeSampling, None, jax.random.key(0), config, path)
  np.testing.assert_array_equal(out[:, 0], [0, 1, 2, 0, 1])
  assert os.path.getsize(path) > 0


def test_sample_and_eval_modes_build_one_mesh(tmp_path, monkeypatch):
  """The mesh of experiment.validate's plan is the one sample and eval use (#24: no second
  mesh per run)."""
  from fdistill import modes
  from fdistill.parallel import mesh as mesh_lib
  from tests.support.toy import tiny_teacher_config
  config = tiny_teacher_config(steps=10)
  config.train.sample_every = 0
  workdir = str(tmp_path / "run")
  modes.run(config, workdir, "train_teacher")
  made = []
  real = mesh_lib.make_mesh
  monkeypatch.setattr(mesh_lib, "make_mesh", lambda *a, **k: made.append(1) or real(*a, **k))
  modes.run(config, workdir, "sample")
  assert len(made) == 1, made
  modes.run(config, workdir, "eval")
  assert len(made) == 2, made

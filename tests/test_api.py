"""fdistill.load(workdir): a tiny toy teacher run, loaded and sampled from Python."""
import glob
import os
import shutil

import numpy as np
import pytest

import fdistill
from fdistill import errors
from fdistill import modes
from support import toy
from test_train_recovery import flip_bytes  # the corruption the recovery tests use


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny DSM teacher with checkpoints at steps 10 and 20, and --mode=sample's file."""
  workdir = str(tmp_path_factory.mktemp("api_run"))
  config = toy.tiny_teacher_config(20)
  modes.run(config, workdir, "train_teacher")
  modes.run(config, workdir, "sample", num_samples=64)
  return workdir, config


def test_load_samples_what_the_sample_mode_writes(run_dir):
  """The loaded run is the newest checkpoint's network: with the seed --mode=sample uses
  (config.seed + 2) it draws exactly the samples that mode saved."""
  workdir, config = run_dir
  run = fdistill.load(workdir)
  assert run.step == 20 and run.config.data.distribution == "gmm8"
  saved = np.load(glob.glob(os.path.join(workdir, "samples_0000020_4steps.npy"))[0])
  np.testing.assert_array_equal(run.sample(64, seed=config.seed + 2), saved)
  # Another sampler step count is another sampler: different samples, same shape.
  other = run.sample(64, seed=config.seed + 2, num_steps=1)
  assert other.shape == saved.shape and not np.array_equal(other, saved)


def test_load_skips_a_corrupt_newest_export(run_dir, tmp_path):
  """A corrupt newest export is skipped with a warning (the step before is loaded); with
  every export corrupt, one CorruptCheckpointError."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(run_dir[0], workdir)
  flip_bytes(os.path.join(workdir, "checkpoints", "20"), "export")
  with pytest.warns(UserWarning, match="checkpoint"):
    assert fdistill.load(workdir).step == 10
  with pytest.raises(errors.CorruptCheckpointError):
    fdistill.load(workdir, step=20)
  flip_bytes(os.path.join(workdir, "checkpoints", "10"), "export")
  with pytest.raises(errors.CorruptCheckpointError), pytest.warns(UserWarning):
    fdistill.load(workdir)


def test_load_of_a_directory_without_a_run_is_one_error(run_dir, tmp_path):
  with pytest.raises(ValueError, match="not a run with a checkpoint"):
    fdistill.load(str(tmp_path))
  with pytest.raises(ValueError, match=r"no such checkpoint; saved: \[10, 20\]"):
    fdistill.load(run_dir[0], step=15)


"""Nothing lost on a crash: corrupt checkpoints are detected, moved aside and the previous one
used; kill -9 at random moments (inside saves too) and restarts end exactly where an
uninterrupted run ends; the eval job skips checkpoints deleted under it."""
import glob
import os
import random
import shutil
import signal
import sys
import time

import jax
import numpy as np
import pytest

from fdistill import errors, modes
from fdistill.io import checkpoint
from support import multiprocess as mp
from support import runs, toy


def config(steps):
  c = toy.tiny_teacher_config(steps)
  c.train.update(dict(save_every=10, log_every=5, keep_checkpoints=3))
  return c


def final_state(workdir, steps):
  return jax.device_get(runs.restored_state(str(workdir), config(steps), step=steps)[0])


def assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(a 20-step run with checkpoints 10 and 20, the state of an uninterrupted 30-step run)."""
  base = tmp_path_factory.mktemp("base")
  modes.run(config(20), str(base), "train_teacher")
  straight = tmp_path_factory.mktemp("straight")
  modes.run(config(30), str(straight), "train_teacher")
  return str(base), final_state(straight, 30)


def _data_files(step_dir, item="state"):
  """The array-data files of checkpoint ``item`` (``state`` or ``export``). Orbax's OCDBT
  writes them per process (``ocdbt.process_*/d``) and may merge them into ``<item>/d``;
  which set a restore reads depends on that merge, so a corruption hits both."""
  files = (glob.glob(os.path.join(step_dir, item, "d", "*")) +
           glob.glob(os.path.join(step_dir, item, "ocdbt.process_*", "d", "*")))
  assert files, os.listdir(os.path.join(step_dir, item))
  return files


def truncate_data(step_dir):
  """Every data file cut to half (as a crash of the storage layer would leave it)."""
  for path in _data_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def flip_bytes(step_dir, item="state"):
  """16 bytes inverted in the middle of every data file (a file can hold bytes no restore
  reads, so one file alone may change nothing)."""
  for path in _data_files(step_dir, item):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    open(path, "wb").write(bytes(data))


def zero_files(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      open(path, "wb").write(bytes(os.path.getsize(path)))


def delete(name):
  def corrupt(step_dir):
    matches = glob.glob(os.path.join(step_dir, "**", name), recursive=True)
    assert matches, name
    for path in matches:
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return corrupt


CORRUPTIONS = {"truncate": truncate_data, "flip_16_bytes": flip_bytes, "zero": zero_files,
               "no_state_dir": delete("state"), "no_meta": delete("meta"),
               "no_metadata_file": delete("_METADATA"), "no_manifest": delete("manifest.ocdbt")}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_run_resumes(reference, tmp_path, name):
  base, want = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  CORRUPTIONS[name](os.path.join(workdir, "checkpoints", "20"))
  modes.run(config(30), workdir, "train_teacher")  # resumes from 10, redoes 11..20
  aside = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
  assert len(aside) == 1 and aside[0].startswith("20.")
  assert_same(final_state(workdir, 30), want)


def test_no_intact_checkpoint_stops_instead_of_starting_afresh(reference, tmp_path, capfd,
                                                              monkeypatch):
  """Both checkpoints moved aside, one error, and no library noise: before the fix, orbax's
  failed reads of checkpoint 20 left sibling reads in flight, and tensorstore reported an
  ``Event loop is closed`` error for each as it landed (through ``sys.unraisablehook``: a
  traceback on the CLI's stderr, issue 26)."""
  base, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  for step in ("10", "20"):
    flip_bytes(os.path.join(workdir, "checkpoints", step))
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
  capfd.readouterr()
  with pytest.raises(errors.CorruptCheckpointError, match="no intact checkpoint"):
    modes.run(config(30), workdir, "train_teacher")
  time.sleep(1.0)  # abandoned reads would have landed by now
  err = capfd.readouterr().err
  assert not unraisable, unraisable[:3]
  assert "Traceback" not in err, err[-3000:]
  assert len(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == 2
  assert checkpoint.saved_steps(workdir) == []  # nothing new was written


def test_kill_9_at_random_moments_then_restart_ends_as_an_uninterrupted_run(tmp_path):
  """Four SIGKILLs at random times (saves every 2 steps, so several land inside a save),
  restarts, and the final state equals a run that was never killed."""
  config_path = mp.write_config(tmp_path)
  args = lambda workdir: mp.main_args(config_path, workdir, "train.num_steps=40",
                                      "mesh.fsdp=1")
  rng = random.Random(0)
  workdir = tmp_path / "killed"
  for attempt in range(4):
    proc = mp.start_main(args(workdir), tmp_path / f"run{attempt}.log", devices=1)
    mp.wait_for_step(workdir, 1, [proc], timeout=180) if attempt == 0 else time.sleep(3)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  proc = mp.start_main(args(workdir), tmp_path / "final.log", devices=1)
  assert proc.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
  reference = tmp_path / "reference"
  proc = mp.start_main(args(reference), tmp_path / "reference.log", devices=1)
  assert proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
  c = mp.load_config(config_path)
  c.train.num_steps = 40
  a = runs.restored_state(str(workdir), c, step=40)[0]
  b = runs.restored_state(str(reference), c, step=40)[0]
  assert_same(jax.device_get(a), jax.device_get(b))


def test_eval_skips_a_checkpoint_deleted_while_it_reads(reference, tmp_path, monkeypatch):
  base, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  from fdistill.eval import job
  real = job.evaluate_checkpoint

  def deleting(config, workdir_, step, sampling=None):
    if step == 10:  # the trainer's keep-last-N removes it under the reader
      shutil.rmtree(os.path.join(workdir_, "checkpoints", "10"))
    return real(config, workdir_, step, sampling)

  monkeypatch.setattr(job, "evaluate_checkpoint", deleting)
  c = config(20)
  c.eval.update(num_samples=100, batch_size=100)
  results = modes.run(c, workdir, "eval")
  assert set(results) == {20}


def test_a_corrupt_export_is_refused_by_sample_and_skipped_by_eval(reference, tmp_path):
  """16 flipped bytes in checkpoint 20's export item (issue 26: sample wrote all-NaN samples
  and eval recorded them): sampling it is one error naming the checkpoint; the eval job
  scores checkpoint 10, skips 20 and says so, and records nothing for it."""
  base, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  flip_bytes(os.path.join(workdir, "checkpoints", "20"), "export")
  c = config(20)
  c.eval.update(num_samples=100, batch_size=100, timeout_seconds=0.0)
  with pytest.raises(errors.CorruptCheckpointError, match="checkpoints/20: its exported params"):
    modes.run(c, workdir, "sample")
  assert not glob.glob(os.path.join(workdir, "samples*"))
  results = modes.run(c, workdir, "eval")
  assert set(results) == {10}
  with pytest.raises(errors.CorruptCheckpointError, match="checkpoints/20"):
    c.eval.step = 20
    modes.run(c, workdir, "eval")


def _ckpt_files(workdir):
  """{relative path: bytes} of every file under ``checkpoints/`` (what must stay untouched)."""
  root = os.path.join(workdir, "checkpoints")
  return {os.path.relpath(p, root): open(p, "rb").read()
          for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p)}


def _wait_until_unchanged(workdir, quiet_seconds=1.0, limit=30.0):
  deadline, last = time.monotonic() + limit, None
  while time.monotonic() < deadline:
    now = {k: len(v) for k, v in _ckpt_files(workdir).items()}
    if now == last:
      return
    last = now
    time.sleep(quiet_seconds)


def test_a_full_disk_during_a_save_loses_nothing_and_the_rerun_resumes(reference, tmp_path,
                                                                      monkeypatch):
  """The write of step 30 fails with ENOSPC inside orbax (its temporary directory exists):
  one error naming the disk and the step to resume from, checkpoints 10 and 20
  byte-identical; the rerun removes the partial directory and ends as the uninterrupted run."""
  import errno
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  base, want = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  before = _ckpt_files(workdir)

  async def disk_full(self, x, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(checkpoint.SaveFailedError,
                     match=r"could not save step 30 .* the disk is full .* resumes from step 20"):
    modes.run(config(30), workdir, "train_teacher")
  assert {k: v for k, v in _ckpt_files(workdir).items() if "tmp" not in k} == before
  monkeypatch.undo()
  _wait_until_unchanged(workdir)  # the failed save's other writers finish in this process
  modes.run(config(30), workdir, "train_teacher")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]
  assert_same(final_state(workdir, 30), want)


def test_keep_n_deletes_nothing_when_the_new_checkpoint_does_not_read_back(reference, tmp_path,
                                                                          monkeypatch):
  """Keep 3 with checkpoints 10, 20, 30: step 40's bytes change between the write and the
  read-back (bad storage), so 40 is moved aside and 10 (due for deletion) is kept."""
  base, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  real = checkpoint.Checkpointer._keep_last_n

  def storage_flips_bytes(self, step, *args):
    if step == 40:
      flip_bytes(os.path.join(workdir, "checkpoints", "40"))
    return real(self, step, *args)

  monkeypatch.setattr(checkpoint.Checkpointer, "_keep_last_n", storage_flips_bytes)
  with pytest.raises(checkpoint.SaveFailedError,
                     match="checkpoint 40 did not read back intact .* resumes from step 30"):
    modes.run(config(40), workdir, "train_teacher")
  assert checkpoint.saved_steps(workdir) == [10, 20, 30]
  assert [d.split(".")[0] for d in os.listdir(os.path.join(workdir, "checkpoints_corrupt"))] == [
      "40"]


def test_a_checkpoint_of_another_model_is_one_error_and_nothing_moves(reference, tmp_path):
  """Another model's checkpoints copied into a workdir without its config.json (so the
  config check cannot see it): one error naming an array and both shapes; nothing is moved
  aside, no config.json is written."""
  base, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  os.remove(os.path.join(workdir, "config.json"))
  before = _ckpt_files(workdir)
  wider = config(30)
  wider.model.hidden = (48, 48)
  with pytest.raises(ValueError, match=r"checkpoints/20 holds another model's state "
                                              r"\(net\.\S+: saved \((\d+, )?32,?\), config "
                                              r"\((\d+, )?48,?\).* or give a new --workdir"):
    modes.run(wider, workdir, "train_teacher")
  assert _ckpt_files(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
  assert not os.path.exists(os.path.join(workdir, "config.json"))

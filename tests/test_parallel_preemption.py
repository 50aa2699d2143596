"""SIGTERM during training leaves a restorable checkpoint, and the restart resumes exactly.

Single process: a Python handler flags the notice; the loop saves after the step
in flight and returns (exit 0). Two processes: SIGTERM reaches only one of them;
JAX's preemption sync manager makes both agree on the step, both save their
shards of that one checkpoint and exit 0.
"""
import os
import signal

import jax
import numpy as np
import pytest

from support import multiprocess as mp
from support import runs
from fdistill.parallel import mesh as mesh_lib
from fdistill.train import loop

FOREVER = "train.num_steps=1000000"
NO_PERIODIC_SAVES = "train.save_every=1000000"
TWO_DEVICE_MESH = ("mesh.data=1", "mesh.fsdp=2")


def in_process_train(config_path, workdir, num_steps):
  """The subprocess's run, continued (or redone) here on 2 devices with the same mesh."""
  config = mp.load_config(config_path)
  config.train.num_steps = num_steps
  config.train.save_every = 1000000
  config.mesh.update({"data": 1, "fsdp": 2})
  loop.train(config, str(workdir), mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:2]))
  return mp.losses(workdir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_the_restart_resumes_exactly(tmp_path, signum):
  """SIGTERM (preemption) and SIGINT (Ctrl-C) both save after the step in flight, exit 0."""
  config_path = mp.write_config(tmp_path)
  workdir = tmp_path / "run"
  proc = mp.start_main(mp.main_args(config_path, workdir, FOREVER, NO_PERIODIC_SAVES,
                                    *TWO_DEVICE_MESH), tmp_path / "run.log", devices=2)
  mp.wait_for_step(workdir, 3, [proc])
  proc.send_signal(signum)
  assert proc.wait(timeout=60) == 0, (tmp_path / "run.log").read_text()[-3000:]
  steps = mp.checkpoint_steps(workdir)
  assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
  saved = steps[0]
  assert max(mp.losses(workdir)) == saved  # it stopped right after the saved step
  assert f"Preempted: saved step {saved}" in (tmp_path / "run.log").read_text()

  resumed = in_process_train(config_path, workdir, saved + 2)
  reference = in_process_train(config_path, tmp_path / "reference", saved + 2)
  assert sorted(resumed) == sorted(reference) == list(range(1, saved + 3))
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [reference[s] for s in sorted(reference)], rtol=1e-6)


def test_sigterm_to_one_of_two_processes_saves_one_agreed_checkpoint(tmp_path):
  config_path = mp.write_config(tmp_path)
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  launcher = mp.start_launcher(2, mp.main_args(config_path, workdir, FOREVER, NO_PERIODIC_SAVES,
                                               "mesh.data=2", "mesh.fsdp=2"), logs)
  pids = mp.launcher_pids(launcher, 2)
  mp.wait_for_step(workdir, 3, [launcher])
  os.kill(pids[1], signal.SIGTERM)  # only process 1 is told
  mp.finish(launcher, logs, timeout=90)
  steps = mp.checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= 3, steps
  for i in (0, 1):
    assert f"Preempted: saved step {steps[0]}" in (logs / f"process_{i}.log").read_text()

  # Restorable onto another topology: this one process, 2 devices, fsdp=2.
  config = mp.load_config(config_path)
  config.mesh.update({"data": 1, "fsdp": 2})
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:2])
  state, meta = runs.restored_state(workdir, config, mesh)
  assert meta["step"] == steps[0] == int(state["step"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(jax.device_get(state)))

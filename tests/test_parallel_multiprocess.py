"""A real two-process run on this machine: jax.distributed over localhost, CPU (gloo) collectives.

launch/local_multiprocess.sh starts 2 processes with 2 fake CPU devices each
(4 global devices) on a multi-slice-style mesh (dcn_data=2 across processes,
fsdp=2 within each). They train 4 DSM steps, checkpoint (every process writes
its shards into one shared directory), exit; a second launch resumes to step 8.
Every loss must equal the single-process run's on a (data=2, fsdp=2) mesh.
A killed or stopped peer ends the other process in bounded time with one FATAL line, in
training and in the eval job.
"""
import os
import signal
import time

import jax
import numpy as np
import pytest

from support import multiprocess as mp
from fdistill.io import checkpoint
from fdistill.parallel import mesh as mesh_lib
from fdistill.train import loop

STEPS = 8
MULTI_SLICE = ("mesh.data=1", "mesh.fsdp=2", "mesh.dcn_data=2")
PEER_TIMEOUT = 15  # seconds without a peer's heartbeat (fdistill.parallel.peers)
EVAL_PEER_TIMEOUT = 8


def single_process_losses(config_path, workdir):
  """The same run in this process on 4 of its 8 devices, mesh (data=2, fsdp=2)."""
  config = mp.load_config(config_path)
  config.train.num_steps = STEPS
  config.mesh.update({"data": 2, "fsdp": 2})
  loop.train(config, str(workdir), mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:4]))
  return mp.losses(workdir)


def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
  config_path = mp.write_config(tmp_path)
  workdir, logs = tmp_path / "two", tmp_path / "logs"
  first = mp.start_launcher(2, mp.main_args(config_path, workdir, "train.num_steps=4",
                                            *MULTI_SLICE), logs / "first")
  # The reference trains here while the two processes start up.
  reference = single_process_losses(config_path, tmp_path / "one")
  mp.finish(first, logs / "first")
  assert mp.checkpoint_steps(workdir) == [2, 4]
  assert sorted(mp.losses(workdir)) == [1, 2, 3, 4]

  second = mp.start_launcher(2, mp.main_args(config_path, workdir, f"train.num_steps={STEPS}",
                                             *MULTI_SLICE), logs / "second")
  mp.finish(second, logs / "second")
  assert mp.checkpoint_steps(workdir) == [4, 6, 8]
  two = mp.losses(workdir)
  assert sorted(two) == sorted(reference) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)],
                             [reference[s] for s in sorted(reference)], rtol=1e-5)
  # Both joined one 4-device runtime; only process 0 prints the run's lines.
  log0, log1 = [(logs / "second" / f"process_{i}.log").read_text() for i in (0, 1)]
  assert "4 cpu devices" in log0 and "done: step 8" in log0
  assert "done: step" not in log1 and "saved checkpoint" not in log1


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_peer_ends_the_other_process_with_one_fatal_line(tmp_path, how):
  """Process 1 of 2 is killed (its connections close: the next collective fails) or stopped
  (nothing fails: only the watchdog's missing heartbeats show it). Process 0 exits 2 within
  the peer timeout plus slack, with one FATAL line and no traceback or abort dump (before:
  stuck up to JAX's 100 s heartbeat timeout, then a C++ stack dump and exit 134)."""
  config_path = mp.write_config(tmp_path)
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  launcher = _start_watched(mp.main_args(config_path, workdir, "train.num_steps=1000000",
                                         *MULTI_SLICE), logs, PEER_TIMEOUT)
  pids = mp.launcher_pids(launcher, 2)
  mp.wait_for_step(workdir, 2, [launcher])
  elapsed, fatal = _stop_peer_1(launcher, pids, logs, how, PEER_TIMEOUT)
  if how == "SIGSTOP":  # only the missing heartbeats show it: about the timeout
    assert "process 1 stopped responding" in fatal
    assert PEER_TIMEOUT - 2 < elapsed < PEER_TIMEOUT + 30, elapsed
  else:
    assert elapsed < PEER_TIMEOUT + 30, elapsed


def test_a_dead_peer_ends_the_eval_job_with_one_fatal_line(tmp_path):
  """The eval job watches its peers as training does: two processes poll a run that has no
  checkpoint yet; process 1 is killed and process 0 exits 2 with one FATAL line (before: its
  next poll's broadcast failed with a traceback, then the exit waited in JAX's shutdown
  barrier)."""
  config_path = mp.write_config(tmp_path)
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  os.makedirs(workdir)
  checkpoint.save_config(str(workdir), mp.load_config(config_path))
  launcher = _start_watched(mp.main_args(config_path, workdir, "eval.poll_seconds=0.5",
                                         "eval.timeout_seconds=1000", mode="eval"),
                            logs, EVAL_PEER_TIMEOUT)
  pids = mp.launcher_pids(launcher, 2)
  deadline = time.monotonic() + 120
  while f" of {workdir}: " not in _log0(logs):  # the job's first line: it polls now
    assert time.monotonic() < deadline and launcher.poll() is None, mp.logs(logs)
    time.sleep(0.2)
  elapsed, _ = _stop_peer_1(launcher, pids, logs, "SIGKILL", EVAL_PEER_TIMEOUT)
  assert elapsed < EVAL_PEER_TIMEOUT + 20, elapsed


def _start_watched(args, logs, timeout):
  return mp.start_launcher(2, args, logs, extra_env={"FDISTILL_PEER_TIMEOUT": str(timeout),
                                                     "KILL_ON_BAD_EXIT": "0"})


def _log0(logs):
  path = logs / "process_0.log"
  return path.read_text() if path.exists() else ""


def _stop_peer_1(launcher, pids, logs, how, timeout):
  """Sends ``how`` to process 1, waits for process 0 to end; checks it exited 2 with one FATAL
  line and no traceback or abort dump. Returns (seconds it took, the FATAL line)."""
  os.kill(pids[1], getattr(signal, how))
  started = time.monotonic()
  while time.monotonic() - started < timeout + 60 and _alive(pids[0]):
    time.sleep(0.2)
  elapsed = time.monotonic() - started
  os.kill(pids[1], signal.SIGKILL) if how == "SIGSTOP" else None
  out, _ = launcher.communicate(timeout=60)
  log0 = _log0(logs)
  fatal = [line for line in log0.splitlines() if line.startswith("FATAL:")]
  assert f"pid {pids[0]} exited 2" in out and len(fatal) == 1, out + log0[-3000:]
  assert "Traceback" not in log0 and "Check failure" not in log0, log0[-3000:]
  assert fatal[0].startswith("FATAL: process 0 of 2:") and "resumes from its last checkpoint" in \
      fatal[0]
  return elapsed, fatal[0]


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True

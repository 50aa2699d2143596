"""A real two-process run on this machine: jax.distributed over localhost, CPU (gloo) collectives.

launch/local_multiprocess.sh starts 2 processes with 2 fake CPU devices each
(4 global devices) on a multi-slice-style mesh (dcn_data=2 across processes,
fsdp=2 within each). They train 4 DSM steps, checkpoint (every process writes
its shards into one shared directory), exit; a second launch resumes to step 8.
Every loss must equal the single-process run's on a (data=2, fsdp=2) mesh.
"""
import jax
import numpy as np

from support import multiprocess as mp
from fdistill.parallel import mesh as mesh_lib
from fdistill.train import loop

STEPS = 8
MULTI_SLICE = ("mesh.data=1", "mesh.fsdp=2", "mesh.dcn_data=2")


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

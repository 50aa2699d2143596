"""Checkpointer on tiny trees: where it reads from, what every process must agree on, what it
says about a step that is not there."""
import glob
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import errors
from fdistill.io import checkpoint


def tree(value=1.0):
  return {"a": jnp.full((3,), value), "b": jnp.full((2, 2), value)}


def saved(workdir, steps=(1,)):
  ckpt = checkpoint.Checkpointer(str(workdir), max_to_keep=3)
  for step in steps:
    assert ckpt.save(step, tree(float(step)), tree(float(step)))
  return ckpt


def test_a_checkpoint_under_a_path_with_url_characters_restores(tmp_path):
  """'#', '?' and '%41' are file name characters, not a fragment, a query and an escape (the
  read-back once opened the item as a file:// URL, found it unreadable and moved it aside)."""
  workdir = tmp_path / "run#1?x=%41"
  ckpt = saved(workdir)
  state, meta = ckpt.restore_intact(tree())
  assert meta["step"] == 1
  np.testing.assert_array_equal(state["b"], np.ones((2, 2)))
  assert ckpt.restore_export(tree())[1] == 1
  assert not os.path.exists(os.path.join(str(workdir), "checkpoints_corrupt"))
  ckpt.close()


def test_every_process_acts_on_a_problem_that_one_of_them_finds(tmp_path, monkeypatch):
  """Process 1 cannot read step 2 (a transient error there) while this one can: this one must
  skip step 2 as well, or the two would restore different steps (mismatched collectives)."""
  ckpt = saved(tmp_path, steps=(1, 2))
  calls = []

  def process_1_fails_its_first_read(flag):  # stands in for the allgather of every verdict
    calls.append(flag)
    return [1] if len(calls) == 1 else ([0] if flag else [])

  monkeypatch.setattr(checkpoint, "_processes_with", process_1_fails_its_first_read,
                      raising=False)
  state, meta = ckpt.restore_intact(tree())
  assert meta["step"] == 1
  assert [os.path.basename(p).split(".")[0]
          for p in glob.glob(os.path.join(str(tmp_path), "checkpoints_corrupt", "*"))] == ["2"]
  calls.clear()
  with pytest.raises(errors.CorruptCheckpointError, match="unreadable on process 1"):
    ckpt.restore_export(tree(), step=1)
  ckpt.close()


def test_the_read_back_opens_every_array_in_one_context(tmp_path, monkeypatch):
  """One tensorstore context for the item: its database (manifest) is opened once and its
  reads share one concurrency limit."""
  ckpt = saved(tmp_path)
  contexts = []
  real = checkpoint.ts.open

  def recording(*args, **kwargs):
    contexts.append(kwargs.get("context"))
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpoint.ts, "open", recording)
  assert ckpt.read_problem(1, "state") is None
  assert len(contexts) == 2 and contexts[0] is not None and contexts[1] is contexts[0]
  ckpt.close()


def test_restore_reads_the_state_back_before_orbax_does(tmp_path):
  """Checkpointer.restore (what tests read runs back with) goes through read_problem too."""
  ckpt = saved(tmp_path)
  for path in glob.glob(os.path.join(str(tmp_path), "checkpoints", "1", "state", "**", "d"),
                        recursive=True):
    shutil.rmtree(path)
  with pytest.raises(errors.CorruptCheckpointError, match="checkpoints/1: its state is "
                                                          "unreadable"):
    ckpt.restore(tree(), 1)
  ckpt.close()


def test_a_step_that_never_existed_is_named_as_missing(tmp_path):
  ckpt = saved(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 7 under .* \(its checkpoints: "
                                              r"\[1\]\)"):
    ckpt.restore_export(tree(), step=7)
  ckpt.close()


# One process of the two-process test below (test code: the failure is injected here).
AGREEING_PROCESS = '''
import sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[3]))
import jax.numpy as jnp
from fdistill.io import checkpoint
real = checkpoint.read_problem

def read_problem(item_dir):  # process 1 alone cannot read step 2 (a transient error there)
  if jax.process_index() == 1 and "/checkpoints/2/" in str(item_dir):
    return "unreadable (injected on process 1)"
  return real(item_dir)

checkpoint.read_problem = read_problem
sharding = jax.sharding.NamedSharding(jax.make_mesh((2,), ("x",)), jax.sharding.PartitionSpec())
abstract = {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
            for name, shape in (("a", (3,)), ("b", (2, 2)))}
ckpt = checkpoint.Checkpointer(sys.argv[1])
print("restored step", ckpt.restore_intact(abstract)[1]["step"], flush=True)
ckpt.close()
'''


def test_two_processes_restore_the_same_step_when_one_cannot_read_the_latest(tmp_path):
  """Two jax.distributed processes, step 2 unreadable on process 1 only: both restore step 1
  and process 0 moves step 2 aside (before the fix process 0 restored 2, process 1 fell back
  to 1: different states, and collectives that no longer matched)."""
  import socket
  import subprocess
  import sys
  from support import multiprocess as mp
  saved(tmp_path / "run", steps=(1, 2)).close()
  with socket.socket() as s:
    s.bind(("", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-c", AGREEING_PROCESS, str(tmp_path / "run"),
                             str(port), str(i)], cwd=mp.ROOT, env=mp.child_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=90)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0 and "restored step 1" in out, out[-3000:]
  assert [os.path.basename(p).split(".")[0] for p in
          glob.glob(os.path.join(str(tmp_path / "run"), "checkpoints_corrupt", "*"))] == ["2"]

"""A failed command leaves no compilation cache it created (issue 23): the CLI's
``<workdir>/compile_cache`` is removed when the command ends with a FATAL line."""
import os
import shutil
import subprocess
import sys

from fdistill import modes
from support import toy
from test_train_recovery import flip_bytes  # the corruption the recovery tests use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny teacher of tests/support/toy.py, from the command line.
ARGS = ["--config=configs/toy2d_teacher.py:gmm8", "--config.model.hidden=(32,32)",
        "--config.model.input_fourier=0", "--mode=sample", "--num_samples=50"]


def _sample(workdir):
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["XLA_FLAGS"] = ""  # one device: the sampler's mesh
  return subprocess.run([sys.executable, "-m", "fdistill.main", f"--workdir={workdir}"] + ARGS,
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_command_failing_after_a_compile_removes_its_compile_cache(tmp_path):
  """--mode=sample of a run whose only export is corrupt compiles the digest check, then fails:
  the cache it wrote is gone. The same command on the intact run keeps its cache (so the
  failing one did have a cache to remove)."""
  good = str(tmp_path / "good")
  modes.run(toy.tiny_teacher_config(10), good, "train_teacher")
  bad = str(tmp_path / "bad")
  shutil.copytree(good, bad)
  flip_bytes(os.path.join(bad, "checkpoints", "10"), "export")
  before = sorted(os.listdir(bad))

  ok = _sample(good)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert os.listdir(os.path.join(good, "compile_cache"))

  failed = _sample(bad)
  assert failed.returncode == 2 and "FATAL:" in failed.stderr, failed.stderr[-2000:]
  assert sorted(os.listdir(bad)) == before  # no compile_cache/, nothing else new

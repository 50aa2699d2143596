"""Helpers of the multi-process and preemption tests: a tiny DSM config file, launching
``fdistill.main`` (directly or through launch/local_multiprocess.sh), reading metrics."""
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")

# A small toy DSM run; the mesh fields are set per test through --config.mesh.* flags.
CONFIG = '''
from configs import toy2d_teacher


def get_config(arg=None):
  c = toy2d_teacher.get_config("gmm8")
  c.model.hidden = (64, 64)
  c.model.emb_dim = 32
  c.teacher.kind = "analytic"  # unused by DSM; exercises placing a frozen teacher on the mesh
  c.train.batch_size = 32
  c.train.log_every = 1
  c.train.save_every = 2
  c.mesh.fsdp_min_size = 1024
  return c
'''


def write_config(directory):
  path = os.path.join(str(directory), "tiny_dsm.py")
  with open(path, "w") as f:
    f.write(CONFIG)
  return path


def load_config(path):
  from fdistill.configfile import load_config_file
  return load_config_file(path)


def child_env(devices, cache_dir=None):
  """Environment of a child process with ``devices`` fake CPU devices and a compile cache
  (``cache_dir``, default: the test session's persistent cache from conftest.py)."""
  import jax
  cache_dir = cache_dir or jax.config.values.get("jax_compilation_cache_dir")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def main_args(config_path, workdir, *overrides, mode="train_teacher"):
  return [f"--config={config_path}", f"--workdir={workdir}", f"--mode={mode}",
          *[f"--config.{o}" for o in overrides]]


def start_launcher(num_processes, args, log_dir, devices=2, cache_dir=None, extra_env=None):
  env = dict(child_env(devices, cache_dir), DEVICES_PER_PROCESS=str(devices),
             LOG_DIR=str(log_dir), PYTHON=sys.executable, **(extra_env or {}))
  return subprocess.Popen([LAUNCHER, str(num_processes), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def launcher_pids(proc, count):
  """{process index: pid} from the launcher's 'process i pid P' lines."""
  pids = {}
  while len(pids) < count:
    line = proc.stdout.readline()
    assert line, "launcher exited before starting its processes"
    match = re.search(r"process (\d+) pid (\d+)", line)
    if match:
      pids[int(match.group(1))] = int(match.group(2))
  return pids


def start_main(args, log_path, devices=1, cache_dir=None):
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, "-m", "fdistill.main", *args], cwd=ROOT,
                          env=child_env(devices, cache_dir), stdout=log,
                          stderr=subprocess.STDOUT)


def logs(log_dir):
  """The tails of every process log (for assertion messages)."""
  out = []
  for name in sorted(os.listdir(log_dir)):
    with open(os.path.join(log_dir, name)) as f:
      out.append(f"--- {name}\n" + "".join(f.readlines()[-25:]))
  return "\n".join(out)


def finish(proc, log_dir, timeout=120):
  """Waits for ``proc``; fails with the process logs if it does not exit 0."""
  out, _ = proc.communicate(timeout=timeout) if proc.stdout else (proc.wait(timeout), None)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{out or ''}\n{logs(log_dir)}"
  return out


def losses(workdir):
  """{step: train/loss} from ``metrics.jsonl`` (later lines win, as after a resume)."""
  out = {}
  path = os.path.join(str(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        out[record["step"]] = record["train/loss"]
  return out


def wait_for_step(workdir, step, procs, timeout=120):
  """Polls metrics.jsonl until ``step`` is logged (fails if a process exits first)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(losses(workdir), default=0) >= step:
      return
    assert all(p.poll() is None for p in procs), "a process exited before training started"
    time.sleep(0.2)
  raise TimeoutError(f"step {step} not reached in {timeout}s")


def checkpoint_steps(workdir):
  directory = os.path.join(str(workdir), "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())

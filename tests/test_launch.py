"""The cluster launch scripts, run against stub ``gcloud`` / ``srun`` that record their arguments.

(launch/local_multiprocess.sh runs for real in test_multiprocess.py and test_preemption.py.)
"""
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDER = """#!/usr/bin/env bash
{{ printf '%s\\n' "$0" "$@"; echo "JAX_LOCAL_DEVICE_IDS=${{JAX_LOCAL_DEVICE_IDS:-}}"; }} >> {log}
"""


def run_with_stubs(tmp_path, argv, env=None, stubs=("gcloud", "srun")):
  """Runs ``argv`` with stub commands first on PATH; returns the recorded invocations."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "calls.log"
  for stub in stubs:
    (bin_dir / stub).write_text(RECORDER.format(log=shlex.quote(str(log))))
    (bin_dir / stub).chmod(0o755)
  full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **(env or {}))
  subprocess.run(argv, cwd=ROOT, env=full_env, check=True, capture_output=True, text=True)
  return log.read_text().splitlines()


def test_tpu_pod_run_sends_one_quoted_command_to_every_worker(tmp_path):
  calls = run_with_stubs(tmp_path, [
      "launch/tpu_pod.sh", "run", "my-pod", "--config=configs/toy2d_teacher.py:gmm8",
      "--workdir=gs://b/run 1", "--config.model.hidden=(64, 64)"],
      env={"ZONE": "us-east5-a", "RUN_ENV": "XLA_FLAGS=--x"})
  assert calls[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert "--zone=us-east5-a" in calls and "--worker=all" in calls
  command = next(c for c in calls if c.startswith("--command="))[len("--command="):]
  assert "env XLA_FLAGS=--x .venv/bin/python -m fdistill.main" in command
  assert command.rstrip().endswith("& disown; echo started on $(hostname)")
  # The remote shell gets back exactly the arguments given here.
  remote_args = command.split("fdistill.main ", 1)[1].split(" --distributed=on")[0]
  assert shlex.split(remote_args) == ["--config=configs/toy2d_teacher.py:gmm8",
                                      "--workdir=gs://b/run 1", "--config.model.hidden=(64, 64)"]


def test_tpu_pod_needs_a_zone(tmp_path):
  with pytest.raises(subprocess.CalledProcessError):
    run_with_stubs(tmp_path, ["launch/tpu_pod.sh", "run", "my-pod", "--workdir=x"],
                   env={"ZONE": ""})


@pytest.mark.parametrize("per, device_ids", [("gpu", ""), ("node", "0,1,2,3")])
def test_slurm_script_sruns_main_on_every_task(tmp_path, per, device_ids):
  calls = run_with_stubs(tmp_path, ["bash", "launch/slurm_gpu.sbatch", "--config=c.py",
                                    "--workdir=/shared/run"],
                         env={"PER": per, "GPUS_PER_NODE": "4", "PYTHON": "python3"})
  assert calls[0].endswith("srun")
  assert calls[1:] == ["--kill-on-bad-exit=1", "python3", "-m", "fdistill.main", "--config=c.py",
                       "--workdir=/shared/run", "--distributed=on",
                       f"JAX_LOCAL_DEVICE_IDS={device_ids}"]

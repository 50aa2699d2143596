"""Bad input through the CLI: one FATAL line naming the field, exit status 2, no traceback, and
the workdir (a real teacher run) byte-identical afterwards. Also: non-finite runs stop,
metrics.jsonl stays one strict-JSON row per step across restarts."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from fdistill import errors, modes
from support import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = "--config=configs/toy2d_teacher.py:gmm8"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = toy.tiny_teacher_config(10)
  config.model = __import__("configs.toy2d_teacher", fromlist=["x"]).get_config("gmm8").model
  modes.run(config, workdir, "train_teacher")
  return workdir


def tree_hash(path):
  """{relative path: sha256} of every file under ``path``."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
  return out


def cli(*args, env=None):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", "fdistill.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=full_env)


# (extra arguments, text the FATAL line must contain); {w} is the teacher's workdir.
CASES = [
    (["--mode=bogus"], "--mode='bogus'; valid values"),
    (["--config.optim.lr=abc"], "--config.optim.lr=abc"),
    (["--config.train.bach_size=3"], "unknown config field config.train.bach_size"),
    (["--config=configs/toy2d_teacher.py:gmm99"], "variant='gmm99'"),
    (["--config=configs/toy2d_teacher.py:foo=1"], "config argument 'foo'"),
    (["--config=configs/nope.py"], "no such file 'configs/nope.py'"),
    (["--config.model.name=nope"], "model.name='nope'"),
    (["--config.train.batch_size=0"], "train.batch_size=0 must be > 0"),
    (["--config.train.batch_size=-4"], "train.batch_size=-4"),
    (["--config.train.batch_size=12"], "train.batch_size=12 must be divisible"),
    (["--config.train.num_steps=-5"], "train.num_steps=-5"),
    (["--config.optim.lr=0"], "optim.lr=0"),
    (["--config.model.hidden=(32,32)"], "holds another run (model"),
    (["--config=configs/toy2d_fdistill.py:js,teacher_dir={w},distribution=gmm8", "--mode=distill"],
     "holds another run (objective.name"),
    (["--config=configs/toy2d_fdistill.py:kl,teacher=analytic", "--mode=distill",
      "--workdir={w}/student"], "divergence"),
    (["--config=configs/toy2d_fdistill.py:js,teacher_dir={w}/none", "--mode=distill",
      "--workdir={w}/student"], "config.json not found"),
    (["--config=configs/toy2d_fdistill.py:js,teacher=analytic", "--mode=distill",
      "--workdir={w}/student", "--config.teacher.kind=edm_pickle",
      "--config.teacher.path={w}/absent.pkl"], "absent.pkl: no such file"),
    (["--config=configs/cifar10_teacher.py", "--workdir={w}/cifar",
      "--config.data.data_dir={w}/nodata"], "data.data_dir"),
    (["--workdir={w}/config.json"], "is a file"),
    (["--mode=sample", "--workdir={w}/empty"], "holds no run"),
    (["--mode=distill"], "--mode=distill needs a distillation objective"),
]


@pytest.mark.parametrize("args, needle", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_input_is_one_fatal_line_and_damages_nothing(teacher_dir, args, needle):
  before = tree_hash(teacher_dir)
  args = [a.replace("{w}", teacher_dir) for a in args]
  if not any(a.startswith("--config=") for a in args):
    args.insert(0, TEACHER)
  if not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={teacher_dir}")
  out = cli(*args, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                        "JAX_PLATFORMS": "cpu"})
  fatal = [line for line in out.stderr.splitlines() if line.startswith("FATAL:")]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(fatal) == 1 and needle in fatal[0], out.stderr[-3000:]
  assert "Traceback" not in out.stderr + out.stdout
  assert tree_hash(teacher_dir) == before


def test_traceback_flag_shows_the_traceback(teacher_dir):
  out = cli(TEACHER, f"--workdir={teacher_dir}", "--config.train.num_steps=-5", "--traceback")
  assert out.returncode == 2 and "Traceback" in out.stderr and "FATAL:" in out.stderr


def test_a_run_driven_to_nan_stops_without_saving_non_finite_params(tmp_path):
  config = toy.tiny_teacher_config(40)
  config.optim.lr = 1e30  # the first update overflows; every later one is non-finite too
  config.train.update(dict(max_consecutive_skips=5, log_every=5, save_every=10))
  with pytest.raises(errors.NonFiniteRunError, match="max_consecutive_skips=5"):
    modes.run(config, str(tmp_path), "train_teacher")
  from fdistill.io import checkpoint
  assert checkpoint.saved_steps(str(tmp_path)) == []  # stopped at step 5, before any save
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r for r in rows if "train/skipped" in r][-1]["train/skipped"] >= 5


def test_metrics_jsonl_has_one_strict_row_per_step_after_restarts(tmp_path):
  """10 steps, then a restart to 20 that is cut at 15 (SIGTERM-like stop simulated by a
  shorter run), then 20: the rows are 5, 10, 15, 20 once each, parsed with a strict parser."""
  workdir = str(tmp_path)
  for steps in (10, 20):
    config = toy.tiny_teacher_config(steps)
    config.train.update(dict(log_every=5, save_every=10))
    modes.run(config, workdir, "train_teacher")
  # A crashed attempt left rows past the last checkpoint (20): 25 and a torn line.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 25, "train/loss": 1.0}) + "\n" + '{"step": 30, "train/lo')
  config = toy.tiny_teacher_config(30)
  config.train.update(dict(log_every=5, save_every=10))
  modes.run(config, workdir, "train_teacher")
  strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  rows = [strict(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == [5, 10, 15, 20, 25, 30]

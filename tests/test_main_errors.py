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
    (["--config.mesh.fsdp=3"], "mesh.fsdp=3, mesh.tensor=1: 8 devices are not divisible"),
    (["--config.train.num_steps=-5"], "train.num_steps=-5"),
    (["--config.optim.lr=0"], "optim.lr=0"),
    # Issue 26: settings that once trained on and saved NaN checkpoints, or were accepted.
    (["--config.optim.lr=nan"], "optim.lr=nan must be a finite number"),
    (["--config.optim.lr=inf"], "optim.lr=inf must be a finite number"),
    (["--config.optim.lr=1e39"], "optim.lr=1e+39 must be a finite number within float32"),
    (["--config.optim.grad_clip=nan"], "optim.grad_clip=nan must be a finite number"),
    (["--config.objective.p_std=-1.0"], "objective.p_std=-1.0 must be > 0"),
    (["--config.model.sigma_data=0.0"], "model.sigma_data=0.0 must be > 0"),
    (["--config.train.num_steps=5"], "train.num_steps=5 is below step 10"),
    (["--config=configs/toy2d_fdistill.py:js,teacher=analytic", "--mode=distill",
      "--workdir={w}/student", "--config.objective.sigma_min=50.0"],
     "objective.sigma_min=50.0 and sigma_max=10.0 must satisfy"),
    (["--config.model.hidden=(32,32)"], "holds another run (model"),
    (["--config=configs/toy2d_fdistill.py:js,teacher_dir={w},distribution=gmm8", "--mode=distill"],
     "holds another run (objective.name"),
    (["--config=configs/toy2d_fdistill.py:kl,teacher=analytic", "--mode=distill",
      "--workdir={w}/student"], "divergence"),
    (["--config=configs/toy2d_fdistill.py:js,teacher_dir={w}/none", "--mode=distill",
      "--workdir={w}/student"], "has no checkpoint; train the teacher first"),
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


def test_a_second_trainer_on_a_workdir_is_refused_and_a_stale_lock_is_taken_over(teacher_dir,
                                                                                   tmp_path):
  """One trainer per workdir (issue 26: two ran to the end on one workdir): a live holder's
  lock (here: this test's own process) refuses the second start with one FATAL line and
  nothing written; a lock left by a dead process (kill -9) is taken over."""
  import shutil
  import socket
  from fdistill.io import lock
  workdir = str(tmp_path / "run")
  shutil.copytree(teacher_dir, workdir)
  path = os.path.join(workdir, lock.LOCK_NAME)
  with open(path, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": 0}, f)
  before = tree_hash(workdir)
  out = cli(TEACHER, f"--workdir={workdir}", "--config.train.num_steps=12")
  fatal = [line for line in out.stderr.splitlines() if line.startswith("FATAL:")]
  assert out.returncode == 2 and len(fatal) == 1 and "is in use by another trainer" in fatal[0]
  assert f"pid {os.getpid()}" in fatal[0]
  assert tree_hash(workdir) == before
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  with open(path, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": int(dead), "since": 0}, f)
  with lock.hold(workdir):  # the dead holder's lock is stale: taken over, then released
    assert json.load(open(path))["pid"] == os.getpid()
  assert not os.path.exists(path)


def student_config(teacher, steps):
  c = __import__("configs.toy2d_fdistill", fromlist=["x"]).get_config(
      f"js,teacher_dir={teacher},distribution=gmm8")
  c.train.update(dict(num_steps=steps, save_every=2, log_every=2, batch_size=64))
  return c


def test_a_student_keeps_the_teacher_step_it_started_from(teacher_dir, tmp_path):
  """A student resumed after its teacher run gained a checkpoint keeps its first teacher step
  (issue 26: it silently switched); another step, or a changed or deleted teacher
  checkpoint, is one error naming the field."""
  import shutil
  from fdistill.io import checkpoint
  teacher = str(tmp_path / "teacher")
  shutil.copytree(teacher_dir, teacher)
  student = str(tmp_path / "student")
  modes.run(student_config(teacher, 2), student, "distill")
  assert json.load(open(os.path.join(student, "teacher.json")))["step"] == 10
  config = toy.tiny_teacher_config(12)
  config.model = __import__("configs.toy2d_teacher", fromlist=["x"]).get_config("gmm8").model
  config.train.save_every = 2
  modes.run(config, teacher, "train_teacher")  # the teacher's latest is now 12
  modes.run(student_config(teacher, 4), student, "distill")
  assert checkpoint.load_config(student).teacher.step == 10
  wrong = student_config(teacher, 6)
  wrong.teacher.step = 12
  with pytest.raises(ValueError, match="teacher.step=12: this run started from teacher step 10"):
    modes.run(wrong, student, "distill")
  shutil.rmtree(os.path.join(teacher, "checkpoints", "10"))
  with pytest.raises(ValueError, match="no longer has checkpoint 10"):
    modes.run(student_config(teacher, 6), student, "distill")


def test_a_run_saved_before_a_field_existed_resumes_and_a_recorded_difference_is_refused(
    tmp_path):
  """config.json of a run from before configs/common.py completed the data and discriminator
  sections lacks their new fields: the run resumes with today's config; a field it did record
  still has to agree."""
  from fdistill import experiment
  config = student_config(str(tmp_path / "teacher"), 2)
  saved = json.loads(config.to_json())
  del saved["data"]["resolution"]
  saved["objective"]["discriminator"] = {"name": config.objective.discriminator.name}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  experiment.check_workdir(str(tmp_path), config)
  config.objective.discriminator.name = "unet_heads"
  with pytest.raises(errors.ConfigError, match="holds another run .objective.discriminator"):
    experiment.check_workdir(str(tmp_path), config)


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback():
  """main.py prints USER_ERRORS as one FATAL line; a ValueError raised by a library bug is not
  one of them (it used to be, which hid such tracebacks). ConfigError stays a ValueError."""
  assert not isinstance(ValueError("a bug"), errors.USER_ERRORS)
  assert isinstance(errors.ConfigError("train.batch_size=0 must be > 0"), errors.USER_ERRORS)
  assert issubclass(errors.ConfigError, ValueError)

"""benchmarks/hostile_probe.py: two of its cases through the CLI, and its judge failing a case
whose FATAL line names another field or whose workdir changed."""
import os

from support import multiprocess as mp
from support import scripts

probe = scripts.benchmark("hostile_probe")


def test_two_cases_pass_through_the_cli(tmp_path):
  """Two cases that need no trained run (no base run is trained for them)."""
  names = ("sigma_min_above_max", "eval_mistyped_workdir")
  rows = probe.run_cases([c for c in probe.CASES if c.name in names], str(tmp_path),
                         env=mp.child_env(1))
  assert [(case.name, ok) for case, _, ok in rows] == [(n, True) for n in names], rows
  assert not os.path.exists(tmp_path / "base")
  assert ("| sigma_min_above_max | FATAL names objective.sigma_min | exit 2: FATAL: "
          "objective.sigma_min=50.0") in probe.table(rows)


def test_the_judge_fails_a_wrong_field_a_traceback_and_a_changed_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "10"))
  open(os.path.join(workdir, "config.json"), "w").write("{}")
  before = probe.fingerprint(workdir)
  case = probe.Case("x", "", [], fatal="optim.lr")
  stderr = "FATAL: optim.lr=nan must be a finite number\n"
  assert probe.judge(case, workdir, 2, stderr, before)[1]
  assert not probe.judge(probe.Case("x", "", [], fatal="optim.grad_clip"), workdir, 2, stderr,
                         before)[1]
  assert not probe.judge(case, workdir, 2, "Traceback (most recent call last):\n" + stderr,
                         before)[1]
  assert not probe.judge(case, workdir, 0, stderr, before)[1]
  open(os.path.join(workdir, "config.json"), "w").write('{"seed": 1}')
  assert not probe.judge(case, workdir, 2, stderr, before)[1]

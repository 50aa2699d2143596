"""``make demo`` on its quick setting: every stage runs through the CLI modes, the summary has
its table and figure, and every student beats a generator that ignores its noise."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_demo_summary_and_students_beat_a_constant_generator(tmp_path):
  # The demo's own rows, read in a subprocess: importing fdistill.demo here would define
  # its absl flags a second time in a worker that imported fdistill.main.
  listed = subprocess.run([sys.executable, "-c", "import json; from fdistill import demo; "
                           "print(json.dumps([demo.STUDENTS, demo.QUICK_STEPS]))"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
  students, quick_steps = json.loads(listed.stdout.strip().splitlines()[-1])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # One device; XLA's backend optimisations off halve the compile time, most of
             # this test (a dozen small programs).
             XLA_FLAGS="--xla_backend_optimization_level=0")
  out = subprocess.run([sys.executable, "-m", "fdistill.demo", "--quick",
                        f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = (tmp_path / "summary.md").read_text()
  assert (tmp_path / "summary.png").stat().st_size > 10_000
  rows = {}
  for line in summary.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 7 and re.fullmatch(r"\d+/25", cells[1]):
      rows[cells[0]] = cells
  expected = ["data (exact samples)", "teacher (Heun, 32 steps)"] + [s[0] for s in students]
  assert list(rows) == expected, summary
  for name, *_ in students:
    modes, precision, recall = int(rows[name][1].split("/")[0]), float(rows[name][2]), float(rows[name][3])
    assert rows[name][5] == str(quick_steps) and float(rows[name][6]) > 0
    # A generator that ignores z puts all its mass on at most one mode: weight recall
    # (1 - total variation of the mode shares) <= 1/25. Every student must beat one that
    # spreads over two modes.
    assert modes >= 3 and recall > 2 / 25, (name, rows[name])
    assert 0 < precision <= 1

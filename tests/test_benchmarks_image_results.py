"""benchmarks/image_results.py in its quick setting: the whole pipeline (teacher, its few-step
samplers, a student and its step-0 baseline, the data floor) writes every row, table and figure;
``--partial`` reports the finished rows and trains nothing."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_results_run_writes_every_row_and_figure(tmp_path):
  out = str(tmp_path / "results")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # the suite's compilation cache: the eval and sample modes compile the same
             # sampler programs, and so do restarts of the suite
             JAX_COMPILATION_CACHE_DIR=os.environ.get("FDISTILL_TEST_JAX_CACHE",
                                                      "/tmp/fdistill_test_jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "image_results.py"),
                        "--quick", f"--out={out}", "--only=sCM"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.load(open(os.path.join(out, "results.json")))
  names = [r["row"] for r in results["rows"]]
  assert names == ["teacher, 1 Heun steps", "sCM, 1 step"]
  assert all(r["digits_fd"] > 0 for r in results["rows"]) and results["data_floor"] > 0
  # each student row carries its initialisation's score (the step-0 checkpoint, evaluated)
  assert all(r["digits_fd_step0"] > 0 for r in results["rows"] if r["family"] != "teacher")
  # sCM (no critic) updates its student at every step
  assert results["rows"][1]["generator_updates"] == results["rows"][1]["train_steps"] == 4
  table = open(os.path.join(out, "results.md")).read()
  assert all(f"| {name} |" in table for name in names)
  assert os.path.getsize(os.path.join(out, "grids.png")) > 5_000
  assert len([f for f in os.listdir(out) if f.startswith("grid_")]) == len(names)

  # --partial trains nothing: the finished rows again, the unfinished one listed, not trained
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "image_results.py"),
                        "--quick", f"--out={out}", "--only=sCM,rCM", "--partial"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  partial = json.load(open(os.path.join(out, "results.json")))
  assert [r["row"] for r in partial["rows"]] == names and partial["unfinished"] == ["rCM"]
  assert not os.path.exists(os.path.join(out, "digits_rcm_rcm"))
  assert "Not trained yet (--partial): rCM" in open(os.path.join(out, "results.md")).read()

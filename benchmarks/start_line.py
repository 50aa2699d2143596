"""Seconds from a toy CLI command to its start line, and whether the run imported TensorFlow.

  python benchmarks/start_line.py                      # this checkout
  python benchmarks/start_line.py --repo=/tmp/before   # another checkout (e.g. a git worktree
                                                       # of an older commit), same interpreter

Runs ``python -m fdistill.main`` on the toy teacher config (20 steps, fresh workdir) ``--runs``
times and prints each run's seconds to the start line (the first line that begins with
``fdistill``), the whole run's seconds, the seconds spent importing modules (the sum of the
``-X importtime`` log's self times) and whether ``tensorflow`` was among them. The figures depend on the machine's load: compare checkouts in one call
or back to back.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time


def one_run(repo):
  """(seconds to the start line, seconds in all, import seconds, TensorFlow imported) of one
  toy run."""
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-X", "importtime", "-m", "fdistill.main",
           "--config=configs/toy2d_teacher.py:gmm8", f"--workdir={tmp}/run",
           "--mode=train_teacher", "--config.train.num_steps=20"]
    env = dict(os.environ, PYTHONPATH=repo)  # the checkout's fdistill and configs come first
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    to_start_line, tf_imported, import_us = None, False, 0
    for line in proc.stdout:
      if to_start_line is None and line.startswith("fdistill"):
        to_start_line = time.perf_counter() - start
      if line.startswith("import time:") and not line.startswith("import time: self"):
        self_us, _, name = line[len("import time:"):].split("|")
        import_us += int(self_us)
        tf_imported |= name.strip() == "tensorflow"
    if proc.wait() != 0:
      raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return to_start_line, time.perf_counter() - start, import_us / 1e6, tf_imported


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p.add_argument("--runs", type=int, default=3)
  args = p.parse_args(argv)
  for i in range(args.runs):
    to_start, total, imports, tf_imported = one_run(os.path.abspath(args.repo))
    print(f"{args.repo} run {i + 1}: start line after {to_start:.1f} s, run {total:.1f} s, "
          f"imports {imports:.1f} s, tensorflow imported: {tf_imported}", flush=True)


if __name__ == "__main__":
  main()

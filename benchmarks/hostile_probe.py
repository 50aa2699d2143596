"""Hostile-user probe (issue 26): the CLI fed bad input, signals and damaged workdirs.

  python benchmarks/hostile_probe.py                     # every case, writes docs/robustness.md
  python benchmarks/hostile_probe.py --only=lr_nan,kill9  # some cases, prints the table

One small toy teacher run (20 steps, checkpoints 10 and 20) is trained once; each case
works on its own copy. A case is a command line (``python -m fdistill.main ...``) and what
must hold afterwards: the exit status, exactly one ``FATAL:`` line on stderr (for errors)
naming what the case expects, and the workdir's checkpoints and ``config.json``
byte-identical (for errors), or the run's checkpoints after a resume. About 10 minutes on
2 busy CPU cores (each case starts a fresh interpreter; a compile cache is shared).
Multi-process (a dead peer) and disk-full cases are tests instead
(tests/test_parallel_multiprocess.py, tests/test_train_recovery.py): they need two
launched processes or a patched write.
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "configs", "toy2d_teacher.py") + ":gmm8"
STUDENT = os.path.join(ROOT, "configs", "toy2d_fdistill.py") + ":js,teacher=analytic"
TINY = ("model.hidden=(32,32)", "train.batch_size=64", "train.save_every=10",
        "train.log_every=10", "train.keep_checkpoints=3", "eval.num_samples=100",
        "eval.batch_size=100", "eval.sampler_steps=4", "eval.num_plot_samples=50")
BASE_STEPS = 20


@dataclasses.dataclass
class Case:
  name: str
  expected: str                      # the table's "expected" column
  args: Sequence[str]                # fdistill.main flags after --workdir
  status: int = 2
  fatal: Optional[str] = None        # text the one FATAL line must hold (errors)
  prepare: Optional[Callable] = None  # prepare(workdir) before the command
  check: Optional[Callable] = None   # check(workdir, stderr) -> problem or None (successes)
  workdir: str = "copy"              # "copy" of the base run, "fresh" (absent) or "file"
  signal_after: Optional[int] = None  # a signal sent once the run trains past step 20
  untouched: bool = True             # an error case leaves checkpoints/ and config.json as they were


def flags(*overrides, config=TEACHER, mode="train_teacher"):
  return [f"--config={config}", f"--mode={mode}", *[f"--config.{o}" for o in TINY + overrides]]


def fingerprint(workdir):
  """Digest of every file under checkpoints/ plus config.json (what an error must not touch)."""
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(workdir, "checkpoints", "**", "*"), recursive=True) +
                     [os.path.join(workdir, "config.json")]):
    if os.path.isfile(path):
      h.update(path[len(workdir):].encode() + open(path, "rb").read())
  return h.hexdigest()


def steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def flip_bytes(workdir, step, item):
  """16 bytes inverted in the middle of every data file of checkpoint ``step``'s ``item``."""
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), item, "**", "d", "*"),
                        recursive=True):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    open(path, "wb").write(bytes(data))


def flip_export(workdir):
  flip_bytes(workdir, 20, "export")


def flip_states(*steps_):
  def corrupt(workdir):
    for step in steps_:
      flip_bytes(workdir, step, "state")
  return corrupt


def all_moved_aside(workdir, stderr):
  moved = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
  return None if len(moved) == 2 and not steps(workdir) else f"moved {moved}, kept {steps(workdir)}"


def delete_manifest(workdir):
  for path in glob.glob(os.path.join(workdir, "checkpoints", "20", "**", "manifest.ocdbt"),
                        recursive=True):
    os.remove(path)


def live_lock(workdir):
  import socket
  with open(os.path.join(workdir, "trainer.lock"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)


def dead_lock(workdir):
  import socket
  with open(os.path.join(workdir, "trainer.lock"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "since": 0}, f)


def truncate_config(workdir):
  path = os.path.join(workdir, "config.json")
  text = open(path).read()
  open(path, "w").write(text[:len(text) // 3])


def other_model(workdir):
  os.remove(os.path.join(workdir, "config.json"))


def reaches(step, aside=None):
  def check(workdir, stderr):
    if steps(workdir)[-1:] != [step]:
      return f"checkpoints {steps(workdir)}"
    moved = sorted(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) if aside else []
    if aside and not (len(moved) == 1 and moved[0].startswith(f"{aside}.")):
      return f"moved aside: {moved}"
    return None
  return check


def wrote_samples(workdir, stderr):
  return None if glob.glob(os.path.join(workdir, "samples_*.npy")) else "no samples written"


def saved_on_signal(workdir, stderr):
  got = steps(workdir)
  return None if got and got[-1] > BASE_STEPS else f"checkpoints {got}"


CASES = [
    Case("lr_nan", "FATAL names optim.lr", flags("optim.lr=nan", "train.num_steps=40"),
         fatal="optim.lr"),
    Case("lr_inf", "FATAL names optim.lr", flags("optim.lr=inf", "train.num_steps=40"),
         fatal="optim.lr"),
    Case("lr_1e39", "FATAL names optim.lr (overflows float32)",
         flags("optim.lr=1e39", "train.num_steps=40"), fatal="optim.lr"),
    Case("grad_clip_nan", "FATAL names optim.grad_clip",
         flags("optim.grad_clip=nan", "train.num_steps=40"), fatal="optim.grad_clip"),
    Case("sigma_data_0", "FATAL names model.sigma_data",
         flags("model.sigma_data=0.0", "train.num_steps=40"), fatal="model.sigma_data"),
    Case("p_std_negative", "FATAL names objective.p_std",
         flags("objective.p_std=-1.0", "train.num_steps=40"), fatal="objective.p_std"),
    Case("sigma_min_above_max", "FATAL names objective.sigma_min",
         flags("objective.sigma_min=50.0", "objective.sigma_max=1.0", config=STUDENT,
               mode="distill"), fatal="sigma_min", workdir="fresh"),
    Case("unknown_field", "FATAL names the field and the valid ones",
         flags("optim.lrr=0.1"), fatal="optim.lrr"),
    Case("bad_mode", "FATAL lists the modes", flags() + ["--mode=trian"], fatal="--mode"),
    Case("num_steps_below_saved", "FATAL names train.num_steps, config.json kept",
         flags("train.num_steps=5"), fatal="train.num_steps"),
    Case("second_trainer", "FATAL: workdir in use (live lock)",
         flags("train.num_steps=40"), fatal="in use by another trainer", prepare=live_lock),
    Case("stale_lock", "a dead holder's lock is taken over; trains to 30",
         flags("train.num_steps=30"), status=0, prepare=dead_lock, check=reaches(30)),
    Case("workdir_is_file", "FATAL: workdir is a file", flags(), fatal="is a file",
         workdir="file"),
    Case("corrupt_export_sample", "FATAL names checkpoint 20's export",
         flags(mode="sample"), fatal="checkpoints/20: its exported params", prepare=flip_export),
    Case("corrupt_export_eval_step", "FATAL names checkpoint 20",
         flags("eval.step=20", mode="eval"), fatal="checkpoints/20", prepare=flip_export),
    Case("corrupt_export_resume", "exit 0: resumes (state intact), trains to 30",
         flags("train.num_steps=30"), status=0, prepare=flip_export, check=reaches(30)),
    Case("no_manifest_resume", "20 moved aside, resumes from 10 to 30",
         flags("train.num_steps=30"), status=0, prepare=delete_manifest, check=reaches(30, 20)),
    Case("truncated_config_sample", "exit 0: sample reads the checkpoint, not config.json",
         flags(mode="sample"), status=0, prepare=truncate_config, check=wrote_samples),
    Case("other_model_checkpoint", "FATAL names an array and both shapes; nothing moved",
         flags("model.hidden=(48,48)", "train.num_steps=40"), fatal="holds another model",
         prepare=other_model),
    Case("eval_mistyped_workdir", "FATAL: no run there; nothing created",
         flags(mode="eval"), fatal="holds no run", workdir="fresh"),
    Case("eval_negative_poll", "FATAL names eval.poll_seconds",
         flags("eval.poll_seconds=-1.0", mode="eval"), fatal="eval.poll_seconds"),
    Case("negative_num_samples", "FATAL names --num_samples",
         flags(mode="sample") + ["--num_samples=-5"], fatal="--num_samples"),
    Case("batch_size_zero", "FATAL names train.batch_size",
         flags("train.batch_size=0", "train.num_steps=40"), fatal="train.batch_size"),
    Case("missing_config_file", "FATAL names the file", ["--config=configs/nope.py",
                                                          "--mode=train_teacher"],
         fatal="nope.py"),
    Case("bad_config_variant", "FATAL names the variant",
         [f"--config={TEACHER[:-5]}:gmm99", "--mode=train_teacher"], fatal="gmm99"),
    Case("truncated_config_train", "FATAL names config.json", flags("train.num_steps=40"),
         fatal="config.json", prepare=truncate_config),
    Case("eval_missing_step", "FATAL names eval.step", flags("eval.step=15", mode="eval"),
         fatal="eval.step"),
    Case("flipped_state_resume", "20 moved aside (digest), resumes from 10 to 30",
         flags("train.num_steps=30"), status=0, prepare=flip_states(20), check=reaches(30, 20)),
    Case("no_intact_checkpoint", "FATAL: no intact checkpoint; both moved aside, none deleted",
         flags("train.num_steps=30"), fatal="no intact checkpoint", prepare=flip_states(10, 20),
         untouched=False, check=all_moved_aside),
    Case("kill_9_resume", "kill -9 once past step 20; the rerun resumes to 60",
         flags("train.num_steps=60"), status=-9, signal_after=signal.SIGKILL),
    Case("sigterm", "SIGTERM: saves the step in flight, exit 0",
         flags("train.num_steps=1000000", "train.save_every=1000000"), status=0,
         signal_after=signal.SIGTERM, check=saved_on_signal),
    Case("sigint", "Ctrl-C: saves the step in flight, exit 0",
         flags("train.num_steps=1000000", "train.save_every=1000000"), status=0,
         signal_after=signal.SIGINT, check=saved_on_signal),
]


def run_main(args, workdir, env, signal_after=None):
  cmd = [sys.executable, "-m", "fdistill.main", f"--workdir={workdir}", *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if signal_after:
    wait_for_progress(workdir, proc)
    proc.send_signal(signal_after)
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def wait_for_progress(workdir, proc, timeout=300):
  """Until the run logs a step past the base run's (it is training, handlers installed)."""
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(json.loads(line).get("step", 0) > BASE_STEPS
                                    for line in open(path) if line.strip()):
      return
    time.sleep(0.2)


def judge(case, workdir, rc, stderr, before):
  """(got, passed) of one case."""
  fatal = [line.replace(os.path.dirname(workdir), "...") for line in stderr.splitlines()
           if line.startswith("FATAL:")]
  got = f"exit {rc}" + (f": {fatal[0][:150]}" if fatal else f"; checkpoints {steps(workdir)}")
  problems = []
  if rc != case.status:
    problems.append(f"exit {rc}")
  if case.fatal is not None:
    if len(fatal) != 1 or case.fatal not in fatal[0]:
      problems.append(f"{len(fatal)} FATAL lines")
    if "Traceback" in stderr:
      problems.append("traceback")
    if case.untouched and case.workdir == "copy" and fingerprint(workdir) != before:
      problems.append("workdir changed")
    if case.workdir == "fresh" and os.path.exists(workdir):
      problems.append("workdir created")
  if case.check is not None:
    problem = case.check(workdir, stderr)
    if problem:
      problems.append(problem)
  return got + ("; " + ", ".join(problems) if problems else ""), not problems


def run_case(case, base, scratch, env):
  workdir = os.path.join(scratch, case.name)
  if case.workdir == "copy":
    shutil.copytree(base, workdir)
  elif case.workdir == "file":
    open(workdir, "w").write("not a directory")
  if case.prepare:
    case.prepare(workdir)
  before = fingerprint(workdir) if case.workdir == "copy" else None
  rc, _, err = run_main(case.args, workdir, env, case.signal_after)
  got, ok = judge(case, workdir, rc, err, before)
  if case.name == "kill_9_resume" and ok:  # the rerun must finish what the killed run began
    rc, _, err = run_main(case.args, workdir, env)
    problem = reaches(60)(workdir, err)
    got += f"; rerun exit {rc}" + (f", {problem}" if problem else ", reached 60")
    ok = rc == 0 and problem is None
  return got, ok


def run_cases(cases, scratch, progress=False, env=None):
  """[(case, got, passed)]: trains the base run under ``scratch``, then runs each case."""
  env = env or dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                    JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, "compile_cache"))
  base = os.path.join(scratch, "base")
  if any(case.workdir == "copy" for case in cases):
    rc, _, err = run_main(flags(f"train.num_steps={BASE_STEPS}"), base, env)
    assert rc == 0 and steps(base) == [10, 20], err[-2000:]
  rows = []
  for case in cases:
    got, ok = run_case(case, base, scratch, env)
    rows.append((case, got, ok))
    if progress:
      print(f"{case.name}: {'pass' if ok else 'FAIL'} ({got})", flush=True)
  return rows


def table(rows):
  lines = ["| case | expected | got | pass |", "|---|---|---|---|"]
  for case, got, ok in rows:
    cell = got.replace("|", "/")
    lines.append(f"| {case.name} | {case.expected} | {cell} | {'yes' if ok else 'NO'} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "robustness.md"))
  a = parser.parse_args()
  cases = [c for c in CASES if not a.only or c.name in a.only.split(",")]
  unknown = set(filter(None, a.only.split(","))) - {c.name for c in CASES}
  if unknown:
    parser.error(f"unknown cases {sorted(unknown)}; valid: {', '.join(c.name for c in CASES)}")
  scratch = tempfile.mkdtemp(prefix="hostile_probe_")
  started = time.monotonic()
  rows = run_cases(cases, scratch, progress=True)
  elapsed = time.monotonic() - started
  passed = sum(ok for _, _, ok in rows)
  text = table(rows)
  print(text)
  print(f"{passed}/{len(rows)} passed in {elapsed:.0f} s")
  if not a.only:
    with open(a.out, "w") as f:
      f.write(ROBUSTNESS_HEADER + text + f"\n\n{passed} of {len(rows)} cases pass "
              f"({elapsed:.0f} s on this machine's CPU).\n")
  shutil.rmtree(scratch, ignore_errors=True)
  return 0 if passed == len(rows) else 1


ROBUSTNESS_HEADER = """# Robustness: the hostile-user probe

Written by `python benchmarks/hostile_probe.py` (issue 26). A small toy teacher run
(checkpoints 10 and 20) is trained once; each case below runs `python -m fdistill.main`
on its own copy. An error case passes when the exit status is 2, stderr holds exactly one
`FATAL:` line naming the expected field or file and no traceback, and every file under
`checkpoints/` and `config.json` is byte-identical afterwards (a case on a fresh workdir:
nothing created). A recovery case passes when the run ends where it should.

Covered by tests instead (they need two processes or a patched write): a dead or hung peer
in a two-process run of training or of the eval job (`tests/test_parallel_multiprocess.py`:
one FATAL line within the peer timeout; `fdistill.eval.ref_stats` runs under the same
watchdog), a full disk during a save and a checkpoint that does not read back before keep-N
deletes anything (`tests/test_train_recovery.py`), non-finite updates
(`tests/test_finite_updates.py`).

Fixed (issue 26): an unreadable checkpoint (`no_intact_checkpoint`, `corrupt_export_*`) used to
print `RuntimeError: Event loop is closed` tracebacks around the FATAL line. Orbax (0.12) runs
a restore's reads in an asyncio loop that it closes as soon as one read fails, with the other
reads still in flight; tensorstore reported each as it landed, during the fallback to the next
checkpoint or before the exit (`no_intact_checkpoint` passed 0 runs of 4). The first failing
orbax call was the metadata read that checks the saved tree against the config's. Now each
restore (`Checkpointer.restore_intact`, which a run resumes through; `restore_export`, which
sampling, evaluation and teacher loading read through; `restore`) first reads the item back in
full with `fdistill.io.checkpoint.read_problem` through tensorstore's own futures, each waited
for (nothing in flight whatever fails), and only an item that reads back is given to orbax;
this costs one more read of the item on a restore
(`tests/test_train_recovery.py::test_no_intact_checkpoint_stops_instead_of_starting_afresh`
fails without it). Not checked this way: the read-back of a new checkpoint before keep-N
deletes older ones (`Checkpointer._keep_last_n`) goes to orbax directly (its digest and
finiteness are checked; a read failure there is a `SaveFailedError`, which tracebacks of
abandoned reads may still surround), and `latest_meta` reads only the JSON metadata.

"""


if __name__ == "__main__":
  sys.exit(main())

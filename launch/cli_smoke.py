"""Every method's config trains and samples from the command line, at tiny sizes, on a CPU.

  python launch/cli_smoke.py --workdir=/tmp/cli_smoke                 # everything (~15 min, 2 cores)
  python launch/cli_smoke.py --workdir=/tmp/cli_smoke --only=digits   # one scale: toy2d | digits
  python launch/cli_smoke.py --workdir=/tmp/cli_smoke --runs=rcm      # runs whose name has 'rcm'

What a user types, as subprocesses of ``python -m fdistill.main``: a teacher per
scale (toy MLP; 8x8 digits U-Net; 8x8 digits DiT), then ``--mode=distill`` of
every variant of configs/{toy2d,digits}_{fdistill,uni_instruct,rcm}.py for a few
steps (generator and critic steps both run; the divergence switch of
rkl_then_fkl falls inside), then ``--mode=sample`` of each run. A row passes
when both commands exit 0, the last logged losses are finite, nothing was
skipped, a checkpoint exists and the sample file was written. The widths are
shrunk by flags (``--config.model...``), so each run takes seconds to a minute,
most of it compiling. Prints a markdown table and exits 1 if any row failed.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

from configs import digits_rcm, toy2d_rcm, toy2d_uni_instruct

# The CLI runs from the repository root, as a user types it (--config=configs/...).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 6  # with gen_every 2..5: generator and critic steps; rkl_then_fkl switches at 3
TINY_UNET = ["--config.model.model_channels=8", "--config.model.channel_mult=(1,2)",
             "--config.model.attn_resolutions=(4,)"]
TINY_DIT = ["--config.model.hidden_size=32", "--config.model.depth=2",
            "--config.model.num_heads=2", "--config.model.noise_channels=32"]
TOY = ["--config.train.batch_size=64"]
# rCM's sCM-only warm-up (200-500 steps in the configs) down to 2, so the student's DMD step
# and the critic run too.
RCM_WARMUP = ["--config.objective.scm_warmup_steps=2"]
COMMON = [f"--config.train.num_steps={STEPS}", f"--config.train.save_every={STEPS}",
          "--config.train.log_every=1", "--config.train.sample_every=0",
          "--config.eval.num_plot_samples=16"]


def runs(scale):
  """(name, config argument, extra flags, sampler steps) of every distillation run of ``scale``."""
  if scale == "toy2d":
    t = "teacher_dir={teacher}"
    rows = [("toy2d_fdistill:js", f"configs/toy2d_fdistill.py:js,{t},steps={STEPS}", TOY, 0)]
    rows += [(f"toy2d_uni_instruct:{m}", f"configs/toy2d_uni_instruct.py:{m},{t},steps={STEPS}",
              TOY, 0) for m in toy2d_uni_instruct.METHODS]
    rows += [(f"toy2d_rcm:{v}", f"configs/toy2d_rcm.py:{v},{t},steps={STEPS}",
              TOY + (RCM_WARMUP if v == "rcm" else []), 2) for v in toy2d_rcm.VARIANTS]
    return rows
  t = "teacher_dir={teacher},resolution=8"
  rows = [("digits_fdistill:js", f"configs/digits_fdistill.py:js,{t},steps={STEPS}", TINY_UNET, 0)]
  rows += [(f"digits_uni_instruct:{m}",
            f"configs/digits_uni_instruct.py:{m},{t},steps={STEPS}", TINY_UNET, 0)
           for m in toy2d_uni_instruct.METHODS]
  dit_t = "teacher_dir={dit_teacher},resolution=8"  # the DiT student copies a DiT teacher
  rows += [(f"digits_rcm:{v}", f"configs/digits_rcm.py:{v},{dit_t if v == 'dit' else t},"
            f"steps={STEPS}", (TINY_DIT if v == "dit" else TINY_UNET) +
            (RCM_WARMUP if v in ("rcm", "dit") else []), 2)
           for v in digits_rcm.VARIANTS]
  return rows


def teachers(scale):
  """(key, config argument, extra flags) of the teachers ``scale``'s runs need."""
  teacher_steps = ["--config.train.num_steps=4", "--config.train.save_every=4",
                   "--config.train.log_every=1", "--config.train.sample_every=0"]
  if scale == "toy2d":
    return [("teacher", "configs/toy2d_teacher.py", TOY + teacher_steps)]
  return [("teacher", "configs/digits_teacher.py:resolution=8",
           TINY_UNET + ["--config.train.batch_size=8"] + teacher_steps),
          ("dit_teacher", "configs/digits_rcm.py:dit,dsm_teacher=True,resolution=8",
           TINY_DIT + ["--config.train.batch_size=8"] + teacher_steps)]


def cli(config, workdir, mode, flags, cache, timeout):
  cmd = [sys.executable, "-m", "fdistill.main", f"--config={config}", f"--workdir={workdir}",
         f"--mode={mode}", f"--compile_cache={cache}", *flags]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  start = time.time()
  try:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    code, text = out.returncode, out.stdout + out.stderr
  except subprocess.TimeoutExpired:
    code, text = -1, f"over {timeout} s"
  return code, text, time.time() - start


def check_run(workdir, records):
  """'' if the run's records (``metrics.jsonl`` rows) and files are complete, else what is
  missing. The writer stores a non-finite value as null and lists its name under
  "nonfinite" (fdistill/io/writers.py)."""
  if not records:
    return "no metrics.jsonl"
  last = records[-1]
  if last.get("step") != STEPS:
    return f"last step {last.get('step')}"
  bad = [k for r in records for k in r.get("nonfinite", [])
         if k.startswith("train/") and k.endswith("loss")]
  if bad:
    return f"non-finite {bad[0]}"
  if last.get("train/skipped", 0):
    return f"skipped {last['train/skipped']}"
  if not os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS))):
    return "no checkpoint"
  return ""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--only", default="", choices=["", "toy2d", "digits"])
  p.add_argument("--runs", default="", help="only runs whose name contains this text")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per command")
  args = p.parse_args(argv)
  cache = os.path.join(args.workdir, "jax_cache")
  rows, failed = [], 0
  print("| run | distill s | sample s | kinds of step logged | result |\n|---|---|---|---|---|",
        flush=True)
  for scale in ([args.only] if args.only else ["toy2d", "digits"]):
    dirs = {}
    for key, config, flags in teachers(scale):
      dirs[key] = os.path.join(args.workdir, scale, key)
      code, text, _ = cli(config, dirs[key], "train_teacher", flags, cache, args.timeout)
      if code:
        sys.exit(f"teacher {config} failed:\n{text[-3000:]}")
    for name, config, flags, sampler_steps in runs(scale):
      if args.runs not in name:
        continue
      workdir = os.path.join(args.workdir, scale, name.replace(":", "_"))
      config = config.format(**dirs)
      code, text, distill_s = cli(config, workdir, "distill", COMMON + flags, cache, args.timeout)
      records = _records(workdir)
      result = (check_run(workdir, records) if code == 0 else
                f"distill exit {code}: {text[-300:]!r}")
      sample_s = 0.0
      if not result:
        extra = [f"--num_steps={sampler_steps}"] if sampler_steps else []
        code, text, sample_s = cli(config, workdir, "sample", COMMON + flags + extra, cache,
                                   args.timeout)
        if code:
          result = f"sample exit {code}: {text[-300:]!r}"
        elif not glob.glob(os.path.join(workdir, "*.png")) + glob.glob(
            os.path.join(workdir, "samples*")):
          result = "no sample file"
      kinds = logged_kinds(records)
      failed += bool(result)
      rows.append(dict(run=name, distill_s=distill_s, sample_s=sample_s, kinds=kinds,
                       result=result or "ok"))
      print(f"| {name} | {distill_s:.0f} | {sample_s:.0f} | {', '.join(kinds)} | "
            f"{result or 'ok'} |", flush=True)
  with open(os.path.join(args.workdir, "cli_smoke.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"\n{len(rows) - failed}/{len(rows)} runs ok; rows in "
        f"{os.path.join(args.workdir, 'cli_smoke.json')}")
  return 1 if failed else 0


def logged_kinds(records):
  """The kinds of step a run logged: ``train/<kind>/...`` keys, or one kind (no prefix)."""
  kinds = {k.split("/")[1] for r in records for k in r if k.startswith("train/") and
           k.count("/") == 2}
  if not kinds and any("train/gen_loss" in r for r in records):
    kinds = {"generator"}
  return sorted(kinds)


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


if __name__ == "__main__":
  sys.exit(main())

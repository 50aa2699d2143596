"""Image results: a teacher on real digits, its few-step samplers, and one-step students of every
family distilled from it, scored with the same metric; tables and sample grids.

  python benchmarks/image_results.py --data=digits                      # the full run (hours of CPU)
  python benchmarks/image_results.py --data=digits --quick --out=/tmp/x  # the suite's setting

Resumable: each stage is a normal ``fdistill.main`` mode on its own workdir under ``--out``
(a training run resumes bit-for-bit; an evaluation already recorded with the same setting is
served from its record), so a run stopped part-way continues when started again.

Stages: (1) the teacher (``configs/digits_teacher.py`` at ``--resolution``, the U-Net sized by
``--channels``); (2) the teacher's Heun sampler at its full step count and at 4, 2 and 1 steps
(the naive few-step baseline a student must beat); (3) each student row of :data:`STUDENTS`
(f-distill JS / reverse KL / forward KL, Uni-Instruct forward KL, SiD, SiDA, DMD2, sCM and
rCM) for ``--student_steps`` steps from the teacher, scored at its sampler steps; (4) the
metric's data floor (the dataset's two halves against each other). Metric: ``digits_fd``
(``fdistill/eval/digits_fd.py``: a classifier-feature Frechet distance; a proxy, not FID).
Writes ``results.json``, ``results.md`` and ``grids.png`` (teacher vs the students) plus one
grid per row under ``--out``. ``--partial`` trains nothing: it writes these for the stages that
have finished (a run stopped part-way, e.g. at the end of a working session) and lists the rest.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs import digits_fdistill, digits_rcm, digits_teacher, digits_uni_instruct  # noqa: E402
from fdistill import modes  # noqa: E402
from fdistill.io import checkpoint  # noqa: E402
from fdistill.io import plotting  # noqa: E402

# (row name, config module, variant, sampler steps to score)
STUDENTS = [
    ("f-distill JS", digits_fdistill, "js", (1,)),
    ("f-distill reverse KL", digits_fdistill, "reverse_kl", (1,)),
    ("f-distill forward KL", digits_fdistill, "forward_kl", (1,)),
    ("Uni-Instruct forward KL", digits_uni_instruct, "forward_kl", (1,)),
    ("SiD", digits_uni_instruct, "sid", (1,)),
    ("SiDA", digits_uni_instruct, "sida", (1,)),
    ("DMD2", digits_uni_instruct, "dmd2", (1,)),
    ("sCM", digits_rcm, "scm", (1, 2)),
    ("rCM", digits_rcm, "rcm", (1, 2)),
]
TEACHER_SAMPLER_STEPS = (18, 4, 2, 1)
NATIVE_RESOLUTION = {"digits": 8, "mnist5k": 28}


def sized(config, args):
  """The U-Net width, the run length and the eval sample count of this results run."""
  config.model.model_channels = args.channels
  config.eval.num_samples = args.num_samples
  config.eval.batch_size = min(args.num_samples, 500)
  config.train.log_every = max(1, min(config.train.log_every, config.train.num_steps // 4))
  config.train.save_every = config.train.num_steps
  config.train.sample_every = 0
  if args.quick:
    config.model.update(dict(channel_mult=(1, 2), attn_resolutions=(4,)))
    config.train.batch_size = 16
  return config


def teacher_config(args):
  c = digits_teacher.get_config(f"resolution={args.resolution},steps={args.teacher_steps},"
                                f"data={args.data}")
  return sized(c, args)


def student_config(module, variant, teacher_dir, args):
  c = module.get_config(f"{variant},teacher_dir={teacher_dir},steps={args.student_steps},"
                        f"resolution={args.resolution},data={args.data}")
  c = sized(c, args)
  if "scm_warmup_steps" in c.objective:  # the sCM-only phase within the short budget
    c.objective.scm_warmup_steps = min(c.objective.scm_warmup_steps, args.student_steps // 4)
  return c


def evaluate(config, workdir, sampler_steps):
  """digits_fd of the run's last checkpoint at ``sampler_steps`` (cached per setting)."""
  config.eval.update(dict(step=config.train.num_steps, sampler_steps=sampler_steps,
                          timeout_seconds=0.0))
  metrics = modes.run(config, workdir, "eval")[config.train.num_steps]
  path = modes.run(config, workdir, "sample")
  return metrics["eval/digits_fd"], np.load(path.replace(".png", ".npy"))


def generator_updates(config) -> int:
  """How many of the run's steps update the generator: every kind of step but "critic" (each
  family's schedule, e.g. f-distill and DMD2 every ``gen_every``-th step, SiD every other step,
  sCM every step), counted from the objective's own schedule."""
  from fdistill import experiment  # pylint: disable=g-import-not-at-top
  schedule = experiment.build(config, teacher_params=False).schedule
  return sum(schedule(step) != "critic" for step in range(config.train.num_steps))


def reached(workdir) -> int:
  """The last saved step of ``workdir`` (-1: none yet; 0 is the initialisation's checkpoint)."""
  return max(checkpoint.saved_steps(workdir) if os.path.isdir(workdir) else [], default=-1)


def train(config, workdir, mode, partial=False):
  """Trains (or resumes) a stage; its training wall seconds over every start, kept in
  ``<workdir>/train_seconds.txt`` (0.0 for a stage trained before that file existed). A stage
  stopped by a signal (it saves first) stops the script: starting it again resumes there.
  ``partial``: train nothing; None for a stage that has not finished."""
  path = os.path.join(workdir, "train_seconds.txt")
  before = float(open(path).read()) if os.path.exists(path) else 0.0
  if reached(workdir) < config.train.num_steps and partial:
    return None
  if reached(workdir) < config.train.num_steps:  # -1 < 0: a num_steps=0 stage runs once
    start = time.time()
    modes.run(config, workdir, mode)
    before += time.time() - start
    checkpoint.write_text(path, f"{before:.1f}\n")
    if reached(workdir) < config.train.num_steps:
      sys.exit(f"stopped at step {reached(workdir)} of {workdir}; run the same command again "
               "to resume")
  return before


class InceptionFid:
  """The papers' FID for rows of ``--data=mnist5k`` (``--inception``: the converted weights,
  docs/fid.md): each row's samples at two sample seeds against the statistics of all 5000 real
  digits, and the floor (the real set's two halves against each other). The reference is kept
  in ``fid_ref.npz`` and the values in ``fid.json`` under ``--out`` (keyed by row, sampler
  steps, seed and sample count), so a resumed run recomputes nothing."""

  SEEDS = (0, 1)

  def __init__(self, config, args):
    from fdistill.eval import fid as fid_lib, inception, ref_stats, statistics
    self.fid_lib, self.statistics = fid_lib, statistics
    self.args = args
    self.detector = statistics.detector_of(inception.load_params(args.inception))
    self.cache_path = os.path.join(args.out, "fid.json")
    self.cache = {}
    if os.path.exists(self.cache_path):
      with open(self.cache_path) as f:
        self.cache = json.load(f)
    images = ref_stats.dataset_of(config).images
    ref_path = os.path.join(args.out, "fid_ref.npz")  # what fdistill.eval.ref_stats writes
    if not os.path.exists(ref_path):  # ~10+ minutes of Inception on 2 cores: once per --out
      stats = ref_stats.reference_stats(config, num=0, detector=self.detector)
      fid_lib.save_reference(ref_path, *stats.mean_cov())
    self.reference = fid_lib.load_reference(ref_path)
    half = len(images) // 2
    order = np.random.default_rng(0).permutation(len(images))
    self.floor = self.cached("data halves", lambda: self.fid_lib.frechet_distance(
        *self.stats(images[order[:half]]).mean_cov(),
        *self.stats(images[order[half:]]).mean_cov()))

  def stats(self, images, batch=250):
    batches = (images[i:i + batch] for i in range(0, len(images), batch))
    return self.statistics.feature_stats(batches, self.detector)[0]

  def cached(self, key, compute):
    if key not in self.cache:
      self.cache[key] = float(compute())
      checkpoint.write_text(self.cache_path, json.dumps(self.cache, indent=1))
    return self.cache[key]

  def of_run(self, config, workdir, sampler_steps):
    """[FID at each seed] of ``workdir``'s last checkpoint, ``--num_samples`` samples each."""
    out = []
    for seed in self.SEEDS:
      key = f"{workdir}|{sampler_steps} steps|seed {seed}|{self.args.num_samples}"

      def compute(seed=seed):
        c = config.copy_and_resolve_references()
        c.seed = seed
        c.eval.sampler_steps = sampler_steps
        path = modes.run(c, workdir, "sample", num_samples=self.args.num_samples)
        samples = np.load(path.replace(".png", ".npy"))
        return self.fid_lib.fid_from_stats(self.stats(samples), self.reference)
      out.append(self.cached(key, compute))
    return out


def data_floor(config, args):
  """digits_fd of the dataset's two halves against each other (the metric's noise floor)."""
  from fdistill.eval import digits_fd
  images, labels = digits_fd.data_images(config)
  params = digits_fd.load_or_train(config, images, labels)
  order = np.random.default_rng(0).permutation(len(images))
  half = len(images) // 2
  a, b = (digits_fd.stats_of(params, images[order[s]]) for s in (slice(0, half), slice(half, None)))
  return digits_fd.distance(a, b)


def main(argv=None):
  plotting.use_headless_backend()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default="digits", choices=digits_teacher.DATASETS)
  p.add_argument("--out", default="", help="default runs/image_results/<data>")
  p.add_argument("--resolution", type=int, default=0,
                 help="default: the data's native size (digits 8, mnist5k 28)")
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--teacher_steps", type=int, default=4000)
  p.add_argument("--student_steps", type=int, default=1000)
  p.add_argument("--num_samples", type=int, default=2000)
  p.add_argument("--only", default="",
                 help="comma-separated student rows to run (default all; 'none': the teacher only)")
  p.add_argument("--inception", default=os.environ.get("FDISTILL_INCEPTION", ""),
                 help="converted Inception .npz (docs/fid.md): adds the FID column (default "
                      "$FDISTILL_INCEPTION; none: digits_fd only)")
  p.add_argument("--quick", action="store_true", help="tiny networks and runs (the suite's)")
  p.add_argument("--partial", action="store_true",
                 help="train nothing: tables and grids of the finished stages only")
  args = p.parse_args(argv)
  args.out = args.out or os.path.join("runs", "image_results", args.data)
  args.resolution = args.resolution or NATIVE_RESOLUTION[args.data]
  only = set(filter(None, args.only.split(",")))
  unknown = only - {name for name, *_ in STUDENTS} - {"none"}
  if unknown:
    p.error(f"--only: unknown rows {sorted(unknown)}; accepted: 'none' or "
            f"{', '.join(name for name, *_ in STUDENTS)}")
  if args.quick:
    args.channels, args.teacher_steps, args.student_steps, args.num_samples = 8, 4, 4, 64
  os.makedirs(args.out, exist_ok=True)
  rows, grids = [], {}
  teacher_dir = os.path.join(args.out, "teacher")
  tc = teacher_config(args)
  seconds = train(tc, teacher_dir, "train_teacher", args.partial)
  if seconds is None:
    sys.exit(f"--partial: the teacher in {teacher_dir} has not finished; nothing to report")
  fid = InceptionFid(tc, args) if args.inception else None
  for steps in (1,) if args.quick else TEACHER_SAMPLER_STEPS:  # quick: one sampler compile each
    fd, samples = evaluate(teacher_config(args), teacher_dir, steps)
    name = f"teacher, {steps} Heun steps"
    rows.append(dict(row=name, family="teacher", sampler_steps=steps, digits_fd=fd,
                     train_steps=args.teacher_steps, train_seconds=seconds,
                     **fid_columns(fid, teacher_config(args), teacher_dir, steps)))
    grids[name] = samples
    print(f"{name}: digits_fd {fd:.3f}", flush=True)
  unfinished = []
  for name, module, variant, sampler_steps in STUDENTS:
    if only and name not in only:
      continue
    workdir = os.path.join(args.out, f"{module.__name__.split('.')[-1]}_{variant}")
    config = student_config(module, variant, teacher_dir, args)
    init_config = student_config(module, variant, teacher_dir, args)
    init_config.train.num_steps = 0  # the initialisation: the baseline training must beat
    if (train(init_config, workdir + "_step0", "distill", args.partial) is None
        or (seconds := train(config, workdir, "distill", args.partial)) is None):
      unfinished.append(name)
      continue
    updates = generator_updates(config)
    for steps in sampler_steps[:1] if args.quick else sampler_steps:
      fd_init, _ = evaluate(init_config, workdir + "_step0", steps)
      fd, samples = evaluate(student_config(module, variant, teacher_dir, args), workdir, steps)
      label = f"{name}, {steps} step{'s' if steps > 1 else ''}"
      rows.append(dict(row=label, family=module.__name__.split(".")[-1], sampler_steps=steps,
                       digits_fd=fd, digits_fd_step0=fd_init, train_steps=args.student_steps,
                       generator_updates=updates,
                       train_seconds=seconds,
                       **fid_columns(fid, config, workdir, steps)))
      grids[label] = samples
      print(f"{label}: digits_fd {fd:.3f}", flush=True)
  floor = data_floor(tc, args)
  write_outputs(args, rows, grids, floor, fid.floor if fid else None, unfinished)


def fid_columns(fid, config, workdir, sampler_steps):
  if fid is None:
    return {}
  values = fid.of_run(config, workdir, sampler_steps)
  return dict(fid=float(np.mean(values)), fid_per_seed=values)


def write_outputs(args, rows, grids, floor, fid_floor=None, unfinished=()):
  checkpoint.write_text(os.path.join(args.out, "results.json"), json.dumps(
      dict(rows=rows, data_floor=floor, fid_floor=fid_floor, args=vars(args),
           unfinished=list(unfinished)), indent=1))
  with_fid = fid_floor is not None
  lines = [f"digits_fd (lower is better; the data's two halves: {floor:.3f})"
           + (f", Inception FID (mean of {len(InceptionFid.SEEDS)} sample seeds, "
              f"{args.num_samples} samples each, against all real images; the data's two "
              f"halves: {fid_floor:.2f})" if with_fid else "")
           + f"; {args.resolution}x{args.resolution} {args.data}, U-Net {args.channels} "
           f"channels, {args.num_samples} samples per row", "",
           "| row | digits_fd | at step 0 |" + (" FID (seeds) |" if with_fid else "")
           + " training steps | generator updates | training seconds |",
           "|---|---|---|" + ("---|" if with_fid else "") + "---|---|---|"]
  lines += [f"| {r['row']} | {r['digits_fd']:.3f} | "
            + (f"{r['digits_fd_step0']:.3f} |" if "digits_fd_step0" in r else "– |")
            + (f" {r['fid']:.2f} ({', '.join(f'{v:.2f}' for v in r['fid_per_seed'])}) |"
               if with_fid else "")
            + f" {r['train_steps']} | {r.get('generator_updates', '')} |"
            + f" {r['train_seconds']:.0f} |" for r in rows]
  if unfinished:
    lines += ["", f"Not trained yet (--partial): {', '.join(unfinished)}"]
  checkpoint.write_text(os.path.join(args.out, "results.md"), "\n".join(lines) + "\n")
  for name, samples in grids.items():
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)
    plotting.save_image_grid(os.path.join(args.out, f"grid_{safe}.png"), samples[:64], nrow=8,
                             padding=1)
  save_side_by_side(os.path.join(args.out, "grids.png"), grids)
  print("\n".join(lines))


def save_side_by_side(path, grids):
  """One figure: a titled 8x8 grid per row, upscaled (nearest) so digits stay readable."""
  from matplotlib import pyplot as plt
  names = list(grids)
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    grid = plotting.image_grid(grids[name][:64], nrow=8, padding=1)
    ax.imshow(grid.squeeze(), cmap="gray", interpolation="nearest")
    ax.set_title(name, fontsize=9)
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()

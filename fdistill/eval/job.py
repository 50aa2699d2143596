"""The evaluation job: polls a training workdir's checkpoints and writes metrics.

It reads only each checkpoint's exported params (the EMA of the sampled
network): no teacher, no optimiser state. Resumable: evaluated steps and their
metrics are recorded in ``<workdir>/eval/done.json`` so a restarted job
continues where it stopped; a step counts as done for a metric when its record
holds that metric's number, so switching ``eval.metric`` evaluates the old
checkpoints again rather than skipping them. It ends once the final training
step (``train.num_steps``) is evaluated, or after ``eval.timeout_seconds``
without a new checkpoint (0 = evaluate what exists and stop).
``eval.step=N`` evaluates checkpoint N only (once: a recorded step is returned
as recorded) and returns.

Metrics (``eval.metric``; "" picks by ``data.name``):

* ``toy`` (toy2d): exact mode statistics against the data GMM.
* ``fid`` (cifar10, imagenet64): ``eval.num_samples`` samples, quantised to
  uint8 as PNGs would be, through the papers' Inception
  (``eval.inception_path``), Frechet distance to ``eval.fid_ref`` (EDM's
  fid-refs npz or ``python -m fdistill.eval.ref_stats``); the Inception Score
  too when the weights carry the 1008-way head.
* ``digits_fd`` (digits, mnist5k): the same Frechet distance in a small
  digits classifier's features, a CPU proxy (:mod:`fdistill.eval.digits_fd`).

``eval/best.json`` points at the best step so far (lowest FID / digits_fd,
highest toy weight recall): ``{"metric", "step", "value", "lower_is_better"}``.
It is recomputed from ``done.json`` after every step and written atomically,
so it needs no state of its own to survive a restart.

Several hosts (``jax.distributed``): every process runs the job; each extracts
the Inception features of its slice of every sample batch on its devices, the
float64 statistics (and Inception Score sums) are merged over processes, and
process 0 picks the checkpoints and alone writes files.
"""
import dataclasses
import json
import math
import os
import time
import zipfile
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fdistill import errors, experiment
from fdistill.diffusion import gmm as gmm_lib
from fdistill.eval import fid as fid_lib
from fdistill.io import checkpoint
from fdistill.io import console
from fdistill.io import writers
from fdistill.parallel import mesh as mesh_lib
from fdistill.registry import lookup

# Images per call of the Inception detector and device (times this process's device count when
# the batch is sharded): a fixed compiled shape whatever eval.batch_size is, and ~0.7 GB of activations
# per 256 images at 299x299.
FEATURE_BATCH = 256


# ---------------------------------------------------------------------------
# Sampling.

def sample_batches(sampling, params, rng, num, batch_size) -> Iterator[np.ndarray]:
  """``num`` samples as host arrays, ``batch_size`` at a time (one compiled sampler).

  Class-conditional runs get labels cycling over the classes (sample ``i`` has
  class ``i mod cond_dim``), so every class is equally represented, as the
  papers' FID protocol draws them. The last batch is sampled full and cut.
  """
  cond_dim = sampling.task.cond_dim
  for i, start in enumerate(range(0, num, batch_size)):
    size = min(batch_size, num)
    cond = None
    if cond_dim:
      cond = np.eye(cond_dim, dtype=np.float32)[(start + np.arange(size)) % cond_dim]
    x = np.asarray(sampling.sample(params, jax.random.fold_in(rng, i), size, cond))
    yield x[:num - start]


def sample_in_batches(sampling, params, rng, num, batch_size):
  """``num`` samples drawn ``batch_size`` at a time (one compiled sampler)."""
  return np.concatenate(list(sample_batches(sampling, params, rng, num, batch_size)))[:num]


def detector_images(x) -> np.ndarray:
  """[-1, 1] float NHWC -> uint8 RGB: PNG quantisation (``plotting.to_uint8``), grey tiled to 3."""
  from fdistill.io import plotting  # pylint: disable=g-import-not-at-top
  images = plotting.to_uint8(x)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


# ---------------------------------------------------------------------------
# The Inception detector.

@dataclasses.dataclass(frozen=True)
class Detector:
  """A feature extractor: uint8 NHWC RGB images -> float features [N, dim].

  ``head``: the Inception classifier kernel [dim, 1008] when the weights have it
  (logits = features @ head, no bias, as StyleGAN3's Inception Score), else None.
  """
  extract: Callable[[np.ndarray], np.ndarray]
  dim: int
  head: Optional[np.ndarray] = None


def check_inception(config) -> str:
  """The file ``eval.inception_path`` (else ``$FDISTILL_INCEPTION``) names; else a one-line error."""
  from fdistill.eval import inception  # pylint: disable=g-import-not-at-top
  try:
    return inception.resolve_path(config.eval.inception_path or None)
  except ValueError as e:
    raise ValueError(f"FID needs the Inception weights (eval.inception_path): "
                     f"{e}") from None


def inception_detector(config, mesh=None) -> Detector:
  """The papers' Inception from ``eval.inception_path`` (:func:`detector_of`).

  Tests replace this function (a module attribute, looked up at call time) with a
  cheap stand-in; :mod:`fdistill.eval.ref_stats` uses it too.
  """
  from fdistill.eval import inception  # pylint: disable=g-import-not-at-top
  return detector_of(inception.load_params(check_inception(config)), mesh)


def detector_of(params, mesh=None, dim=None, batch=FEATURE_BATCH) -> Detector:
  """A Detector of Inception ``params``: calls of ``batch`` images per local device of ``mesh``.

  With a mesh the images passed are this process's slice (:func:`process_rows`).
  ``dim`` (default 2048) exists for tests that swap in a smaller stand-in network.
  """
  from fdistill.eval import inception  # pylint: disable=g-import-not-at-top
  head = params["output"]["kernel"] if inception.has_head(params) else None
  extract = fid_lib.feature_fn(params, mesh)
  chunk = batch * (len(mesh.local_devices) if mesh is not None else 1)

  def chunked(images):
    images = np.asarray(images)
    out = []
    for start in range(0, len(images), chunk):
      part = images[start:start + chunk]
      # A short tail pads to the compiled shape (the padding is dropped); a call with
      # fewer images than a chunk runs as it is.
      pad = chunk - len(part) if len(images) > chunk else 0
      if pad:
        part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
      out.append(extract(part)[:chunk - pad])
    return np.concatenate(out)

  return Detector(chunked, dim or inception.FEATURE_DIM, head)


def check_fid_ref(config) -> str:
  path = os.path.expanduser(config.eval.fid_ref)
  fix = (f"make it with `python -m fdistill.eval.ref_stats --config=<this config> "
         f"--out=PATH` (or use EDM's fid-refs npz) and pass --config.eval.fid_ref=PATH")
  if not path:
    raise ValueError(f"eval.fid_ref is not set (eval.metric='fid' compares against reference "
                     f"statistics); {fix}")
  if not os.path.isfile(path):
    raise ValueError(f"eval.fid_ref={config.eval.fid_ref!r} does not exist; {fix}")
  return path


def process_rows(x, index: int, count: int):
  """Process ``index`` of ``count``'s share of a global batch ``x``: (rows, offset, valid).

  Contiguous blocks of ``ceil(len(x) / count)`` rows starting at ``offset``; the
  last blocks are padded with zero rows so that every process hands the sharded
  detector the same shape; the first ``valid`` rows are real.
  """
  per = -(-len(x) // count)
  offset = min(index * per, len(x))
  rows = np.asarray(x[offset:offset + per])
  valid = len(rows)
  if valid < per:
    rows = np.concatenate([rows, np.zeros((per - valid,) + rows.shape[1:], rows.dtype)])
  return rows, offset, valid


def feature_stats(batches, detector: Detector, score_total: int = 0, num_splits: int = 10):
  """(FeatureStats, (IS mean, std) or None) of float [-1, 1] image batches, streamed.

  ``batches``: the same global batches on every process (the sampler's output is
  replicated); each process extracts features of its :func:`process_rows` only and
  the sums are merged over processes at the end (a collective), so every process
  returns the same statistics. With ``score_total`` (the number of images) and a
  detector head, the Inception Score over ``min(num_splits, score_total)`` splits
  (StyleGAN3's: 10) of the head's logits (no bias), from additive per-split sums.
  """
  from fdistill.eval import inception  # pylint: disable=g-import-not-at-top
  stats = fid_lib.FeatureStats(detector.dim)
  scoring = bool(score_total) and detector.head is not None
  splits = min(num_splits, score_total)
  parts, start = None, 0
  for x in batches:
    rows, offset, valid = process_rows(x, jax.process_index(), jax.process_count())
    feats = np.asarray(detector.extract(detector_images(rows)), np.float64)[:valid]
    stats.update(feats)
    if scoring:
      index = start + offset + np.arange(valid)
      new = inception.score_parts(feats @ np.asarray(detector.head, np.float64), index,
                                  score_total, splits)
      parts = new if parts is None else tuple(a + b for a, b in zip(parts, new))
    start += len(x)
  score = None
  if scoring:
    score = inception.score_from_parts(*fid_lib.sum_over_processes(*parts))
  return fid_lib.merge_processes(stats), score


# ---------------------------------------------------------------------------
# Metrics: prepare(config, sampling) -> compute(params, rng) -> {"eval/<name>": value}.

@dataclasses.dataclass(frozen=True)
class Metric:
  """One eval metric.

  prepare(config, sampling) -> compute(params, rng) -> dict
      run once per job (loads detectors and reference statistics), then per checkpoint.
  key: the number ``best.json`` tracks; its presence in a step's record marks the step done.
  check(config): raises a one-line ValueError before the job waits for anything.
  """
  prepare: Callable
  key: str
  lower_is_better: bool
  check: Optional[Callable] = None


def _prepare_toy(config, sampling):
  from fdistill.eval import toy_metrics as tm  # pylint: disable=g-import-not-at-top
  gmm = gmm_lib.named(config.data.distribution)

  def compute(params, rng):
    samples = sample_in_batches(sampling, params, rng, config.eval.num_samples,
                                config.eval.batch_size)
    return {"eval/" + k: v for k, v in tm.mode_statistics(gmm, samples).items()}
  return compute


def _check_fid(config):
  """Both files exist and read (the reference's arrays and their finiteness; the Inception file
  is a .npz archive) before the job writes or samples anything; the reference's width is
  checked against the detector's when it loads (``_prepare_fid``)."""
  weights = check_inception(config)
  fid_lib.load_reference(check_fid_ref(config))
  if not zipfile.is_zipfile(weights):
    raise ValueError(f"eval.inception_path={weights!r} is not a converted .npz (make it with "
                     "python -m fdistill.eval.convert_inception)")


def _prepare_fid(config, sampling):
  reference = fid_lib.load_reference(check_fid_ref(config))
  detector = inception_detector(config, sampling.mesh)
  if reference[0].size != detector.dim:  # before any sampling
    raise ValueError(f"eval.fid_ref={config.eval.fid_ref!r} holds {reference[0].size}-d "
                     f"statistics; the detector's features are {detector.dim}-d")

  def compute(params, rng):
    batches = sample_batches(sampling, params, rng, config.eval.num_samples,
                             config.eval.batch_size)
    stats, score = feature_stats(batches, detector, score_total=config.eval.num_samples)
    out = {"eval/fid": fid_lib.fid_from_stats(stats, reference)}
    if score is not None:
      out.update({"eval/inception_score": score[0], "eval/inception_score_std": score[1]})
    return out
  return compute


def _prepare_digits_fd(config, sampling):
  from fdistill.eval import digits_fd  # pylint: disable=g-import-not-at-top
  images, labels = digits_fd.data_images(config)
  classifier = digits_fd.load_or_train(config, images, labels)
  reference = digits_fd.stats_of(classifier, images)
  detector = Detector(lambda u8: digits_fd.features(classifier, u8), digits_fd.FEATURE_DIM)

  from fdistill.io import plotting  # pylint: disable=g-import-not-at-top

  def compute(params, rng):
    stats = fid_lib.FeatureStats(detector.dim)
    for x in sample_batches(sampling, params, rng, config.eval.num_samples,
                            config.eval.batch_size):
      stats.update(detector.extract(plotting.to_uint8(x)))  # the data's own channels
    return {"eval/digits_fd": digits_fd.distance(stats, reference)}
  return compute


METRICS = {
    "toy": Metric(_prepare_toy, "eval/weight_recall", lower_is_better=False),
    "fid": Metric(_prepare_fid, "eval/fid", lower_is_better=True, check=_check_fid),
    "digits_fd": Metric(_prepare_digits_fd, "eval/digits_fd", lower_is_better=True),
}
DEFAULT_METRIC = {"toy2d": "toy", "digits": "digits_fd", "mnist5k": "digits_fd"}


def metric_name(config):
  return config.eval.metric or DEFAULT_METRIC.get(config.data.name, "fid")


def metric_of(config) -> Metric:
  return lookup(METRICS, metric_name(config), "eval.metric")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A run's sampler with the metric prepared for it (detector, reference statistics)."""
  sampling: experiment.Sampling
  metric: Metric
  compute: Callable


def make_evaluator(config, workdir, sampling=None) -> Evaluator:
  if sampling is None:
    sampling = experiment.build_sampler(config, experiment.task_of_run(workdir))
  metric = metric_of(config)
  return Evaluator(sampling, metric, metric.prepare(config, sampling))


def evaluate_checkpoint(config, workdir, step, evaluator=None):
  """Metrics dict for the checkpoint at ``step`` of ``workdir``.

  ``evaluator``: an :class:`Evaluator` (the job passes its own, prepared once), a
  bare sampler, or None to build one.
  """
  if not isinstance(evaluator, Evaluator):
    evaluator = make_evaluator(config, workdir, evaluator)
  params, _ = experiment.restore_export(evaluator.sampling, workdir, step)
  return evaluator.compute(params, jax.random.key(config.seed + 1))


# ---------------------------------------------------------------------------
# The job.

def _write_json(path, value):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def eval_setting(config, metric: Metric) -> str:
  """Everything besides the checkpoint that changes an evaluation's numbers, as one string:
  a record made with another setting is never served for this one."""
  times = config.objective.sampler_times if "sampler_times" in config.objective else None
  return (f"{metric.key}|sampler_steps={config.eval.sampler_steps}|num_samples="
          f"{config.eval.num_samples}|sampler_times={None if times is None else list(times)}"
          f"|seed={config.seed}")


def best_of(done, metric: Metric, setting: Optional[str] = None) -> Optional[dict]:
  """The best recorded step for ``metric`` (finite values only; the earliest on ties), among
  the records of ``setting`` (None: all)."""
  scored = [(float(rec[metric.key]), int(step)) for step, rec in done.items()
            if rec.get(metric.key) is not None and math.isfinite(float(rec[metric.key]))
            and (setting is None or rec.get("setting") == setting)]
  if not scored:
    return None
  sign = 1.0 if metric.lower_is_better else -1.0
  value, step = min(scored, key=lambda vs: (sign * vs[0], vs[1]))
  return {"metric": metric.key, "step": step, "value": value,
          "lower_is_better": metric.lower_is_better}


def _metrics_only(record):
  return {k: v for k, v in record.items() if k != "setting"}


def _update_best(eval_dir, done, metric, setting=None):
  best = best_of(done, metric, setting)
  path = os.path.join(eval_dir, "best.json")
  if best is not None:
    current = None
    if os.path.exists(path):
      with open(path) as f:
        current = json.load(f)
    if current != best:
      _write_json(path, best)
  return best


# What process 0 tells every process to do next, besides evaluating a step (>= 0).
_WAIT, _STOP = -1, -2


def agreed(value: int) -> int:
  """Process 0's ``value`` on every process.

  Why: each evaluation is a collective (sampling, the sharded detector, merging the
  statistics), so all processes must evaluate the same checkpoints in the same
  order; a checkpoint listing or a clock read on each process could disagree.
  """
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def wait_for_run(workdir, timeout_seconds, poll_seconds):
  """Returns once ``workdir`` holds a run (its ``config.json``); a trainer started beside the
  job may write it a while after the job starts. A ValueError if none appears within
  ``timeout_seconds``: a mistyped workdir is an error, and nothing is created under it."""
  path = os.path.join(workdir, "config.json")
  deadline = time.time() + timeout_seconds
  while not os.path.exists(path):
    if time.time() >= deadline:
      raise ValueError(f"--workdir={workdir!r} holds no run (no config.json"
                       + (f" after {timeout_seconds:g} s, eval.timeout_seconds" if timeout_seconds
                          else "") + "); give the workdir of a training run")
    time.sleep(min(poll_seconds, max(deadline - time.time(), 0)))


def run(config, workdir):
  """Polls ``workdir`` and evaluates every new checkpoint; returns {step: metrics}.

  With ``eval.step >= 0``: evaluates that checkpoint only and returns {step: metrics}.
  Under ``jax.distributed`` every process runs this (each samples and extracts its
  slice); process 0 decides what to evaluate and alone writes the metrics,
  ``done.json`` and ``best.json``.
  """
  metric = metric_of(config)  # fail fast on a bad name, a missing file or field
  if metric.check is not None:
    metric.check(config)
  only = int(config.eval.step)
  wait_for_run(workdir, config.eval.timeout_seconds, config.eval.poll_seconds)
  if only >= 0:  # checked before eval/ exists: a wrong step writes nothing
    saved = sorted(checkpoint.saved_steps(workdir))
    if only not in saved:
      raise ValueError(f"eval.step={only}: {workdir} has no checkpoint {only} "
                       f"(saved: {saved or 'none'})")
  main = mesh_lib.is_main_process()
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  done_path = os.path.join(eval_dir, "done.json")
  done = json.load(open(done_path)) if os.path.exists(done_path) else {}
  setting = eval_setting(config, metric)
  if main:  # catches up after a stop between the two writes
    _update_best(eval_dir, done, metric, setting)

  def is_done(step):
    record = done.get(str(step), {})
    return metric.key in record and record.get("setting") == setting

  if only >= 0 and is_done(only):
    logging.info("eval: step %d already evaluated (%s); nothing to do", only, done_path)
    return {only: _metrics_only(done[str(only)])}
  writer = writers.make_writer(eval_dir, resume_step=max(map(int, done), default=0))
  console.say(f"eval {metric.key} of {workdir}: " + (
      f"checkpoint {only}" if only >= 0 else
      f"every new checkpoint until step {config.train.num_steps} (poll "
      f"{config.eval.poll_seconds:g} s, timeout {config.eval.timeout_seconds:g} s)")
      + f", {config.eval.num_samples} samples, {config.eval.sampler_steps} sampler steps")
  evaluated = 0
  evaluator = None  # built at the first checkpoint, whose metadata gives the data shape
  last_new = time.time()
  skipped = set()  # steps whose export is corrupt or half-deleted

  def next_step() -> int:
    if only >= 0:
      return _STOP if is_done(only) else only
    todo = [s for s in sorted(checkpoint.saved_steps(workdir))
            if not is_done(s) and s not in skipped]
    if todo:
      return todo[0]
    finished = is_done(config.train.num_steps)
    timed_out = time.time() - last_new > config.eval.timeout_seconds
    return _STOP if finished or timed_out else _WAIT

  while True:
    step = agreed(next_step())
    if step == _STOP:
      writer.flush()
      best = best_of(done, metric, setting)
      console.say(f"eval done: {evaluated} checkpoint(s) evaluated, results in {done_path}"
                  + (f"; best {metric.key}={best['value']:.5g} at step {best['step']}"
                     if best else ""))
      if only >= 0:
        return {only: _metrics_only(done[str(only)])}
      return {int(k): _metrics_only(v) for k, v in done.items() if v.get("setting") == setting}
    if step == _WAIT:
      time.sleep(config.eval.poll_seconds)
      continue
    try:
      if evaluator is None:
        evaluator = make_evaluator(config, workdir)
      start = time.time()
      metrics = evaluate_checkpoint(config, workdir, step, evaluator)
    except errors.CorruptCheckpointError as e:
      if only >= 0:
        raise
      # Half-deleted under us by the trainer's keep-last-N, or damaged: never scored.
      logging.warning("eval: skipped step %d: %s", step, e)
      skipped.add(step)
      continue
    except Exception:  # pylint: disable=broad-except
      if only >= 0 or step in checkpoint.saved_steps(workdir):
        raise
      # The trainer's keep-last-N deleted it while we read it: nothing to evaluate.
      logging.warning("eval: checkpoint %d of %s was deleted while being read; skipped",
                      step, workdir)
      continue
    writer.write_scalars(step, metrics)
    previous = done.get(str(step))
    if main and previous is not None and previous.get("setting") != setting:
      with open(os.path.join(eval_dir, "replaced.jsonl"), "a") as f:  # kept, not lost
        f.write(json.dumps(dict(previous, step=step)) + "\n")
    done[str(step)] = dict(metrics, setting=setting)
    if main:
      _write_json(done_path, done)
      _update_best(eval_dir, done, metric, setting)
    evaluated += 1
    shown = ", ".join(f"{k.split('/', 1)[-1]}={float(v):.5g}" for k, v in metrics.items())
    console.say(f"eval step {step} ({time.time() - start:.1f} s): {shown}")
    last_new = time.time()

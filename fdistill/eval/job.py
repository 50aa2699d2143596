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
"""
import dataclasses
import json
import math
import os
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging

from fdistill import experiment
from fdistill.diffusion import gmm as gmm_lib
from fdistill.eval import fid as fid_lib
from fdistill.io import checkpoint
from fdistill.io import writers
from fdistill.registry import lookup

# Images per call of the Inception detector (times the device count when the batch is
# sharded): a fixed compiled shape whatever eval.batch_size is, and ~0.7 GB of activations
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
  """The papers' Inception from ``eval.inception_path``, batches of FEATURE_BATCH x devices.

  Tests replace this function (a module attribute, looked up at call time) with a
  cheap stand-in; :mod:`fdistill.eval.ref_stats` uses it too.
  """
  from fdistill.eval import inception  # pylint: disable=g-import-not-at-top
  params = inception.load_params(check_inception(config))
  head = params["output"]["kernel"] if inception.has_head(params) else None
  extract = fid_lib.feature_fn(params, mesh)
  chunk = FEATURE_BATCH * (mesh.size if mesh is not None else 1)

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

  return Detector(chunked, inception.FEATURE_DIM, head)


def feature_mesh(sampling):
  """The sampler's mesh for sharding the detector's batch, single-process only (feature_fn)."""
  return sampling.mesh if jax.process_count() == 1 else None


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


def feature_stats(batches, detector: Detector, keep_logits: bool = False):
  """(FeatureStats, logits or None) of float [-1, 1] image batches, streamed."""
  stats = fid_lib.FeatureStats(detector.dim)
  logits = []
  for x in batches:
    feats = np.asarray(detector.extract(detector_images(x)), np.float64)
    stats.update(feats)
    if keep_logits and detector.head is not None:
      logits.append((feats @ np.asarray(detector.head, np.float64)).astype(np.float32))
  return stats, (np.concatenate(logits) if logits else None)


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
  check_inception(config)
  check_fid_ref(config)


def _prepare_fid(config, sampling):
  from fdistill.eval import inception  # pylint: disable=g-import-not-at-top
  reference = fid_lib.load_reference(check_fid_ref(config))
  detector = inception_detector(config, feature_mesh(sampling))

  def compute(params, rng):
    batches = sample_batches(sampling, params, rng, config.eval.num_samples,
                             config.eval.batch_size)
    stats, logits = feature_stats(batches, detector, keep_logits=True)
    out = {"eval/fid": fid_lib.fid_from_stats(stats, reference)}
    if logits is not None:
      mean, std = inception.inception_score(logits, num_splits=min(10, len(logits)))
      out.update({"eval/inception_score": mean, "eval/inception_score_std": std})
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


def best_of(done, metric: Metric) -> Optional[dict]:
  """The best recorded step for ``metric`` (finite values only; the earliest on ties)."""
  scored = [(float(rec[metric.key]), int(step)) for step, rec in done.items()
            if rec.get(metric.key) is not None and math.isfinite(float(rec[metric.key]))]
  if not scored:
    return None
  sign = 1.0 if metric.lower_is_better else -1.0
  value, step = min(scored, key=lambda vs: (sign * vs[0], vs[1]))
  return {"metric": metric.key, "step": step, "value": value,
          "lower_is_better": metric.lower_is_better}


def _update_best(eval_dir, done, metric):
  best = best_of(done, metric)
  path = os.path.join(eval_dir, "best.json")
  if best is not None:
    current = None
    if os.path.exists(path):
      with open(path) as f:
        current = json.load(f)
    if current != best:
      _write_json(path, best)
  return best


def run(config, workdir):
  """Polls ``workdir`` and evaluates every new checkpoint; returns {step: metrics}.

  With ``eval.step >= 0``: evaluates that checkpoint only and returns {step: metrics}.
  """
  metric = metric_of(config)  # fail fast on a bad name, a missing file or field
  if metric.check is not None:
    metric.check(config)
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  done_path = os.path.join(eval_dir, "done.json")
  done = json.load(open(done_path)) if os.path.exists(done_path) else {}
  _update_best(eval_dir, done, metric)  # catches up after a stop between the two writes

  def is_done(step):
    return metric.key in done.get(str(step), {})

  only = int(config.eval.step)
  if only >= 0:
    if is_done(only):
      logging.info("eval: step %d already evaluated (%s); nothing to do", only, done_path)
      return {only: done[str(only)]}
    saved = sorted(checkpoint.saved_steps(workdir))
    if only not in saved:
      raise ValueError(f"eval.step={only}: {workdir} has no checkpoint {only} "
                       f"(saved: {saved or 'none'})")
  writer = writers.make_writer(eval_dir, resume_step=max(map(int, done), default=0))
  evaluator = None  # built at the first checkpoint, whose metadata gives the data shape
  last_new = time.time()
  while True:
    if only >= 0:
      todo = [only]
    else:
      todo = [s for s in sorted(checkpoint.saved_steps(workdir)) if not is_done(s)]
    for step in todo:
      try:
        if evaluator is None:
          evaluator = make_evaluator(config, workdir)
        start = time.time()
        metrics = evaluate_checkpoint(config, workdir, step, evaluator)
      except Exception:  # pylint: disable=broad-except
        if only >= 0 or step in checkpoint.saved_steps(workdir):
          raise
        # The trainer's keep-last-N deleted it while we read it: nothing to evaluate.
        logging.warning("eval: checkpoint %d of %s was deleted while being read; skipped",
                        step, workdir)
        continue
      writer.write_scalars(step, metrics)
      done[str(step)] = dict(done.get(str(step), {}), **metrics)
      _write_json(done_path, done)
      best = _update_best(eval_dir, done, metric)
      logging.info("eval step %d (%.1f s): %s; best: %s", step, time.time() - start, metrics,
                   best)
      last_new = time.time()
    if only >= 0:
      writer.flush()
      return {only: done[str(only)]}
    finished = is_done(config.train.num_steps)
    timed_out = time.time() - last_new > config.eval.timeout_seconds
    if finished or timed_out:
      writer.flush()
      return {int(k): v for k, v in done.items()}
    time.sleep(config.eval.poll_seconds)

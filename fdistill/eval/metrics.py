"""The eval metrics: a registry, each metric's checks and its preparation for one run.

Metrics (``eval.metric``; "" picks by ``data.name``):

* ``toy`` (toy2d): exact mode statistics against the data GMM.
* ``fid`` (cifar10, imagenet64): ``eval.num_samples`` samples, quantised to
  uint8 as PNGs would be, through the papers' Inception
  (``eval.inception_path``), Frechet distance to ``eval.fid_ref`` (EDM's
  fid-refs npz or ``python -m fdistill.eval.ref_stats``); the Inception Score
  too when the weights carry the 1008-way head.
* ``digits_fd`` (digits, mnist5k): the same Frechet distance in a small
  digits classifier's features, a CPU proxy (:mod:`fdistill.eval.digits_fd`).

A metric is prepared once per job (``prepare(config, sampling) -> compute``: the
detector and reference statistics load), then ``compute(params, rng)`` scores one
checkpoint's exported params: ``{"eval/<name>": value}``.
"""
import dataclasses
import os
import zipfile
from typing import Callable, Optional

from fdistill import experiment
from fdistill import sampling as sampling_lib
from fdistill.diffusion import gmm as gmm_lib
from fdistill.eval import fid as fid_lib
from fdistill.eval import statistics
from fdistill.registry import lookup
from fdistill.errors import ConfigError


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
    samples = sampling_lib.sample_in_batches(sampling, params, rng, config.eval.num_samples,
                                             config.eval.batch_size)
    return {"eval/" + k: v for k, v in tm.mode_statistics(gmm, samples).items()}
  return compute


def check_fid_ref(config) -> str:
  path = os.path.expanduser(config.eval.fid_ref)
  fix = (f"make it with `python -m fdistill.eval.ref_stats --config=<this config> "
         f"--out=PATH` (or use EDM's fid-refs npz) and pass --config.eval.fid_ref=PATH")
  if not path:
    raise ConfigError(f"eval.fid_ref is not set (eval.metric='fid' compares against reference "
                      f"statistics); {fix}")
  if not os.path.isfile(path):
    raise ConfigError(f"eval.fid_ref={config.eval.fid_ref!r} does not exist; {fix}")
  return path


def _check_fid(config):
  """Both files exist and read (the reference's arrays and their finiteness; the Inception file
  is a .npz archive) before the job writes or samples anything; the reference's width is
  checked against the detector's when it loads (``_prepare_fid``)."""
  weights = statistics.check_inception(config)
  fid_lib.load_reference(check_fid_ref(config))
  if not zipfile.is_zipfile(weights):
    raise ConfigError(f"eval.inception_path={weights!r} is not a converted .npz (make it with "
                      "python -m fdistill.eval.convert_inception)")


def _prepare_fid(config, sampling):
  reference = fid_lib.load_reference(check_fid_ref(config))
  detector = statistics.inception_detector(config, sampling.mesh)
  if reference[0].size != detector.dim:  # before any sampling
    raise ConfigError(f"eval.fid_ref={config.eval.fid_ref!r} holds {reference[0].size}-d "
                      f"statistics; the detector's features are {detector.dim}-d")

  def compute(params, rng):
    batches = sampling_lib.sample_batches(sampling, params, rng, config.eval.num_samples,
                                          config.eval.batch_size)
    stats, score = statistics.feature_stats(batches, detector,
                                            score_total=config.eval.num_samples)
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
  detector = statistics.Detector(lambda u8: digits_fd.features(classifier, u8),
                                 digits_fd.FEATURE_DIM)

  from fdistill.io import plotting  # pylint: disable=g-import-not-at-top

  def compute(params, rng):
    stats = fid_lib.FeatureStats(detector.dim)
    for x in sampling_lib.sample_batches(sampling, params, rng, config.eval.num_samples,
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


def make_evaluator(config, workdir, sampling=None, mesh=None, settings=None) -> Evaluator:
  """``mesh`` / ``settings``: the run's (``experiment.validate``'s plan); None: made here."""
  if sampling is None:
    sampling = experiment.build_sampler(config, experiment.task_of_run(workdir), mesh, settings)
  metric = metric_of(config)
  return Evaluator(sampling, metric, metric.prepare(config, sampling))

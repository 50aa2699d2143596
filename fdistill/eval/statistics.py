"""Feature statistics of image batches: the detector, FID's float64 sums and the Inception Score.

A :class:`Detector` maps uint8 images to features; :func:`feature_stats` streams
float [-1, 1] batches through it into :class:`fdistill.eval.fid.FeatureStats` and,
when the detector carries the Inception classifier head, the Inception Score's
per-split sums. The eval job's metrics, ``ref_stats`` and ``fid_cli`` all use this
one path, so the samples and the reference images are treated alike.

Several hosts (``jax.distributed``): each process extracts the features of its
slice of every batch (:func:`process_rows`) on its devices, and the float64 sums
(and the Inception Score sums) are merged over processes, so every process
returns the same statistics.
"""
import dataclasses
from typing import Callable, Optional, Tuple

import jax
import numpy as np

from fdistill.eval import fid as fid_lib
from fdistill.eval import inception
from fdistill.errors import ConfigError

# Images per call of the Inception detector and device (times this process's device count when
# the batch is sharded): a fixed compiled shape whatever eval.batch_size is, and ~0.7 GB of activations
# per 256 images at 299x299.
FEATURE_BATCH = 256


# ---------------------------------------------------------------------------
# The detector.

@dataclasses.dataclass(frozen=True)
class Detector:
  """A feature extractor: uint8 NHWC RGB images -> float features [N, dim].

  ``head``: the Inception classifier kernel [dim, 1008] when the weights have it
  (logits = features @ head, no bias, as StyleGAN3's Inception Score), else None.
  """
  extract: Callable[[np.ndarray], np.ndarray]
  dim: int
  head: Optional[np.ndarray] = None


def detector_images(x) -> np.ndarray:
  """[-1, 1] float NHWC -> uint8 RGB: PNG quantisation (``plotting.to_uint8``), grey tiled to 3."""
  from fdistill.io import plotting  # pylint: disable=g-import-not-at-top
  images = plotting.to_uint8(x)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def check_inception(config) -> str:
  """The file ``eval.inception_path`` (else ``$FDISTILL_INCEPTION``) names; else a one-line error."""
  try:
    return inception.resolve_path(config.eval.inception_path or None)
  except ValueError as e:
    raise ConfigError(f"FID needs the Inception weights (eval.inception_path): "
                      f"{e}") from None


def inception_detector(config, mesh=None) -> Detector:
  """The papers' Inception from ``eval.inception_path`` (:func:`detector_of`).

  Tests replace this function (a module attribute, looked up at call time) with a
  cheap stand-in; :mod:`fdistill.eval.ref_stats` uses it too.
  """
  return detector_of(inception.load_params(check_inception(config)), mesh)


def detector_of(params, mesh=None, dim=None, batch=FEATURE_BATCH) -> Detector:
  """A Detector of Inception ``params``: calls of ``batch`` images per local device of ``mesh``.

  With a mesh the images passed are this process's slice (:func:`process_rows`).
  ``dim`` (default 2048) exists for tests that swap in a smaller stand-in network.
  """
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


# ---------------------------------------------------------------------------
# Streaming statistics over processes.

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
      new = score_parts(feats @ np.asarray(detector.head, np.float64), index, score_total, splits)
      parts = new if parts is None else tuple(a + b for a, b in zip(parts, new))
    start += len(x)
  score = None
  if scoring:
    score = score_from_parts(*fid_lib.sum_over_processes(*parts))
  return fid_lib.merge_processes(stats), score


# ---------------------------------------------------------------------------
# The Inception Score.

def _probs(logits_or_probs, from_logits: bool = True) -> np.ndarray:
  x = np.asarray(logits_or_probs, np.float64)
  if not from_logits:
    return x
  x = x - x.max(axis=1, keepdims=True)
  probs = np.exp(x)
  return probs / probs.sum(axis=1, keepdims=True)


def score_parts(logits_or_probs: np.ndarray, index: np.ndarray, total: int, num_splits: int = 10,
                from_logits: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Additive float64 sums of the Inception Score of samples at positions ``index`` of ``total``.

  Why sums: the score of a split is ``exp(mean_x sum_y p log p - sum_y pbar log pbar)``
  with ``pbar`` the split's mean probabilities, so per split the count, the sum of
  ``p`` and the sum of ``sum_y p log p`` are all it needs. They add over batches and
  over processes (:func:`fdistill.eval.fid.sum_over_processes`), so no host keeps
  every sample's 1008 logits. Sample ``j`` is in split ``i`` iff
  ``i * total // num_splits <= j < (i + 1) * total // num_splits``, StyleGAN3's split.
  Returns ``(count [S], prob_sum [S, C], plogp_sum [S])``; add parts with ``+``.
  """
  probs = _probs(logits_or_probs, from_logits)
  bounds = np.arange(num_splits + 1) * int(total) // num_splits
  split = np.searchsorted(bounds, np.asarray(index), side="right") - 1
  count = np.zeros(num_splits)
  prob_sum = np.zeros((num_splits, probs.shape[1]))
  plogp = np.zeros(num_splits)
  np.add.at(count, split, 1.0)
  np.add.at(prob_sum, split, probs)
  np.add.at(plogp, split, np.sum(probs * np.log(probs + 1e-300), axis=1))
  return count, prob_sum, plogp


def score_from_parts(count, prob_sum, plogp) -> Tuple[float, float]:
  """(mean, std) over the splits of exp(E_x KL(p(y|x) || p(y))) from :func:`score_parts`."""
  if np.any(np.asarray(count) < 1):
    raise ValueError(f"inception_score: every split needs a sample, counts {np.asarray(count)}")
  pbar = prob_sum / count[:, None]
  kl = plogp / count - np.sum(pbar * np.log(pbar + 1e-300), axis=1)
  scores = np.exp(kl)
  return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits_or_probs: np.ndarray, num_splits: int = 10,
                    from_logits: bool = True) -> Tuple[float, float]:
  """(mean, std) over ``num_splits`` of exp(E_x KL(p(y|x) || p(y))), as StyleGAN3 computes it."""
  n = np.shape(logits_or_probs)[0]
  return score_from_parts(*score_parts(logits_or_probs, np.arange(n), n, num_splits, from_logits))

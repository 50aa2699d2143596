"""Runs of the Uni-Instruct family: the digits config from the CLI (distill, then sample), a
generator started from another run's export (generator.init_workdir) and the divergence switch
in a run's records."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits_teacher
from fdistill import experiment, modes
from support import runs, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))
# The suite's persistent compilation cache (tests/conftest.py), shared with the CLI runs: the
# compiles (most of this test on its first run: ~1.5 min of CPU for the U-Net steps) are cache
# hits afterwards.
CACHE = os.environ.get("FDISTILL_TEST_JAX_CACHE", "/tmp/fdistill_test_jax_cache")


def records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_digits_sida_distills_and_samples_from_the_cli(tmp_path):
  """A 2-step 8x8 digits teacher (in-process), then ``--mode=distill`` of
  digits_uni_instruct.py:sida (SiDA: the logit is the fake U-Net's bottleneck channel mean) and
  ``--mode=sample`` as subprocesses: finite losses of both step kinds, a checkpoint, a PNG.
  The teacher's settings are tests/test_eval_job.py's, so its steps are compiled once."""
  teacher_dir, workdir = str(tmp_path / "teacher"), str(tmp_path / "sida")
  teacher = digits_teacher.get_config("resolution=8")
  teacher.model.update(TINY_UNET)
  teacher.train.update(dict(batch_size=8, num_steps=2, save_every=1, log_every=1,
                            sample_every=0))
  modes.run(teacher, teacher_dir, "train_teacher")
  args = [f"--config=configs/digits_uni_instruct.py:sida,teacher_dir={teacher_dir},resolution=8,"
          "steps=2", f"--workdir={workdir}", "--config.model.model_channels=8",
          "--config.model.channel_mult=(1,2)", "--config.model.attn_resolutions=(4,)",
          "--config.train.batch_size=8", "--config.train.save_every=2",
          "--config.train.log_every=2", "--config.train.sample_every=0",
          "--config.eval.num_plot_samples=16", f"--compile_cache={CACHE}"]
  # One device. XLA's backend optimisations stay on: with the cache warm the distill run takes
  # ~25 s with them and ~70 s without (the unoptimised U-Net steps run slowly on CPU).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  for mode in ("distill", "sample"):
    out = subprocess.run([sys.executable, "-m", "fdistill.main", *args, f"--mode={mode}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  logged = records(workdir)[-1]
  assert logged["step"] == 2 and logged["train/skipped"] == 0
  for name in ("train/generator/gen_loss", "train/generator/gan_gen",
               "train/critic/adv_disc_loss", "train/critic/dsm_loss"):
    assert np.isfinite(logged[name]), (name, logged)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  assert glob.glob(os.path.join(workdir, "*.png"))


@pytest.fixture(scope="module")
def sid_run(tmp_path_factory):
  """A 2-step toy SiD run (exact teacher), its config and workdir."""
  config = toy.tiny_uni_instruct_config("sid")
  config.train.update(dict(num_steps=2, save_every=2, log_every=2))
  workdir = str(tmp_path_factory.mktemp("sid"))
  modes.run(config, workdir, "distill")
  return config, workdir


def test_generator_init_workdir_loads_exactly_the_saved_generator(sid_run):
  """A SiDA run started from the SiD run: its fresh generator params and EMA are the SiD
  run's generator EMA, read here from the SiD checkpoint's full ``state`` item (not the
  ``export`` item the loader reads); the fake score still starts as in a fresh run."""
  sid_config, sid_dir = sid_run
  config = toy.tiny_uni_instruct_config("sida")
  config.generator.init_workdir = sid_dir
  exp = experiment.build(config)
  fresh = exp.init(jax.random.key(3), exp.teacher)
  fresh_gen, fresh_fake = jax.device_get((fresh["gen"]["params"], fresh["fake"]["params"]))
  started = experiment.start_generator_from_run(exp, fresh)
  saved = runs.restored_state(sid_dir, sid_config)[0]["gen"]["ema"]
  leaves = jax.tree_util.tree_leaves
  for name in ("params", "ema"):
    for got, want in zip(leaves(started["gen"][name]), leaves(saved)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(not np.array_equal(a, np.asarray(b))
             for a, b in zip(leaves(fresh_gen), leaves(saved)))
  for a, b in zip(leaves(fresh_fake), leaves(started["fake"]["params"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_switch_in_a_run_started_from_another_run(sid_run, tmp_path):
  """rkl_then_fkl from the SiD run's generator, switch at step 4: the records of steps 0 and
  2 hold reverse-KL generator steps (kind ``generator``), the one of step 4 the switched kind."""
  config = toy.tiny_uni_instruct_config("rkl_then_fkl")
  config.objective.switch_step = 4
  config.generator.init_workdir = sid_run[1]
  config.train.update(dict(num_steps=6, save_every=6, log_every=1))
  workdir = str(tmp_path / "run")
  modes.run(config, workdir, "distill")
  logged = records(workdir)
  steps_of = lambda kind: [m["step"] for m in logged if f"train/{kind}/gen_loss" in m]
  assert steps_of("generator") == [1, 3] and steps_of("generator_switched") == [5]
  assert all(np.isfinite(m[f"train/{k}/gen_loss"]) for m in logged
             for k in ("generator", "generator_switched") if f"train/{k}/gen_loss" in m)


def test_missing_init_workdir_is_one_clear_error_before_anything_is_written(tmp_path):
  config = toy.tiny_uni_instruct_config("sida")
  config.generator.init_workdir = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=r"generator.init_workdir='.*nope' is not a run's workdir"):
    modes.run(config, str(tmp_path / "new"), "distill")
  assert not os.path.exists(tmp_path / "new")

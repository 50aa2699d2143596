"""Configs, the CLI modes (main.py, modes.py), clear errors, bit-for-bit resume, and f-distill's
distill -> resume -> sample -> eval, also with the teacher workdir gone."""
import glob
import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fdistill import data, models, modes, train
from fdistill.main import unknown_override
from support import runs, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*_*.py"))
                      if not p.endswith(("__init__.py", "common.py", "architectures.py")))


tiny_toy_config = toy.tiny_teacher_config


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_builds_and_its_model_is_valid(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for section in ("data", "model", "teacher", "generator", "objective", "optim", "train", "eval", "mesh"):
    assert section in config, section
  module = models.build(config.model)  # raises on unknown model fields
  assert module is not None


def test_unknown_override_names_the_field_and_valid_ones():
  config = tiny_toy_config()
  msg = unknown_override(config, "--config.train.bach_size=3")
  assert "config.train.bach_size" in msg and "batch_size" in msg
  assert unknown_override(config, "--config.train.batch_size=3") is None
  assert "config.nosection" in unknown_override(config, "--config.nosection.x=1")


def test_cli_rejects_unknown_field_with_clear_message(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "fdistill.main", "--config=configs/toy2d_teacher.py",
       "--config.optim.learning_rate=1", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "unknown config field config.optim.learning_rate" in out.stderr + out.stdout
  assert "lr" in out.stderr + out.stdout


@pytest.mark.parametrize("registry_fn, field", [
    (lambda cfg: models.build(cfg.model), "model.name"),
    (lambda cfg: data.build(cfg.data), "data.name"),
])
def test_unknown_registry_names_list_valid_ones(registry_fn, field):
  config = tiny_toy_config()
  config.model.name = config.data.name = "nope"
  with pytest.raises(ValueError, match=f"Unknown {field}='nope'; valid values: .*"):
    registry_fn(config)


def test_mode_objective_mismatch_is_rejected():
  with pytest.raises(ValueError, match="--mode=distill needs a distillation objective"):
    modes.check_mode("distill", tiny_toy_config())


def _params(workdir, config):
  return runs.restored_state(workdir, config)[0]


def test_resume_is_bit_for_bit(tmp_path):
  """20 steps straight == 10 steps, a restart from the checkpoint, 10 more."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  modes.run(tiny_toy_config(20), straight, "train_teacher")
  modes.run(tiny_toy_config(10), resumed, "train_teacher")
  modes.run(tiny_toy_config(20), resumed, "train_teacher")
  a, b = _params(straight, tiny_toy_config()), _params(resumed, tiny_toy_config())
  assert int(a["step"]) == int(b["step"]) == 20
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The loss logged at step 20 is the same number in both runs.
  last = lambda d: [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if "train/loss" in l][-1]
  assert last(straight)["train/loss"] == last(resumed)["train/loss"]


def test_parameters_txt_lists_every_parameter_and_the_total(tmp_path, capsys):
  """<workdir>/parameters.txt (clu's table) names every parameter of a freshly initialised model
  with its shape, and its total, the start line's count, is the model's own count."""
  config = tiny_toy_config(0)
  fresh = models.init_params(models.build(config.model), jax.random.key(1), (1, 2))
  expected = {"net/" + "/".join(k.key for k in path): tuple(x.shape)
              for path, x in jax.tree_util.tree_leaves_with_path(fresh)}
  total = sum(x.size for x in jax.tree.leaves(fresh))
  modes.run(config, str(tmp_path), "train_teacher")
  text = open(tmp_path / "parameters.txt").read()
  rows = [[cell.strip() for cell in line.strip("|").split("|")]
          for line in text.splitlines() if line.startswith("| ")][1:]  # the header row left out
  assert {row[0]: row[1] for row in rows} == {k: str(v) for k, v in expected.items()}
  assert sum(int(row[3].replace(",", "")) for row in rows) == total
  assert f"Total: {total:,} -- {4 * total:,} bytes" in text
  assert f", {total:,} parameters" in capsys.readouterr().out


def test_toy_modes_smoke(tmp_path, monkeypatch):
  """train_teacher -> sample (scatter PNG) -> eval (exact toy metrics) on tiny settings; sample
  and eval run with the training loop unimportable (they draw through fdistill.sampling)."""
  workdir = str(tmp_path)
  config = tiny_toy_config(10)
  modes.run(config, workdir, "train_teacher")
  monkeypatch.delattr(train, "loop")
  monkeypatch.setitem(sys.modules, "fdistill.train.loop", None)  # importing it now raises
  png = modes.run(config, workdir, "sample")
  assert os.path.getsize(png) > 1000
  results = modes.run(config, workdir, "eval")
  assert set(results) == {10}
  assert {"eval/precision", "eval/modes_covered", "eval/weight_recall"} <= set(results[10])
  assert os.path.exists(os.path.join(workdir, "eval", "done.json"))
  # Resumable: a second eval run finds nothing new and returns the same record.
  assert modes.run(config, workdir, "eval") == results


def test_distill_resume_sample_eval(tmp_path):
  workdir = str(tmp_path / "run")
  config = toy.tiny_fdistill_config()
  config.train.update(num_steps=5, save_every=5, log_every=5)
  config.eval.update(num_samples=200, batch_size=100, num_plot_samples=100)
  modes.run(config, workdir, "distill")
  config.train.num_steps = 7  # resumes at step 5 (a critic step) and runs a generator step at 6
  modes.run(config, workdir, "distill")
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [m for m in logged if "train/generator/gen_loss" in m]
  assert [m["step"] for m in losses] == [5, 7]
  assert all(np.isfinite(v) for m in losses for v in m.values())
  assert losses[-1]["train/skipped"] == 0
  # Steps 5, 6 = critic, generator: the record at 7 holds exactly one step of each kind.
  assert losses[-1]["train/generator/steps"] == 1 and losses[-1]["train/critic/steps"] == 1
  assert os.path.exists(modes.run(config, workdir, "sample", num_samples=50))
  results = modes.run(config, workdir, "eval")
  assert set(results) == {5, 7}
  assert 0 <= results[7]["eval/modes_covered"] <= 8 and "eval/log_density" in results[7]
  # Each trained network's parameters are listed (not the EMA, not the optimiser state).
  names = [line.split("|")[1].strip() for line in open(os.path.join(workdir, "parameters.txt"))
           if line.startswith("| ")][1:]
  assert {name.split("/")[0] for name in names} == {"gen", "fake", "disc"}
  assert all("/params/" not in name and "ema" not in name for name in names)


def test_console_output_of_a_toy_run_is_short(tmp_path):
  """300 steps print a start line, progress lines, checkpoint lines and a summary: under 15
  lines of stdout+stderr together, no library chatter; --verbosity=0 shows library logs."""
  args = ["--config=configs/toy2d_teacher.py:gmm8", "--mode=train_teacher",
          "--config.train.num_steps=300", "--config.train.save_every=150",
          "--config.train.log_every=100"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-m", "fdistill.main", *args,
                        f"--workdir={tmp_path / 'quiet'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
  lines = (out.stdout + out.stderr).splitlines()
  assert out.returncode == 0 and len(lines) < 15, lines
  text = "\n".join(lines)
  assert "fdistill dsm: workdir" in text and "from scratch" in text
  assert "step 300/300" in text and "steps/s" in text and "loss=" in text
  assert "saved checkpoint 150" in text and "done: step 300" in text
  assert "tensorflow" not in text.lower() and "orbax" not in text.lower()
  loud = subprocess.run([sys.executable, "-m", "fdistill.main", *args, "--verbosity=0",
                         f"--workdir={tmp_path / 'loud'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)
  assert loud.returncode == 0 and len((loud.stdout + loud.stderr).splitlines()) > len(lines)


def test_loop_and_writers_do_not_import_tensorflow():
  code = ("import sys\nimport fdistill.train.loop, fdistill.eval.job\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\nprint('ok')")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_a_restarted_run_compiles_nothing_new(tmp_path):
  """The CLI's persistent compilation cache: the first run fills <workdir>/compile_cache; a
  restart (same programs, same shardings) adds no entry for the step, init or sampler
  programs, i.e. they are cache hits (only the restore's integrity check is new)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  workdir = tmp_path / "run"
  cache = workdir / "compile_cache"
  run = lambda steps: subprocess.run(
      [sys.executable, "-m", "fdistill.main", "--config=configs/toy2d_teacher.py:gmm8",
       "--mode=train_teacher", f"--config.train.num_steps={steps}",
       "--config.train.save_every=10", "--config.model.hidden=(32,)", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert run(10).returncode == 0
  first = set(os.listdir(cache))
  out = run(20)
  assert out.returncode == 0 and "resumed from step 10" in out.stdout, out.stdout + out.stderr
  new = set(os.listdir(cache)) - first
  assert all(name.startswith(("jit__all_finite", "jit__digests")) for name in new), new
  assert any(name.startswith("jit_step") for name in first), sorted(first)

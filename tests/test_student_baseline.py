"""A student's step 0 (its initialisation) is a checkpoint the eval job scores, and the metric
tells it apart from the trained student: the baseline every results row shows (issue #22)."""
from fdistill import modes
from fdistill.io import checkpoint
from tests.support.toy import tiny_fdistill_config

TRAIN_STEPS = 600


def student(steps):
  c = tiny_fdistill_config("js,teacher=analytic")
  c.train.update(dict(num_steps=steps, save_every=max(steps, 1), log_every=max(steps, 1),
                      sample_every=0))
  c.eval.update(dict(num_samples=400, batch_size=200, sampler_steps=1, timeout_seconds=0.0,
                     step=steps))
  return c


def test_step0_is_saved_and_scored_worse_than_the_trained_student(tmp_path):
  init_dir, trained_dir = str(tmp_path / "init"), str(tmp_path / "trained")
  modes.run(student(0), init_dir, "distill")
  assert checkpoint.saved_steps(init_dir) == [0]
  init = modes.run(student(0), init_dir, "eval")[0]
  modes.run(student(TRAIN_STEPS), trained_dir, "distill")
  trained = modes.run(student(TRAIN_STEPS), trained_dir, "eval")[TRAIN_STEPS]
  # The exact mean log-density of the samples under the data GMM: a generator at its random
  # initialisation puts its samples far from every mode; training must pull them in by many
  # nats (measured: -154 at step 0, -43 after 900 steps).
  assert trained["eval/log_density"] > init["eval/log_density"] + 40.0, (init, trained)
  assert trained["eval/weight_recall"] >= init["eval/weight_recall"], (init, trained)

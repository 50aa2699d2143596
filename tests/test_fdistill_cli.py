"""f-distill through the CLI modes (distill -> resume -> sample -> eval) on the exact toy teacher.

The training loop jits the objective's two branches (generator, critics) and
picks one per step on the host; this runs them on the 8 fake devices of
conftest.py with tiny networks.
"""
import json
import os

import jax
import numpy as np

from fdistill import modes
from fdistill import objectives
from fdistill.diffusion import gmm as gmm_lib
from test_fdistill_objective import GMM, analytic_objective, batch, tiny_config


def test_branches_equal_the_single_step_function():
  """``Objective.branches`` (host-side choice) and ``Objective.step`` (lax.cond) agree."""
  obj, init, step = analytic_objective()
  assert [obj.branch_of(i) for i in range(7)] == [0, 1, 1, 0, 1, 1, 0]
  state = init(jax.random.key(0))
  for i in range(2):  # a generator step, then a critic step
    key = jax.random.key(i)
    expected, metrics = step(state, GMM, batch(i), key)
    got, got_metrics = jax.jit(obj.branches[obj.branch_of(i)])(state, GMM, batch(i), key)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert metrics.keys() == got_metrics.keys()
    state = got


def test_distill_resume_sample_eval(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  config.train.update(num_steps=5, save_every=5, log_every=5)
  config.eval.update(num_samples=200, batch_size=100, num_plot_samples=100)
  modes.run(config, workdir, "distill")
  config.train.num_steps = 7  # resumes at step 5 (a critic step) and runs a generator step at 6
  modes.run(config, workdir, "distill")
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [m for m in logged if "train/gen_loss" in m]
  assert [m["step"] for m in losses] == [5, 7]
  assert all(np.isfinite(v) for m in losses for v in m.values())
  assert losses[-1]["train/skipped"] == 0
  assert os.path.exists(modes.run(config, workdir, "sample", num_samples=50))
  results = modes.run(config, workdir, "eval")
  assert set(results) == {5, 7}
  assert 0 <= results[7]["eval/modes_covered"] <= 8 and "eval/log_density" in results[7]

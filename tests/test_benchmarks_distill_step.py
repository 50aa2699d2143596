"""benchmarks/distill_step.py: its rows are complete and its FLOP counts are per step.

One row of the smallest image setting (--small DiT, batch 8, the f-distill
generator step) through ``main`` in its default mode, a fresh process per row
(the mode the GPU run uses). The forward-equivalents bound [1, 20] is the check
that step and forward FLOPs are counted on the same batch: the negative control
divides by the forward of ONE example instead, which must break it.

Duplicate work: the step's XLA FLOPs against the sum of its objective's
documented minimum passes, each priced by XLA on the same network and batch
(``benchmarks/minimum_passes.py``), must agree within 10% for the f-distill
generator step; one extra network forward must break that band. Every objective's
every step is measured on the toy MLP (one process, seconds).
"""
import functools
import json
import os

import pytest

from support import scripts

FIELDS = ("net", "params_M", "objective", "kind", "batch", "dtype", "status", "step_ms",
          "images_per_s", "peak_bytes", "peak_source", "xla_bytes", "gflops", "gflops_lowered",
          "forward_gflops", "forward_equivalents", "compile_s", "device")
BOUNDS = (1.0, 20.0)  # network forwards per generator step: 1 G forward + backward alone is 3
PASSES_BAND = 0.10    # |step FLOPs / minimum - 1|: the 10%


_script = functools.partial(scripts.benchmark, "distill_step")


def _within(value):
  return BOUNDS[0] <= value <= BOUNDS[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("distill_step") / "rows.json"
  cache = os.environ.get("FDISTILL_TEST_JAX_CACHE", "/tmp/fdistill_test_jax_cache")
  returned = _script().main(["--small", "--nets=dit", "--objectives=fdistill",
                             "--kinds=generator", "--batches=8", "--dtypes=float32",
                             "--steps=1", "--warmup=0", f"--cache_dir={cache}", f"--out={out}"])
  with open(out) as f:
    written = json.load(f)
  return returned, written


def test_rows_are_complete_and_written(result):
  returned, written = result
  assert written["rows"] == returned["rows"]
  (row,) = written["rows"]
  assert row["status"] == "ok", row["status"]
  missing = [f for f in FIELDS if f not in row]
  assert not missing, missing
  assert (row["net"], row["objective"], row["kind"], row["batch"]) == ("dit", "fdistill",
                                                                        "generator", 8)
  assert row["gflops"] > 0 and row["forward_gflops"] > 0 and row["gflops_lowered"] > 0
  assert row["step_ms"] > 0 and row["images_per_s"] == pytest.approx(8e3 / row["step_ms"])
  assert row["peak_bytes"] > 0


def test_forward_equivalents_bounded_and_the_bound_can_fail(result):
  (row,) = result[1]["rows"]
  assert row["forward_equivalents"] == pytest.approx(row["gflops"] / row["forward_gflops"])
  assert _within(row["forward_equivalents"]), row["forward_equivalents"]
  # Negative control: step FLOPs over one example's forward (the mix-up the bound guards
  # against) lands outside it, so a per-example / per-batch error cannot pass unseen.
  script = _script()
  config, x_shape, cond_dim = script.make_config(dict(
      net="dit", objective="fdistill", kind="generator", batch=8, dtype="float32", small=True,
      dit_size="B", attn_impl=""))
  teacher, _ = script.random_teacher(config, x_shape, cond_dim)
  one = script.forward_flops(teacher, 1, x_shape, cond_dim)
  assert one > 0
  assert not _within(row["gflops"] * 1e9 / one), row["gflops"] * 1e9 / one


def test_rcm_attention_rows_pair_the_fused_kernel_with_xla():
  """--plan=rcm_attn and --attn_impl lists: each rCM DiT row once with the fused JVP kernel
  and once with XLA attention, and the row's config really uses that attention (specs and
  configs only; a --small CPU run of such a pair took 120 s on 2 shared cores, docs/methods.md)."""
  script = _script()
  specs = script.row_specs(script.parse_args(["--plan=rcm_attn"]))
  cells = {}
  for s in specs:
    assert (s["net"], s["objective"]) == ("dit", "rcm") and s["kind"] in ("scm_warmup",
                                                                           "generator")
    cells.setdefault((s["kind"], s["batch"], s["dtype"]), []).append(s["attn_impl"])
    assert script.make_config(s)[0].model.attn_impl == s["attn_impl"]
  assert cells and all(sorted(v) == ["flash_jvp", "xla"] for v in cells.values()), cells
  small = script.row_specs(script.parse_args(["--plan=rcm_attn", "--small"]))
  assert len(small) == len(specs) and max(s["batch"] for s in small) <= 8
  listed = script.row_specs(script.parse_args(
      ["--nets=dit", "--objectives=rcm", "--kinds=scm_warmup", "--batches=2",
       "--dtypes=float32", "--attn_impl=flash_jvp,xla"]))
  assert [s["attn_impl"] for s in listed] == ["flash_jvp", "xla"]
  default = script.row_specs(script.parse_args(
      ["--nets=dit", "--objectives=rcm", "--kinds=scm_warmup", "--batches=2",
       "--dtypes=float32"]))
  assert [script.make_config(s)[0].model.attn_impl for s in default] == ["auto"]
  assert "| flash_jvp |" in script.markdown_row(script.failed_row(listed[0], "not run"))


def test_fdistill_generator_step_does_no_work_beyond_its_minimum(result):
  """Measured (XLA's count of the compiled step) vs the documented minimum: within 10%,
  and a duplicated network forward (e.g. teacher features computed twice) would leave it."""
  (row,) = result[1]["rows"]
  assert row["minimum_passes"] == {"train": 1, "forward": 2, "disc_input_grad": 1}
  assert set(row["pass_gflops"]) == set(row["minimum_passes"])
  assert all(v > 0 for v in row["pass_gflops"].values()), row["pass_gflops"]
  assert abs(row["passes_ratio"] - 1) <= PASSES_BAND, row["passes_ratio"]
  minimum = row["gflops"] / row["passes_ratio"]
  assert (row["gflops"] + row["forward_gflops"]) / minimum > 1 + PASSES_BAND


def test_every_objective_and_step_has_a_measured_minimum(tmp_path):
  """--nets=mlp, one process: every objective's every kind of step runs, and its FLOPs sit
  within 10% of its minimum (the 2-D toy's networks; the image rows: benchmarks/README.md).
  Batch 64: the minimum counts network passes, not the optimiser's elementwise update of the
  0.2M params, which at batch 16 is ~15% of the step's FLOPs and at 64 ~4%."""
  script = _script()
  out = tmp_path / "rows.json"
  rows = script.main(["--small", "--nets=mlp", "--batches=64", "--dtypes=float32",
                      "--steps=1", "--warmup=0", "--isolate=0", f"--out={out}"])["rows"]
  seen = {(r["objective"], r["kind"]) for r in rows}
  expected = {(o, k) for o in script.ALL_OBJECTIVES for k in script._kinds_of(o)}
  assert seen == expected and {"fdistill", "sid", "expanded", "rcm"} <= {o for o, _ in seen}
  for r in rows:
    assert r["status"] == "ok", (r["objective"], r["kind"], r["status"])
    assert abs(r["passes_ratio"] - 1) <= PASSES_BAND, (r["objective"], r["kind"],
                                                       r["passes_ratio"])
  with open(out) as f:
    assert json.load(f)["rows"] == rows

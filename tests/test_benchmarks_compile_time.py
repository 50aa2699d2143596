"""benchmarks/compile_time.py in its quick mode (the toy f-distill generator step): a complete
row per compile, and a restart in a new process takes the executable from the persistent cache
(checked by the cache directory: a hit writes no new entry), where the first compile stored it."""
import os

from support import scripts


def _script():
  return scripts.benchmark("compile_time")


def test_quick_rows_and_the_restart_hits_the_cache(tmp_path):
  rows = _script().main(["--quick", "--restart", "--kinds=generator",
                         f"--out={tmp_path / 'rows.json'}"])
  assert [r["flags"] for r in rows] == ["default (fresh)", "default (restart)"], rows
  fresh, restart = rows
  for row in rows:
    assert "status" not in row, row
    assert row["program"] == "fdistill:generator"
    assert row["compile_s"] > 0 and row["compile_cpu"] > 0 and row["peak_GB"] > 0
  assert fresh["hit"] is False and restart["hit"] is True
  assert fresh["cache_dir"] == restart["cache_dir"] and os.listdir(fresh["cache_dir"])
  assert (tmp_path / "rows.json").exists()


def test_compile_phases_take_the_largest_module():
  log = ("I1204 cpu_compiler.cc:1269] Running HLO passes on [jit_small] for CPU time: 2 ms (x)\n"
         "I1204 cpu_compiler.cc:2094] Compiling [jit_small] for CPU using JIT time: 54.2 ms (x)\n"
         "I1204 cpu_compiler.cc:1269] Running HLO passes on [jit_step] for CPU time: 162 ms (x)\n"
         "I1204 cpu_compiler.cc:2094] Compiling [jit_step] for CPU using JIT time: 5.18 s (x)\n")
  assert _script().compile_phases(log) == {"hlo_s": 0.16, "llvm_s": 5.18}
  assert _script().compile_phases("no timers here") == {}

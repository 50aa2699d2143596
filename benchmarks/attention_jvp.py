"""Speed, memory and accuracy of the fused flash-attention JVP (docs/design.md section 5).

On a GPU this prints, for B=1, H=16, bf16, D in {128, 64} and
S in {1024, 4096, 16384, 32768}, one table with

  fwd      the fastest differentiable forward (cuDNN on GPU)
  jvp      the fused Pallas kernel alone: O, dO and LSE in one pass
  routed   jax.jvp of attention(impl="flash_jvp"): fwd + kernel, what models run
  xla      jax.jvp of plain XLA attention (or OOM)
  ratios   jvp/fwd (target <= 3.6 at S >= 4096; the FLOP floor is 3) and xla/jvp
           (target >= 3.5 at S = 16384)
  TFLOP/s  forward FLOPs 4 B H S^2 D; the JVPs count 3x that
  memory   temp + output bytes of each compiled program (XLA's memory analysis)

then the relative L2 error of O and dO against a float64 NumPy reference
(targets: < 5e-3 for bf16, < 1e-5 for fp32), and the time of one rCM tangent
pass (jax.jvp of the denoiser at stop_gradient(params) w.r.t. (x, sigma)) of a
bf16 DiT-B/2 at 256 and 1024 tokens with attn_impl "xla" and "flash_jvp".

  python benchmarks/attention_jvp.py                 # everything (GPU)
  python benchmarks/attention_jvp.py --tune          # search tile sizes / warps / stages
  python benchmarks/attention_jvp.py --smoke         # tiny CPU run that checks the script
"""
import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import time

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from fdistill.ops import attention as attention_lib
from fdistill.ops import flash_jvp

_MIB = 2**20


def _parse_ints(text):
  return [int(x) for x in text.split(",") if x]


def _time(fn, args, iters):
  """Median over 3 rounds of ``iters`` back-to-back calls (dispatch is async), in seconds."""
  jax.block_until_ready(fn(*args))
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / iters)
  return statistics.median(rounds)


def _memory_bytes(compiled):
  """Temp + output bytes of a compiled program, or None where the backend does not say."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return stats.temp_size_in_bytes + stats.output_size_in_bytes


def _device_limit():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def _measure(fn, args, iters):
  """(seconds, bytes) for a jitted ``fn``, or (None, "OOM ...") when it does not fit."""
  try:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = _memory_bytes(compiled)
    limit = _device_limit()
    if mem is not None and limit is not None and mem > limit:
      return None, f"OOM ({mem / 2**30:.0f} GiB)"
    return _time(compiled, args, iters), mem
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return None, "OOM"
    raise


def _inputs(key, batch, seq, heads, dim, dtype):
  keys = jax.random.split(key, 6)
  return [jax.random.normal(k, (batch, seq, heads, dim), dtype) for k in keys]


def _fwd_flops(batch, seq, heads, dim):
  return 4 * batch * heads * seq * seq * dim


def _fmt_ms(t):
  return "-" if t is None else f"{t * 1e3:.3f}"


def _fmt_mem(m):
  if isinstance(m, str):
    return m
  return "-" if m is None else f"{m / _MIB:.0f}"


def _fmt_tflops(flops, t):
  return "-" if t is None else f"{flops / t / 1e12:.1f}"


def _ratio(a, b):
  return "-" if a is None or b is None else f"{a / b:.2f}"


def speed_table(dims, seqs, heads, dtype, config, iters):
  print(f"\n## Speed and memory (B=1, H={heads}, {jnp.dtype(dtype).name}; times in ms, memory "
        f"in MiB)\n")
  print("| D | S | fwd | jvp | routed | xla jvp | jvp/fwd | xla/jvp | fwd TFLOP/s | jvp TFLOP/s "
        "| xla TFLOP/s | jvp MiB | xla MiB |")
  print("|" + "---|" * 13)
  for dim, seq in itertools.product(dims, seqs):
    q, k, v, dq, dk, dv = _inputs(jax.random.PRNGKey(seq + dim), 1, seq, heads, dim, dtype)
    fast = attention_lib._fast_forward(dtype)  # pylint: disable=protected-access
    fused = lambda *a: flash_jvp.flash_attention_jvp(*a, config=config)
    routed = lambda q, k, v, dq, dk, dv: jax.jvp(
        lambda q, k, v: attention_lib.attention(q, k, v, impl="flash_jvp"), (q, k, v),
        (dq, dk, dv))
    xla = lambda q, k, v, dq, dk, dv: jax.jvp(attention_lib.xla_attention, (q, k, v),
                                              (dq, dk, dv))
    t_fwd, _ = _measure(fast, (q, k, v), iters)
    t_jvp, m_jvp = _measure(fused, (q, k, v, dq, dk, dv), iters)
    t_routed, _ = _measure(routed, (q, k, v, dq, dk, dv), iters)
    t_xla, m_xla = _measure(xla, (q, k, v, dq, dk, dv), iters)
    flops = _fwd_flops(1, seq, heads, dim)
    print(f"| {dim} | {seq} | {_fmt_ms(t_fwd)} | {_fmt_ms(t_jvp)} | {_fmt_ms(t_routed)} | "
          f"{_fmt_ms(t_xla) if t_xla else m_xla} | {_ratio(t_jvp, t_fwd)} | "
          f"{_ratio(t_xla, t_jvp)} | {_fmt_tflops(flops, t_fwd)} | "
          f"{_fmt_tflops(3 * flops, t_jvp)} | {_fmt_tflops(3 * flops, t_xla)} | "
          f"{_fmt_mem(m_jvp)} | {_fmt_mem(m_xla)} |", flush=True)


def _reference(q, k, v, dq, dk, dv, scale):
  """O and dO in float64 on the host (the closed form, as in tests/test_ops_attention.py)."""
  q, k, v, dq, dk, dv = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                         for x in (q, k, v, dq, dk, dv))
  s = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
  ds = scale * (np.einsum("bqhd,bkhd->bhqk", dq, k) + np.einsum("bqhd,bkhd->bhqk", q, dk))
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = p * (ds - (p * ds).sum(-1, keepdims=True))
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  return out, np.einsum("bhqk,bkhd->bqhd", dp, v) + np.einsum("bhqk,bkhd->bqhd", p, dv)


def _rel_l2(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def accuracy_table(cases, dim, config):
  print(f"\n## Relative L2 error against float64 (D={dim})\n")
  print("| dtype | S | H | O | dO |")
  print("|---|---|---|---|---|")
  for dtype, seq, heads in cases:
    args = _inputs(jax.random.PRNGKey(7), 1, seq, heads, dim, dtype)
    res = jax.jit(lambda *a: flash_jvp.flash_attention_jvp(*a, config=config))(*args)
    out, tangent = _reference(*args, dim**-0.5)
    print(f"| {jnp.dtype(dtype).name} | {seq} | {heads} | {_rel_l2(res.out, out):.2e} | "
          f"{_rel_l2(res.tangent, tangent):.2e} |", flush=True)


def tune(dims, seq, heads, dtype, iters, top=8):
  """Times the fused kernel over tile sizes, warps and stages; prints the fastest."""
  for dim in dims:
    args = _inputs(jax.random.PRNGKey(dim), 1, seq, heads, dim, dtype)
    results = []
    for bq, bk, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (4, 8),
                                                   (1, 2, 3, 4)):
      config = flash_jvp.KernelConfig(bq, bk, warps, stages)
      try:
        t, _ = _measure(lambda *a: flash_jvp.flash_attention_jvp(*a, config=config), args, iters)
      except Exception as e:  # pylint: disable=broad-except  (shared-memory overflows etc.)
        print(f"  {config}: failed ({type(e).__name__})", file=sys.stderr)
        continue
      results.append((t, config))
    results.sort(key=lambda r: r[0])
    print(f"\n## Fastest kernel configs, D={dim}, S={seq}, H={heads}\n")
    flops = 3 * _fwd_flops(1, seq, heads, dim)
    for t, config in results[:top]:
      print(f"- {dataclasses.astuple(config)} (block_q, block_k, warps, stages): "
            f"{t * 1e3:.3f} ms, {flops / t / 1e12:.1f} TFLOP/s")


def dit_tangent_pass(resolutions, batch, iters):
  """One rCM tangent pass of a bf16 DiT-B/2: jvp of D(sg(params), x, sigma) w.r.t. (x, sigma)."""
  from configs import architectures  # pylint: disable=g-import-not-at-top
  from fdistill import models  # pylint: disable=g-import-not-at-top

  print(f"\n## rCM tangent pass, DiT-B/2 bf16, batch {batch} (ms)\n")
  print("| tokens | xla | flash_jvp | xla/flash_jvp |")
  print("|---|---|---|---|")
  for res in resolutions:
    times = {}
    for impl in ("xla", "flash_jvp"):
      config = architectures.dit("B", img_resolution=res, in_channels=4, label_dim=0)
      config.update(dict(dtype="bfloat16", attn_impl=impl))
      module = models.build(config)
      x_shape = (batch, res, res, 4)
      params = jax.jit(lambda key: models.init_params(module, key, x_shape))(
          jax.random.PRNGKey(0))
      denoise = models.make_denoiser(module)
      x, tx = (jax.random.normal(jax.random.PRNGKey(i), x_shape) for i in (1, 2))
      sigma, ts = jnp.full((batch,), 0.8), jnp.full((batch,), 0.3)

      def tangent_pass(params, x, sigma, tx, ts):
        frozen = jax.lax.stop_gradient(params)
        return jax.jvp(lambda x, s: denoise(frozen, x, s), (x, sigma), (tx, ts))

      times[impl], _ = _measure(tangent_pass, (params, x, sigma, tx, ts), iters)
    print(f"| {(res // 2)**2} | {_fmt_ms(times['xla'])} | {_fmt_ms(times['flash_jvp'])} | "
          f"{_ratio(times['xla'], times['flash_jvp'])} |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dims", default="128,64")
  parser.add_argument("--seqs", default="1024,4096,16384,32768")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--config", default="", help="block_q,block_k,warps,stages for the kernel")
  parser.add_argument("--tune", action="store_true", help="search kernel configs at --tune-seq")
  parser.add_argument("--tune-seq", type=int, default=4096)
  parser.add_argument("--skip", default="", help="comma list of: speed,accuracy,dit")
  parser.add_argument("--dit-batch", type=int, default=32)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes on CPU (interpret mode) to check this script runs")
  args = parser.parse_args(argv)
  dims, seqs = _parse_ints(args.dims), _parse_ints(args.seqs)
  config = flash_jvp.KernelConfig(*_parse_ints(args.config)) if args.config else None
  skip = set(args.skip.split(","))
  dtype = jnp.bfloat16
  accuracy_cases = [(jnp.bfloat16, 1024, 16), (jnp.float32, 1024, 16), (jnp.bfloat16, 4096, 2),
                    (jnp.float32, 4096, 2)]
  dit_resolutions, dit_batch = (32, 64), args.dit_batch
  if args.smoke:
    dims, seqs, args.heads, args.iters = [64], [64, 96], 2, 1
    accuracy_cases = [(jnp.bfloat16, 64, 2), (jnp.float32, 64, 2)]
    dit_resolutions, dit_batch = (8,), 2
    config = config or flash_jvp.KernelConfig(32, 32)
  elif jax.default_backend() != "gpu":
    sys.exit(f"This benchmark needs a GPU (found {jax.default_backend()!r}); use --smoke on CPU.")

  print(f"# attention JVP benchmark: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}")
  if args.tune:
    tune(dims, args.tune_seq, args.heads, dtype, args.iters)
    return
  if "speed" not in skip:
    speed_table(dims, seqs, args.heads, dtype, config, args.iters)
  if "accuracy" not in skip:
    accuracy_table(accuracy_cases, dims[0], config)
  if "dit" not in skip:
    dit_tangent_pass(dit_resolutions, dit_batch, args.iters)


if __name__ == "__main__":
  main()

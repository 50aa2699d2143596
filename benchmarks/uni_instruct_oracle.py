"""The Uni-Instruct oracle table: Monte-Carlo surrogate gradients against exact gradients.

  python benchmarks/uni_instruct_oracle.py             # the test's rows (~30 s on 2 CPU cores)
  python benchmarks/uni_instruct_oracle.py --c_sweep   # + SIM pseudo-Huber at c = 0.05 and 5 (docs)
  python benchmarks/uni_instruct_oracle.py --n=262144       # quicker, noisier

Setting (``fdistill.diffusion.gaussian_oracle``): teacher N(0.3, 1) in 1-D, generator
``G(z) = a z + b``, exact fake score and exact log-ratio closures, three points
(a, b, s). For each case of ``gaussian_oracle.CASES`` the generator loss of
``fdistill.objectives.uni_instruct_loss.generator_loss_fn`` (scale 'exact') is
differentiated per sample over ``--n`` draws (float64); the table gives the mean, its
standard error, the independent truth (trapezoid quadrature + central finite
differences, numpy float64) and z = (estimate - truth)/s.e. The same rows, with the same
seed and n, are what tests/test_objectives_uni_instruct.py checks.
"""
import argparse
import time

from fdistill.diffusion import gaussian_oracle as go
from fdistill.objectives import uni_instruct_loss as ul

N, CHUNK, SEED = 2**20, 2**17, 0  # the test's values


def sweep_cases():
  """SIM's form against the exact surrogate for a small and a large pseudo-Huber c."""
  out = []
  for c in (0.05, 5.0):
    out.append(go.Case(f"SIM pseudo-Huber c={c:g}",
                       dict(objective="sim", sim_distance="pseudo_huber", sim_c=c),
                       ("sim", "pseudo_huber", c)))
    out.append(go.Case(f"exact pseudo-Huber c={c:g}",
                       dict(objective="score_divergence", sim_distance="pseudo_huber", sim_c=c),
                       ("k", "pseudo_huber", c)))
  return tuple(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=N)
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument("--c_sweep", action="store_true")
  args = parser.parse_args()
  cases = go.CASES + (sweep_cases() if args.c_sweep else ())
  closures = go.closures()
  losses = {c.label: ul.generator_loss_fn(*closures, **c.loss) for c in cases}
  t0 = time.time()
  results = go.monte_carlo_gradients(losses, n=args.n, chunk=min(CHUNK, args.n), seed=args.seed)
  print(go.format_rows(go.rows(results, cases)))
  print(f"\n{len(cases)} cases x {len(go.POINTS)} points, n = {args.n}, seed = {args.seed}: "
        f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()

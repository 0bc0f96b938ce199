"""One BLAS thread against OpenBLAS's pool for the small float64 systems of the adaptive plan.

`jaxprune.placement.serial_blas` runs host LAPACK work on matrices of fewer than
`SERIAL_BLAS_BELOW` rows on one thread. This measures why, on this machine, in one run:

* the Cholesky inverse (dpotrf + dpotri, as `obs_sweep.ridge_inverse`) of a ridge
  system per size, with BLAS threaded (its default) and on one thread, interleaved
  round by round (medians, and the minima);
* the same with `--busy` other processes spinning (a machine shared with other work);
* the plan's blocked sweep of one MLP (`output_approx.refit_aware_stream`, 513-channel
  blocks of a 4096-channel module over 1024 tokens) with the limit on and off, quiet and busy.

    python benchmarks/blas_threads.py            # -> results/blas_threads.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402

SIZES = (257, 513, 1025, 1537, 2049, 4097)


@contextlib.contextmanager
def busy(n: int):
  """`n` processes that spin on a core each."""
  procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
  try:
    time.sleep(0.5 if n else 0)
    yield
  finally:
    for p in procs:
      p.kill()
      p.wait()


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def median(xs) -> float:
  xs = sorted(xs)
  return 0.5 * (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2])


def inverse_rows(repeats: int) -> list[dict]:
  import numpy as np
  import scipy.linalg
  from threadpoolctl import threadpool_limits

  rng = np.random.default_rng(0)
  rows = []
  for d in SIZES:
    a = rng.standard_normal((2 * d, d))
    g = a.T @ a + np.eye(d)

    def inv():
      c, _ = scipy.linalg.lapack.dpotrf(g, lower=1, clean=1)
      scipy.linalg.lapack.dpotri(c, lower=1)

    n = max(5, min(10 * repeats, int(2e10 / d**3)))
    inv()
    threaded, one = [], []
    for _ in range(n):  # interleaved: a change of load hits both
      threaded.append(timed(inv))
      with threadpool_limits(1, user_api="blas"):
        one.append(timed(inv))
    rows.append({"rows": d, "calls": n, "threaded_median_ms": 1e3 * median(threaded),
                 "one_thread_median_ms": 1e3 * median(one), "threaded_min_ms": 1e3 * min(threaded),
                 "one_thread_min_ms": 1e3 * min(one), "threaded_over_one_thread": median(threaded) / median(one)})
  return rows


def sweep_row(repeats: int) -> dict:
  import jax.numpy as jnp
  import numpy as np

  from jaxprune import placement
  from jaxprune.criteria import output_approx
  from jaxprune.criteria.stats import ModuleStats
  from jaxprune.models import adapter as A

  rng = np.random.default_rng(1)
  U, D = 4096, 1024
  x2 = jnp.asarray(rng.standard_normal((1, 8, 128, U)).astype(np.float32))
  w2a = rng.standard_normal((U + 1, D)).astype(np.float32) / np.sqrt(U)
  p = {"gate": {"kernel": jnp.zeros((D, U))}, "up": {"kernel": jnp.zeros((D, U))},
       "down": {"kernel": jnp.asarray(w2a[:U])}}
  stats = ModuleStats(damping=1e-5, intercept=True, n_remove=U * 3 // 4)

  def run():
    output_approx.refit_aware_stream(A.MLP, p, stats, x2, w2a, 0.25)

  limit = placement.SERIAL_BLAS_BELOW
  run()
  times = {"serial": [], "threaded": []}
  try:
    for _ in range(repeats):  # interleaved
      for name, n in (("serial", limit), ("threaded", 0)):
        placement.SERIAL_BLAS_BELOW = n
        times[name].append(timed(run))
  finally:
    placement.SERIAL_BLAS_BELOW = limit
  out = {f"{k}_median_seconds": median(v) for k, v in times.items()}
  out["threaded_over_serial"] = out["threaded_median_seconds"] / out["serial_median_seconds"]
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=5, help="plan sweeps per setting (and a tenth of the small inverses)")
  p.add_argument("--busy", type=int, default=os.cpu_count(), help="spinning processes in the busy rows")
  p.add_argument("--out", default=os.path.join(HERE, "results", "blas_threads.json"))
  args = p.parse_args(argv)
  from jaxprune import placement

  result = {"benchmark": "blas_threads", "cpu": cpu_name(), "cores": os.cpu_count(),
            "serial_blas_below": placement.SERIAL_BLAS_BELOW, "busy_processes": args.busy}
  for name, n in (("quiet", 0), ("busy", args.busy)):
    with busy(n):
      result[name] = {"inverse": inverse_rows(args.repeats), "plan_sweep_4096": sweep_row(args.repeats)}
    print(name, json.dumps(result[name]), flush=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

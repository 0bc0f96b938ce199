"""The `goa-obs` sweep at SmolLM2's MLP width, with and without cutting removed units out.

A Gram matrix of 1536 random channels (plus the ones column) over 16384 tokens, with a
576-wide cross moment, is scored by `refit_aware` as the adaptive plan scores it (the
sweep stops at min_keep 0.25: 1152 channels removed, 96 steps of 12), warm, median of
--repeats calls, cut and uncut interleaved: as the engine runs it (removed units cut out
from COMPACT_MIN channels on) and uncut. The removal orders of both are compared. The module's forward over
the same tokens is timed beside it (SmolLM2's gated MLP: gate and up 576 -> 1536, down).

    python benchmarks/obs_sweep.py                       # -> results/obs_sweep.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402


def median_seconds(f, repeats: int = 5) -> float:
  f()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(HERE, "results", "obs_sweep.json"))
  ap.add_argument("--repeats", type=int, default=9)
  args = ap.parse_args()
  from jaxprune.criteria import output_approx as O
  from jaxprune.criteria.stats import ModuleStats
  from jaxprune.io.atomic import write_json
  from jaxprune.models import adapter as A
  from jaxprune.stats import moments

  F, D, T = 1536, 576, 16384
  rng = np.random.default_rng(0)
  x = rng.standard_normal((T, F)).astype(np.float32) * np.linspace(0.1, 2, F).astype(np.float32)
  m = moments.update(moments.init(F, D), jnp.asarray(x), jnp.asarray(rng.standard_normal((T, D)).astype(np.float32)))
  p = {"down": {"kernel": jnp.zeros((F, D))}, "up": {"kernel": jnp.zeros((D, F))}, "gate": {"kernel": jnp.zeros((D, F))}}
  stats = ModuleStats(hidden=m, damping=1e-5, intercept=True, n_remove=F - F // 4)
  out, orders = {"cut": [], "uncut": []}, {}
  saved = O.COMPACT_MIN
  settings = (("cut", saved), ("uncut", 10 ** 9))
  try:
    for name, compact_min in settings:  # warm-up: compiles, and the orders to compare
      O.COMPACT_MIN = compact_min
      orders[name] = np.argsort(O.refit_aware(A.MLP, p, stats), kind="stable")[:stats.n_remove]
    for _ in range(args.repeats):  # interleaved, so that the machine's load hits both alike
      for name, compact_min in settings:
        O.COMPACT_MIN = compact_min
        t = time.perf_counter()
        O.refit_aware(A.MLP, p, stats)
        out[name].append(time.perf_counter() - t)
  finally:
    O.COMPACT_MIN = saved
  out = {k: float(np.median(v)) for k, v in out.items()}

  w = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02) for k, s in
       (("gate", (D, F)), ("up", (D, F)), ("down", (F, D)))}
  h = jnp.asarray(rng.standard_normal((16, 128, D)).astype(np.float32))

  @jax.jit
  def mlp_chunk(h):
    return (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]

  forward = median_seconds(lambda: [mlp_chunk(h).block_until_ready() for _ in range(T // (16 * 128))])
  row = {"benchmark": "obs_sweep", "machine": cpu_name(), "channels": F, "tokens": T, "removed": stats.n_remove,
         "sweep_seconds_cut": out["cut"], "sweep_seconds_uncut": out["uncut"],
         "same_removal_order": bool(np.array_equal(orders["cut"], orders["uncut"])),
         "module_forward_seconds": forward, "compact_min": O.COMPACT_MIN, "compact_at": O.COMPACT_AT}
  write_json(args.out, row, force=True)
  print(f"sweep {out['cut']:.3f} s cut, {out['uncut']:.3f} s uncut (same order: {row['same_removal_order']}); "
        f"module forward {forward:.3f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

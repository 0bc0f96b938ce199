"""The `goa-obs` sweep as the engine runs it (G^-1 factored) against the textbook sweep.

A Gram matrix of F random channels (plus the ones column) over 16384 tokens, with a
D-wide cross moment, is swept from its inverse as the layer loop sweeps it
(`obs_sweep.removal_order`: G^-1 kept as its first inverse less U U^T, a step reading
only the rows it removes) and by the textbook sweep, which rewrites G^-1 and W at every
step (the engine's form before issue 33). Both stop where the adaptive plan lets a module
stop (min_keep 0.25: three quarters of the units removed) and where the layer loop stops
at 20% (a quarter removed); warm, median of --repeats calls, interleaved. The removal
orders are compared. Rows: SmolLM2's MLP (1536 -> 576) and the 0.83B synthetic model's
(4096 -> 1024). The module's forward over the same tokens is timed beside each.

    python benchmarks/obs_sweep.py                       # -> results/obs_sweep.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402

SHAPES = ((1536, 576), (4096, 1024))  # (channels, outputs)
TOKENS = 16384


def median_seconds(f, repeats: int) -> float:
  f()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


@functools.partial(jax.jit, static_argnames=("per_step", "steps"))
def textbook(ginv, w, per_step: int, steps: int):
  """Width-1 units, the ones column last: each step removes the per_step cheapest live
  units and rewrites G^-1 and W by their joint update. Returns the removal order."""
  n = ginv.shape[0] - 1

  def step(t, state):
    ginv, w, alive, order = state
    c = jnp.where(alive, jnp.sum(jnp.square(w[:n]), -1) / jnp.diagonal(ginv)[:n], jnp.inf)
    _, s = jax.lax.top_k(-c, per_step)
    rows = ginv[s]
    m = jnp.linalg.inv(rows[:, s])
    return (ginv - rows.T @ (m @ rows), w - rows.T @ (m @ w[s]), alive.at[s].set(False),
            order.at[s].set(t * per_step + jnp.arange(per_step, dtype=jnp.int32)))

  state = (ginv, ginv @ w, jnp.ones((n,), bool), jnp.full((n,), n, jnp.int32))
  return jax.lax.fori_loop(0, steps, step, state)[3]


def row(F: int, D: int, repeats: int, rng) -> dict:
  from jaxprune.criteria import obs_sweep as O
  from jaxprune.placement import float64_solves
  from jaxprune.stats import moments

  x = rng.standard_normal((TOKENS, F)).astype(np.float32) * np.linspace(0.1, 2, F).astype(np.float32)
  m = moments.update(moments.init(F, D), jnp.asarray(x), jnp.asarray(rng.standard_normal((TOKENS, D)).astype(np.float32)))
  per_step = O.step_size(F)
  out = {"channels": F, "outputs": D, "tokens": TOKENS, "per_step": per_step}
  with float64_solves():
    ginv = O.ridge_inverse(m.xx, 1e-5, True)
    xy = jnp.asarray(m.xy, jnp.float64)
    for name, removed in (("plan", F - F // 4), ("loop_20pct", F // 4)):
      steps = -(-removed // per_step)
      removed = steps * per_step  # whole steps, as the textbook form takes them
      fact = lambda: O.removal_order(ginv, xy, 1, True, per_step, removed)[0]
      book = lambda: np.asarray(textbook(ginv, xy, per_step, steps))
      step_of = lambda order: np.where(order < removed, order // per_step, -1)  # -1: kept
      same = bool(np.array_equal(step_of(np.asarray(fact())), step_of(book())))
      times = {"factored": [], "textbook": []}
      fact(), book()
      for _ in range(repeats):  # interleaved, so that the machine's load hits both alike
        for k, f in (("factored", fact), ("textbook", book)):
          t = time.perf_counter()
          f()
          times[k].append(time.perf_counter() - t)
      med = {k: float(np.median(v)) for k, v in times.items()}
      out[name] = {"removed": removed, "factored_seconds": med["factored"], "textbook_seconds": med["textbook"],
                   "textbook_over_factored": med["textbook"] / med["factored"], "same_steps": same}
    out["inverse_seconds"] = median_seconds(lambda: jax.block_until_ready(O.ridge_inverse(m.xx, 1e-5, True)),
                                            repeats)

  w = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02) for k, s in
       (("gate", (D, F)), ("up", (D, F)), ("down", (F, D)))}
  h = jnp.asarray(rng.standard_normal((16, 128, D)).astype(np.float32))

  @jax.jit
  def mlp_chunk(h):
    return (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]

  out["module_forward_seconds"] = median_seconds(
      lambda: [mlp_chunk(h).block_until_ready() for _ in range(TOKENS // (16 * 128))], repeats)
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(HERE, "results", "obs_sweep.json"))
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  from jaxprune.io.atomic import write_json

  rng = np.random.default_rng(0)
  rows = []
  for F, D in SHAPES:
    rows.append(row(F, D, args.repeats, rng))
    r = rows[-1]
    print(f"F={F}: plan sweep {r['plan']['factored_seconds']:.3f} s factored / {r['plan']['textbook_seconds']:.3f} s "
          f"textbook; loop {r['loop_20pct']['factored_seconds']:.3f} / {r['loop_20pct']['textbook_seconds']:.3f} s; "
          f"inverse {r['inverse_seconds']:.3f} s; module forward {r['module_forward_seconds']:.3f} s", flush=True)
  write_json(args.out, {"benchmark": "obs_sweep", "machine": cpu_name(), "rows": rows}, force=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

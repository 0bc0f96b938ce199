"""The row-split ridge solve (`jaxprune.sharded_solve`): what one device holds, and how accurate it is.

Memory: XLA's buffer assignment of the compiled solve kernel for one device of a (data, model)
mesh of 8 forced host CPU devices, on abstract shapes (nothing is allocated, so widths up to a
70B model's MLP fit): arguments (its float32 row block of G and block of C) and temporaries,
against one whole Gram matrix in the solve's dtype.

Accuracy: G [d, d] with eigenvalues log-spaced from 1 to 1e-8 (seed 0, rounded to float32 as the
statistics are), C [d, e] standard normal (seed 1), jaxprune's default ridge (1e-5 times the mean
of diag G); each mesh's float64 and float32-with-refinement solves against SciPy's float64
Cholesky: the forward error max|W - W_scipy| / max|W_scipy| and the componentwise backward error
max |A W - C| / (|A||W| + |C|), both evaluated in float64.

    python benchmarks/sharded_solve.py        # -> results/sharded_solve.json
"""

from __future__ import annotations

import argparse
import os
import sys

# Eight forced devices each calling a threaded OpenBLAS (LAPACK's trsm) oversubscribe the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from jaxprune import sharded_solve, sharding  # noqa: E402
from jaxprune.prune import PruneConfig  # noqa: E402
from jaxprune.reconstruct import ridge_lam  # noqa: E402
from machine import cpu_name  # noqa: E402
from quality import git_state  # noqa: E402

WIDTHS = ((1536, 576), (8192, 2048), (28672, 8192))  # (d, e): SmolLM2's MLP, LLaMA-3-8B's hidden, 70B's MLP
MESHES = ((1, 8), (2, 4), (4, 2), (1, 1))


def memory(d: int, e: int, shape, dtype) -> dict:
  mesh = sharding.make_mesh(*shape)
  with jax.enable_x64(dtype == "float64"):
    g = jax.ShapeDtypeStruct((d, d), jnp.float32, sharding=NamedSharding(mesh, sharded_solve.row_spec(mesh)))
    c = jax.ShapeDtypeStruct((d, e), jnp.float32, sharding=NamedSharding(mesh, sharded_solve.row_spec(mesh, e)))
    steps = 0 if dtype == "float64" else sharded_solve.REFINE_STEPS
    mem = sharded_solve._solve.lower(g, c, jax.ShapeDtypeStruct((), jnp.dtype(dtype)), mesh=mesh,
                                     dtype=jnp.dtype(dtype), steps=steps).compile().memory_analysis()
  whole = d * d * jnp.dtype(dtype).itemsize
  return {"d": d, "e": e, "mesh": list(shape), "dtype": dtype, "argument_bytes": mem.argument_size_in_bytes,
          "temp_bytes": mem.temp_size_in_bytes, "output_bytes": mem.output_size_in_bytes, "whole_gram_bytes": whole,
          "held_over_whole_gram": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / whole}


def accuracy(d: int, e: int) -> list[dict]:
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  g = (q * np.logspace(0, -8, d)) @ q.T
  g = ((g + g.T) / 2).astype(np.float32)
  c = np.random.default_rng(1).standard_normal((d, e)).astype(np.float32)
  lam = float(ridge_lam(np.diagonal(g), PruneConfig().damping))
  a = g.astype(np.float64) + lam * np.eye(d)
  c64 = c.astype(np.float64)
  ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True), c64)
  cond = float(np.linalg.cond(a))
  rows = []
  for shape in MESHES:
    mesh = sharding.make_mesh(*shape)
    for dtype in ("float64", "float32"):
      sol = sharded_solve.solve(g, c, lam, mesh, dtype=jnp.dtype(dtype))
      w = np.asarray(sol.w, np.float64)
      omega = np.max(np.abs(a @ w - c64) / (np.abs(a) @ np.abs(w) + np.abs(c64)))
      rows.append({"mesh": list(shape), "dtype": dtype, "d": d, "e": e, "cond_G": 1e8, "cond_A": cond,
                   "forward_error": float(np.max(np.abs(w - ref)) / np.max(np.abs(ref))),
                   "backward_error": float(omega), "refinements": sol.refinements})
  return rows


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--accuracy-width", type=int, default=1024)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "sharded_solve.json"))
  args = ap.parse_args()
  mem = [memory(d, e, (1, 8), dtype) for d, e in WIDTHS for dtype in ("float64", "float32")]
  for row in mem:
    print(row)
  acc = accuracy(args.accuracy_width, 32)
  for row in acc:
    print(row)
  result = {"machine": cpu_name(), "jax": jax.__version__, "memory": mem, "accuracy": acc,
            **git_state(exclude=(args.out,))}
  from jaxprune.io.atomic import write_json

  write_json(args.out, result, force=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Float32 GEMM rate per core on SmolLM2's shapes: XLA (jax), PyTorch and NumPy's BLAS.

The evidence behind `eval_speed.py`'s float32 gap: a SmolLM2 forward is almost
all matmuls, so the engine whose GEMM is slower per core cannot win in float32.
Each row is the best of `--repeats` timed calls after a warm-up, interleaved
round by round so that background load hits all libraries alike; the process is
pinned to one core and every library gets one thread. Also recorded: the XLA
CPU flags tried (`--xla-flags` runs the XLA rows again in a child process with
each flag set) and whether jaxlib was built with oneDNN.

    python benchmarks/gemm_speed.py                  # -> results/gemm_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402

# (name, [M, K] x [K, N]): a batch of 8 windows of 128 tokens through SmolLM2's projections.
SHAPES = [("qkv", 1024, 576, 960), ("o_proj", 1024, 576, 576), ("gate/up", 1024, 576, 1536),
          ("down", 1024, 1536, 576), ("lm_head", 1024, 576, 49152)]
FLAGS = ["--xla_cpu_use_thunk_runtime=false", "--xla_cpu_use_xnnpack=true", "--xla_cpu_use_onednn=true",
         "--xla_cpu_prefer_vector_width=512", "--xla_cpu_enable_fast_math=true"]


def xla_rows(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  out = {}
  rng = np.random.default_rng(0)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  for name, M, K, N in SHAPES:
    a = jnp.asarray(rng.standard_normal((M, K), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      dot(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t)
    out[name] = 2 * M * K * N / best / 1e9
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--out", default=os.path.join(HERE, "results", "gemm_speed.json"))
  p.add_argument("--xla-only", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.xla_only:
    print(json.dumps(xla_rows(args.repeats)))
    return 0
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  import numpy as np
  import torch

  torch.set_num_threads(1)
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  rows = []
  for name, M, K, N in SHAPES:
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    fns = {"xla": lambda: dot(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb),
           "numpy": lambda: a @ b}
    best = {k: float("inf") for k in fns}
    for f in fns.values():
      f()
    for _ in range(args.repeats):
      for k, f in fns.items():
        t = time.perf_counter()
        f()
        best[k] = min(best[k], time.perf_counter() - t)
    flops = 2 * M * K * N
    rows.append({"shape": f"{name} [{M},{K}]x[{K},{N}]",
                 **{f"{k}_gflops": flops / v / 1e9 for k, v in best.items()},
                 "xla_over_torch": best["torch"] / best["xla"]})
    print(rows[-1], file=sys.stderr)
  flags = {}
  for flag in FLAGS:
    env = dict(os.environ, XLA_FLAGS=flag)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--xla-only", "--repeats", str(args.repeats)],
                       env=env, capture_output=True, text=True)
    flags[flag] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip().splitlines()[-1:]}
    print(flag, flags[flag], file=sys.stderr)
  out = {"benchmark": "gemm_speed", "cpu": cpu_name(), "jax": jax.__version__, "torch": torch.__version__,
         "torch_blas": torch.__config__.show().split("\n")[:12], "threads": 1, "repeats": args.repeats,
         "load_average": list(os.getloadavg()), "rows": rows,
         "xla_with_flags_gflops": flags}
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(out, f, indent=1)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""SmolLM2 pruned on a 2 x 4 (data, model) mesh against a 1 x 1 mesh: the same units, the same perplexity.

Two `jaxprune prune smollm2-135m --sparsity 0.2` runs (default recipe, 128 x 128 WikiText-2 valid
calibration tokens, seed 0) in child processes with 8 forced host CPU devices, one with
`--mesh data=1,model=1` and one with `--mesh data=2,model=4`; each evaluates its pruned model on
the first N windows of WikiText-2 test. Writes which modules kept different units (none
expected) and the relative perplexity difference (the bar: 1e-3).

    python benchmarks/mesh_equality.py               # -> results/mesh_equality.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402
from quality import git_state  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")
MESHES = ("data=1,model=1", "data=2,model=4")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib-samples", type=int, default=128)
  ap.add_argument("--eval-windows", type=int, default=64)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "mesh_equality.json"))
  args = ap.parse_args()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  runs = {}
  with tempfile.TemporaryDirectory() as work:
    for mesh in MESHES:
      out = os.path.join(work, mesh.replace(",", "_").replace("=", ""))
      cmd = [sys.executable, "-m", "jaxprune", "prune", "smollm2-135m", "--sparsity", "0.2",
             "--calib", os.path.join(DATA, "valid.txt"), "--calib-samples", str(args.calib_samples),
             "--eval-text", os.path.join(DATA, "test.txt"), "--eval-windows", str(args.eval_windows),
             "--mesh", mesh, "--out", out, "--no-progress"]
      proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
      if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
      with open(os.path.join(out, "report.json")) as f:
        runs[mesh] = json.load(f)
  a, b = (runs[m] for m in MESHES)
  differ = [f"{x['layer']}.{x['module']}" for x, y in zip(a["modules"], b["modules"], strict=True)
            if x["kept"] != y["kept"]]
  pa, pb = a["perplexity"]["pruned"]["perplexity"], b["perplexity"]["pruned"]["perplexity"]
  result = {
      "machine": cpu_name(),
      "recipe": a["preset"], "sparsity": 0.2, "calib_samples": args.calib_samples, "eval_windows": args.eval_windows,
      "runs": {m: {"devices": r["devices"], "perplexity_pruned": r["perplexity"]["pruned"]["perplexity"],
                   "perplexity_dense": r["perplexity"]["dense"]["perplexity"], "params_after": r["params"]["after"],
                   "seconds": r["seconds"]["total"]} for m, r in runs.items()},
      "modules_with_different_units": differ,
      "perplexity_relative_difference": abs(pa - pb) / pa,
      **git_state(exclude=(args.out,)),
  }
  from jaxprune.io.atomic import write_json

  write_json(args.out, result, force=True)
  print(json.dumps({k: result[k] for k in ("modules_with_different_units", "perplexity_relative_difference")}))
  return 0 if not differ and result["perplexity_relative_difference"] <= 1e-3 else 1


if __name__ == "__main__":
  sys.exit(main())

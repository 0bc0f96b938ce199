"""Compiles and wall time of pruning tiny Gemma 3 with module kernels jitted on the module's view
of the block config (`layers.part_config`) against the whole block config (the code before).

    nice -n 5 python benchmarks/part_config_compiles.py   # writes benchmarks/results/part_config_compiles.json

Protocol: tests/tiny.py's random `gemma3` (2 blocks: a sliding-window layer with a local RoPE
base, then a full-attention one) and `llama_gqa` (one layer type) for reference, saved once;
16 random-token windows of 16 tokens (numpy seed 0); `PruneConfig.preset("recommended",
sparsity=0.4, batch_size=8)`. Each run is a fresh process (cold jit caches, no persistent
compile cache) timing `prune` alone; "whole" replaces `layers.part_config` by the identity,
which is the code before views. Runs alternate whole/views, `REPEATS` pairs per model, so
background load hits both alike; ratios are of medians, taken in this one run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from machine import cpu_name  # noqa: E402
from quality import git_state, write_text  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "part_config_compiles.json")
MODELS = ("gemma3", "llama_gqa")
REPEATS = 3

_RUN = """
import json, sys, time
import numpy as np
import jaxprune
from jaxprune.models import layers as L
from jaxprune.prune import PruneConfig, prune
if sys.argv[2] == "whole":
  L.part_config = lambda cfg, part: cfg
m = jaxprune.load(sys.argv[1])
calib = np.random.default_rng(0).integers(0, 128, size=(16, 16)).astype(np.int32)
t0 = time.perf_counter()
r = prune(m, calib, PruneConfig.preset("recommended", sparsity=0.4, batch_size=8))
print(json.dumps({"seconds": time.perf_counter() - t0, "compiles": r.report["passes"]["compiles"],
                  "compile_seconds": r.report["seconds"]["phases"]["compile"],
                  "kept": [mod["kept"] for mod in r.report["modules"]]}))
"""


def _run(path: str, mode: str) -> dict:
  p = subprocess.run([sys.executable, "-c", _RUN, path, mode], cwd=ROOT, capture_output=True, text=True, check=True)
  return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
  from tests import tiny

  result = {"benchmark": "part_config_compiles", "protocol": __doc__.split("\n\n", 2)[2].strip(),
            "cpu": cpu_name(), "load_before": os.getloadavg(), "rows": []}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in MODELS:
      path = tiny.save(kind, os.path.join(tmp, kind))
      runs = {"whole": [], "views": []}
      for _ in range(REPEATS):
        for mode in runs:
          runs[mode].append(_run(path, mode))
      kept = {json.dumps(r["kept"]) for rs in runs.values() for r in rs}
      row = {"model": kind, "same_kept_units": len(kept) == 1}
      for mode, rs in runs.items():
        row[mode] = {"seconds": [r["seconds"] for r in rs], "compiles": [r["compiles"] for r in rs],
                     "compile_seconds": [r["compile_seconds"] for r in rs]}
      med = {mode: statistics.median(row[mode]["seconds"]) for mode in runs}
      row["wall_ratio_views_over_whole"] = med["views"] / med["whole"]
      row["compile_seconds_ratio"] = (statistics.median(row["views"]["compile_seconds"]) /
                                      statistics.median(row["whole"]["compile_seconds"]))
      print(kind, {m: row[m]["compiles"] for m in runs}, "wall ratio %.3f" % row["wall_ratio_views_over_whole"],
            flush=True)
      result["rows"].append(row)
  result["load_after"] = os.getloadavg()
  result.update(git_state(ROOT, exclude=(OUT,)))
  write_text(OUT, json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""SmolLM2 pruned by two processes on a 2 x 4 (data, model) mesh against one device: the same
units, and a perplexity within the spread that permuting the calibration windows gives.

`tpu_scripts/prune_distributed.py smollm2-135m --sparsity 0.2` (the default recipe, which the
script runs on the text alone; 128 x 128 WikiText-2 valid calibration tokens, seed 0) as two
processes of 4 forced host CPU devices each, joined by jax.distributed (gloo), with
`--mesh-data 2 --mesh-model 4`: the `model` axis within each process, `data` across them. The
same configuration then runs in this process on a one-device mesh, once on the windows as drawn
and once per permutation of them (the same sums in other orders). Each pruned model is
evaluated on the first N windows of WikiText-2 test and of Tiny Shakespeare.

Writes which modules kept different units (none expected), every perplexity, and whether the
two-process run lies within the permutations' spread: |ppl(two processes) - ppl(one device)|
against the largest |ppl(permuted) - ppl(one device)| itself, and against the bound the test
suite derives from K such spreads (tests/numerics.py's point 2 for reorderings: 2 M(1, K) times
the largest spread, plus a floor of a few roundings; M falls as K grows).

    python benchmarks/two_process_equality.py          # -> results/two_process_equality.json
    python benchmarks/two_process_equality.py --solves split   # statistics split to the solves
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402
from quality import git_state  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
TEXTS = {"wikitext2": os.path.join(SHARED, "wikitext-2", "test.txt"),
         "shakespeare": os.path.join(SHARED, "tinyshakespeare", "input.txt")}
SCRIPT = os.path.join(ROOT, "tpu_scripts", "prune_distributed.py")


def _script():
  spec = importlib.util.spec_from_file_location("prune_distributed", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def two_processes(argv: list[str], out: str) -> float:
  """Runs the script as two processes of 4 CPU devices; returns its wall seconds."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": ROOT}
  port, t0 = _port(), time.perf_counter()
  # Each log goes to a file: a pipe read only after the other process's would fill and stop its
  # writer, and with it, at the next collective, both processes.
  files = [tempfile.TemporaryFile("w+") for _ in range(2)]
  procs = [subprocess.Popen([sys.executable, SCRIPT, *argv, "--out", out, "--mesh-data", "2", "--mesh-model", "4",
                             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                            env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
           for i, f in enumerate(files)]
  logs = []
  for p, f in zip(procs, files):
    p.wait()
    f.seek(0)
    logs.append(f.read())
    f.close()
  for i, (p, log) in enumerate(zip(procs, logs)):
    if p.returncode != 0:
      raise SystemExit(f"process {i} of the two-process run failed:\n{log[-4000:]}")
  return time.perf_counter() - t0


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib-samples", type=int, default=128)
  ap.add_argument("--eval-windows", type=int, default=64)
  ap.add_argument("--permutations", type=int, default=6)
  ap.add_argument("--solves", default="joined", choices=("joined", "split"),
                  help="the two-process run's statistics: joined for the solves, or kept split over `model`")
  ap.add_argument("--out", default=None, help="default: results/two_process_equality[_split].json")
  args = ap.parse_args()
  args.out = args.out or os.path.join(HERE, "results", "two_process_equality%s.json" % (
      "_split" if args.solves == "split" else ""))

  import numpy as np

  import jaxprune
  from jaxprune import sharding
  from jaxprune.data.windows import text_windows
  from jaxprune.eval.perplexity import perplexity
  from jaxprune.io.atomic import write_json
  from jaxprune.prune import prune

  argv = ["smollm2-135m", "--calib", os.path.join(SHARED, "wikitext-2", "valid.txt"), "--sparsity", "0.2",
          "--calib-samples", str(args.calib_samples)]
  with tempfile.TemporaryDirectory() as work:
    out = os.path.join(work, "two_processes")
    wall = two_processes([*argv, "--solves", args.solves], out)
    with open(os.path.join(out, "report.json")) as f:
      report = json.load(f)
    runs = {"two_processes": jaxprune.load(out)}

    mod = _script()
    parsed = mod.parse_args([*argv, "--out", os.path.join(work, "unused")])
    model = jaxprune.load("smollm2-135m")
    tokenizer = jaxprune.load_tokenizer("smollm2-135m")
    calib = mod.calibration(parsed, model, tokenizer)
    config = mod.build_config(parsed, data=1)
    one = prune(model, calib, config, mesh=sharding.make_mesh(1, 1))
    runs["one_device"] = one.model
    for k in range(args.permutations):
      perm = np.random.default_rng(k).permutation(len(calib))
      runs[f"permuted_{k}"] = prune(model, calib[perm], config, mesh=sharding.make_mesh(1, 1)).model

  windows = {name: text_windows(path, tokenizer, 128, args.eval_windows) for name, path in TEXTS.items()}
  ppl = {run: {text: perplexity(m.spec, m.params, w).perplexity for text, w in windows.items()}
         for run, m in runs.items()}
  differ = [f"{x['layer']}.{x['module']}" for x, y in zip(report["modules"], one.report["modules"], strict=True)
            if x["kept"] != y["kept"]]
  from tests.numerics import reordering_bound

  within = {}
  for text in TEXTS:
    ref = ppl["one_device"][text]
    spreads = [ppl[f"permuted_{k}"][text] - ref for k in range(args.permutations)]
    gap = abs(ppl["two_processes"][text] - ref)
    bound = reordering_bound(ref, spreads)
    within[text] = {"gap": gap, "largest_spread": max(map(abs, spreads)), "within_largest_spread":
                    gap <= max(map(abs, spreads)), "derived_bound": bound, "within": gap <= bound}
  result = {
      "machine": cpu_name(),
      "recipe": "recommended (the text alone: selfgen_share 0)", "sparsity": 0.2, "seed": config.seed,
      "calib_samples": args.calib_samples, "eval_windows": args.eval_windows, "permutations": args.permutations,
      "mesh": report["mesh"], "solves": report["devices"]["solves"], "two_process_wall_seconds": wall,
      "two_process_phases": report["seconds"]["phases"],
      "params_after": {"two_processes": report["params"]["after"], "one_device": one.report["params"]["after"]},
      "perplexity": ppl, "modules_with_different_units": differ, "two_processes_vs_permutation_spread": within,
      **git_state(exclude=(args.out,)),
  }
  write_json(args.out, result, force=True)
  print(json.dumps({"modules_with_different_units": differ, "within": within}))
  return 0 if not differ and all(v["within"] for v in within.values()) else 1


if __name__ == "__main__":
  sys.exit(main())

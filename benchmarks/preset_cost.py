"""Pruning cost of the `paper` preset and the default (`recommended`) side by side, by phase.

Each row prunes one model at 20% with 8 x 128 calibration tokens from WikiText-2 valid
(seed 0) in a child process (`jaxprune prune`, streamed from its safetensors), once with
`--preset paper` and once with the default preset, and records from the run's report the
wall seconds by phase (the plan's own split too), the XLA compiles and the child's peak RSS
(`os.wait4`), against the model's float32 size, and the calibration's seconds (the default
samples its self-generated share there, before the pruning). Both presets of a row run back to back, so
their ratio is taken under the same load of the (shared) machine.

Models: the synthetic LLaMA of `streaming_memory.py` (hidden 1024, 16 heads, 4 KV heads,
SmolLM2's vocabulary, bfloat16 safetensors) at FFN 4096 with 48 blocks (the 0.83B
model), the same at FFN 8192 with fewer blocks (the growth with width: the plan and sweep
seconds per block at both widths, at the same depth), and SmolLM2-135M (its Q4_1 GGUF).

    nice -n 5 python benchmarks/preset_cost.py                        # -> results/preset_cost.json
    nice -n 5 python benchmarks/preset_cost.py --rows f4096-l4 f8192-l4 smollm2   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402
from quality import git_state  # noqa: E402
from streaming_memory import DATA, SHAPE, child  # noqa: E402

PRESETS = ("paper", "recommended")


def synthetic(work: str, ffn: int, layers: int) -> str:
  """The path of a synthetic LLaMA written under `work`."""
  src = os.path.join(work, f"llama-f{ffn}-l{layers}")
  shape = {**SHAPE, "ffn": ffn, "layers": layers}
  write = ("import jaxprune, json; from jaxprune.io.synthetic import write_llama, num_params; "
           "tok = jaxprune.load_tokenizer('smollm2-135m'); "
           f"cfg = write_llama({src!r}, vocab=tok.vocab_size, tokenizer=tok, shard_bytes=500 * 10**6, **{shape!r}); "
           "print(json.dumps({'params': num_params(cfg)}))")
  child([sys.executable, "-c", write])
  return src


def run_preset(model: str, preset: str, out: str, calib_samples: int) -> dict:
  """One `jaxprune prune` child: its report's seconds by phase, compiles, peak RSS."""
  cmd = [sys.executable, "-m", "jaxprune", "--no-compile-cache", "prune", model, "--sparsity", "0.2", "--calib", DATA,
         "--calib-samples", str(calib_samples), "--seq-len", "128", "--out", out, "--no-progress", "--preset", preset]
  wall, peak, _ = child(cmd)
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  s = report["seconds"]
  return {"preset": preset, "wall_seconds": wall, "seconds": s["total"], "plan_seconds": s["plan"],
          "phases": s["phases"], "plan_phases": s["plan_phases"], "compiles": report["passes"].get("compiles"),
          "peak_rss_bytes": peak, "params_before": report["params"]["before"],
          "params_after": report["params"]["after"],
          # Reading the text and, for the default, sampling its own share (outside `seconds`).
          "calibration_seconds": report["calibration"]["seconds"],
          "calibration_windows": report["calibration"].get("source_windows", [report["calibration"]["windows"]])}


def row(name: str, model: str, work: str, calib_samples: int, layers: int | None) -> dict:
  load_start = os.getloadavg()
  runs = {p: run_preset(model, p, os.path.join(work, f"{name}-{p}"), calib_samples) for p in PRESETS}
  params = runs["paper"]["params_before"]
  fp32 = 4 * params
  for r in runs.values():
    r["peak_rss_over_float32"] = r["peak_rss_bytes"] / fp32
    # The goa-obs work: the plan's scoring and the loop's.
    r["plan_and_sweep_seconds"] = r["plan_seconds"] + r["phases"].get("scoring", 0.0)
    if layers:
      r["plan_and_sweep_seconds_per_block"] = r["plan_and_sweep_seconds"] / layers
  ratio = runs["recommended"]["seconds"] / runs["paper"]["seconds"]
  print(f"{name}: paper {runs['paper']['seconds']:.1f} s, recommended {runs['recommended']['seconds']:.1f} s "
        f"({ratio:.2f}x), peak RSS {runs['recommended']['peak_rss_over_float32']:.2f} of float32", flush=True)
  return {"model": name, "params": params, "float32_bytes": fp32, "layers": layers, "runs": runs,
          "recommended_over_paper_seconds": ratio, "machine": cpu_name(),
          "load_average_start": load_start, "load_average_end": os.getloadavg()}


ROWS = ("f4096-l8", "f8192-l8", "f4096-l48", "smollm2")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", nargs="+", default=list(ROWS),
                  help="synthetic models as f<FFN>-l<blocks> (f4096-l48: the 0.83B model), and smollm2")
  ap.add_argument("--calib-samples", type=int, default=8)
  ap.add_argument("--work", default=None, help="directory for the models and outputs (default: temporary)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "preset_cost.json"))
  args = ap.parse_args()
  from jaxprune.io.atomic import write_json

  # Rows already in --out are kept (a later call adds or replaces rows by model).
  result = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": []}
  for r in result["rows"]:  # rows from before rows named their machine ran on the file's
    r.setdefault("machine", result.get("machine"))
  result.pop("machine", None)
  result.update(benchmark="preset_cost", sparsity=0.2, calib_windows=args.calib_samples,
                seq_len=128, seed=0)
  with tempfile.TemporaryDirectory(dir=args.work) as work:
    for name in args.rows:
      if name == "smollm2":
        r = row("smollm2-135m", "smollm2-135m", work, args.calib_samples, None)
      else:
        ffn, layers = (int(v) for v in name[1:].split("-l"))
        r = row(f"llama-h1024-f{ffn}-l{layers}", synthetic(work, ffn, layers), work, args.calib_samples, layers)
      r.update(git_state(ROOT, exclude=(args.out,)))  # the commit, and whether the tree differed from it
      result["rows"] = [x for x in result["rows"] if x["model"] != r["model"]] + [r]
      _growth(result)
      write_json(args.out, result, force=True)  # each finished row is kept
  return 0


def _growth(result: dict) -> None:
  """Plan + sweep seconds per block at FFN 8192 over FFN 4096, for each depth measured at both."""
  per_block = {r["model"]: r["runs"]["recommended"]["plan_and_sweep_seconds_per_block"] for r in result["rows"]
               if r["layers"]}
  result["plan_and_sweep_growth_4096_to_8192"] = {
      m.split("-l")[1] + " blocks": per_block[m.replace("f4096", "f8192")] / v for m, v in per_block.items()
      if "f4096" in m and m.replace("f4096", "f8192") in per_block}


if __name__ == "__main__":
  sys.exit(main())

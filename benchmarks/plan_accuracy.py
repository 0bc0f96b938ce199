"""`jaxprune plan`'s estimate against the measured peak RSS of the run it plans.

Runs `jaxprune prune` on the built-in SmolLM2-135M (20%, 128 x 128 WikiText-2 valid
tokens, the default recipe unless --method is given), or on the synthetic 0.83B LLaMA of
benchmarks/streaming_memory.py (bf16 sharded safetensors, streamed; 8 x 128 tokens), in a
child process and takes its own peak RSS from `os.wait4`; then runs `jaxprune plan` with the
same options (one CPU device: on a CPU the device terms are host memory) and compares the
per-host estimate with it (the larger of the pruning's and, where the run samples its own
calibration text first, the sampling's). The bar (issue 31) is 15%.

    python benchmarks/plan_accuracy.py                    # -> results/plan_accuracy.json
    python benchmarks/plan_accuracy.py --model synthetic-0.83b   # -> results/plan_accuracy_synthetic.json
    python benchmarks/plan_accuracy.py --method flap --out /tmp/pa.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402
from quality import git_state  # noqa: E402
from streaming_memory import SHAPE, child  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
SYNTHETIC = "synthetic-0.83b"
# Calibration windows by model: the synthetic model's are issue 33's (8 x 128 tokens).
SAMPLES = {"smollm2-135m": 128, SYNTHETIC: 8}


def _synthetic(path: str) -> str:
  """streaming_memory.py's 0.83B LLaMA (bf16, 500 MB shards) written to `path`."""
  child([sys.executable, "-c", "import jaxprune; from jaxprune.io.synthetic import write_llama; "
         "tok = jaxprune.load_tokenizer('smollm2-135m'); "
         f"write_llama({path!r}, vocab=tok.vocab_size, tokenizer=tok, shard_bytes=500 * 10**6, **{SHAPE!r})"])
  return path


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m", choices=sorted(SAMPLES))
  ap.add_argument("--method", default=None)
  ap.add_argument("--calib-samples", type=int, default=None, help="default: 128 (SmolLM2), 8 (synthetic)")
  ap.add_argument("--out", default=None,
                  help="default: results/plan_accuracy.json (SmolLM2), results/plan_accuracy_synthetic.json")
  args = ap.parse_args()
  args.out = args.out or os.path.join(HERE, "results", "plan_accuracy" + ("_synthetic" if args.model == SYNTHETIC
                                                                         else "") + ".json")
  jp = [sys.executable, "-c", "import sys; from jaxprune.cli import main; sys.exit(main())"]
  opts = ["--sparsity", "0.2", "--calib-samples", str(args.calib_samples or SAMPLES[args.model]), "--seq-len", "128"]
  if args.method:
    opts += ["--method", args.method]
  with tempfile.TemporaryDirectory() as tmp:
    model = _synthetic(os.path.join(tmp, "llama-0.8b")) if args.model == SYNTHETIC else args.model
    # One device, as the plan assumes for this machine.
    env_cmd = ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=1"]
    seconds, peak, _ = child(env_cmd + jp + ["prune", model, "--calib", DATA, "--out", os.path.join(tmp, "out"),
                                             "--no-progress", *opts])
    est_path = os.path.join(tmp, "plan.json")
    child(env_cmd + jp + ["plan", model, "--backend", "cpu", "--devices-per-host", "1", "--json", est_path, *opts])
    with open(est_path) as f:
      est = json.load(f)
  # The run's peak is its pruning's or, where it first samples its own calibration text, that
  # sampling's, whichever is larger.
  host = max(est["host"]["bytes"], (est.get("generation") or {}).get("host", {}).get("bytes", 0))
  row = {"benchmark": "plan_accuracy", "model": args.model, "options": opts, "machine": cpu_name(),
         "measured_peak_rss_bytes": peak, "prune_seconds": seconds, "estimate": est,
         "estimate_host_bytes": host, "error": host / peak - 1, "bound": 0.15,
         **git_state(exclude=(args.out,))}
  from jaxprune.io.atomic import write_json

  write_json(args.out, row, force=True)
  print(f"estimate {host / 2**30:.2f} GiB vs measured peak RSS {peak / 2**30:.2f} GiB: "
        f"{100 * (host / peak - 1):+.1f}% (bound 15%)")
  return 0 if abs(host / peak - 1) <= 0.15 else 1


if __name__ == "__main__":
  sys.exit(main())

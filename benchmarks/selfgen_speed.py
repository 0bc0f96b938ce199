"""Self-generated calibration text: tokens per second of `data.selfgen.self_generated` on SmolLM2.

Generates `--windows` windows of 128 tokens as the data-free preset draws them (no top-k,
four windows a text: texts of 512 tokens after BOS) in batches of `--batch` texts, after a
warm-up call that compiles; reports the wall seconds, the tokens sampled per second and the
milliseconds per decode step. `--before DIR` runs the same measurement with the jaxprune
checkout at DIR (a git worktree of an older commit) in a child process, interleaved with this
one's, so that both figures come from one sitting.

    python benchmarks/selfgen_speed.py                   # -> results/selfgen_speed.json
    python benchmarks/selfgen_speed.py --before /path/to/old/worktree
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402

SEQ_LEN, PER_TEXT = 128, 4


def measure(root: str, windows: int, batch: int) -> dict:
  """One run in a child process importing jaxprune from `root`."""
  code = f"""
import json, sys, time
sys.path.insert(0, {root!r})
import jaxprune
from jaxprune.data.selfgen import self_generated
m = jaxprune.load("smollm2-135m")
kw = dict(seed=0, top_k=0, windows_per_text={PER_TEXT}, batch_size={batch})
self_generated(m.spec, m.params, {batch * PER_TEXT}, {SEQ_LEN}, **kw)  # compiles
t = time.perf_counter()
w = self_generated(m.spec, m.params, {windows}, {SEQ_LEN}, **kw)
print(json.dumps({{"seconds": time.perf_counter() - t, "windows": int(w.shape[0])}}))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  texts = -(-windows // PER_TEXT)
  steps = -(-texts // batch) * (PER_TEXT * SEQ_LEN - 1)
  r.update(tokens_per_second=windows * SEQ_LEN / r["seconds"], ms_per_step=1e3 * r["seconds"] / steps,
           batch_texts=batch)
  return r


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=256)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--before", default=None, help="an older jaxprune checkout to measure beside this one")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "selfgen_speed.json"))
  args = ap.parse_args()
  sys.path.insert(0, ROOT)
  from jaxprune.io.atomic import write_json

  result = {"benchmark": "selfgen_speed", "machine": cpu_name(), "windows": args.windows, "seq_len": SEQ_LEN,
            "windows_per_text": PER_TEXT, "load_average_start": os.getloadavg()}
  if args.before:
    result["before"] = {"checkout": args.before, **measure(args.before, args.windows, args.batch)}
  result["now"] = measure(ROOT, args.windows, args.batch)
  if args.before:
    result["now_over_before_tokens_per_second"] = (result["now"]["tokens_per_second"] /
                                                   result["before"]["tokens_per_second"])
  result["load_average_end"] = os.getloadavg()
  write_json(args.out, result, force=True)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

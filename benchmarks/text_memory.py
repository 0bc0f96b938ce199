"""Peak memory of `jaxprune eval --text` on a large text: it reads only what its windows need.

Writes a text of `--megabytes` MB (WikiText-2 test repeated) in a temporary
directory (removed afterwards; nothing is copied into the repository), runs

    jaxprune eval smollm2-135m --text FILE --max-windows 4

in a child process and records the child's own peak RSS (`os.wait4`), with the
same run on WikiText-2 test itself (1.2 MB) beside it: the two peaks should be
about equal, whatever the size of the file. Before streamed reading, 40 MB of
text passed 6 GB and was killed.

    python benchmarks/text_memory.py [--megabytes 200] [--bound-gb 2]
                                     [--out benchmarks/results/text_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")


def child(cmd: list[str]) -> tuple[float, int, int, str]:
  """(wall seconds, peak RSS bytes, exit code, output) of one child process."""
  t = time.perf_counter()
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  return time.perf_counter() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), out


def write_big(path: str, megabytes: int) -> int:
  """Repeats WikiText-2 test into `path` until it holds `megabytes` MB; returns its size."""
  with open(TEXT, "rb") as f:
    block = f.read()
  with open(path, "wb") as f:
    while f.tell() < megabytes * 10**6:
      f.write(block)
  return os.path.getsize(path)


def eval_run(text: str) -> dict:
  cmd = [sys.executable, "-m", "jaxprune", "--no-compile-cache", "eval", "smollm2-135m", "--text", text,
         "--max-windows", "4", "--no-progress"]
  seconds, peak, rc, out = child(cmd)
  if rc != 0:
    raise SystemExit(f"jaxprune eval failed (exit {rc}):\n{out[-3000:]}")
  ppl = float(out.split("perplexity")[1].split()[0])
  return {"text_bytes": os.path.getsize(text), "peak_rss_bytes": peak, "seconds": seconds, "perplexity": ppl}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--megabytes", type=int, default=200)
  ap.add_argument("--bound-gb", type=float, default=2.0)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "text_memory.json"))
  args = ap.parse_args()

  small = eval_run(TEXT)
  with tempfile.TemporaryDirectory() as d:
    big_path = os.path.join(d, "big.txt")
    write_big(big_path, args.megabytes)
    big = eval_run(big_path)
  bound = int(args.bound_gb * 10**9)
  result = {
      "command": "jaxprune eval smollm2-135m --text FILE --max-windows 4 --no-progress",
      "cpu": cpu_name(),
      "wikitext2_test": small,
      "large_text": {**big, "made_of": "WikiText-2 test repeated"},
      "bound_bytes": bound,
      "within_bound": big["peak_rss_bytes"] < bound,
      # The same first windows: the large file starts with WikiText-2 test.
      "same_perplexity": big["perplexity"] == small["perplexity"],
  }
  sys.path.insert(0, ROOT)
  from jaxprune.io.atomic import write_json

  write_json(args.out, result, force=True)
  print(json.dumps(result, indent=1))
  return 0 if result["within_bound"] and result["same_perplexity"] else 1


if __name__ == "__main__":
  sys.exit(main())

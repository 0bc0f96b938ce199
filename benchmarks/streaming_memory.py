"""Peak memory of a streamed `jaxprune prune` on a 0.83B-parameter LLaMA, against its float32 size.

One run:

1. writes a synthetic LLaMA checkpoint with random weights (`jaxprune.io.synthetic`, transformers'
   tensor names and config): hidden 1024, FFN 4096, 48 layers, 16 heads, 4 KV heads, SmolLM2's
   tokenizer (vocab 49152, so WikiText-2 tokenizes as for SmolLM2), untied head; bfloat16,
   sharded safetensors of <= 500 MB with an index;
2. runs `jaxprune prune` on it in a child process (20%, 8 x 128 calibration tokens from
   WikiText-2 valid, seed 0; the default recipe unless --preset/--method say otherwise) and takes
   the child's own peak RSS (`os.wait4`);
3. loads the output in another child with stock `transformers.AutoModelForCausalLM.from_pretrained`
   (`trust_remote_code=True` when the layers differ in width, as the export's config says) and
   counts its parameters against the run's report.

The peak is compared with 40% of the model's float32 size. A child that only imports jaxprune and
starts JAX gives the process's floor, reported beside it.

    python benchmarks/streaming_memory.py                      # -> results/streaming_memory.json
    python benchmarks/streaming_memory.py --preset baseline --method flap --out /tmp/sm.json
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
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from machine import cpu_name  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
SHAPE = dict(hidden=1024, ffn=4096, layers=48, heads=16, kv_heads=4)


def child(cmd: list[str]) -> tuple[float, int, str]:
  """(wall seconds, peak RSS bytes, output) of one child process."""
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
  return time.perf_counter() - t, usage.ru_maxrss * 1024, out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--work", default=None, help="directory for the checkpoint and output (default: temporary)")
  ap.add_argument("--preset", default=None)
  ap.add_argument("--method", default=None)
  ap.add_argument("--calib-samples", type=int, default=8)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "streaming_memory.json"))
  args = ap.parse_args()

  with tempfile.TemporaryDirectory(dir=args.work) as work:
    src, out = os.path.join(work, "llama-0.8b"), os.path.join(work, "pruned")
    write = ("import jaxprune, json; from jaxprune.io.synthetic import write_llama, num_params; "
             f"tok = jaxprune.load_tokenizer('smollm2-135m'); "
             f"cfg = write_llama({src!r}, vocab=tok.vocab_size, tokenizer=tok, shard_bytes=500 * 10**6, **{SHAPE!r}); "
             "print(json.dumps({'params': num_params(cfg)}))")
    write_s, _, text = child([sys.executable, "-c", write])
    n_params = json.loads(text.strip().splitlines()[-1])["params"]
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    shard_mb = [os.path.getsize(os.path.join(src, f)) / 1e6 for f in shards]

    _, floor, _ = child([sys.executable, "-c", "import jax, jaxprune.prune, jaxprune.io; jax.devices()"])
    cmd = [sys.executable, "-m", "jaxprune", "--no-compile-cache", "prune", src, "--sparsity", "0.2",
           "--calib", DATA, "--calib-samples", str(args.calib_samples), "--seq-len", "128", "--out", out,
           "--no-progress"]
    if args.preset:
      cmd += ["--preset", args.preset]
    if args.method:
      cmd += ["--method", args.method]
    prune_s, peak, log = child(cmd)
    with open(os.path.join(out, "report.json")) as f:
      report = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
      remote = "auto_map" in json.load(f)
    load = ("import json, torch, transformers; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code={remote}, "
            "dtype=torch.bfloat16); "
            "x = m(torch.arange(16)[None]).logits; "
            "print(json.dumps({'params': sum(p.numel() for p in m.parameters()), "
            "'finite': bool(torch.isfinite(x).all())}))")
    _, _, text = child([sys.executable, "-c", load])
    loaded = json.loads(text.strip().splitlines()[-1])
    out_files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))

  fp32 = 4 * n_params
  result = {
      "machine": cpu_name(),
      "model": {**SHAPE, "vocab": 49152, "params": n_params, "float32_bytes": fp32,
                "checkpoint": {"dtype": "bfloat16", "shards_mb": [round(s, 1) for s in shard_mb]},
                "write_seconds": write_s},
      "run": {"command": " ".join(cmd[1:]).replace(work, "$WORK"), "seconds": prune_s,
              "preset": report.get("preset"), "method": report["config"]["method"],
              "allocation": report["config"]["allocation"], "compiles": report["passes"].get("compiles"),
              "params_after": report["params"]["after"],
              "ratio_of_pruned_blocks": report["params"]["ratio_of_pruned_blocks"],
              "output_shards": len(out_files)},
      "peak_rss_bytes": peak,
      "peak_rss_over_float32": peak / fp32,
      "bound_over_float32": 0.4,
      "within_bound": peak <= 0.4 * fp32,
      "process_floor_bytes": floor,  # importing jaxprune and starting JAX, nothing loaded
      "transformers_load": {**loaded, "trust_remote_code": remote,
                            "params_match_report": loaded["params"] == report["params"]["after"]},
      "log_tail": log.strip().splitlines()[-4:],
  }
  from jaxprune.io.atomic import write_json

  write_json(args.out, result, force=True)
  print(json.dumps({k: result[k] for k in ("peak_rss_bytes", "peak_rss_over_float32", "within_bound",
                                           "process_floor_bytes", "transformers_load")}, indent=1))
  return 0 if result["within_bound"] and loaded["params"] == report["params"]["after"] else 1


if __name__ == "__main__":
  sys.exit(main())

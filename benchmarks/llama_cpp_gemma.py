"""Gemma-3-270M through jaxprune's GGUF export in a real llama.cpp: perplexity parity, dense and pruned.

    nice -n 5 python benchmarks/llama_cpp_gemma.py   # writes benchmarks/results/llama_cpp_gemma.json

Protocol: the built-in `gemma3-270m` (the Q4_K_M GGUF, dequantized to float32 by jaxprune) and
the same model pruned to 20% of its block parameters with one shape in every layer (FLAP's
criterion, uniform allocation, no bias compensation and no intercept: llama.cpp's gemma3 has no
attn_output or ffn_down bias), calibrated on `--calib` windows of 128 tokens sampled from
WikiText-2 valid (seed 0), each as [BOS] + window. Each model is exported with `save_gguf` at
f32 and q8_0 (tokenizer copied from the source GGUF) and run in llama.cpp (built from the
llama-cpp-python sdist by benchmarks/llama_cpp.py, through its binding, one thread, f32 KV
cache). Evaluation as benchmarks/gemma_parity.py: the first `--windows` windows of 128 tokens
of WikiText-2 test, each fed alone as [BOS] + window from an empty cache, all 128 window tokens
scored; llama.cpp's log-softmax in float64, jaxprune's as gemma_parity's. `--long` more windows
of 575 tokens after BOS (longer than Gemma's 512-token window, so its sliding layers mask) on
the f32 files only. The figure is the relative difference of the perplexities.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gemma_parity import LENGTH, _nll, jax_logprobs  # noqa: E402
from quality import git_state  # noqa: E402
from tests.gemma_reference import bos_windows  # noqa: E402

TEST = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")
VALID = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
LONG = 575
RATIO, SEED = 0.2, 0


def _llama_cpp_bench():
  """benchmarks/llama_cpp.py under another name: as `llama_cpp` it would shadow the binding's package."""
  spec = importlib.util.spec_from_file_location("llama_cpp_bench", os.path.join(ROOT, "benchmarks", "llama_cpp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _trim() -> None:
  """Hands the heap freed by the tokenizer and by JAX's logits back to the system before llama.cpp maps its
  file, so the process stays under ~5 GB."""
  import ctypes
  import gc

  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)


def _jaxprune_ppl(model, windows: np.ndarray) -> float:
  # One window at a time: a batch of long windows' logits over 262144 tokens would take gigabytes.
  logprobs = jax_logprobs(model)
  return math.exp(sum(_nll(logprobs, windows[i:i + 1]) for i in range(len(windows))) / windows[:, 1:].size)


def evaluate(lc, binding, model, name: str, sets: dict, gguf_dir: str, threads: int) -> dict:
  from jaxprune.io.gguf_export import save_gguf

  row = {"params": model.num_params, "heads": sorted({l.num_heads for l in model.spec.layers}),
         "channels": sorted({l.ffn_dim for l in model.spec.layers}), "files": {}}
  t = time.perf_counter()
  row["jaxprune"] = {s: _jaxprune_ppl(model, w) for s, w in sets.items()}
  row["jaxprune_seconds"] = time.perf_counter() - t
  _trim()
  for ttype in ("f32", "q8_0"):
    info = save_gguf(model, os.path.join(gguf_dir, f"gemma3-{name}-{ttype}.gguf"), dtype=ttype, force=True)
    row["files"][ttype] = {"architecture": info.architecture, "bytes": os.path.getsize(info.path),
                           "exported_params": info.exported_params, "f16_fallback": len(info.f16_fallback),
                           "tokenizer": os.path.basename(info.tokenizer)}
    for s, w in sets.items():
      if ttype != "f32" and s != "wikitext-2 test":
        continue
      lc_row = lc.llama_cpp_perplexity(binding, info.path, w, threads)
      jp = row["jaxprune"][s]
      lc_row["relative_difference"] = abs(lc_row["perplexity"] - jp) / jp
      row[f"llama_cpp_{ttype} {s}"] = lc_row
      print(f"{name} {ttype} {s}: llama.cpp {lc_row['perplexity']:.4f}, jaxprune {jp:.4f} "
            f"(relative difference {lc_row['relative_difference']:.2e})", flush=True)
    os.remove(info.path)  # a 1 GB f32 file per model: the cache keeps none of them
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--windows", type=int, default=32)
  ap.add_argument("--calib", type=int, default=32, help="calibration windows for the pruned model")
  ap.add_argument("--long", type=int, default=2, help="windows of 575 tokens (0: none)")
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--cache", default=os.path.expanduser("~/.cache/jaxprune/llama.cpp"))
  ap.add_argument("--no-pruned", action="store_true")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "llama_cpp_gemma.json"))
  args = ap.parse_args(argv)

  import jaxprune
  from jaxprune.data import read_text, sample_windows, tokenize
  from jaxprune.io.atomic import write_json
  from jaxprune.prune import PruneConfig, prune

  lc = _llama_cpp_bench()
  sdist, bin_dir = lc.build(args.cache, ("llama",))
  binding = lc.llama_binding(sdist, bin_dir)
  gguf_dir = os.path.join(args.cache, "gguf")
  os.makedirs(gguf_dir, exist_ok=True)

  tokenizer = jaxprune.load_tokenizer("gemma3-270m")
  test = tokenize(tokenizer, read_text(TEST))
  valid = None if args.no_pruned else tokenize(tokenizer, read_text(VALID))
  del tokenizer
  _trim()
  model = jaxprune.load("gemma3-270m")
  bos = model.spec.bos_token_id
  sets = {"wikitext-2 test": bos_windows(test, args.windows, LENGTH, bos)}
  if args.long:
    sets[f"wikitext-2 test, {LONG} tokens"] = bos_windows(test, args.long, LONG, bos)
  result = {"benchmark": "llama_cpp_gemma", "model": "gemma3-270m (gemma-3-270m-q4_k_m.gguf, as float32)",
            "protocol": __doc__.split("\n\n", 2)[2].strip(),
            "windows": {s: {"shape": list(w.shape), "sha256": hashlib.sha256(w.tobytes()).hexdigest()}
                        for s, w in sets.items()},
            "machine": {"llama_cpp": os.path.basename(sdist), "flags": lc.CMAKE_FLAGS, "threads": args.threads,
                        "cpus": os.cpu_count()},
            "models": {}, **git_state(ROOT, exclude=(args.out,))}
  result["models"]["dense"] = evaluate(lc, binding, model, "dense", sets, gguf_dir, args.threads)
  write_json(args.out, result, force=True)  # what has finished survives a cut-short run
  if args.no_pruned:
    return 0
  calib, _ = sample_windows(valid, LENGTH, args.calib, seed=SEED, source=VALID, prefix=(bos,))
  cfg = PruneConfig.preset("baseline", method="flap", compensate=False, sparsity=RATIO, batch_size=8)
  t = time.perf_counter()
  r = prune(model, np.asarray(calib, np.int32), cfg)
  result["pruning"] = {"preset": "baseline", "method": "flap", "compensate": False, "allocation": "uniform",
                       "ratio": RATIO, "seed": SEED, "calibration": f"wikitext-2 valid, {args.calib} x [BOS] + 128",
                       "seconds": time.perf_counter() - t, "report_params": r.report["params"]}
  del model  # the dense weights: only the pruned model from here on
  _trim()
  result["models"]["pruned_0.2_uniform"] = evaluate(lc, binding, r.model, "pruned_0.2_uniform", sets, gguf_dir,
                                                    args.threads)
  write_json(args.out, result, force=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

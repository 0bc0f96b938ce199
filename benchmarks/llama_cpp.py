"""Dense and pruned SmolLM2-135M in a real llama.cpp: perplexity parity and speed.

    python benchmarks/llama_cpp.py --pruned 0.2=/tmp/p20 --pruned 0.5=/tmp/p50 [--threads 1]

1. Builds llama.cpp (the `llama` shared library and `llama-bench`) from the
   `llama-cpp-python` source distribution on PyPI, into a cache outside the
   repository (default ~/.cache/jaxprune/llama.cpp), unless already built. No
   network beyond `pip download`; the flags are portable: no GGML_NATIVE, AVX2,
   FMA and F16C on, AMX off (some of these machines list AMX in /proc/cpuinfo but
   raise SIGILL on its instructions). The build runs under `nice -n 19`.
2. Exports the dense model and each pruned directory (from `jaxprune prune`) with
   `save_gguf` at f32, f16 and q8_0.
3. Perplexity on the evaluation windows (default: the first 64 windows of 128
   tokens of WikiText-2 test), jaxprune's protocol exactly: each window is fed
   alone from an empty KV cache, no BOS, and every position after the first is
   scored. llama.cpp's `llama-perplexity` scores only the second half of each
   window and adds a BOS, so the windows go through llama.cpp's own Python
   binding (the sdist's `llama_cpp` package on the library built here) with all
   logits returned; the log-softmax is taken in float64 here. jaxprune's
   perplexity of the same model on the same windows is computed beside it.
4. `llama-bench` on the f16 dense and pruned files, in one run: prompt
   processing (pp128) and generation (tg128), tokens/s. `--speed binding`
   times the same two tests through the binding instead (no llama-bench build:
   it needs llama.cpp's `common` library, about as long to build again).

Results go to JSON (default benchmarks/results/llama_cpp.json), written atomically.
`--prepare-only` does step 2 (and jaxprune's perplexities) while llama.cpp builds;
`--add-llama-bench` adds llama-bench's numbers to a file written with `--speed binding`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PACKAGE = "llama-cpp-python"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON",
               "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
TEXT = "/work/shared/data/wikitext-2/test.txt"
_ROWS = 64  # positions whose log-softmax is taken at once


# --------------------------------------------------------------------------
# Building llama.cpp.


def _run(cmd, **kw):
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, **kw)


def source_tree(cache: str) -> str:
  """The sdist's directory (downloaded and unpacked once); llama.cpp's sources are under vendor/llama.cpp."""
  trees = sorted(glob.glob(os.path.join(cache, "llama_cpp_python-*", "vendor", "llama.cpp")))
  if trees:
    return os.path.dirname(os.path.dirname(trees[-1]))
  sdists = os.path.join(cache, "sdist")
  if not glob.glob(os.path.join(sdists, "*.tar.gz")):
    _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", PACKAGE, "-d", sdists])
  archive = sorted(glob.glob(os.path.join(sdists, "*.tar.gz")))[-1]
  with tarfile.open(archive) as t:
    t.extractall(cache, filter="data")
  return source_tree(cache)


def build(cache: str, targets: tuple[str, ...], jobs: int = 2) -> tuple[str, str]:
  """(the sdist's directory, the directory with libllama.so and llama-bench), building what is missing."""
  sdist = source_tree(cache)
  build_dir = os.path.join(cache, "build")
  bin_dir = os.path.join(build_dir, "bin")
  files = {"llama": "libllama.so", "llama-bench": "llama-bench"}
  missing = [t for t in targets if not os.path.exists(os.path.join(bin_dir, files[t]))]
  if missing:
    if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
      _run(["cmake", "-S", os.path.join(sdist, "vendor", "llama.cpp"), "-B", build_dir, "-G", "Ninja", *CMAKE_FLAGS])
    # The build takes many minutes on 2 shared cores: lowest priority, so the machine stays usable.
    _run(["nice", "-n", "19", "cmake", "--build", build_dir, f"-j{jobs}", "--target", *missing])
  return sdist, bin_dir


def llama_binding(sdist: str, bin_dir: str):
  """The sdist's `llama_cpp` package, on the library built here."""
  os.environ["LLAMA_CPP_LIB_PATH"] = bin_dir
  sys.path.insert(0, sdist)
  try:
    import diskcache  # noqa: F401
  except ImportError:
    # Only llama_cpp's optional on-disk prompt cache uses it; the perplexity loop never does.
    sys.modules["diskcache"] = types.ModuleType("diskcache")
  import llama_cpp

  if not hasattr(llama_cpp, "Llama"):  # this file, imported as a module named llama_cpp, shadows the package
    raise ImportError(f"llama_cpp resolved to {llama_cpp.__file__}; run this benchmark as a script")
  return llama_cpp


# --------------------------------------------------------------------------
# Perplexity, both engines, same windows.


def llama_cpp_perplexity(binding, path: str, windows: np.ndarray, threads: int) -> dict:
  """exp(mean NLL) of every position after the first of each window, each window from an empty cache."""
  W, T = windows.shape
  # An f32 KV cache (llama.cpp's default is f16), so an f32 file is computed in f32 throughout and
  # q8_0's cost is the weights' alone.
  f32 = binding.GGML_TYPE_F32
  llm = binding.Llama(model_path=path, n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, n_threads=threads,
                      n_threads_batch=threads, type_k=f32, type_v=f32, verbose=False)
  total, start = 0.0, time.perf_counter()
  for w in windows:
    llm.reset()  # n_tokens = 0: eval() then drops the whole KV cache before decoding
    llm.eval([int(t) for t in w])
    for s in range(0, T - 1, _ROWS):  # rows at a time: a float64 copy of a long window's scores over a
      e = min(s + _ROWS, T - 1)  # 262144-token vocabulary (Gemma's) would take gigabytes
      logits = np.asarray(llm.scores[s:e], np.float64)
      peak = logits.max(axis=-1)
      lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
      total += float(np.sum(lse - logits[np.arange(e - s), w[s + 1:e + 1]]))
  seconds = time.perf_counter() - start
  del llm
  mean = total / (W * (T - 1))
  return {"perplexity": float(np.exp(mean)), "mean_nll": mean, "seconds": seconds}


def jaxprune_perplexity(model, windows: np.ndarray) -> dict:
  from jaxprune.eval.perplexity import perplexity

  r = perplexity(model.spec, model.params, windows)
  return {"perplexity": r.perplexity, "mean_nll": r.mean_nll, "seconds": r.seconds}


# --------------------------------------------------------------------------
# llama-bench.


def llama_bench(bin_dir: str, files: dict[str, str], threads: int, reps: int) -> dict:
  """{name: {"pp128": tokens/s, "tg128": ..., "*_std": ...}} from one llama-bench run over all files."""
  cmd = [os.path.join(bin_dir, "llama-bench"), "-p", "128", "-n", "128", "-t", str(threads), "-r", str(reps),
         "-o", "json"]
  for path in files.values():
    cmd += ["-m", path]
  print("+", " ".join(cmd), flush=True)
  rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
  by_path = {v: k for k, v in files.items()}
  out: dict[str, dict] = {}
  for row in rows:
    test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
    entry = out.setdefault(by_path[row["model_filename"]], {})
    entry[test], entry[f"{test}_std"] = row["avg_ts"], row["stddev_ts"]
    entry["model_size_bytes"], entry["model_n_params"] = row["model_size"], row["model_n_params"]
  return out


def binding_bench(binding, files: dict[str, str], threads: int, reps: int, n: int = 128) -> dict:
  """llama-bench's pp/tg protocol through the binding, for when llama-bench is not built.

  pp: one batch of n tokens into an empty context; tg: n single-token decodes from an
  empty context. After one warm-up of each, the models take turns rep by rep, so load
  from other processes falls on all of them alike.
  """
  llms = {name: binding.Llama(model_path=p, n_ctx=2 * n, n_batch=n, n_ubatch=n, n_threads=threads,
                              n_threads_batch=threads, verbose=False) for name, p in files.items()}
  tokens = [int(t) for t in np.random.default_rng(0).integers(0, 32000, n)]

  def pp(llm):
    llm.reset()
    llm.eval(tokens)

  def tg(llm):
    llm.reset()
    for t in tokens:
      llm.eval([t])

  times: dict[str, dict[str, list]] = {name: {"pp": [], "tg": []} for name in llms}
  for rep in range(reps + 1):
    for name, llm in llms.items():
      for test, fn in (("pp", pp), ("tg", tg)):
        start = time.perf_counter()
        fn(llm)
        if rep:  # rep 0 warms up
          times[name][test].append(n / (time.perf_counter() - start))
  return {name: {f"{test}{n}": float(np.mean(v)) for test, v in t.items()} |
          {f"{test}{n}_std": float(np.std(v)) for test, v in t.items()} for name, t in times.items()}


# --------------------------------------------------------------------------
# The run.


def prepare(name: str, source: str, windows, gguf_dir: str) -> dict:
  """The GGUF files and jaxprune's perplexity of one model: the part that needs no llama.cpp.

  Kept in gguf_dir/NAME.json (with the windows' hash), so `--prepare-only` can run while
  llama.cpp is still building and the full run reuses it.
  """
  import hashlib

  import jaxprune
  from jaxprune.io.gguf_export import save_gguf

  key = {"source": os.path.abspath(source) if os.path.exists(source) else source,
         "windows_sha256": hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest()}
  cached = os.path.join(gguf_dir, f"{name}.json")
  if os.path.exists(cached):
    with open(cached) as f:
      row = json.load(f)
    if row.get("key") == key and all(os.path.exists(v["path"]) for v in row["files"].values()):
      return row
  model = jaxprune.load(source)
  files = {}
  for t in ("f32", "f16", "q8_0"):
    info = save_gguf(model, os.path.join(gguf_dir, f"{name}-{t}.gguf"), dtype=t, force=True)
    files[t] = {"path": info.path, "architecture": info.architecture, "exported_params": info.exported_params,
                "bytes": os.path.getsize(info.path), "f16_fallback": len(info.f16_fallback)}
  row = {"key": key, "params": model.num_params, "per_layer": not model.spec.uniform, "files": files,
         "jaxprune": jaxprune_perplexity(model, windows)}
  from jaxprune.io.atomic import write_json

  write_json(cached, row, force=True)
  return row


def evaluate(row: dict, name: str, windows, binding, threads: int) -> dict:
  """Adds llama.cpp's perplexity of the f32 and q8_0 files to a `prepare` row."""
  jp = row["jaxprune"]
  for t in ("f32", "q8_0"):
    lc = llama_cpp_perplexity(binding, row["files"][t]["path"], windows, threads)
    lc["relative_difference"] = abs(lc["perplexity"] - jp["perplexity"]) / jp["perplexity"]
    row[f"llama_cpp_{t}"] = lc
    print(f"{name} {t}: llama.cpp {lc['perplexity']:.4f}, jaxprune {jp['perplexity']:.4f} "
          f"(relative difference {lc['relative_difference']:.2e})", flush=True)
  row["q8_0_perplexity_cost"] = row["llama_cpp_q8_0"]["perplexity"] / row["llama_cpp_f32"]["perplexity"] - 1
  return row


def add_speedups(bench: dict) -> dict:
  for b in bench.values():
    for test in ("pp128", "tg128"):
      b[f"{test}_speedup"] = b[test] / bench["dense"][test]
  return bench


def add_llama_bench(args) -> int:
  """llama-bench's numbers beside the binding's, in an existing results file."""
  from jaxprune.io.atomic import write_json

  with open(args.out) as f:
    result = json.load(f)
  _, bin_dir = build(args.cache, ("llama", "llama-bench"))
  models = result["models"]
  bench = add_speedups(llama_bench(bin_dir, {n: m["files"]["f16"]["path"] for n, m in models.items()}, args.threads,
                                   args.reps))
  for name, b in bench.items():
    models[name]["llama_bench_f16"] = b
  result["machine"]["llama_bench_threads"] = args.threads
  write_json(args.out, result, force=True)
  print(json.dumps(bench, indent=1))
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--pruned", action="append", default=[], metavar="SPARSITY=DIR",
                  help="a directory written by `jaxprune prune smollm2-135m --sparsity SPARSITY` (repeatable)")
  ap.add_argument("--cache", default=os.path.expanduser("~/.cache/jaxprune/llama.cpp"))
  ap.add_argument("--text", default=TEXT)
  ap.add_argument("--windows", type=int, default=64)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--threads", type=int, default=1,
                  help="CPU threads for llama.cpp (default 1: on a shared machine, more threads measure scheduling)")
  ap.add_argument("--reps", type=int, default=5, help="llama-bench repetitions")
  ap.add_argument("--speed", choices=("llama-bench", "binding"), default="llama-bench",
                  help="time pp128/tg128 with llama-bench (built here), or through the binding (no llama-bench build)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "llama_cpp.json"))
  ap.add_argument("--add-llama-bench", action="store_true",
                  help="run llama-bench on the f16 files of an existing --out (written with --speed binding) and "
                  "add its numbers there")
  ap.add_argument("--prepare-only", action="store_true",
                  help="export the GGUF files and compute jaxprune's perplexities only (no llama.cpp needed)")
  args = ap.parse_args(argv)

  import jaxprune
  from jaxprune.data import eval_windows, read_text, tokenize
  from jaxprune.io.atomic import write_json

  if args.add_llama_bench:
    return add_llama_bench(args)
  gguf_dir = os.path.join(args.cache, "gguf")
  os.makedirs(gguf_dir, exist_ok=True)
  tokenizer = jaxprune.load_tokenizer("smollm2-135m")
  windows = eval_windows(tokenize(tokenizer, read_text(args.text)), args.seq_len, args.windows)
  sources = {"dense": "smollm2-135m", **{f"pruned_{s}": d for s, d in (p.split("=", 1) for p in args.pruned)}}
  rows = {name: prepare(name, src, windows, gguf_dir) for name, src in sources.items()}
  if args.prepare_only:
    return 0
  sdist, bin_dir = build(args.cache, ("llama", "llama-bench") if args.speed == "llama-bench" else ("llama",))
  binding = llama_binding(sdist, bin_dir)
  models = {name: evaluate(row, name, windows, binding, args.threads) for name, row in rows.items()}
  f16 = {n: m["files"]["f16"]["path"] for n, m in models.items()}
  if args.speed == "llama-bench":
    bench = llama_bench(bin_dir, f16, args.threads, args.reps)
  else:
    bench = binding_bench(binding, f16, args.threads, args.reps)
  for name, b in add_speedups(bench).items():
    models[name]["speed_f16"] = b
  result = {
      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "threads": args.threads, "llama_cpp": os.path.basename(sdist), "flags": CMAKE_FLAGS,
                  "speed_tool": args.speed},
      "protocol": {"text": args.text, "windows": int(len(windows)), "seq_len": args.seq_len, "bos": False,
                   "scored": "every position after the first, each window from an empty KV cache",
                   "kv_cache": "f32"},
      "models": models,
  }
  write_json(args.out, result, force=True)
  print(json.dumps({n: {"ppl_rel_diff_f32": m["llama_cpp_f32"]["relative_difference"],
                        "q8_0_cost": m["q8_0_perplexity_cost"],
                        **{k: v for k, v in m["speed_f16"].items() if k.endswith(("128", "speedup"))}}
                    for n, m in models.items()}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The derived tolerances (tests/numerics.py) under every kernel path this CPU can be forced onto.

Each configuration runs the checks that compare float32 forwards against their float64
reference (tiny models; SmolLM2's export parity where marked) in a fresh process, with
    XLA_FLAGS=--xla_cpu_max_isa=...   JAX's instruction set (SSE4_2, AVX, AVX2),
    ATEN_CPU_CAPABILITY=...           PyTorch's kernels (default, avx2, avx512),
    1 or 2 threads                    OMP_NUM_THREADS, XLA's Eigen pool and taskset,
and JAXPRUNE_TOLERANCE_LOG, which receives every check. The JSON keeps, per configuration
and check, the largest error-to-bound ratio; every ratio must be <= 1 (the tests assert
it, so a configuration's return code says the same).

Usage: python benchmarks/tolerance_isa.py [--only NAME ...] [--out PATH] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "benchmarks", "results", "tolerance_isa.json")
DEVICES = "--xla_force_host_platform_device_count=8"  # what tests/conftest.py would add
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

TINY = ["tests/test_models.py", "tests/test_gguf.py", "-k", "logit_parity or logits_match_torch"]
SMOLLM2 = ["tests/test_export_smollm2.py", "-m", "smollm2", "-k", "test_logit_parity"]
SMOLLM2_DENSE = [*SMOLLM2[:-1], "test_logit_parity and dense"]  # on two busy cores, each layout takes minutes

# (name, JAX max ISA or None for native, ATEN_CPU_CAPABILITY or None, threads, test sets):
# every setting at least once, SmolLM2's export parity under each JAX ISA.
CONFIGS = [
    ("native-2t", None, None, 2, (TINY,)),
    ("avx2-torchavx2-1t", "AVX2", "avx2", 1, (TINY,)),
    ("avx-torchdefault-2t", "AVX", "default", 2, (TINY,)),
    ("sse42-torchdefault-1t", "SSE4_2", "default", 1, (TINY,)),
    ("sse42-torchavx2-2t", "SSE4_2", "avx2", 2, (TINY,)),
    ("avx2-torchavx512-2t", "AVX2", "avx512", 2, (TINY,)),  # recorded as skipped where the CPU lacks AVX-512
    ("smollm2-native-2t", None, None, 2, (SMOLLM2,)),
    ("smollm2-avx-2t", "AVX", None, 2, (SMOLLM2_DENSE,)),
    ("smollm2-sse42-1t", "SSE4_2", None, 1, (SMOLLM2_DENSE,)),
]


def environment(isa: str | None, capability: str | None, threads: int, log: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAXPRUNE_TOLERANCE_LOG=log, OMP_NUM_THREADS=str(threads),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  flags = [DEVICES] + ([f"--xla_cpu_max_isa={isa}"] if isa else []) + ([ONE_THREAD_XLA] if threads == 1 else [])
  env["XLA_FLAGS"] = " ".join(flags)
  env.pop("ATEN_CPU_CAPABILITY", None)
  if capability:
    env["ATEN_CPU_CAPABILITY"] = capability
  return env


def run_config(name, isa, capability, threads, test_sets, cpu_flags=()) -> dict:
  """Runs the config's test sets, one pytest process each; returns its record."""
  if capability == "avx512" and "avx512f" not in cpu_flags:
    # PyTorch takes the override without checking the CPU, and its AVX-512 kernels die of SIGILL.
    return dict(name=name, skipped="ATEN_CPU_CAPABILITY=avx512 needs AVX-512, which this CPU lacks",
                checks={}, max_ratio=None, runs=[])
  with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
    log = f.name
  env = environment(isa, capability, threads, log)
  pin = ["taskset", "-c", "0"] if threads == 1 else []
  record = dict(name=name, jax_max_isa=isa or "native", aten_cpu_capability=capability or "native",
                threads=threads, xla_flags=env["XLA_FLAGS"], runs=[])
  try:
    record["torch_capability"] = subprocess.run(
        [*pin, sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], env=env,
        capture_output=True, text=True, check=False).stdout.strip()
    for tests in test_sets:
      start = time.time()
      proc = subprocess.run([*pin, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                            env=env, capture_output=True, text=True, check=False)
      tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
      record["runs"].append(dict(tests=tests, returncode=proc.returncode, summary=" ".join(tail),
                                 seconds=round(time.time() - start, 1)))
      print(f"{name}: {' '.join(tests[:1])}... rc={proc.returncode} {' '.join(tail)}", flush=True)
    record["checks"] = worst_ratios(log)
  finally:
    os.unlink(log)
  record["max_ratio"] = max((c["ratio"] for c in record["checks"].values()), default=None)
  return record


def worst_ratios(log: str) -> dict:
  """Per check name, the logged line with the largest ratio."""
  worst = {}
  with open(log) as f:
    for line in f:
      entry = json.loads(line)
      name = entry.pop("what")
      if name not in worst or entry["ratio"] > worst[name]["ratio"]:
        worst[name] = entry
  return add_old_ratios(dict(sorted(worst.items())))


def add_old_ratios(checks: dict) -> dict:
  """For comparison only: JAX's error against the bound it had before issue 27 (4 x PyTorch's
  float32 error + 8 roundings of the largest logit), where the check logged PyTorch's error."""
  for name, entry in checks.items():
    if " jax " in name and "err_torch" in entry:
      entry["old_yardstick_ratio"] = entry["observed"] / (4 * entry["err_torch"] + 8 * 2.0**-24 * entry["exact_max"])
  return checks


def cpu_model() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  names = [l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")]
  return names[0] if names else platform.processor()


def write_json(path: str, data: dict):
  """Writes to a temporary file beside `path` and renames it, so a kill never leaves half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
  ap.add_argument("--out", default=OUT)
  ap.add_argument("--append", action="store_true", help="keep the configurations already in --out")
  args = ap.parse_args(argv)
  chosen = [c for c in CONFIGS if not args.only or c[0] in args.only]
  with open("/proc/cpuinfo") as f:
    flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
  result = dict(cpu=cpu_model(), cpu_isa=sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx"))),
                nproc=os.cpu_count(), configs=[])
  if args.append and os.path.exists(args.out):
    with open(args.out) as f:
      result["configs"] = [c for c in json.load(f)["configs"] if c["name"] not in {n for n, *_ in chosen}]
  for config in chosen:
    result["configs"].append(run_config(*config, cpu_flags=flags))
    write_json(args.out, result)  # after each configuration, so a long run keeps what it measured
  ratios = [c["max_ratio"] for c in result["configs"] if c["max_ratio"] is not None]
  result["max_ratio"] = max(ratios, default=None)
  result["all_passed"] = all(r["returncode"] == 0 for c in result["configs"] for r in c["runs"])
  write_json(args.out, result)
  print(f"worst ratio {result['max_ratio']}, all passed: {result['all_passed']} -> {args.out}")
  return 0 if result["all_passed"] else 1


if __name__ == "__main__":
  sys.exit(main())

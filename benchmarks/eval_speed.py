"""Perplexity-forward throughput: jaxprune (JAX) vs transformers (PyTorch) on the same SmolLM2 windows.

One run loads both models from the same GGUF, cuts the same WikiText-2 windows
and times, for float32 and bfloat16, the full perplexity computation (forward,
float32 log-softmax, summed NLL) over all windows:

  * jaxprune: `jaxprune.eval.perplexity`, the code behind `jaxprune eval`;
  * transformers: `model(ids).logits` -> float32 cross-entropy, under
    `torch.inference_mode`.

Warm-up (JAX compilation, oneDNN primitive creation) is timed separately and
excluded from throughput; JAX's share of it spent tracing and compiling is
read from JAX's monitoring events. Timed passes interleave the rows batch by batch,
so background load on the machine hits all rows alike; the median pass is
reported. The machine's load average is recorded: when it exceeds the core
count, other processes competed for the CPU and absolute numbers are low.

    python benchmarks/eval_speed.py [--windows 64] [--batch-size 8] [--repeats 3]
                                    [--out benchmarks/results/eval_speed.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "test.txt")


@dataclasses.dataclass
class Row:
  engine: str  # "jaxprune" | "transformers"
  dtype: str  # "float32" | "bfloat16"
  step: Callable  # windows [B,T] -> summed NLL of the batch
  warmup_s: float = 0.0
  compile_s: float = 0.0  # JAX tracing + lowering + XLA compilation within the warm-up
  batch_s: dict = dataclasses.field(default_factory=dict)  # repeat -> list of seconds per batch
  nll: float = 0.0


def jax_step(model):
  import numpy as np

  from jaxprune.eval import window_nll

  return lambda w: float(np.asarray(window_nll(model.spec, model.params, w), np.float64).sum())


def torch_step(model):
  import torch

  def step(w):
    with torch.inference_mode():
      ids = torch.as_tensor(w, dtype=torch.long)
      logits = model(ids).logits[:, :-1].float()
      return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum"))

  return step


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, from its monitoring events."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    import jax

    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **_):
    if event in self.EVENTS:
      self.seconds += duration


def environment() -> dict:
  import jax
  import torch
  import transformers

  cpu = cpu_name()
  return {
      "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
      "jax_backend": jax.default_backend(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "transformers": transformers.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_start": list(os.getloadavg()),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m", help="a .gguf file or built-in name (default smollm2-135m)")
  p.add_argument("--text", default=DEFAULT_TEXT)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--windows", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3, help="timed passes over all windows per row")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--threads", type=int, default=None,
                 help="pin the process to this many cores and give PyTorch as many threads (default: all cores). "
                 "On a shared machine, --threads 1 keeps other processes from stalling PyTorch's OpenMP barriers")
  p.add_argument("--out", default=os.path.join(HERE, "results", "eval_speed.json"))
  args = p.parse_args(argv)
  if args.threads is not None:  # before JAX and PyTorch size their thread pools
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])

  import jax.numpy as jnp
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM

  import jaxprune
  from jaxprune.data import eval_windows, read_text, tokenize
  from jaxprune.io import resolve

  if args.threads is not None:
    torch.set_num_threads(args.threads)
  env = environment()
  env["threads"] = args.threads
  env["affinity"] = sorted(os.sched_getaffinity(0))
  loc = resolve(args.model)
  if loc.kind != "gguf":
    raise SystemExit(f"--model {args.model!r} is not a GGUF file; this benchmark loads both engines from one GGUF")
  t = time.perf_counter()
  jmodel = jaxprune.load(args.model)
  jload = time.perf_counter() - t
  tokenizer = jaxprune.load_tokenizer(args.model)
  windows = eval_windows(tokenize(tokenizer, read_text(args.text)), args.seq_len, args.windows, source=args.text)
  t = time.perf_counter()
  tmodel = AutoModelForCausalLM.from_pretrained(os.path.dirname(loc.path), gguf_file=os.path.basename(loc.path),
                                                dtype=torch.float32).eval()
  tload = time.perf_counter() - t

  dtypes = args.dtypes.split(",")
  rows = []
  for dtype in dtypes:
    tm = tmodel if dtype == "float32" else AutoModelForCausalLM.from_config(
        tmodel.config, dtype=getattr(torch, dtype)).eval()
    if tm is not tmodel:
      tm.load_state_dict(tmodel.state_dict())
    jm = jmodel if dtype == "float32" else jmodel.astype(getattr(jnp, dtype))
    rows.append(Row("transformers", dtype, torch_step(tm)))
    rows.append(Row("jaxprune", dtype, jax_step(jm)))

  batches = [windows[b:b + args.batch_size] for b in range(0, len(windows), args.batch_size)]
  clock = CompileClock()
  for r in rows:  # warm-up: JAX traces and compiles; PyTorch creates its kernels
    t, c = time.perf_counter(), clock.seconds
    r.step(batches[0])
    r.warmup_s, r.compile_s = time.perf_counter() - t, clock.seconds - c
    print(f"warm-up {r.engine:12s} {r.dtype:8s} {r.warmup_s:6.2f} s", file=sys.stderr)
  # Rows take turns batch by batch (in rotating order), so a change in background load hits every row alike.
  for rep in range(args.repeats):
    for r in rows:
      r.nll, r.batch_s[rep] = 0.0, []
    for i, w in enumerate(batches):
      k = (rep * len(batches) + i) % len(rows)
      for r in rows[k:] + rows[:k]:
        t = time.perf_counter()
        r.nll += r.step(w)
        r.batch_s[rep].append(time.perf_counter() - t)
    print(f"pass {rep + 1}/{args.repeats}: " + ", ".join(
        f"{r.engine} {r.dtype} {sum(r.batch_s[rep]):.2f} s" for r in rows), file=sys.stderr)

  tokens = windows.size
  out_rows = []
  for r in rows:
    passes = [sum(v) for v in r.batch_s.values()]
    batch = statistics.median(t for v in r.batch_s.values() for t in v)
    out_rows.append({
        "engine": r.engine, "dtype": r.dtype, "tokens_per_s": tokens / statistics.median(passes),
        "best_tokens_per_s": tokens / min(passes), "pass_s": passes, "median_batch_s": batch, "warmup_s": r.warmup_s,
        "compile_s": r.compile_s if r.engine == "jaxprune" else None,
        "perplexity": float(np.exp(r.nll / (len(windows) * (args.seq_len - 1)))),
    })
  by = {(r["engine"], r["dtype"]): r for r in out_rows}
  ratios = {}
  for d in dtypes:
    ratios[f"jaxprune_{d}_over_transformers_{d}"] = (by["jaxprune", d]["tokens_per_s"]
                                                     / by["transformers", d]["tokens_per_s"])
  for d in dtypes:
    if d != "float32":
      ratios[f"jaxprune_{d}_over_transformers_float32"] = (by["jaxprune", d]["tokens_per_s"]
                                                           / by["transformers", "float32"]["tokens_per_s"])
  env["load_average_end"] = list(os.getloadavg())
  result = {
      "benchmark": "eval_speed", "model": args.model, "model_path": loc.path, "text": os.path.abspath(args.text),
      "windows": len(windows), "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens_per_pass": tokens,
      "repeats": args.repeats, "load_s": {"jaxprune": jload, "transformers": tload},
      "transformers_attn_implementation": tmodel.config._attn_implementation,
      "rows": out_rows, "ratios": ratios, "environment": env,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)

  print(f"{len(windows)} windows x {args.seq_len} tokens, batch {args.batch_size}, median of {args.repeats} passes "
        f"on cores {env['affinity']} (load average {env['load_average_start'][0]:.1f} -> "
        f"{env['load_average_end'][0]:.1f}; {env['cores']} cores in the machine)")
  print(f"{'engine':13s}{'dtype':10s}{'tokens/s':>10s}{'best':>10s}{'warm-up s':>11s}{'compile s':>11s}{'ppl':>9s}")
  for r in out_rows:
    comp = f"{r['compile_s']:.2f}" if r["compile_s"] is not None else "-"
    print(f"{r['engine']:13s}{r['dtype']:10s}{r['tokens_per_s']:10.1f}{r['best_tokens_per_s']:10.1f}"
          f"{r['warmup_s']:11.2f}{comp:>11s}{r['perplexity']:9.3f}")
  for k, v in ratios.items():
    print(f"{k}: {v:.2f}x")
  print(f"load: jaxprune {jload:.2f} s, transformers {tload:.2f} s; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Forward throughput of dense vs pruned SmolLM2-135M, in JAX and in PyTorch after export.

One run measures everything and writes JSON (default benchmarks/results/pruned_speed.json):
for the dense model and each sparsity, tokens/s of a full forward pass (logits
included) in JAX (`jaxprune.logits`) and in PyTorch (the exported directory
loaded by `jaxprune.pytorch.load_pruned`, which is stock transformers for plain
configs), the speedups over dense, parameter counts and the logit difference
between the two frameworks on the timed batch.

    python benchmarks/pruned_speed.py [--sparsities 0.2 0.5] [--layout uniform|per_layer] [--threads 1]

Both frameworks run with the same number of CPU threads (default 1): on a
shared machine, PyTorch's OpenMP threads stall each other when a core is taken
by another process (2 threads measured 6x slower than 1 on a busy 2-core
machine), which would compare scheduling, not models. `--threads 0` keeps each
framework's default.

The pruned models come from `make_pruned`, a deterministic weight-magnitude
rule on top of `jaxprune.surgery`; swap it for the real pipeline to time
models pruned for quality (only the sizes matter for speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

import jaxprune
from jaxprune.io.export import save_hf
from jaxprune.model import Model
from jaxprune.spec import block_param_count
from jaxprune.surgery import prune_model

HERE = os.path.dirname(os.path.abspath(__file__))


def make_pruned(model: Model, sparsity: float, layout: str = "uniform") -> Model:
  """Removes about `sparsity` of every block's attention+MLP parameters by weight magnitude.

  Heads are ranked within their KV group by the norm of their W_O rows and the
  same number is kept in every group (a plain GQA config); MLP channels are
  ranked by ||up column|| * ||down row||, and their count fills the rest of
  the budget (a multiple of 8). `layout="per_layer"` ramps the sparsity from
  half to 1.5x the target over depth (same mean), so layer sizes differ.
  """
  if sparsity == 0:
    return model
  spec, L = model.spec, model.spec.num_layers
  heads, channels = {}, {}
  for i, (layer, blk) in enumerate(zip(spec.layers, model.params["layers"])):
    s = sparsity if layout == "uniform" else sparsity * (0.5 + i / max(L - 1, 1))
    s = min(max(s, 0.0), 0.95)
    D, N, K, H, F = spec.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.ffn_dim
    G = N // K
    g = max(1, int(G * (1 - s) + 0.5))
    per_channel = D * (3 if spec.fam.gated_mlp else 2)
    budget = (1 - s) * block_param_count(blk) - D * H * 2 * (g * K + K)
    f = int(min(F, max(8, budget / per_channel)) // 8 * 8)
    o = np.asarray(blk["attn"]["o"]["kernel"], np.float32)
    score = np.linalg.norm(o.reshape(N, -1), axis=1).reshape(K, G)
    heads[i] = np.sort((np.argsort(-score, axis=1)[:, :g] + np.arange(K)[:, None] * G).ravel())
    up = np.linalg.norm(np.asarray(blk["mlp"]["up"]["kernel"], np.float32), axis=0)
    down = np.linalg.norm(np.asarray(blk["mlp"]["down"]["kernel"], np.float32), axis=1)
    channels[i] = np.sort(np.argsort(-(up * down))[:f])
  return prune_model(model, heads=heads, channels=channels)


def _seconds(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


class Candidate:
  """One model in both frameworks: the JAX forward and the exported model's PyTorch forward."""

  def __init__(self, name: str, sparsity: float, model: Model, tokens: np.ndarray, workdir: str):
    import torch

    from jaxprune.pytorch import count_parameters, load_pruned

    self.name, self.sparsity, self.model, self.tokens = name, sparsity, model, tokens
    info = save_hf(model, os.path.join(workdir, name), dtype="float32", tokenizer=False)
    self.torch_model = load_pruned(info.path, dtype=torch.float32)
    self.ids = torch.as_tensor(tokens, dtype=torch.long)
    self.info = {
        "params": model.num_params,
        "block_params": sum(block_param_count(b) for b in model.params["layers"]),
        "torch_params": count_parameters(self.torch_model),
        "torch_loader": self.torch_model.jaxprune_loader,
        "hf_config": "per_layer" if info.per_layer else "plain",
    }

  def jax(self):
    return jaxprune.logits(self.model.spec, self.model.params, self.tokens).block_until_ready()

  def torch(self):
    import torch
    with torch.inference_mode():
      return self.torch_model(self.ids).logits


def measure(candidates: list[Candidate], repeats: int) -> list[dict]:
  """Median seconds per forward of every candidate in both frameworks.

  The calls are interleaved round by round, so that a change in the machine's
  load during the run affects every candidate alike and the ratios stay fair.
  """
  for c in candidates:  # warm up: compile (JAX), allocate, and check the two frameworks agree
    jax_logits = np.asarray(c.jax())
    c.info["max_abs_logit_diff"] = float(np.max(np.abs(c.torch().float().numpy() - jax_logits)))
    c.info["max_abs_logit"] = float(np.max(np.abs(jax_logits)))
  times = {(c.name, fw): [] for c in candidates for fw in ("jax", "torch")}
  for _ in range(repeats):
    for c in candidates:
      times[c.name, "jax"].append(_seconds(c.jax))
      times[c.name, "torch"].append(_seconds(c.torch))
  rows = []
  for c in candidates:
    jax_s, torch_s = (statistics.median(times[c.name, fw]) for fw in ("jax", "torch"))
    rows.append({"name": c.name, "sparsity": c.sparsity, **c.info, "jax_seconds": jax_s, "torch_seconds": torch_s,
                 "jax_tokens_per_s": c.tokens.size / jax_s, "torch_tokens_per_s": c.tokens.size / torch_s})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
  p.add_argument("--layout", choices=("uniform", "per_layer"), default="uniform")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=1, help="CPU threads for both frameworks (0: their defaults)")
  p.add_argument("--out", default=os.path.join(HERE, "results", "pruned_speed.json"))
  args = p.parse_args(argv)
  if args.threads == 1:  # read when the JAX backend starts, which is below
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  elif args.threads > 1:
    print("note: JAX on CPU has no exact thread count; only PyTorch is pinned", file=sys.stderr)

  import torch
  if args.threads > 0:
    torch.set_num_threads(args.threads)

  dense = jaxprune.load(args.model)
  tokens = np.random.default_rng(0).integers(0, dense.spec.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  with tempfile.TemporaryDirectory() as work:
    candidates = [Candidate("dense" if sp == 0 else f"pruned-{round(sp * 100)}%", sp,
                            make_pruned(dense, sp, args.layout), tokens, work) for sp in [0.0, *args.sparsities]]
    rows = measure(candidates, args.repeats)
  for r in rows:
    print(f"{r['name']}: JAX {r['jax_tokens_per_s']:.0f} tok/s, PyTorch {r['torch_tokens_per_s']:.0f} tok/s",
          file=sys.stderr)
  base = rows[0]
  for r in rows:
    r["param_ratio"] = r["params"] / base["params"]
    r["block_param_ratio"] = r["block_params"] / base["block_params"]
    r["jax_speedup"] = r["jax_tokens_per_s"] / base["jax_tokens_per_s"]
    r["torch_speedup"] = r["torch_tokens_per_s"] / base["torch_tokens_per_s"]
    r["torch_over_jax"] = r["torch_tokens_per_s"] / r["jax_tokens_per_s"]
  result = {
      "benchmark": "pruned_speed",
      "model": args.model,
      "layout": args.layout,
      "pruning": "make_pruned (weight magnitude, jaxprune.surgery)",
      "batch": args.batch,
      "seq_len": args.seq_len,
      "repeats": args.repeats,
      "statistic": "median seconds per forward (logits included) over interleaved rounds, after one warm-up call",
      "dtype": "float32",
      "jax": {"version": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
              "xla_flags": os.environ.get("XLA_FLAGS", "")},
      "threads": args.threads or "default",
      "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
      "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"| model | params | block params | JAX tok/s | speedup | PyTorch tok/s | speedup | max |Δlogit| |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['params'] / 1e6:.1f}M ({r['param_ratio']:.2f}) | {r['block_param_ratio']:.2f} | "
          f"{r['jax_tokens_per_s']:.0f} | {r['jax_speedup']:.2f}x | {r['torch_tokens_per_s']:.0f} | "
          f"{r['torch_speedup']:.2f}x | {r['max_abs_logit_diff']:.1e} |")
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

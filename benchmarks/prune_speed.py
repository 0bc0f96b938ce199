"""Pruning time of SmolLM2-135M per method, as a multiple of one forward pass over the calibration tokens.

Pruning cost is dominated by matrix multiplies over the calibration tokens, so
the unit is one forward pass of the model over those same tokens: the jitted
perplexity forward of `jaxprune eval` (embedding, blocks, LM head, log-softmax)
over the 128 calibration windows of 128 tokens, timed after a warm-up call.

One run measures, on the same machine and in one sitting:

* the forward time, before the first and after every pruning run (the ratio
  of a method uses the mean of the forwards just before and after it, so a
  change of the machine's load during the run moves both);
* for each method, a child process that loads the model and prunes (20%,
  128 x 128 tokens from WikiText-2 valid, seed 0): its wall time (compiles
  included), the pipeline report's per-phase split and pass counts, the number
  of XLA compiles, and the child's peak RSS (`ru_maxrss`, so each method's
  memory is its own);
* the modelled FLOPs of each method's run, counted from the model's shapes and
  the passes the engine runs for that configuration (`jaxprune.stats.needs`),
  against the modelled FLOPs of the forward.

    python benchmarks/prune_speed.py                     # -> results/prune_speed.json
    python benchmarks/prune_speed.py --only flap --calib-samples 16 --out /tmp/ps.json   # quick

The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
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
MODEL = "smollm2-135m"
SEQ_LEN = 128

# name -> (preset, options over it). Baselines run as their tools define them.
METHODS = {
    "flap": ("baseline", dict(method="flap")),
    "wanda-sp": ("baseline", dict(method="wanda-sp")),
    "goa --no-reconstruct": ("paper", dict(reconstruct=False)),
    "flap --allocation adaptive": ("baseline", dict(method="flap", allocation="adaptive")),
    "recommended": ("recommended", {}),
    "recommended-uniform": ("recommended-uniform", {}),
}


# ---------------------------------------------------------------------------
# The FLOP model: 2mnk per matmul; elementwise work is not counted.


def attn_flops(n, T, D, N, K, H, part="full"):
  """QKV projection, scores and values over the full T x T block, and (full) the output projection."""
  f = 2 * n * D * (N + 2 * K) * H + 2 * (2 * n * N * T * H)
  return f + (2 * n * N * H * D if part == "full" else 0)


def mlp_flops(n, D, F, gated=True, part="full"):
  f = 2 * n * D * F * (2 if gated else 1)
  return f + (2 * n * F * D if part == "full" else 0)


def gram(n, d, e=0):
  """[X 1]^T [X 1] (and [X 1]^T Y with e columns) over n tokens; wide Gram matrices are
  formed from their upper blocks (`moments.gram`)."""
  from jaxprune.stats import moments

  g = 2 * n * (d + 1) ** 2
  if d + 1 >= moments.SYMMETRIC_MIN:
    nb = moments.SYMMETRIC_BLOCKS
    g = g * (nb + 1) / (2 * nb)
  return g + 2 * n * (d + 1) * e


def obs_blocks(U2, width, block=None):
  """Channels of each block of the goa-obs sweep (default: the loop's OBS_BLOCK; [U2] where it is exact)."""
  from jaxprune.criteria.output_approx import OBS_BLOCK, _blocks

  block = OBS_BLOCK if block is None else block
  return [U2] if U2 <= block else [len(b) * width for b in _blocks(U2 // width, width, block)]


def obs_sweep(U2, D, width, n_remove, block=None):
  """The goa-obs sweep: the inverse of the (U2+1)^2 system, W = G^-1 X^T Y, and the rank-k
  updates of G^-1 and W until n_remove units are gone (k channels a step); a wide module's
  blocks each stop one step past their share of them (`output_approx._first_depth`; a block
  swept again is not modelled)."""
  from jaxprune.criteria.output_approx import _first_depth

  blocks = obs_blocks(U2, width, block)
  if len(blocks) == 1:
    return _obs_sweep(U2, D, width, min(n_remove, U2 // width - 1))
  n = U2 // width
  return sum(_obs_sweep(b, D, width, min(n_remove, b // width - 1, _first_depth(b // width, n, n_remove)))
             for b in blocks)


def _obs_sweep(U2, D, width, n_remove):
  from jaxprune.criteria.obs_sweep import MAX_STEPS

  d = U2 + 1
  units = U2 // width
  per_step = -(-units // MAX_STEPS)
  steps = -(-n_remove // per_step)
  k = per_step * width
  return d ** 3 + 2 * d * d * D + steps * (2 * d * d * k + 2 * d * D * k)


def forward_flops(spec, n, T) -> float:
  D = spec.hidden_size
  f = 2 * n * D * spec.vocab_size  # LM head
  for l in spec.layers:
    f += attn_flops(n, T, D, l.num_heads, l.num_kv_heads, l.head_dim) + mlp_flops(n, D, l.ffn_dim, spec.fam.gated_mlp)
  return f


def prune_flops(spec, config, crit_needs, report, n, T) -> dict:
  """FLOPs of the passes the engine ran for `config` (from its needs and the report's scored modules)."""
  from jaxprune.models import adapter as A
  from jaxprune.stats import needs as needs_lib

  D, gated = spec.hidden_size, spec.fam.gated_mlp
  out = {"dense_stream": 0.0, "statistics": 0.0, "advance": 0.0, "solves_f64": 0.0, "scoring_f64": 0.0}
  with_dense = any(needs_lib.module_needs(config, crit_needs, k, True, False).dense for k in (A.ATTN, A.MLP))
  for m in report["modules"]:
    kind = A.KINDS[m["module"]]
    l = spec.layers[m["layer"]]
    nd = needs_lib.module_needs(config, crit_needs, kind, m["scored"], kind is A.ATTN and config.heads == "similarity")
    if kind is A.ATTN:
      N, K, H = l.num_heads, l.num_kv_heads, l.head_dim
      full, inner, U1, U2 = attn_flops(n, T, D, N, K, H), attn_flops(n, T, D, N, K, H, "inner"), (N + 2 * K) * H, N * H
    else:
      F = l.ffn_dim
      full, inner, U1, U2 = mlp_flops(n, D, F, gated), mlp_flops(n, D, F, gated, "inner"), (2 if gated else 1) * F, F
    if m.get("unchanged"):  # keeps everything on the dense input: the plan's stored output, or a forward
      out["advance"] += 0 if m.get("from_store") else full
      continue
    if with_dense:
      out["dense_stream"] += full + (full if nd.inherited_error else 0)
      out["statistics"] += (gram(n, D, D) + gram(n, D)) if nd.first_moments else 0
    streams = [nd.calib] + ([nd.score] if nd.score is not None else [])
    for st in streams:
      out["advance"] += inner + 2 * n * U2 * D  # X2, then the full-width second level
      if st.hidden == "gram":
        out["statistics"] += gram(n, U2, D if st.cross else 0)
      if st.inputs:
        out["statistics"] += gram(n, D)
    for lvl, (d, e) in (("first_level", (D, U1)), ("second_level", (U2, D)), ("refit", (m["units_after"] *
                                                                                          (U2 // m["units_before"]), D))):
      if lvl in m:
        out["solves_f64"] += d ** 3 / 3 + 2 * d * d * e + 2 * (2 * d * d * e)  # Cholesky, solves, two residuals
    if m["scored"] and "hidden_cross" in (crit_needs or ()):
      width = U2 // m["units_before"]
      n_remove = m["units_before"] - m["units_after"] if kind is A.MLP else m["units_before"] - 1
      out["scoring_f64"] += obs_sweep(U2, D, width, n_remove)
  # Modules whose dense outputs the plan stored are read, not recomputed.
  read, ran = report["passes"].get("dense_read", 0), report["passes"].get("dense_pass", 0)
  if read + ran:
    out["dense_stream"] *= ran / (read + ran)
  if config.allocation == "adaptive":
    # The plan scores the dense model first: one pass per module up to X2, the statistics
    # its criterion reads (for goa-obs: X2's Gram, or an MLP's diagonal blocks of it, the
    # cross moment from it, the sweep up to min_keep), and the second level.
    from jaxprune.criteria.output_approx import PLAN_BLOCK

    out["plan"] = 0.0
    st_attn, st_mlp = (needs_lib.criterion_stats(crit_needs, k) for k in (A.ATTN, A.MLP))
    for l in spec.layers:
      N, K, H, F = l.num_heads, l.num_kv_heads, l.head_dim, l.ffn_dim
      out["plan"] += attn_flops(n, T, D, N, K, H) + mlp_flops(n, D, F, gated)
      for st, U2, width, n_remove in ((st_attn, N * H, H, N - 1),
                                      (st_mlp, F, 1, F - max(1, math.ceil(config.min_keep * F)))):
        from_stream = width == 1 and "hidden_cross" in (crit_needs or ())
        if st.hidden == "gram" and from_stream:
          # goa-obs plans an MLP from X2 itself: the diagonal blocks of its Gram matrix.
          out["plan"] += sum(gram(n, b) + 2 * (b + 1) ** 2 * D for b in obs_blocks(U2, width, PLAN_BLOCK))
        elif st.hidden == "gram":
          out["plan"] += gram(n, U2) + (2 * (U2 + 1) ** 2 * D if st.cross else 0)
        if "hidden_cross" in (crit_needs or ()):
          out["plan"] += obs_sweep(U2, D, width, n_remove, PLAN_BLOCK if from_stream else None)
  out["total"] = sum(out.values())
  return out


# ---------------------------------------------------------------------------


def maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def calibration(samples: int):
  import jaxprune
  from jaxprune.data import read_text, sample_windows, tokenize

  tok = jaxprune.load_tokenizer(MODEL)
  w, _ = sample_windows(tokenize(tok, read_text(DATA)), SEQ_LEN, samples, seed=0, source=DATA)
  return w


def child(name: str, samples: int, out_path: str) -> int:
  """Loads the model and prunes it with METHODS[name]; writes the timings to out_path."""
  import jaxprune
  from jaxprune import criteria
  from jaxprune.prune import PruneConfig, prune

  model = jaxprune.load(MODEL)
  calib = calibration(samples)
  preset, kw = METHODS[name]
  config = PruneConfig.preset(preset, sparsity=0.2, **kw)
  rss_before = maxrss_bytes()
  t = time.perf_counter()
  res = prune(model, calib, config)
  wall = time.perf_counter() - t
  rep = res.report
  flops = prune_flops(model.spec, config, criteria.get(config.method).needs, rep, samples * SEQ_LEN, SEQ_LEN)
  row = {"method": name, "preset": preset, "options": kw, "wall_seconds": wall, "report_seconds": rep["seconds"],
         "passes": rep["passes"], "streams": rep["streams"], "params_after": res.model.num_params,
         "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_before, "modelled_flops": flops}
  with open(out_path, "w") as f:
    json.dump(row, f)
  return 0


def forward_seconds(model, windows, repeats: int = 2, warm_up: bool = True) -> float:
  """Best of `repeats` timed perplexity forwards over `windows` (after one warm-up call if asked)."""
  from jaxprune.eval import perplexity

  if warm_up:
    perplexity(model.spec, model.params, windows, batch_size=16)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    perplexity(model.spec, model.params, windows, batch_size=16)
    best = min(best, time.perf_counter() - t)
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", nargs="*", default=list(METHODS), choices=list(METHODS))
  p.add_argument("--calib-samples", type=int, default=128)
  p.add_argument("--out", default=os.path.join(HERE, "results", "prune_speed.json"))
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--child-out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return child(args.child, args.calib_samples, args.child_out)

  import jax

  import jaxprune

  model = jaxprune.load(MODEL)
  windows = calibration(args.calib_samples)
  n = args.calib_samples * SEQ_LEN
  fwd_flops = forward_flops(model.spec, n, SEQ_LEN)
  env = {"cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
         "load_average_start": list(os.getloadavg())}
  print(f"forward over {args.calib_samples} x {SEQ_LEN} tokens ...", file=sys.stderr)
  forwards = [forward_seconds(model, windows)]
  rows = []
  for name in args.only:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      tmp = f.name
    print(f"pruning with {name} ...", file=sys.stderr)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--child-out", tmp,
                    "--calib-samples", str(args.calib_samples)], check=True)
    with open(tmp) as f:
      row = json.load(f)
    os.remove(tmp)
    forwards.append(forward_seconds(model, windows, warm_up=False))  # compiled by the first measurement
    fwd = (forwards[-2] + forwards[-1]) / 2
    row.update(forward_seconds=fwd, ratio_to_forward=row["wall_seconds"] / fwd,
               modelled_ratio_to_forward=row["modelled_flops"]["total"] / fwd_flops,
               compiles=row["passes"].get("compiles"))
    print(f"  {row['wall_seconds']:.1f}s = {row['ratio_to_forward']:.2f}x forward ({fwd:.1f}s); modelled "
          f"{row['modelled_ratio_to_forward']:.2f}x; peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    rows.append(row)
  env["load_average_end"] = list(os.getloadavg())
  out = {"benchmark": "prune_speed", "model": MODEL, "sparsity": 0.2, "calib_windows": args.calib_samples,
         "seq_len": SEQ_LEN, "environment": env, "forward_seconds_each": forwards, "forward_flops": fwd_flops,
         "forward_what": "jaxprune.eval.perplexity over the calibration windows (batch 16), jitted, after warm-up",
         "methods": rows}
  from jaxprune.io.atomic import write_json
  write_json(args.out, out, force=True)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

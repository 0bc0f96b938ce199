"""Wall time and peak memory of pruning SmolLM2-135M, against the work's ideal time on this machine.

One run (default: 20% sparsity, reconstruction on, 128 calibration windows of
128 tokens sampled from WikiText-2 valid) measures:

* this machine's float32 matmul rate, in the same process: best of a few jitted
  `jnp.dot` calls on the pipeline's shapes ([16384,576]x[576,1536],
  [16384,1536]x[1536,576], and a Gram [1537,2048]x[2048,1537]), plus a float64
  rate for the least-squares solves, which run in float64 on CPU;
* the floating-point operations the pipeline performs, counted analytically from
  the model's shapes and the config, pass by pass as `jaxprune.kernels` runs
  them (first_pass: the module twice, dense and pruned input, plus the input
  Gram and cross moment; second_pass: the inner part once plus the X2 Gram and
  cross moment; final_pass: the pruned module once; the targets X^T Y1; the
  Cholesky factorisations d^3/3 and solves; the residuals; the scores). Matmul
  and attention einsums (the T^2 score and value terms included) count 2mnk;
  elementwise work (norms, softmax, activations) is not counted and is reported
  apart as an estimate of transcendental evaluations;
* ideal seconds = FLOPs / matmul rate, the measured wall seconds of
  `jaxprune.pipeline.prune` and the ratio wall / ideal, overall and per phase.
  Phases are timed by wrapping the pipeline's kernels (first_pass, second_pass,
  final_pass, the solves, the residuals, the targets, the embedding) with a
  `block_until_ready`; the pipeline already waits for each kernel's result
  (it reads its error sums), so the wrapping adds no synchronisation of note;
* compile time, from JAX's monitoring events (seconds spent tracing, lowering
  and compiling), and with `--runs 2` the wall time of a second identical
  run in the same process, where every kernel is already compiled;
* peak memory: the process's ru_maxrss (high-water mark) at each stage, and the
  sizes of the activation streams, per-chunk intermediates and statistics
  computed from the shapes;
* a cross-check of the FLOP model against XLA's own cost analysis of the
  three kernels compiled for one chunk (`--no-xla-check` skips it).

    python benchmarks/prune_speed.py                       # full: 128 windows -> results/prune_speed.json
    python benchmarks/prune_speed.py --quick --out /tmp/prune_speed_quick.json   # 16 windows, smoke test

The JSON is written atomically (a temporary file, then os.replace). Record the
load average: on a shared machine the matmul rate and the pipeline share the
cores with other jobs, so absolute seconds move with the load; the ratio
wall/ideal is steadier because both are measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..")))
DATA_DIR = os.environ.get("JAXPRUNE_DATA", os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2"))
MiB = 2**20


# ---------------------------------------------------------------------------
# Memory


def maxrss_bytes() -> int:
  """The process's peak resident set size so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# ---------------------------------------------------------------------------
# The machine's matmul rate


def matmul_rate(repeats: int = 5) -> dict:
  """Best-of-`repeats` seconds of jitted float32 (and float64) matmuls on the pipeline's shapes."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  def best(fn, *args):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    return min(times)

  rng = np.random.default_rng(0)
  dot = jax.jit(jnp.dot)
  gram = jax.jit(lambda x: jnp.einsum("ti,tj->ij", x, x))
  rows, total_flops, total_s = [], 0.0, 0.0
  for name, fn, shapes, flops in (
      ("[16384,576]x[576,1536]", dot, ((16384, 576), (576, 1536)), 2 * 16384 * 576 * 1536),
      ("[16384,1536]x[1536,576]", dot, ((16384, 1536), (1536, 576)), 2 * 16384 * 1536 * 576),
      ("gram [2048,1537]^T[2048,1537]", gram, ((2048, 1537),), 2 * 2048 * 1537 * 1537),
  ):
    args = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    s = best(fn, *args)
    rows.append({"shape": name, "flops": flops, "best_seconds": s, "gflops_per_s": flops / s / 1e9})
    total_flops += flops
    total_s += s
  with jax.enable_x64(True):
    a = jnp.asarray(rng.standard_normal((1536, 1536)))
    b = jnp.asarray(rng.standard_normal((1536, 576)))
    f64_flops = 2 * 1536 * 1536 * 576
    f64_s = best(jax.jit(jnp.dot), a, b)
  return {
      "float32_gflops_per_s": total_flops / total_s / 1e9,
      "float32_shapes": rows,
      "float64_gflops_per_s": f64_flops / f64_s / 1e9,
      "float64_shape": "[1536,1536]x[1536,576]",
      "repeats": repeats,
      "statistic": "sum of FLOPs over sum of best-of-repeats seconds (float32); best of repeats (float64)",
  }


# ---------------------------------------------------------------------------
# The FLOP model


@dataclasses.dataclass
class Count:
  """Floating-point operations of one piece of work, by where they run."""

  f32: float = 0.0  # matmuls / einsums in float32 (2mnk each)
  f64: float = 0.0  # solves and residuals (float64 on CPU and GPU)
  transcendental: float = 0.0  # exp / sigmoid evaluations (not in the FLOPs)

  def __add__(self, o: "Count") -> "Count":
    return Count(self.f32 + o.f32, self.f64 + o.f64, self.transcendental + o.transcendental)

  def __mul__(self, k: float) -> "Count":
    return Count(self.f32 * k, self.f64 * k, self.transcendental * k)

  @property
  def flops(self) -> float:
    return self.f32 + self.f64

  def as_dict(self) -> dict:
    return {"flops": self.flops, "float32_flops": self.f32, "float64_flops": self.f64,
            "transcendentals": self.transcendental}


def attn_apply(n, T, D, N, K, H, inner_only=False) -> Count:
  """Self-attention on n tokens in windows of T: fused QKV projection, scores, values (, W_O).

  The score and value einsums run over the full T x T block (the causal mask is
  applied to the scores), 2*T*H FLOPs per query head and token each.
  """
  f = 2 * n * D * (N + 2 * K) * H + 2 * (2 * n * N * T * H)
  if not inner_only:
    f += 2 * n * N * H * D
  return Count(f32=f, transcendental=n * N * T)


def mlp_apply(n, D, F, gated=True, inner_only=False) -> Count:
  f = 2 * n * D * F * (2 if gated else 1)
  if not inner_only:
    f += 2 * n * F * D
  return Count(f32=f, transcendental=n * F)


def moments_update(n, d, e=None) -> Count:
  """Augmented Gram [X 1]^T [X 1] (and [X 1]^T Y) of n tokens."""
  f = 2 * n * (d + 1)**2
  if e is not None:
    f += 2 * n * (d + 1) * e
  return Count(f32=f)


def solve(d, e) -> Count:
  """Cholesky of a d x d system (d^3/3) and two triangular solves with e right-hand sides."""
  return Count(f64=d**3 / 3 + 2 * d * d * e)


def residual(d, e) -> Count:
  """||XW - Y||^2 from sums: G @ W, then elementwise."""
  return Count(f64=2 * d * d * e)


def module_flops(kind: str, n: int, T: int, D: int, dense, pruned, gated: bool, reconstruct: bool) -> dict:
  """Counts of one module's phases; `dense`/`pruned` are LayerSpecs before/after this module is pruned."""
  if kind == "attn":
    N, K, H = dense.num_heads, dense.num_kv_heads, dense.head_dim
    full = attn_apply(n, T, D, N, K, H)
    inner = attn_apply(n, T, D, N, K, H, inner_only=True)
    after = attn_apply(n, T, D, pruned.num_heads, pruned.num_kv_heads, pruned.head_dim)
    U1, U2 = (N + 2 * K) * H, N * H
    score = Count()  # per-head sums of ||W_O rows||^2 * E[v^2]: negligible
  else:
    F = dense.ffn_dim
    full = mlp_apply(n, D, F, gated)
    inner = mlp_apply(n, D, F, gated, inner_only=True)
    after = mlp_apply(n, D, pruned.ffn_dim, gated)
    U1, U2 = (2 if gated else 1) * F, F
    # second_moment: S_aug @ a for up (and gate), then a column-wise dot.
    score = Count(f32=(2 if gated else 1) * (2 * (D + 1)**2 * F + 2 * (D + 1) * F))
  phases = {
      "first_pass": full * 2 + moments_update(n, D, D) + moments_update(n, D),
      "second_pass": inner + moments_update(n, U2, D),
      "final_pass": after,
      "score": score,
  }
  if reconstruct:
    phases["targets"] = Count(f32=2 * (2 * (D + 1)**2 * U1))  # (X^T X_dense) W1 and X_dense^T X_dense W1
    phases["solves"] = solve(D, U1) + solve(U2, D)
    phases["residuals"] = (residual(D, U1) + residual(U2, D)) * 2  # before and after, each level
  return phases


def pipeline_flops(spec, pruned_layers, n: int, T: int, reconstruct: bool, start: int, stop: int) -> dict:
  """Counts per phase and per module of a prune() run (uniform allocation, no auto damping)."""
  by_phase: dict[str, Count] = {"embedding": Count()}  # a gather: no FLOPs
  modules = []
  D, gated = spec.hidden_size, spec.fam.gated_mlp
  for i in range(start, stop):
    dense, final = spec.layers[i], pruned_layers[i]
    after_attn = dataclasses.replace(dense, num_heads=final.num_heads, num_kv_heads=final.num_kv_heads,
                                     head_dim=final.head_dim, kv_map=None)
    # The MLP is pruned after the attention module, so its passes see the attention-pruned layer.
    for kind, before, after in (("attn", dense, after_attn), ("mlp", after_attn, final)):
      phases = module_flops(kind, n, T, D, before, after, gated, reconstruct)
      total = sum(phases.values(), Count())
      modules.append({"layer": i, "module": kind, **total.as_dict()})
      for k, c in phases.items():
        by_phase[k] = by_phase.get(k, Count()) + c
  total = sum(by_phase.values(), Count())
  return {"total": total, "by_phase": by_phase, "modules": modules}


def memory_model(spec, n: int, B: int, T: int, num_params: int) -> dict:
  """Bytes of the activation streams, per-chunk intermediates and statistics (float32), from shapes."""
  D = spec.hidden_size
  N = max(l.num_heads for l in spec.layers)
  K = max(l.num_kv_heads for l in spec.layers)
  H = max(l.head_dim for l in spec.layers)
  F = max(l.ffn_dim for l in spec.layers)
  stream = n * D * 4
  stats_attn = ((D + 1)**2 * 2 + (D + 1) * D + (N * H + 1)**2 + (N * H + 1) * D) * 4
  stats_mlp = ((D + 1)**2 * 2 + (D + 1) * D + (F + 1)**2 + (F + 1) * D) * 4
  # The float64 copies a solve makes: the system, the right-hand side, the factor and the solution.
  solve64 = max((D + 1)**2 * 2 + (D + 1) * (2 * F) * 2, (F + 1)**2 * 2 + (F + 1) * D * 2) * 8
  return {
      "stream_bytes": stream,
      "streams_alive_at_peak": 5,
      "streams_peak_bytes": 5 * stream,
      "streams_note": "dense stream, pruned stream, dense module outputs and the two next streams, around "
                      "one module's final_pass",
      "chunk_attention_probs_bytes": B * N * T * T * 4 * 2,  # scores and probabilities
      "chunk_qkv_bytes": B * T * (N + 2 * K) * H * 4,
      "chunk_mlp_bytes": 3 * B * T * F * 4,  # gate, up, hidden
      "statistics_attn_bytes": stats_attn,
      "statistics_mlp_bytes": stats_mlp,
      "solve_float64_bytes": solve64,
      "params_float32_bytes": num_params * 4,
  }


# ---------------------------------------------------------------------------
# Timing the pipeline's phases


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, from its monitoring events."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    import jax

    self.seconds = 0.0
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **_):
    if event in self.EVENTS:
      self.seconds += duration
      if event == "/jax/core/compile/backend_compile_duration":
        self.count += 1


@contextlib.contextmanager
def phase_timer(seconds: dict):
  """Wraps the pipeline's kernels so each call adds its (blocked-on) wall time to seconds[phase]."""
  import jax

  from jaxprune import kernels, pipeline, reconstruct

  targets = [(kernels, "first_pass", "first_pass"), (kernels, "second_pass", "second_pass"),
             (kernels, "final_pass", "final_pass"), (kernels, "add", "final_pass"),
             (reconstruct, "ridge_solve", "solves"), (reconstruct, "residual", "residuals"),
             (pipeline, "_first_level_targets", "targets"), (pipeline, "_embed_stream", "embedding")]
  saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]

  def wrap(fn, phase):
    def timed(*args, **kwargs):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t
      return out
    return timed

  try:
    for (mod, name, phase), (_, _, fn) in zip(targets, saved):
      setattr(mod, name, wrap(fn, phase))
    yield seconds
  finally:
    for mod, name, fn in saved:
      setattr(mod, name, fn)


def xla_check(model, config, B: int, T: int, spec) -> list[dict]:
  """XLA's cost analysis of the three kernels on one chunk of layer 0, against the FLOP model."""
  import jax
  import jax.numpy as jnp

  from jaxprune import kernels
  from jaxprune.models import adapter as A
  from jaxprune.models import layers as L

  D = spec.hidden_size
  cfg = L.block_config(spec, 0)
  blk = model.params["layers"][0]
  x = jax.ShapeDtypeStruct((1, B, T, D), jnp.float32)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  layer = spec.layers[0]
  out = []
  for kind, key in ((A.ATTN, "attn"), (A.MLP, "mlp")):
    norm_p, p = blk[kind.norm_key], blk[kind.key]
    phases = module_flops(key, B * T, T, D, layer, layer, spec.fam.gated_mlp, config.reconstruct)
    for name, lowered in (
        ("first_pass", lambda: kernels.first_pass.lower(kind, cfg, norm_p, p, x, x, pos)),
        ("second_pass", lambda: kernels.second_pass.lower(kind, cfg, norm_p, p, x, x, pos, False)),
        ("final_pass", lambda: kernels.final_pass.lower(kind, cfg, norm_p, p, x, x, pos)),
    ):
      cost = lowered().compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      xla = float(cost.get("flops", float("nan")))
      model_f = phases[name].f32
      out.append({"module": key, "kernel": name, "tokens": B * T, "model_flops": model_f, "xla_flops": xla,
                  "xla_over_model": xla / model_f, "xla_transcendentals": float(cost.get("transcendentals", 0.0))})
  return out


# ---------------------------------------------------------------------------


def environment() -> dict:
  import jax

  cpu = cpu_name()
  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
          "load_average_start": list(os.getloadavg())}


def write_json(path: str, obj) -> None:
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".prune_speed.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--calib", default=os.path.join(DATA_DIR, "valid.txt"), help="calibration text (WikiText-2 valid)")
  p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128; 16 with --quick)")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--sparsity", type=float, default=0.2)
  p.add_argument("--batch-size", type=int, default=16, help="windows per chunk of the pipeline's scans")
  p.add_argument("--runs", type=int, default=None,
                 help="identical prune runs in this process (default 1; 2 with --quick). The second runs with "
                 "every kernel compiled")
  p.add_argument("--repeats", type=int, default=5, help="repeats of each matmul when measuring the rate")
  p.add_argument("--quick", action="store_true", help="smoke test: 16 windows and 2 runs")
  p.add_argument("--no-xla-check", dest="xla_check", action="store_false",
                 help="skip comparing the FLOP model with XLA's cost analysis")
  p.add_argument("--blas-threads", type=int, default=None,
                 help="set OPENBLAS_NUM_THREADS before numpy/scipy load (the LAPACK behind JAX's CPU Cholesky and "
                 "triangular solves). Default: leave the environment as it is")
  p.add_argument("--out", default=os.path.join(HERE, "results", "prune_speed.json"))
  args = p.parse_args(argv)
  if args.blas_threads is not None:
    if "numpy" in sys.modules:
      raise SystemExit("--blas-threads must take effect before numpy is imported; run the script directly")
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
  samples = args.calib_samples or (16 if args.quick else 128)
  runs = args.runs or (2 if args.quick else 1)

  rss = {"start": maxrss_bytes()}
  import jax
  import numpy as np

  import jaxprune
  from jaxprune.data import read_text, sample_windows, tokenize
  from jaxprune.pipeline import PruneConfig, prune

  clock = CompileClock()
  env = environment()
  rss["after_imports"] = maxrss_bytes()

  print("measuring the matmul rate ...", file=sys.stderr)
  rate = matmul_rate(args.repeats)
  print(f"  float32 {rate['float32_gflops_per_s']:.1f} GFLOP/s, float64 {rate['float64_gflops_per_s']:.1f} GFLOP/s",
        file=sys.stderr)

  t = time.perf_counter()
  model = jaxprune.load(args.model)
  tokenizer = jaxprune.load_tokenizer(args.model)
  load_s = time.perf_counter() - t
  t = time.perf_counter()
  stream = tokenize(tokenizer, read_text(args.calib))
  calib, _ = sample_windows(stream, args.seq_len, samples, seed=0, source=args.calib)
  tokenize_s = time.perf_counter() - t
  rss["after_load"] = maxrss_bytes()
  config = PruneConfig(sparsity=args.sparsity, reconstruct=True, batch_size=args.batch_size)

  run_rows, result = [], None
  for r in range(runs):
    phases: dict[str, float] = {}
    result = None  # let the previous run's pruned model go before the next run
    c0, n0 = clock.seconds, clock.count
    print(f"prune run {r + 1}/{runs}: {samples} windows of {args.seq_len} tokens ...", file=sys.stderr)
    with phase_timer(phases):
      t = time.perf_counter()
      result = prune(model, calib, config)
      wall = time.perf_counter() - t
    rss[f"after_run_{r + 1}"] = maxrss_bytes()
    rep = result.report
    run_rows.append({
        "wall_seconds": wall,
        "compile_seconds": clock.seconds - c0,
        "compilations": clock.count - n0,
        "report_seconds": rep["seconds"],
        "phase_seconds": phases,
        "module_seconds": [{"layer": m["layer"], "module": m["module"], "seconds": m["seconds"]}
                           for m in rep["modules"]],
        "load_average_end": list(os.getloadavg()),
    })
    print(f"  wall {wall:.1f}s, of which tracing+compiling {clock.seconds - c0:.1f}s ({clock.count - n0} "
          "compilations)", file=sys.stderr)

  spec = model.spec
  start, stop = config.block_range(spec)
  n = samples * args.seq_len
  fl = pipeline_flops(spec, result.model.spec.layers, n, args.seq_len, config.reconstruct, start, stop)
  r32, r64 = rate["float32_gflops_per_s"] * 1e9, rate["float64_gflops_per_s"] * 1e9
  total = fl["total"]
  ideal = total.flops / r32
  ideal_split = total.f32 / r32 + total.f64 / r64

  def phase_table(row):
    out = {}
    for k, c in fl["by_phase"].items():
      i = c.f32 / r32 + c.f64 / r64
      w = row["phase_seconds"].get(k)
      out[k] = {**c.as_dict(), "ideal_seconds": i, "wall_seconds": w,
                "wall_over_ideal": (w / i) if (w is not None and i > 0) else None}
    timed = sum(row["phase_seconds"].values())
    out["untimed"] = {"wall_seconds": row["wall_seconds"] - timed,
                      "what": "scoring, selection, surgery, bias filling, report; and Python between kernels"}
    return out

  last = run_rows[-1]
  summary = {
      "flops": total.flops,
      "tflops": total.flops / 1e12,
      "float32_matmul_gflops_per_s": rate["float32_gflops_per_s"],
      "ideal_seconds": ideal,
      "ideal_seconds_f64_solves_at_f64_rate": ideal_split,
      "wall_seconds_run1": run_rows[0]["wall_seconds"],
      "wall_over_ideal_run1": run_rows[0]["wall_seconds"] / ideal,
      "compile_seconds_run1": run_rows[0]["compile_seconds"],
      "wall_seconds_last_run": last["wall_seconds"],
      "wall_over_ideal_last_run": last["wall_seconds"] / ideal,
      "achieved_gflops_per_s_last_run": total.flops / last["wall_seconds"] / 1e9,
      "peak_rss_bytes": maxrss_bytes(),
      "peak_rss_mib": maxrss_bytes() / MiB,
  }
  if runs > 1:
    summary["compile_estimate_from_second_run"] = run_rows[0]["wall_seconds"] - last["wall_seconds"]

  xla = None
  if args.xla_check:
    print("cross-checking the FLOP model with XLA's cost analysis ...", file=sys.stderr)
    xla = xla_check(model, config, min(args.batch_size, samples), args.seq_len, spec)

  out = {
      "benchmark": "prune_speed",
      "what": "jaxprune.pipeline.prune on SmolLM2-135M: wall time and peak memory against FLOPs / measured matmul "
              "rate",
      "model": args.model,
      "config": {"sparsity": args.sparsity, "reconstruct": True, "method": config.method,
                 "calib_windows": samples, "seq_len": args.seq_len, "batch_size": config.batch_size,
                 "calib_text": os.path.relpath(os.path.abspath(args.calib), os.path.join(HERE, "..")),
                 "tokens": n, "layers": [start, stop], "quick": args.quick},
      "environment": env,
      "summary": summary,
      "matmul_rate": rate,
      "flop_model": {
          "convention": "2mnk per matmul/einsum (attention score and value einsums over the full T x T block); "
                        "Cholesky d^3/3, triangular solves d^2 per right-hand side; elementwise work not counted",
          "total": total.as_dict(),
          "modules": fl["modules"],
          "xla_check": xla,
      },
      "runs": [{**row, "phases": phase_table(row)} for row in run_rows],
      "compile_time_method": "JAX monitoring events (jaxpr trace + MLIR lowering + backend compile durations) "
                             "during each run" + ("; also run 1 wall minus run 2 wall (same process, kernels "
                                                  "cached)" if runs > 1 else ""),
      "memory": {
          "maxrss_bytes_by_stage": rss,
          "maxrss_note": "ru_maxrss is the process's high-water mark: each stage's value includes all earlier "
                         "stages (imports, model, tokenizer, matmul-rate buffers)",
          "model_from_shapes": memory_model(spec, n, min(args.batch_size, samples), args.seq_len, model.num_params),
      },
      "result": {"params": result.report["params"],
                 "layers": result.report["layers"][:1] + (["..."] if stop - start > 1 else []),
                 "damping_retries": result.report["damping_retries"]},
      "load_seconds": load_s,
      "tokenize_and_sample_seconds": tokenize_s,
  }
  out["environment"]["load_average_end"] = list(os.getloadavg())
  write_json(args.out, out)
  print(f"FLOPs {total.flops / 1e12:.2f} T at {rate['float32_gflops_per_s']:.1f} GFLOP/s -> ideal {ideal:.1f}s; "
        f"wall {run_rows[0]['wall_seconds']:.1f}s (run 1, {run_rows[0]['compile_seconds']:.1f}s compiling)"
        + (f", {last['wall_seconds']:.1f}s (run {runs})" if runs > 1 else "")
        + f"; wall/ideal {summary['wall_over_ideal_last_run']:.2f}; peak RSS {summary['peak_rss_mib']:.0f} MiB",
        file=sys.stderr)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""`jaxprune report DIR`: figures of a pruning run, written beside its report.json.

  kept.png                  query heads and MLP channels kept per layer
  errors.png                per-module output error: inherited / after reconstruction / after pruning
  head_similarity.png       one layer's Jensen-Shannon head-divergence matrix, pairs under tau boxed
  perplexity_vs_params.png  perplexity against parameters of every run in benchmarks/results/quality.json
  figures.json              the numbers behind head_similarity.png (D, tau, pairs, selected heads)

A run pruned with --heads similarity carries the divergences it used; for any
other run the matrix is computed from the dense source model (report.json's
"model", or --model) on the first --js-windows of the run's calibration
windows (rebuilt from "calibration.source", the seed and sizes in the report,
or --calib). Existing figures are replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import os

from jaxprune.errors import UsageError

FIGURES = ("kept.png", "errors.png", "head_similarity.png", "perplexity_vs_params.png")
QUALITY = os.path.join("benchmarks", "results", "quality.json")


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("report", help="draw the figures of a pruning run", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dir", help="a directory written by `jaxprune prune` (holds report.json)")
  p.add_argument("--model", default=None, help="dense source model (default: report.json's \"model\")")
  p.add_argument("--calib", default=None,
                 help="calibration text, 'selfgen' or 'random' (default: report.json's calibration source)")
  p.add_argument("--js-layer", type=int, default=None, help="layer of the head-similarity figure (default: middle)")
  p.add_argument("--js-windows", type=int, default=16, help="calibration windows for the divergences (default 16)")
  p.add_argument("--tau", type=float, default=None,
                 help="threshold to mark (default: the run's, else the tau meeting the run's head budget)")
  p.add_argument("--quality", default=None, help=f"quality benchmark JSON (default: {QUALITY} if present)")
  p.add_argument("--force", action="store_true", help="replace existing figures")
  return p


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise UsageError(f"{path} does not exist; {what}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UsageError(f"{path} is not valid JSON ({e}); {what}") from None


def _source_path(value: str, flag: str, what: str) -> str:
  """`value` if it names something loadable from here: a path, a built-in model, or selfgen/random."""
  from jaxprune.io.resolve import BUILTIN

  if value in ("selfgen", "random") or value in BUILTIN or os.path.exists(value):
    return value
  raise UsageError(f"the run's {what} {value!r} does not exist from {os.getcwd()}; run `jaxprune report` from the "
                   f"directory the run was made in, or pass {flag}")


def _calibration_windows(report: dict, calib: str, model, model_arg: str, n: int, total: int | None = None):
  """The first `n` of the run's calibration windows (of `total` drawn from `calib`: all the run's
  unless given), rebuilt as `jaxprune prune` drew them."""
  import jaxprune
  from jaxprune.data import bos_prefix, read_text, sample_windows, tokenize
  from jaxprune.data.selfgen import random_tokens, self_generated

  cal, cfg = report.get("calibration", {}), report.get("config", {})
  seq_len, seed = int(cal.get("seq_len", 128)), int(cfg.get("seed", 0))
  total = int(cal.get("windows", n)) if total is None else total
  tokenizer = jaxprune.load_tokenizer(model_arg)
  prefix = bos_prefix(tokenizer)  # as `jaxprune prune` fed them: after BOS where the tokenizer adds it
  if calib == "selfgen":
    # Reports from before these fields sampled as they then defaulted: a text per window, top-50.
    return self_generated(model.spec, model.params, n, seq_len, seed=seed,
                          windows_per_text=int(cfg.get("selfgen_windows_per_text", 1)),
                          top_k=int(cfg.get("selfgen_top_k", 50)),
                          temperature=float(cfg.get("selfgen_temperature", 1.0)), prefix=prefix)
  if calib == "random":
    return random_tokens(model.spec.vocab_size, total, seq_len, seed=seed, prefix=prefix)[:n]
  stream = tokenize(tokenizer, read_text(calib))
  windows, _ = sample_windows(stream, seq_len, max(total, n), seed=seed, source=calib, prefix=prefix)
  return windows[:n]


def head_similarity_of(report: dict, args):
  """The HeadSimilarity of the chosen layer: the run's divergences, or recomputed from the dense model."""
  import jaxprune
  from jaxprune.report import data

  layers = report["layers"]
  layer = len(layers) // 2 if args.js_layer is None else args.js_layer
  if not 0 <= layer < len(layers):
    raise UsageError(f"--js-layer {layer} is outside the model's {len(layers)} blocks; choose 0..{len(layers) - 1}")
  found = data.run_js(report, layer)
  spec = None
  if found is not None and args.model is None and args.calib is None:
    (D, tau), from_run = found, True
  else:
    if args.js_windows < 1:
      raise UsageError(f"--js-windows must be positive, got {args.js_windows}")
    model_arg = _source_path(args.model or report.get("model", ""), "--model", "source model")
    model = jaxprune.load(model_arg)
    cal = report.get("calibration", {})
    mixed, counts, total = cal.get("sources"), cal.get("source_windows"), None
    # The first source's windows come first: enough of them stand for the run's.
    if args.calib is None and mixed and counts and args.js_windows <= counts[0]:
      calib, total = mixed[0], counts[0]
    elif args.calib is None and mixed:
      raise UsageError(f"the run calibrated on several sources ({' + '.join(mixed)}); pass --calib with the one "
                       "to rebuild its windows from")
    else:
      calib = args.calib or cal.get("source", "")
      if mixed and counts and calib in mixed:  # as many windows as the run drew from it
        total = counts[mixed.index(calib)]
    calib = _source_path(calib, "--calib", "calibration source")
    windows = _calibration_windows(report, calib, model, model_arg, args.js_windows, total)
    D, tau, from_run, spec = data.layer_js(model.spec, model.params, windows, layer), None, False, model.spec
  if args.tau is not None:
    tau, how = args.tau, "given with --tau"
  elif tau is not None:
    how = "the run's tau"
  else:
    tau, how = data.tau_for_layer(D, report, layer, spec, spec.layers[layer] if spec is not None else None)
  if not tau > 0:
    raise UsageError(f"tau must be positive (JS divergences lie in [0, ln 2]), got {tau}")
  return data.head_similarity(D, layer, tau, how, from_run)


def run(args) -> int:
  from jaxprune.io.atomic import write_json
  from jaxprune.report import data, plots

  report = _read_json(os.path.join(args.dir, "report.json"), "give a directory written by `jaxprune prune`")
  outs = [os.path.join(args.dir, f) for f in FIGURES]
  for out in outs + [os.path.join(args.dir, "figures.json")]:
    if os.path.lexists(out) and not args.force:
      raise UsageError(f"{out} already exists; pass --force to replace the figures")
  quality_path = args.quality or (QUALITY if os.path.isfile(QUALITY) else None)
  quality = _read_json(quality_path, "pass --quality with benchmarks/results/quality.json") if quality_path else None

  # The divergences first: the slow and fallible part, so a failure leaves no figure half-replaced.
  hs = head_similarity_of(report, args)
  name = os.path.basename(os.path.normpath(args.dir))
  model = os.path.basename(os.path.normpath(report.get("model", "?")))
  p = report["params"]
  what = (f"{model} -> {name}: {100 * p['ratio_of_pruned_blocks']:.1f}% of block parameters removed, "
          f"{p['before'] / 1e6:.2f}M -> {p['after'] / 1e6:.2f}M")
  written = [plots.save_png(plots.plot_kept(data.kept_per_layer(report), what), outs[0], args.force),
             plots.save_png(plots.plot_errors(data.module_errors(report), what), outs[1], args.force)]
  src = "the run's divergences" if hs.from_run else f"dense {model}, {args.js_windows} calibration windows"
  written.append(plots.save_png(plots.plot_head_similarity(hs, f"{model}: head similarity ({src})"), outs[2],
                                args.force))
  write_json(os.path.join(args.dir, "figures.json"), {"head_similarity": hs.to_json()}, force=args.force)

  if quality is not None:
    ppl = report.get("perplexity", {}).get("pruned", {}).get("perplexity")
    run_pt = None
    if ppl is not None:
      run_pt = {"params": p["after"], "perplexity": ppl, "name": f"this run ({name})",
                "ratio": float(report["config"]["sparsity"])}
    title = (f"{quality.get('model', '')} pruned without retraining: perplexity against parameters "
             "(lower left is better)\nevery measured configuration, calibrated on 128 x 128 tokens of WikiText-2 "
             "valid; error bars: one standard deviation over calibration seeds")
    written.append(plots.save_png(plots.plot_quality(data.quality_points(quality), title, run=run_pt), outs[3],
                                  args.force))
  else:
    print(f"skipped perplexity_vs_params.png: no {QUALITY} here; pass --quality PATH")
  for w in written:
    print(f"wrote {w}")
  return 0

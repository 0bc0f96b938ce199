"""`jaxprune prune MODEL --sparsity R --out DIR`: the main job.

Loads the model, builds calibration windows (a text file, the model's own
generated text, or random tokens), runs the greedy pipeline with a progress bar
per block, and writes the pruned model (safetensors + config + jaxprune.json +
tokenizer), `report.json` and a per-module `progress.jsonl` to DIR. Everything
is written to a temporary directory first and renamed into place at the end,
so a failed or interrupted run leaves nothing half-written, and an existing DIR
is never replaced without --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from jaxprune.errors import UsageError

CALIB_SPECIAL = ("selfgen", "random")


def parse_block_range(text: str) -> tuple[int, int]:
  try:
    a, b = text.split(":")
    return int(a), int(b)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--layers takes A:B (a half-open block range such as 4:28), got {text!r}")


def _float(text: str, flag: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise UsageError(f"{flag} takes a number or 'auto', got {text!r}") from None


def add_parser(sub):
  from jaxprune import criteria
  from jaxprune.pipeline import ALLOCATIONS, HEAD_MODES, SCORE_DATA

  p = sub.add_parser("prune", help="prune a model and save it", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="built-in name (smollm2-135m), HF directory, .gguf file or Hub id")
  p.add_argument("--sparsity", type=float, required=True, help="fraction of the pruned blocks' parameters to remove")
  p.add_argument("--method", default="goa", choices=criteria.names(), help="criterion (default: goa, the paper's)")
  p.add_argument("--calib", default="selfgen",
                 help="calibration text file, 'selfgen' (text the model generates; default) or 'random' tokens")
  p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  p.add_argument("--heads", default="second-moment", choices=HEAD_MODES, help="how heads are chosen")
  p.add_argument("--tau", type=float, default=None, help="JS threshold for --heads similarity (default: searched "
                 "so the head budget matches the allocation)")
  p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                 help="two-step least-squares reconstruction (default on)")
  p.add_argument("--refit", action="store_true", help="refit the second level on the kept channels")
  p.add_argument("--intercept", action="store_true", help="fit biases (a ones column) in the solves")
  p.add_argument("--damping", default="1e-3",
                 help="ridge delta: lam = delta * mean(diag(X^T X)), or 'auto' to choose it per solve on a held-out "
                 "batch of calibration windows")
  p.add_argument("--layers", type=parse_block_range, default=None, help="block range A:B to prune (default: all)")
  p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
  p.add_argument("--score-data", default=None, choices=SCORE_DATA,
                 help="statistics the criterion sees (default: calib; random for --calib selfgen, as in the paper)")
  p.add_argument("--free-groups", action="store_true", help="allow uneven query heads per KV head (JAX-only)")
  p.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                 help="FLAP's bias compensation for removed channels (default: on for --method flap only)")
  p.add_argument("--attn-sparsity", type=float, default=None,
                 help="with uniform allocation: fraction of each attention module to remove (default: --sparsity)")
  p.add_argument("--batch-size", type=int, default=16, help="calibration windows per chunk")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-text", default=None, help="text file for perplexity before and after")
  p.add_argument("--eval-windows", type=int, default=256, help="windows of --eval-text to use (default 256)")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  p.add_argument("--force", action="store_true", help="replace an existing --out")
  return p


def _check_out(out: str, force: bool):
  if os.path.exists(out) and not force:
    raise UsageError(f"output directory {out} already exists; pass --force to replace it or choose another --out")


def _calibration(args, model, tokenizer):
  from jaxprune.data import read_text, sample_windows, tokenize
  from jaxprune.data.selfgen import random_tokens, self_generated

  if args.calib_samples < 1:
    raise UsageError(f"--calib-samples must be positive, got {args.calib_samples}")
  if args.calib == "selfgen":
    return self_generated(model.spec, model.params, args.calib_samples, args.seq_len, seed=args.seed)
  if args.calib == "random":
    return random_tokens(model.spec.vocab_size, args.calib_samples, args.seq_len, seed=args.seed)
  stream = tokenize(tokenizer, read_text(args.calib))
  windows, _ = sample_windows(stream, args.seq_len, args.calib_samples, seed=args.seed, source=args.calib)
  return windows


def run(args) -> int:
  from tqdm import tqdm

  import jaxprune
  from jaxprune.data import eval_windows, read_text, tokenize
  from jaxprune.eval import perplexity
  from jaxprune.io.atomic import atomic_dir
  from jaxprune.io.export import hf_problems, save_hf
  from jaxprune.pipeline import PruneConfig, prune

  _check_out(args.out, args.force)
  if args.eval_text is not None:
    read_text(args.eval_text)  # fail before any work if it is missing
  score_data = args.score_data or ("random" if args.calib == "selfgen" else "calib")
  config = PruneConfig(sparsity=args.sparsity, method=args.method, heads=args.heads, tau=args.tau,
                       reconstruct=args.reconstruct, refit=args.refit, intercept=args.intercept,
                       damping=1e-3 if args.damping == "auto" else _float(args.damping, "--damping"),
                       auto_damping=args.damping == "auto", layers=args.layers, allocation=args.allocation, score_data=score_data,
                       attn_sparsity=args.attn_sparsity, free_groups=args.free_groups,
                       compensate=args.method == "flap" if args.compensate is None else args.compensate,
                       batch_size=args.batch_size, seed=args.seed)
  t0 = time.perf_counter()
  model = jaxprune.load(args.model)
  config.check(model.spec)
  tokenizer = jaxprune.load_tokenizer(args.model)
  load_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  calib = _calibration(args, model, tokenizer)
  calib_s = time.perf_counter() - t0

  evaluation = {}
  test = None
  if args.eval_text is not None:
    test = eval_windows(tokenize(tokenizer, read_text(args.eval_text)), args.seq_len, args.eval_windows,
                        source=args.eval_text)
    with tqdm(total=len(test), desc="perplexity (dense)", unit="win") as bar:
      evaluation["dense"] = dataclasses.asdict(perplexity(model.spec, model.params, test, progress=bar.update))

  events = []
  start, stop = config.block_range(model.spec)
  with tqdm(total=stop - start, desc="pruning", unit="block") as bar:

    def progress(event):
      events.append(event)
      if event["event"] == "block":
        bar.update(1)
      elif event["event"] == "module":
        bar.set_postfix_str(f"layer {event['layer']} {event['module']}: {event['units_before']}->"
                            f"{event['units_after']} err {event['error_after']:.3f}")

    result = prune(model, calib, config, progress=progress)

  if test is not None:
    with tqdm(total=len(test), desc="perplexity (pruned)", unit="win") as bar:
      evaluation["pruned"] = dataclasses.asdict(
          perplexity(result.model.spec, result.model.params, test, progress=bar.update))

  report = dict(result.report)
  report["model"] = args.model
  report["calibration"] = {**report["calibration"], "source": args.calib, "seconds": calib_s}
  report["seconds"] = {**report["seconds"], "load": load_s}
  if evaluation:
    report["perplexity"] = {"text": args.eval_text, "windows": len(test), "seq_len": args.seq_len, **evaluation}

  with atomic_dir(args.out, force=args.force) as tmp:
    # Uneven GQA groups (--free-groups) have no Hugging Face config: weights + jaxprune.json only.
    save_hf(result.model, tmp, tokenizer=tokenizer, force=True, jax_only=bool(hf_problems(result.model.spec)))
    with open(os.path.join(tmp, "report.json"), "w") as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(tmp, "progress.jsonl"), "w") as f:
      for e in events:
        f.write(json.dumps(e) + "\n")

  p = report["params"]
  print(f"parameters: {p['before'] / 1e6:.2f}M -> {p['after'] / 1e6:.2f}M "
        f"({100 * p['ratio_of_pruned_blocks']:.1f}% of the pruned blocks, {100 * p['ratio_global']:.1f}% overall)")
  if evaluation:
    print(f"perplexity on {args.eval_text} ({len(test)} windows of {args.seq_len}): "
          f"dense {evaluation['dense']['perplexity']:.2f} -> pruned {evaluation['pruned']['perplexity']:.2f}")
  print(f"time: load {load_s:.1f}s, calibration {calib_s:.1f}s, pruning {report['seconds']['total']:.1f}s")
  print(f"wrote {args.out} (model, report.json, progress.jsonl)")
  return 0

"""`jaxprune prune MODEL --sparsity R --out DIR`: the main job.

Loads the model, builds calibration windows (a text file, the model's own
generated text, or random tokens; several of them as one set), runs the greedy pipeline with a progress bar
per block, and writes the pruned model (safetensors + config + jaxprune.json +
tokenizer), `report.json` and a per-module `progress.jsonl` to DIR. Everything
is written to a temporary directory first and renamed into place at the end,
so a failed or interrupted run leaves nothing half-written, and an existing DIR
is never replaced without --force. Every finished block is checkpointed in
DIR.checkpoint (with progress.jsonl as the run goes); a killed run continues
with --resume, bit-identically, and the checkpoint goes once DIR is in place.

Options start from a preset (`--preset`): `recommended` by default (jaxprune's
recipe), `recommended-datafree` with `--calib selfgen`, `paper` and
`paper-datafree` for the paper's method as published, and `baseline` when
`--method` names a published tool (flap, wanda-sp, l1, l2, random, taylor-*),
which then runs as that tool does. A `--config FILE.yaml` of PruneConfig
fields overrides the preset, and options given here override both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

from jaxprune.cli import prune_output
from jaxprune.cli.prune_inputs import calibration, check_inputs, check_model_inputs, sources
from jaxprune.cli.prune_options import add_config_options, resolve_config
from jaxprune.errors import JaxpruneError, UsageError
from jaxprune.prune import presets

# `jaxprune.placement.Solves`, spelled here so that parsing imports no JAX (a test checks they agree).
SOLVES = ("auto", "joined", "split")


def add_parser(sub):
  p = sub.add_parser("prune", help="prune a model and save it", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="built-in name (smollm2-135m), HF directory, .gguf file or Hub id")
  p.add_argument("--preset", default=None, choices=presets.names(),
                 help="the recipe options start from (default: recommended; recommended-datafree with --calib "
                 "selfgen; baseline with --method naming a published tool, which then runs as that tool does)")
  p.add_argument("--config", default=None, metavar="FILE.yaml",
                 help="YAML file of PruneConfig fields (e.g. 'sparsity: 0.2'); overrides the preset, and "
                 "options on the command line override it")
  p.add_argument("--calib", default="selfgen", nargs="+", metavar="SOURCE",
                 help="calibration text file, 'selfgen' (text the model generates; default) or 'random' tokens; "
                 "several (e.g. valid.txt selfgen) are drawn in turn into one calibration set. Text files alone "
                 "are joined by --selfgen-share windows of the model's own text per text window (the preset's)")
  p.add_argument("--calib-samples", type=int, default=None,
                 help="windows of a text or random tokens (default 128); of self-generated text alone too "
                 "(default --selfgen-samples: the preset's)")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  p.add_argument("--eval-text", default=None, help="text file for perplexity before and after")
  p.add_argument("--eval-windows", type=int, default=256, help="windows of --eval-text to use (default 256)")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  p.add_argument("--force", action="store_true", help="replace an existing --out that jaxprune wrote (and start "
                 "over from a checkpoint a killed run left); never an input, the current directory or its ancestors")
  p.add_argument("--resume", action="store_true",
                 help="continue a killed run from its last finished block (the checkpoint in OUT.checkpoint); "
                 "the result is bit-identical to an uninterrupted run with the same inputs and options")
  p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                 help="do not save each finished block's state in OUT.checkpoint (a killed run then starts over)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="dtype of the written model (default: the checkpoint's, e.g. bfloat16 stays bfloat16; GGUF "
                 "quantizations are written as float32)")
  p.add_argument("--max-shard-size", default="200MB",
                 help="largest safetensors file written (default 200MB), unless one block is larger; a shard is "
                 "held in memory while it is written, and a block is never split")
  p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                 help="device mesh: activations sharded over data, blocks (heads, KV heads, MLP channels) over "
                 "model (default: every device on data)")
  p.add_argument("--solves", default="auto", choices=SOLVES,
                 help="split: the statistics stay split over the mesh's model axis and are solved on its devices "
                 "(no device or host holds a whole Gram matrix); joined: gathered where the solves run (the host's "
                 "LAPACK on CPU and TPU); auto (default): split on an accelerator's mesh with a model axis")
  p.add_argument("--no-progress", dest="show_progress", action="store_false", help="no progress bars")
  add_config_options(p)
  return p


def checkpoint_dir(out: str) -> str:
  return os.path.normpath(out) + ".checkpoint"


def prepare_checkpoint(args, ckpt: str | None = None) -> str | None:
  """The run's checkpoint directory (default OUT.checkpoint): checked against --resume and
  --force before any work."""
  import shutil

  from jaxprune.prune.checkpoint import STATE, read_state

  ckpt = ckpt or checkpoint_dir(args.out)
  held = os.path.exists(os.path.join(ckpt, STATE))
  if args.resume and not held:
    raise UsageError(f"--resume: there is no checkpoint in {ckpt} to continue; run without --resume")
  if args.resume:
    read_state(ckpt)  # a damaged or foreign state.json stops here, before any work
  if held and not args.resume:
    if not args.force:
      raise UsageError(f"a previous run for {args.out} stopped and left a checkpoint in {ckpt}; pass --resume to "
                       "continue it, or --force to start over")
    shutil.rmtree(ckpt)
  if not args.checkpoint:
    if args.resume:
      raise UsageError("--resume and --no-checkpoint contradict each other; drop one")
    return None
  return ckpt  # created by the run itself, once the inputs have been checked


def _drop_unfinished(ckpt: str | None) -> None:
  """Removes the checkpoint directory this run created when the run was refused before its
  first block was saved (bad weights, degenerate statistics): nothing there to resume, and
  the plan's stored outputs in it can be large."""
  import shutil

  from jaxprune.prune.checkpoint import STATE

  if ckpt is not None and not os.path.exists(os.path.join(ckpt, STATE)):
    shutil.rmtree(ckpt, ignore_errors=True)


def _mesh(text: str | None):
  from jaxprune import sharding

  if text is None:
    return sharding.make_mesh()
  data, model = sharding.parse_mesh(text)
  try:
    return sharding.make_mesh(data, model)
  except ValueError as e:
    raise UsageError(f"--mesh {text}: {e}; choose sizes whose product is at most the device count") from None


def _resumed_events(ckpt: str, log_path: str) -> list[dict]:
  """The killed run's log, cut to the blocks its checkpoint holds (a block it was in
  the middle of is redone), with a "block" event for every finished block."""
  from jaxprune.prune.checkpoint import read_state

  done = set(read_state(ckpt).finished_blocks)
  events = []
  if os.path.exists(log_path):
    with open(log_path) as f:
      for line in f:
        try:
          e = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
          continue
        if e.get("event") not in ("module", "block") or e.get("layer") in done:
          events.append(e)
  logged = {e["layer"] for e in events if e.get("event") == "block"}
  events += [{"event": "block", "layer": i} for i in sorted(done - logged)]
  return events + [{"event": "resumed", "next_block": max(done) + 1}]


def run(args) -> int:
  from tqdm import tqdm

  import jaxprune
  from jaxprune.cli.progress import phase
  from jaxprune.data import text_windows
  from jaxprune.eval import perplexity
  from jaxprune.io.export import parse_size
  from jaxprune.io.lazy import is_lazy
  from jaxprune.io.target import check_output, local_path, size_on_disk
  from jaxprune.prune import prune

  model_path = local_path(args.model)
  check_output(args.out, args.force, [model_path, *sources(args.calib), args.eval_text, args.config],
               need_bytes=size_on_disk(model_path))  # writable, with room, before any work
  parse_size(args.max_shard_size)  # bad input stops before any work
  mesh = _mesh(args.mesh)
  from jaxprune import placement

  placement.solve_mesh(args.solves, mesh)  # `split` without a model axis is refused before any work
  config, preset = resolve_config(args)
  draws = check_inputs(args, config, mesh)
  ckpt = prepare_checkpoint(args)
  t0 = time.perf_counter()
  # Blocks stay in the checkpoint until the run reaches them (safetensors and GGUF; jaxprune.io.lazy).
  model = jaxprune.load(args.model, lazy=True)
  config.check(model.spec)
  check_model_inputs(args, model, draws)
  # A streamed checkpoint keeps its embeddings in the dtype it was saved in: the output's default.
  source_dtype = str(model.params["embed"]["embedding"].dtype) if is_lazy(model.params) else None
  tokenizer = jaxprune.load_tokenizer(args.model)
  load_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  calib = calibration(args, model, tokenizer, config, draws)
  calib_s = time.perf_counter() - t0

  evaluation = {}
  test = None
  if args.eval_text is not None:
    test = text_windows(args.eval_text, tokenizer, args.seq_len, args.eval_windows)
    with tqdm(total=len(test), desc="perplexity (dense)", unit="win", disable=not args.show_progress) as bar:
      # A dense model with non-finite logits stops the run here; the pruned one's perplexity is
      # reported whatever it is, so that the run's output is not lost.
      evaluation["dense"] = dataclasses.asdict(perplexity(model.spec, model.params, test, progress=bar.update,
                                                          finite=True))

  # progress.jsonl is written as the run goes (in the checkpoint directory, so that a
  # resumed run continues it), and copied into the output at the end.
  log_path = os.path.join(ckpt, "progress.jsonl") if ckpt else None
  events = _resumed_events(ckpt, log_path) if args.resume else []
  log_file = None
  start, stop = config.block_range(model.spec)
  plan = contextlib.ExitStack()
  plan_update = None
  if config.allocation == "adaptive" and not args.resume:  # the dense pass runs before the first block is pruned
    plan_update = plan.enter_context(phase(f"adaptive plan: scoring blocks {start}-{stop - 1} of the dense model "
                                           "before pruning", stop - start, "plan", "block", args.show_progress))
  with plan, tqdm(total=stop - start, desc="pruning", unit="block", disable=not args.show_progress) as bar:

    def progress(event):
      nonlocal log_file
      if event["event"] == "recompute":  # a damaged checkpoint: the blocks from here on are done again
        events[:] = [e for e in events if e.get("layer", -1) < event["next_block"] or e["event"] == "plan"]
      events.append(event)
      if log_path is not None:
        # Opened at the run's first event, so a run refused before any work (bad input, another
        # run's checkpoint) leaves the directory and the killed run's log as they were.
        rewrite = log_file is None or event["event"] == "recompute"
        if log_file is None:
          os.makedirs(ckpt, exist_ok=True)
          log_file = open(log_path, "w")
        if rewrite:
          log_file.seek(0)
          log_file.truncate()
          log_file.writelines(json.dumps(e) + "\n" for e in events)
        else:
          log_file.write(json.dumps(event) + "\n")
        log_file.flush()
      if event["event"] == "plan" and plan_update is not None:
        plan_update(1)
      elif event["event"] == "block":
        bar.update(1)
      elif event["event"] == "module":
        plan.close()
        err = f" err {event['error_after']:.3f}" if "error_after" in event else ""
        bar.set_postfix_str(f"layer {event['layer']} {event['module']}: {event['units_before']}->"
                            f"{event['units_after']}{err}")

    fresh = ckpt is not None and not os.path.exists(ckpt)
    try:
      result = prune(model, calib, config, progress=progress, checkpoint=ckpt, mesh=mesh, solves=args.solves)
    except JaxpruneError:
      _drop_unfinished(ckpt if fresh else None)
      raise
    finally:
      if log_file is not None:
        log_file.close()

  if test is not None:
    with tqdm(total=len(test), desc="perplexity (pruned)", unit="win", disable=not args.show_progress) as bar:
      evaluation["pruned"] = dataclasses.asdict(
          perplexity(result.model.spec, result.model.params, test, progress=bar.update))
    if not math.isfinite(evaluation["pruned"]["perplexity"]):
      print("warning: the pruned model's perplexity is not finite (NaN or inf logits); it is written all the same, "
            "see report.json", file=sys.stderr)

  report = prune_output.report(result, args, preset, draws, calib_s=calib_s, load_s=load_s, evaluation=evaluation,
                               eval_windows=len(test) if test is not None else 0)
  prune_output.write(args, result.model, tokenizer, report, events, dtype=args.dtype or source_dtype)
  if ckpt and os.path.exists(ckpt):  # a run with nothing to prune (--sparsity 0) made none
    import shutil

    shutil.rmtree(ckpt)  # the output is in place; nothing left to resume
  prune_output.summary(args, report)
  return 0

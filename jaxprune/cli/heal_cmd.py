"""`jaxprune heal MODEL --calib TEXT --out DIR`: optional training after pruning (beyond the paper).

jaxprune's pruning is training-free; this separate command trains only the
projection biases (`--train bias`) or a rank-r LoRA of the attention output and
MLP down projections (`--train lora`, merged into the kernels on save) for a
few hundred optax AdamW steps on calibration windows of a text file, with
every other parameter frozen. It writes the healed model (same shapes and
config as MODEL) and `heal.json` (loss curve, held-out perplexity on other
windows of the same text before and after) to DIR, atomically; an existing DIR
is kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(sub):
  from jaxprune.heal import TRAIN_MODES, HealConfig

  d = HealConfig()
  p = sub.add_parser("heal", help="optional: train biases or a LoRA of a pruned model briefly (beyond the paper)",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="the pruned model: a directory written by `jaxprune prune` (or any MODEL)")
  p.add_argument("--calib", required=True, help="training text file (the calibration text, e.g. WikiText-2 valid)")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  p.add_argument("--train", choices=TRAIN_MODES, default=d.train, help=f"what to train (default {d.train})")
  p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
  p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default 1e-4 for lora, 1e-3 for bias)")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
  p.add_argument("--calib-samples", type=int, default=128, help="training windows (default 128)")
  p.add_argument("--heldout", type=int, default=32,
                 help="held-out windows of the same text, disjoint from the training ones, for perplexity "
                 "before/after (default 32; 0 skips it)")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  p.add_argument("--seed", type=int, default=d.seed, help="window choice, LoRA init and batch order (default 0)")
  p.add_argument("--force", action="store_true", help="replace an existing DIR that jaxprune wrote (only once the new "
                 "one is complete)")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="do not draw a progress bar")
  return p


def run(args) -> int:
  from tqdm import tqdm

  import jaxprune
  from jaxprune.cli.eval_cmd import load_model
  from jaxprune.data import bos_prefix, read_text, sample_windows, tokenize
  from jaxprune.errors import UsageError
  from jaxprune.heal import HealConfig, heal
  from jaxprune.io.atomic import atomic_dir
  from jaxprune.io.target import check_output, local_path, size_on_disk
  from jaxprune.io.export import hf_problems, save_hf

  lr = args.lr if args.lr is not None else (1e-4 if args.train == "lora" else 1e-3)
  cfg = HealConfig(train=args.train, rank=args.rank, steps=args.steps, batch_size=args.batch_size, learning_rate=lr,
                   weight_decay=args.weight_decay, seed=args.seed)
  if args.heldout < 0:
    raise UsageError(f"--heldout must be 0 or more windows, got {args.heldout}")
  model_path = local_path(args.model)
  check_output(args.out, args.force, [model_path, args.calib], need_bytes=size_on_disk(model_path))
  text = read_text(args.calib)
  t0 = time.perf_counter()
  model = load_model(args.model, "float32", args.progress)
  tokenizer = jaxprune.load_tokenizer(args.model)
  stream, prefix = tokenize(tokenizer, text), bos_prefix(tokenizer)
  train, idx = sample_windows(stream, args.seq_len, args.calib_samples, seed=args.seed, source=args.calib,
                              prefix=prefix)
  heldout = None
  if args.heldout:
    heldout, _ = sample_windows(stream, args.seq_len, args.heldout, seed=args.seed + 1, exclude=idx,
                                source=args.calib, prefix=prefix)
  load_s = time.perf_counter() - t0

  with tqdm(total=cfg.steps, unit="step", desc="heal", disable=not args.progress, file=sys.stderr) as bar:
    def progress(step, loss):
      bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
      bar.update(1)

    result = heal(model, train, heldout, cfg, progress=progress)

  report = {**result.report, "model": args.model, "calib": args.calib, "seconds": {**result.report["seconds"],
                                                                                   "load": load_s}}
  with atomic_dir(args.out, force=args.force) as tmp:
    save_hf(result.model, tmp, tokenizer=tokenizer, force=True, jax_only=bool(hf_problems(result.model.spec)))
    with open(os.path.join(tmp, "heal.json"), "w") as f:
      json.dump(report, f, indent=1)

  loss = report["loss"]
  print(f"trained {cfg.train}: {report['trained']['parameters']} of {report['trained']['model_parameters']} "
        f"parameters, {cfg.steps} steps in {report['seconds']['train']:.1f}s")
  print(f"train loss: {loss[0]:.4f} (first step) -> {loss[-1]:.4f} (last step)")
  if "heldout_perplexity" in report:
    h = report["heldout_perplexity"]
    print(f"held-out perplexity ({len(heldout)} windows of {args.calib}): {h['before']:.2f} -> {h['after']:.2f}")
  print(f"wrote {args.out} (model, heal.json)")
  return 0


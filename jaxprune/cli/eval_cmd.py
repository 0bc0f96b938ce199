"""`jaxprune eval MODEL --text PATH`: perplexity on non-overlapping windows of a text."""

from __future__ import annotations

import argparse
import dataclasses
import sys


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `jaxprune eval` does, independent of argparse."""

  model: str
  text: str
  seq_len: int = 128
  max_windows: int | None = None
  batch_size: int = 8
  dtype: str = "float32"
  progress: bool = True


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "eval", help="perplexity of a model on a text",
      description="Perplexity on a text tokenized as one stream without special tokens and cut into "
      "non-overlapping windows (the paper's protocol).")
  p.add_argument("model", help="built-in name (smollm2-135m), Hugging Face directory, .gguf file or Hub id")
  p.add_argument("--text", required=True, help="UTF-8 text file, e.g. ../shared/data/wikitext-2/test.txt")
  p.add_argument("--seq-len", type=int, default=128, help="window length in tokens (default 128)")
  p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
  p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="parameter and activation dtype; logits and log-softmax stay float32 (default float32)")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="do not draw a progress bar")
  return p


def config_from_args(args) -> EvalConfig:
  return EvalConfig(model=args.model, text=args.text, seq_len=args.seq_len, max_windows=args.max_windows,
                    batch_size=args.batch_size, dtype=args.dtype, progress=args.progress)


def evaluate(cfg: EvalConfig):
  """Loads the model and text of `cfg`; returns (PerplexityResult, Model)."""
  from tqdm import tqdm

  import jaxprune
  from jaxprune.data import eval_windows, read_text, tokenize
  from jaxprune.errors import UsageError
  from jaxprune.eval import perplexity

  if cfg.batch_size < 1:
    raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
  text = read_text(cfg.text)  # before the (slower) model load, so a wrong path fails fast
  model = jaxprune.load(cfg.model, dtype=cfg.dtype)
  tokenizer = jaxprune.load_tokenizer(cfg.model)
  windows = eval_windows(tokenize(tokenizer, text), cfg.seq_len, cfg.max_windows, source=cfg.text)
  with tqdm(total=len(windows), unit="win", desc="eval", disable=not cfg.progress, file=sys.stderr) as bar:
    result = perplexity(model.spec, model.params, windows, batch_size=cfg.batch_size, progress=bar.update)
  return result, model


def run(args) -> int:
  cfg = config_from_args(args)
  r, model = evaluate(cfg)
  print(f"model       {cfg.model} ({model.source})")
  print(f"text        {cfg.text}")
  print(f"perplexity  {r.perplexity:.4f}")
  print(f"windows     {r.windows} x {cfg.seq_len} tokens (batch {cfg.batch_size}, {cfg.dtype})")
  print(f"tokens      {r.tokens} predicted")
  print(f"throughput  {r.tokens_per_second:.1f} tokens/s ({r.seconds:.2f} s, including compilation)")
  return 0

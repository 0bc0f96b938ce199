"""Does the BOS position belong in the statistics the criteria and the refit see? (issue 29)

A model whose tokenizer adds BOS gets every window as `[BOS] + N` tokens (jaxprune.data.bos_prefix).
The BOS position is the model's attention sink: the same token at the same position in every
window, so its activations are identical in all of them and, in a model with massive
activations, much larger than any text token's. Two choices: keep it in X^T X and in the
targets (what the engine does with position 0 of any window), or leave it out
(`skip_positions=1`).

No Gemma model runs in this tree, so the measurement is on SmolLM2-135M, whose first position is
a sink too (docs/results.md: one token a window holds 99% of the stream's energy from block 12
on). Its tokenizer adds no BOS; here its windows are fed both ways: as they are (plain), and
after `<|endoftext|>` (id 0, the document separator of its pre-training) as a BOS-adding tokenizer
would feed them. Each way is pruned by the default preset at 20%, calibrated on 128 x 128
tokens of WikiText-2 valid (seed 0), once with the first position in the statistics and once
without, and evaluated on the first --eval-windows windows of WikiText-2 test and of Tiny
Shakespeare fed the same way. Ratios are taken within this one run.

    nice -n 5 python benchmarks/bos_statistics.py [--eval-windows 64] [--out benchmarks/results/bos_statistics.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import quality  # noqa: E402  (benchmarks/quality.py: the data, the run and the record of a row)

ENDOFTEXT = 0  # SmolLM2's <|endoftext|>
FEEDS = {"bos": (ENDOFTEXT,), "plain": ()}  # windows after <|endoftext|>, or as SmolLM2's tokenizer gives them


class Fed(quality.Data):
  """quality.Data with every window fed after a prefix chosen here, not by the tokenizer."""

  def __init__(self, args, prefix: tuple[int, ...]):
    super().__init__(args)
    self._prefix = prefix

  @property
  def prefix(self) -> tuple[int, ...]:
    return self._prefix


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--eval-windows", type=int, default=64)
  p.add_argument("--calib-samples", type=int, default=128)
  p.add_argument("--feeds", nargs="+", choices=list(FEEDS), default=list(FEEDS))
  p.add_argument("--out", default=os.path.join(HERE, "results", "bos_statistics.json"))
  args = p.parse_args()
  args.data, args.shakespeare = quality.DATA, quality.SHAKESPEARE

  from jaxprune.io.atomic import write_json

  keep = ("feed", "skip_positions", "name", "ratio", "seed", "params_after", "perplexity", "mean_nll",
          "shakespeare_perplexity", "shakespeare_mean_nll", "eval_windows", "prune_seconds", "wall_seconds",
          "channels_kept", "heads_kept")
  rows, model = [], None

  def add(row):  # the file after every row: a run cut short keeps what it measured
    rows.append({k: row[k] for k in keep if k in row})
    write_json(args.out, {
        "question": "BOS position in the statistics (skip_positions 0) or left out (skip_positions 1)",
        "model": quality.MODEL, "prefix_token": ENDOFTEXT,
        "protocol": f"default preset at 20% of block parameters, {args.calib_samples} x {quality.SEQ_LEN} tokens "
                    f"of WikiText-2 valid (seed 0); first {args.eval_windows} windows of WikiText-2 test and Tiny "
                    "Shakespeare; every window fed the row's way (feed), for calibration and evaluation alike",
        **quality.git_state(exclude=(args.out,)), "rows": rows}, force=True)

  for feed in args.feeds:
    data = Fed(args, FEEDS[feed])
    if model is not None:
      data._model = model  # one load for both feeds
    model = data.model
    add({"feed": feed, "skip_positions": None, **quality.run_one(data, "dense", None, {}, "valid", None, 0)})
    for skip in (0, 1):
      t0 = time.perf_counter()
      row = quality.run_one(data, "default preset", "recommended", dict(skip_positions=skip), "valid", 0.2, 0)
      add({"feed": feed, "skip_positions": skip, "wall_seconds": time.perf_counter() - t0, **row})
      print(f"{feed:5s} skip {skip}: wikitext-2 {row['perplexity']:.2f}  shakespeare "
            f"{row['shakespeare_perplexity']:.2f}", flush=True)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

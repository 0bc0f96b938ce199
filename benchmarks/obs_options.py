"""The default preset's quality under each form of the `goa-obs` sweep, row by row.

Every row is the `default preset` row of `quality.py` at 20% (SmolLM2-135M, seed 0, 128 x 128
calibration tokens from WikiText-2 valid; perplexity over the first 256 windows of 128 tokens of
WikiText-2 test and of Tiny Shakespeare), pruned with the row's block sizes PLAN/LOOP: the adaptive plan's sweep
on diagonal blocks of PLAN channels of X2's Gram matrix formed from X2 itself
(`output_approx.PLAN_BLOCK`), and the layer loop's blocked sweep for modules wider than LOOP
channels (`output_approx.OBS_BLOCK`). "exact" is a block larger than any module. The rows
record the kept units of every module (the plan's per-layer widths), the perplexities and the
pruning seconds. Choices are made on WikiText-2 only; Shakespeare is reported, never tuned on.

    nice -n 5 python benchmarks/obs_options.py                       # -> results/obs_options.json
    nice -n 5 python benchmarks/obs_options.py --rows 512/exact
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import engine_parity  # noqa: E402  (quality.py's protocol, one row)
import quality  # noqa: E402

ROWS = ("512/512", "512/exact", "1024/exact")


def _block(b: str) -> int:
  return 10 ** 9 if b == "exact" else int(b)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", nargs="+", default=list(ROWS),
                  help="PLAN/LOOP: the plan's block and the loop's sweep block in channels (or exact)")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "obs_options.json"))
  args = ap.parse_args()
  from jaxprune.criteria import output_approx as O
  from jaxprune.io.atomic import write_json

  data = engine_parity.CachedData(argparse.Namespace(data=quality.DATA, shakespeare=quality.SHAKESPEARE,
                                                     eval_windows=256, calib_samples=128))
  result = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": {}}
  result.update(protocol="quality.py's default preset row at 20%, seed 0", plan_block=O.PLAN_BLOCK,
                obs_block=O.OBS_BLOCK)
  saved = O.PLAN_BLOCK, O.OBS_BLOCK
  try:
    for name in args.rows:
      plan, loop = name.split("/")
      O.PLAN_BLOCK, O.OBS_BLOCK = _block(plan), _block(loop)
      r = engine_parity.run_row(data, "default preset", 0.2)
      r.update(plan_block=plan, loop_block=loop)
      result["rows"][name] = r
      write_json(args.out, result, force=True)
      print(f"{name}: ppl {r['perplexity']['wikitext2']:.4f} / {r['perplexity']['shakespeare']:.4f}, "
            f"{r['params']} params, {r['prune_seconds']:.0f} s", flush=True)
  finally:
    O.PLAN_BLOCK, O.OBS_BLOCK = saved
  return 0


if __name__ == "__main__":
  sys.exit(main())

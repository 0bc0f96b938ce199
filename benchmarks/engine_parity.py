"""Kept units and perplexity of a fixed set of configurations: a fingerprint of what the engine computes.

Run it on two versions of jaxprune (e.g. before and after an engine change, the
older one through PYTHONPATH) and compare the JSON files with `--compare`: the
kept heads and channels of every module must match and the perplexities agree
to 1e-3 relative, so that a faster engine is shown to compute the same pruning.

    python benchmarks/engine_parity.py --out /tmp/new.json [--only flap-uniform ...]
    PYTHONPATH=/path/to/old/checkout python benchmarks/engine_parity.py --out /tmp/old.json
    python benchmarks/engine_parity.py --compare /tmp/old.json /tmp/new.json

SmolLM2-135M at 20%, 128 x 128 calibration tokens from WikiText-2 valid (seed
0), perplexity over the first 64 windows of 128 tokens of WikiText-2 test.
The recorded prune seconds are those of whatever else the machine ran at the
time: timings belong to `prune_speed.py`, which measures them as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")

CONFIGS = {
    "recommended": ("recommended", {}, "valid"),
    # The same computation in chunks of 8 windows instead of 16: only the float32
    # summation order changes, which shows how far rounding alone moves a configuration.
    "recommended, batch 8": ("recommended", dict(batch_size=8), "valid"),
    "flap-uniform": ("baseline", dict(method="flap"), "valid"),
    "flap-adaptive": ("baseline", dict(method="flap", allocation="adaptive"), "valid"),
    "wanda-sp": ("baseline", dict(method="wanda-sp"), "valid"),
    "goa": ("paper", dict(reconstruct=False), "valid"),
    "goa+reconstruct": ("paper", {}, "valid"),
    "goa+similarity": ("paper", dict(heads="similarity", reconstruct=False), "valid"),
    "goa random-token S": ("paper", dict(reconstruct=False), "random"),
}


def run(names, out_path, eval_windows):
  import jaxprune
  from jaxprune.data import eval_windows as cut, read_text, sample_windows, tokenize
  from jaxprune.data.selfgen import random_tokens
  from jaxprune.eval import perplexity
  from jaxprune.pipeline import PruneConfig, prune

  model = jaxprune.load("smollm2-135m")
  tok = jaxprune.load_tokenizer("smollm2-135m")
  valid = os.path.join(DATA, "valid.txt")
  calib, _ = sample_windows(tokenize(tok, read_text(valid)), 128, 128, seed=0, source=valid)
  rand = random_tokens(model.spec.vocab_size, 128, 128, seed=0)
  test = os.path.join(DATA, "test.txt")
  windows = cut(tokenize(tok, read_text(test)), 128, eval_windows, source=test)
  rows = json.load(open(out_path)) if os.path.exists(out_path) else {}
  for name in names:
    preset, kw, source = CONFIGS[name]
    t0 = time.perf_counter()
    res = prune(model, calib if source == "valid" else rand, PruneConfig.preset(preset, sparsity=0.2, **kw))
    seconds = time.perf_counter() - t0
    ppl = perplexity(res.model.spec, res.model.params, windows).perplexity
    rows[name] = {"kept": {f"{m['layer']}.{m['module']}": m["kept"] for m in res.report["modules"]},
                  "params": res.model.num_params, "perplexity": ppl, "prune_seconds": seconds}
    print(f"{name}: {res.model.num_params} params, ppl {ppl:.4f}, {seconds:.1f}s", flush=True)
    with open(out_path + ".tmp", "w") as f:
      json.dump(rows, f, indent=1)
    os.replace(out_path + ".tmp", out_path)


def compare(a_path, b_path) -> int:
  a, b = json.load(open(a_path)), json.load(open(b_path))
  bad = 0
  for name in sorted(set(a) & set(b)):
    diff = [m for m in a[name]["kept"] if a[name]["kept"][m] != b[name]["kept"].get(m)]
    moved = sum(len(set(a[name]["kept"][m]) - set(b[name]["kept"].get(m, ()))) for m in diff)
    rel = abs(a[name]["perplexity"] - b[name]["perplexity"]) / a[name]["perplexity"]
    ok = not diff and rel <= 1e-3 and a[name]["params"] == b[name]["params"]
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} {name}: modules differing {len(diff)} {diff[:4]} ({moved} units), ppl {a[name]['perplexity']:.4f} "
          f"vs {b[name]['perplexity']:.4f} (rel {rel:.1e}), seconds {a[name]['prune_seconds']:.0f} -> "
          f"{b[name]['prune_seconds']:.0f}")
  return 1 if bad else 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out")
  ap.add_argument("--only", nargs="*", default=list(CONFIGS))
  ap.add_argument("--eval-windows", type=int, default=64)
  ap.add_argument("--compare", nargs=2)
  args = ap.parse_args(argv)
  if args.compare:
    return compare(*args.compare)
  run(args.only, args.out, args.eval_windows)
  return 0


if __name__ == "__main__":
  sys.exit(main())

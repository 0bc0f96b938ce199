"""Where the paper's self-generated row at 914.80 went: one text through the code of then and of now.

The row (`goa data-free (self-generated)`, 20%) was recorded by commit 26326c2 with
that commit's defaults (method goa, random-token statistics, reconstruction, damping
1e-3, uniform allocation with each layer's rounding carried to the next) on 128 x 128
tokens its sampler drew with seed 0. Stages:

  then  run with PYTHONPATH at a checkout of 26326c2: draw the windows with that
        commit's sampler, save them, prune as the row did, evaluate on WikiText-2 test;
  now   this checkout: the same windows through the `paper-datafree` preset, with
        carried rounding and with one shape, evaluated on WikiText-2 test and Shakespeare.

    python benchmarks/selfgen_row_history.py [--out benchmarks/results/selfgen_row_history.json]

runs both (the first in a temporary git worktree of 26326c2); `--stage then|now`
runs one. About 25 minutes on two cores, most of it generating the text at 26326c2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
THEN = "26326c2"
MODEL = "smollm2-135m"


def _texts(data: str, shakespeare: str) -> dict[str, str]:
  return {"wikitext2_test": os.path.join(data, "test.txt"), "shakespeare": shakespeare}


def _ppl(model, tok, path: str) -> float:
  from jaxprune.data import eval_windows, read_text, tokenize
  from jaxprune.eval import perplexity
  return float(perplexity(model.spec, model.params, eval_windows(tokenize(tok, read_text(path)), 128, 256)).perplexity)


def stage_then(args) -> dict:
  """Only APIs that 26326c2 has: it runs with that commit's jaxprune."""
  import numpy as np

  import jaxprune
  from jaxprune.data.selfgen import self_generated
  from jaxprune.prune import PruneConfig, prune

  m, tok = jaxprune.load(MODEL), jaxprune.load_tokenizer(MODEL)
  w = self_generated(m.spec, m.params, 128, 128, seed=0)
  np.save(args.windows, w)
  res = prune(m, w, PruneConfig(method="goa", score_data="random", reconstruct=True))
  return {"params": int(res.model.num_params), "channels_kept": [l["ffn_dim"] for l in res.report["layers"]],
          "wikitext2_test": _ppl(res.model, tok, os.path.join(args.data, "test.txt"))}


def stage_now(args) -> dict:
  import numpy as np

  import jaxprune
  from jaxprune.prune import PruneConfig, prune

  m, tok = jaxprune.load(MODEL), jaxprune.load_tokenizer(MODEL)
  w = np.load(args.windows)
  out = {}
  for name, kw in [("paper-datafree, carried rounding", dict(rounding="carry")), ("paper-datafree", {})]:
    res = prune(m, w, PruneConfig.preset("paper-datafree", sparsity=0.2, seed=0, **kw))
    row = {"params": int(res.model.num_params), "channels_kept": [l["ffn_dim"] for l in res.report["layers"]]}
    row.update({k: _ppl(res.model, tok, p) for k, p in _texts(args.data, args.shakespeare).items()})
    out[name] = row
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stage", choices=("then", "now"), default=None, help="run one stage (default: both)")
  p.add_argument("--windows", default=None, help="the .npy of the windows `then` draws and `now` reads")
  p.add_argument("--data", default=None, help="directory of WikiText-2 test.txt (default: ../shared's)")
  p.add_argument("--shakespeare", default=None, help="tinyshakespeare/input.txt (default: ../shared's)")
  p.add_argument("--part", default=None, help="with --stage: where the stage writes its JSON")
  p.add_argument("--out", default=os.path.join(HERE, "results", "selfgen_row_history.json"))
  args = p.parse_args(argv)
  if args.stage is not None:
    # No import of quality.py here: it puts this checkout's jaxprune first on sys.path, and
    # the `then` stage must run 26326c2's.
    result = (stage_then if args.stage == "then" else stage_now)(args)
    with open(args.part, "w") as f:
      json.dump(result, f)
    return 0

  sys.path.insert(0, HERE)
  import quality  # noqa: E402  (data paths, git state)
  from jaxprune.io.atomic import write_json

  args.data = args.data or quality.DATA
  args.shakespeare = args.shakespeare or quality.SHAKESPEARE
  state = quality.git_state(exclude=(args.out,))
  root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True,
                        check=True).stdout.strip()
  with tempfile.TemporaryDirectory(prefix="selfgen-row-") as tmp:
    old = os.path.join(tmp, THEN)
    args.windows = os.path.join(tmp, "windows.npy")
    subprocess.run(["git", "worktree", "add", "--detach", old, THEN], cwd=root, check=True)
    try:
      parts = {}
      for stage, path in (("then", old), ("now", root)):
        part = os.path.join(tmp, f"{stage}.json")
        env = dict(os.environ, PYTHONPATH=path)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", stage, "--windows", args.windows,
                        "--data", os.path.abspath(args.data), "--shakespeare", os.path.abspath(args.shakespeare),
                        "--part", part], cwd=path, env=env, check=True)
        with open(part) as f:
          parts[stage] = json.load(f)
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", old], cwd=root, check=False)
  write_json(args.out, {"then": {"commit": THEN, "recorded_wikitext2_test": 914.80, **parts["then"]},
                        "now": parts["now"], **state}, force=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

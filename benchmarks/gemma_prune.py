"""Gemma-3-270M pruned to 20% of its block parameters: the default preset against FLAP, on two texts.

    nice -n 5 python benchmarks/gemma_prune.py   # writes benchmarks/results/gemma_prune.json

Protocol: the built-in `gemma3-270m`; calibration on 128 windows of 128 tokens sampled from
WikiText-2 valid (`jaxprune.data.sample_windows`, seed 0), each fed as [BOS] + window, as
Gemma needs; evaluation as benchmarks/gemma_parity.py (the first 64 windows of 128 tokens of
WikiText-2 test and of Tiny Shakespeare, each as [BOS] + window, all 128 tokens scored). The
presets are SmolLM2's, unchanged (`quality.py`'s rows of the same names). Rows are written
as they finish, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gemma_parity import LENGTH, TEXTS, WINDOWS, _nll, jax_logprobs  # noqa: E402
from quality import git_state, write_text  # noqa: E402
from tests.gemma_reference import bos_windows  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "gemma_prune.json")
VALID = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
RATIO, SEED, CALIB = 0.2, 0, 128
ROWS = [  # (name, preset, settings); the dense model's perplexities are gemma_parity.json's (same windows)
    ("default preset", "recommended", {}),
    ("flap-uniform", "baseline", dict(method="flap")),
    ("flap-adaptive", "baseline", dict(method="flap", allocation="adaptive")),
]


def main() -> int:
  import jaxprune
  import numpy as np
  from jaxprune.data import read_text, sample_windows, tokenize
  from jaxprune.prune import PruneConfig, prune

  tokenizer = jaxprune.load_tokenizer("gemma3-270m")
  model = jaxprune.load("gemma3-270m")
  bos = model.spec.bos_token_id
  texts = {n: bos_windows(tokenize(tokenizer, read_text(p)), WINDOWS, LENGTH, bos) for n, p in TEXTS.items()}
  calib, _ = sample_windows(tokenize(tokenizer, read_text(VALID)), LENGTH, CALIB, seed=SEED, source=VALID,
                            prefix=(bos,))
  calib = np.asarray(calib, np.int32)
  result = json.load(open(OUT)) if os.path.exists(OUT) else {"benchmark": "gemma_prune", "rows": []}
  result["protocol"] = __doc__.split("\n\n", 2)[2].strip()
  parity = os.path.join(ROOT, "benchmarks", "results", "gemma_parity.json")
  if os.path.exists(parity):
    result["dense"] = {f"ppl {r['text']}": r["ppl_jaxprune"] for r in json.load(open(parity))["rows"]}
  done = {r["name"] for r in result["rows"]}
  for name, preset, settings in ROWS:
    if name in done:
      continue
    row = {"name": name, "preset": preset, "settings": settings, "ratio": RATIO,
           "seed": SEED, "calibration": f"wikitext-2 valid, {CALIB} x [BOS] + {LENGTH}"}
    t0 = time.perf_counter()
    r = prune(model, calib, PruneConfig.preset(preset, **settings, sparsity=RATIO, seed=SEED))
    m = r.model
    row.update(prune_seconds=time.perf_counter() - t0, report_params=r.report["params"],
               heads_kept=[l.num_heads for l in m.spec.layers], channels_kept=[l.ffn_dim for l in m.spec.layers])
    row["params"] = m.num_params
    for text, w in texts.items():
      row[f"ppl {text}"] = math.exp(_nll(jax_logprobs(m), w) / (WINDOWS * LENGTH))
    print(name, {k: v for k, v in row.items() if k.startswith("ppl")}, flush=True)
    result["rows"].append(row)
    result.update(git_state(ROOT, exclude=(OUT,)))
    write_text(OUT, json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

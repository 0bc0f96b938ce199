"""`jaxprune inspect MODEL`: per-layer shapes and parameter counts."""

from __future__ import annotations

import argparse

import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("inspect", help="per-layer shapes and parameter counts of a model",
                            description="Loads a model and prints its family, sizes, and for every block the "
                            "shapes of its weights (read from the arrays) and its parameter count.")
  p.add_argument("model", help="built-in name (smollm2-135m), Hugging Face directory, .gguf file or Hub id")
  return p


def _shape(x) -> str:
  return "x".join(str(d) for d in np.shape(x))


def describe(model) -> list[str]:
  """The lines `jaxprune inspect` prints for a `jaxprune.Model`."""
  from jaxprune.spec import block_param_count, count_params, spec_from_params

  spec = spec_from_params(model.spec, model.params)  # shapes are the source of truth
  fam, p = spec.fam, model.params
  rope = f", rope theta={spec.rope.theta:g} ({spec.rope.kind})" if spec.rope else ", learned positions"
  window = f", sliding window {spec.sliding_window}" if spec.sliding_window else ""
  biases = [n for n, on in (("qkv", spec.qkv_bias), ("o", spec.o_bias), ("mlp", spec.mlp_bias)) if on]
  blocks = sum(count_params(b) for b in p["layers"])
  lines = [
      f"model       {model.source}",
      f"family      {spec.family}: {fam.norm} norm, {spec.act}, {'gated' if fam.gated_mlp else 'plain'} MLP{rope}"
      f"{window}, biases: {', '.join(biases) or 'none'}",
      f"sizes       vocab {spec.vocab_size}, hidden {spec.hidden_size}, {spec.num_layers} layers, "
      f"{'tied' if spec.tie_embeddings else 'untied'} embeddings, dtype {p['embed']['embedding'].dtype}",
      f"parameters  {count_params(p):,} total: {blocks:,} in blocks, {count_params(p) - blocks:,} in embeddings, "
      "final norm and head",
      "",
  ]
  names = ["q", "k", "v", "o"] + (["gate"] if fam.gated_mlp else []) + ["up", "down"]
  rows = [["layer", "heads", "kv", "head_dim", "ffn"] + names + ["attn+mlp params"]]
  for i, (layer, blk) in enumerate(zip(spec.layers, p["layers"])):
    kernels = {**blk["attn"], **blk["mlp"]}
    rows.append([str(i), str(layer.num_heads), str(layer.num_kv_heads), str(layer.head_dim), str(layer.ffn_dim)]
                + [_shape(kernels[n]["kernel"]) for n in names] + [f"{block_param_count(blk):,}"])
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
  return lines


def run(args) -> int:
  import sys

  from jaxprune.cli.eval_cmd import load_model

  print("\n".join(describe(load_model(args.model, "float32", sys.stderr.isatty()))))
  return 0

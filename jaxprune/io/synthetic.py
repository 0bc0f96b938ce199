"""Random-weight LLaMA checkpoints written with transformers, for streaming benchmarks and tests.

A checkpoint of a given size, saved the way hub checkpoints are (bfloat16,
sharded safetensors with an index, a tokenizer), without downloading one. The
model is built on the meta device and its tensors are drawn and saved one
block at a time, so writing a 0.8B-parameter checkpoint needs only a little
more memory than one block.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def write_llama(path: str, *, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
                shard_bytes: int = 500 * 10**6, seed: int = 0, tokenizer=None) -> dict:
  """Writes a random LLaMA checkpoint (bfloat16 sharded safetensors + index + config) to `path`.

  Weights are N(0, 0.02) with unit norm scales, like `LlamaPreTrainedModel._init_weights`.
  Returns the config dict. `tokenizer` (a transformers tokenizer) is saved beside it.
  """
  import ml_dtypes
  import transformers
  from safetensors.numpy import save_file

  cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                 num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                 max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
  # The tensor names and shapes are those of transformers' own model, built without memory.
  import torch

  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
  rng = np.random.default_rng(seed)
  os.makedirs(path, exist_ok=True)
  bf16 = ml_dtypes.bfloat16

  def draw(name, shape):
    if name.endswith("norm.weight"):
      return np.ones(shape, bf16)
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(bf16)

  groups: list[list[str]] = [[]]
  size = 0
  for k, s in shapes.items():
    nbytes = 2 * int(np.prod(s))
    if groups[-1] and size + nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(k)
    size += nbytes
  weight_map = {}
  for i, keys in enumerate(groups):
    name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    save_file({k: draw(k, shapes[k]) for k in keys}, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in keys})
  total = sum(2 * int(np.prod(s)) for s in shapes.values())
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  cfg.save_pretrained(path)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return cfg.to_dict()


def num_params(cfg: dict) -> int:
  """Parameters of the model `cfg` describes, from jaxprune's own shapes of it."""
  from jaxprune.io.hf_config import spec_from_hf_config
  from jaxprune.spec import param_shapes

  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
  shapes = jax.tree.leaves(param_shapes(spec_from_hf_config(cfg)), is_leaf=is_shape)
  return sum(math.prod(s) for s in shapes)

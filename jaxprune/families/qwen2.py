"""Qwen2: LLaMA's computation and tensors, with q, k and v biases always on."""

from __future__ import annotations

import dataclasses

from jaxprune.families.base import Sliding
from jaxprune.families.llama import LLAMA


def native_biases(spec):
  """Qwen2Config always has q/k/v biases (zeros are written where the model lacks them) and never o or MLP ones."""
  if spec.o_bias or spec.mlp_bias:
    return None
  return {"qkv": True, "o": False, "mlp": False}


def config_extra(spec, flags):
  return {"use_sliding_window": False, "sliding_window": None}


QWEN2 = dataclasses.replace(
    LLAMA, name="qwen2", model_type="qwen2", architectures=("Qwen2ForCausalLM",),
    remote_class="JaxpruneQwen2ForCausalLM", native_biases=native_biases, config_extra=config_extra,
    strict_heads=False, sliding=Sliding.REFUSE, attention_bias_groups=(), fixed_biases=("qkv",),
    fallback="llama", gguf_arch="qwen2", gguf_rope_permuted=False, decilm=False,
)

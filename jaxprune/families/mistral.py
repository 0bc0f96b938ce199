"""Mistral: LLaMA's computation and tensors, with a sliding attention window."""

from __future__ import annotations

import dataclasses

from jaxprune.families.base import Sliding
from jaxprune.families.llama import LLAMA


def native_biases(spec):
  """MistralConfig holds no bias at all (its `attention_bias` reaches q, k and v only when read)."""
  if spec.qkv_bias or spec.o_bias or spec.mlp_bias:
    return None
  return {"qkv": False, "o": False, "mlp": False}


def config_extra(spec, flags):
  return {"sliding_window": spec.sliding_window}


MISTRAL = dataclasses.replace(
    LLAMA, name="mistral", model_type="mistral", architectures=("MistralForCausalLM",),
    remote_class="JaxpruneMistralForCausalLM", native_biases=native_biases, config_extra=config_extra,
    strict_heads=False, sliding=Sliding.READ, attention_bias_groups=("qkv",), fallback="llama",
)

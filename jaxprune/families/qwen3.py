"""Qwen3: LLaMA's computation and tensors with an RMSNorm on every query and key head, and no biases."""

from __future__ import annotations

import dataclasses

from jaxprune.families import tensors as t
from jaxprune.families.base import Sliding
from jaxprune.families.llama import GGUF_BLOCK, LLAMA, TABLE
from jaxprune.families.tensors import Rule

QK_NORMS = (
    Rule("self_attn.q_norm.weight", (("attn", "q_norm", "scale"),), **t.ident()),
    Rule("self_attn.k_norm.weight", (("attn", "k_norm", "scale"),), **t.ident()),
)
GGUF_QK_NORMS = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}


def native_biases(spec):
  """Qwen3Config's `attention_bias` covers q, k, v and o; it has no MLP bias, and no other family computes the
  q/k norms, so a spec with MLP biases has no stock transformers form (`remote_mlp_bias`: the shipped
  modeling file adds them)."""
  if spec.mlp_bias:
    return None
  attn = spec.qkv_bias or spec.o_bias
  return {"qkv": attn, "o": attn, "mlp": False}


def config_extra(spec, flags):
  return {"attention_bias": flags["qkv"], "use_sliding_window": False, "sliding_window": None}


def output_bias_checks(arch: str):
  """The GGUF check of an architecture that loads q/k/v biases but none on attn_output or the MLP
  (llama.cpp's qwen3 and gemma3: their loaders create no such tensor, and refuse a file holding one)."""

  def checks(spec):
    groups = [name for name, on in (("attention-output", spec.o_bias), ("MLP", spec.mlp_bias)) if on]
    if not groups:
      return []
    return [f"{' and '.join(groups)} biases (reconstruction's intercept): llama.cpp's {arch} reads only q/k/v "
            "biases; prune with --no-intercept"]

  return checks


QWEN3 = dataclasses.replace(
    LLAMA, name="qwen3", model_type="qwen3", architectures=("Qwen3ForCausalLM",),
    remote_class="JaxpruneQwen3ForCausalLM", native_biases=native_biases, config_extra=config_extra,
    table=dataclasses.replace(TABLE, block=TABLE.block + QK_NORMS), strict_heads=False, sliding=Sliding.REFUSE,
    gguf_arch="qwen3", gguf_block={**GGUF_BLOCK, **GGUF_QK_NORMS}, gguf_rope_permuted=False, gguf_deci=False,
    gguf_checks=output_bias_checks("qwen3"), decilm=False, remote_mlp_bias=True,
    qk_norm=True,
)

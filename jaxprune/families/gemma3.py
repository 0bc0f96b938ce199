"""Gemma 3: LLaMA's projections with GeGLU, (1 + w) RMSNorms before and after both modules, q/k norms,
embeddings scaled by sqrt(hidden), and a sliding window on the layers `layer_types` marks, which also
use their own (local) RoPE base. Gemma 2's soft capping is read where a config has it."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from jaxprune.families import tensors as t
from jaxprune.families.base import Sliding, rope_parameters
from jaxprune.families.llama import BLOCK as LLAMA_BLOCK
from jaxprune.families.llama import GGUF_BLOCK as LLAMA_GGUF_BLOCK
from jaxprune.families.llama import LLAMA, TABLE
from jaxprune.families.qwen3 import GGUF_QK_NORMS, QK_NORMS, output_bias_checks
from jaxprune.families.tensors import Rule

# Gemma names its norms by place: the LLaMA name `post_attention_layernorm` is here the norm AFTER attention.
NORMS = (
    Rule("input_layernorm.weight", (("attn_norm", "scale"),), **t.ident()),
    Rule("post_attention_layernorm.weight", (("attn_post_norm", "scale"),), **t.ident()),
    Rule("pre_feedforward_layernorm.weight", (("mlp_norm", "scale"),), **t.ident()),
    Rule("post_feedforward_layernorm.weight", (("mlp_post_norm", "scale"),), **t.ident()),
)
BLOCK = NORMS + tuple(r for r in LLAMA_BLOCK if not r.hf.endswith("layernorm.weight")) + QK_NORMS

# llama.cpp's gemma3 names. Its converter stores every norm weight with Gemma's +1 added
# (`io/gguf.py` subtracts it back, as transformers' GGUF loader does).
GGUF_BLOCK = MappingProxyType({
    **{k: v for k, v in LLAMA_GGUF_BLOCK.items() if "norm" not in k}, **GGUF_QK_NORMS,
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
})

# Config keys -> the ModelSpec fields that hold them. transformers' Gemma 3 attention reads no
# attn_logit_softcapping (Gemma 2's does): the key is accepted and, as there, computes nothing.
SPEC_KEYS = MappingProxyType({"query_pre_attn_scalar": "query_pre_attn_scalar",
                              "final_logit_softcapping": "final_softcap",
                              "attn_logit_softcapping": None})


def native_biases(spec):
  """Gemma3TextConfig's `attention_bias` covers q, k, v and o; it has no MLP bias, and no other family
  computes Gemma's block, so a spec with MLP biases has no stock transformers form (`remote_mlp_bias`:
  the shipped modeling file adds them)."""
  if spec.mlp_bias:
    return None
  attn = spec.qkv_bias or spec.o_bias
  return {"qkv": attn, "o": attn, "mlp": False}


def config_extra(spec, flags):
  sliding = set(spec.sliding_layers or ())
  full = rope_parameters(spec.rope)
  scalar = spec.query_pre_attn_scalar or spec.layers[0].head_dim
  return {
      "attention_bias": flags["qkv"],
      "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,  # the config wants an int
      "final_logit_softcapping": spec.final_softcap,
      "sliding_window": spec.sliding_window,
      "layer_types": ["sliding_attention" if i in sliding else "full_attention" for i in range(spec.num_layers)],
      "rope_parameters": {"full_attention": full,
                          "sliding_attention": rope_parameters(spec.rope_local) if spec.rope_local else full},
      "use_bidirectional_attention": False,
  }


def gguf_query_scalar(hidden: int, n_heads: int, n_layers: int, head_dim: int) -> int:
  """The query_pre_attn_scalar llama.cpp's gemma3 scales queries by (it stores none): hidden / heads for
  Gemma 3 27B, which it recognizes by its 62 layers, else head_dim (src/models/gemma3.cpp)."""
  return hidden // n_heads if n_layers == 62 else head_dim


def swa_pattern(sliding: list[bool]) -> int | list[bool]:
  """llama.cpp's `attention.sliding_window_pattern` for these sliding layers: the period n whose rule
  (layer i slides when i % n < n - 1, llama_hparams::set_swa_pattern) gives them, as its converter
  writes, else one flag per layer (which llama.cpp's load_swa_pattern also reads)."""
  for n in range(1, len(sliding) + 2):
    if [i % n < n - 1 for i in range(len(sliding))] == sliding:
      return n
  return sliding


def swa_layers(pattern, n_layers: int) -> list[bool]:
  """Which layers slide, from a `sliding_window_pattern` as `swa_pattern` writes it (inverse of it)."""
  if isinstance(pattern, list):
    return [bool(p) for p in pattern]
  return [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]  # 0: every layer, as llama.cpp


_gguf_biases = output_bias_checks("gemma3")


def gguf_checks(spec):
  problems = _gguf_biases(spec)
  l0 = spec.layers[0]
  scalar = spec.query_pre_attn_scalar or l0.head_dim
  want = gguf_query_scalar(spec.hidden_size, l0.num_heads, spec.num_layers, l0.head_dim)
  if scalar != want:
    problems.append(f"query_pre_attn_scalar={scalar:g}: llama.cpp's gemma3 scales queries by {want}^-1/2 "
                    "(head_dim; hidden / heads at 62 layers)")
  local = spec.rope_local or spec.rope  # the sliding layers' RoPE (theirs, else the model's)
  if any(spec.sliding(i) for i in range(spec.num_layers)) and local.kind != "default":
    problems.append(f"sliding layers' RoPE scaling {local.kind!r}: llama.cpp's gemma3 scales only the "
                    "full-attention layers' RoPE")
  return problems


def gguf_meta(spec):
  """What llama.cpp's gemma3 reads beyond LLaMA's keys (llama_model_gemma3::load_arch_hparams)."""
  meta = {}
  sliding = [spec.sliding(i) for i in range(spec.num_layers)]
  if any(sliding):
    meta["attention.sliding_window"] = int(spec.sliding_window)
    meta["attention.sliding_window_pattern"] = swa_pattern(sliding)
    meta["rope.freq_base_swa"] = float((spec.rope_local or spec.rope).theta)
  if spec.final_softcap:
    meta["final_logit_softcapping"] = float(spec.final_softcap)
  return meta


GEMMA3 = dataclasses.replace(
    LLAMA, name="gemma3", act="gelu_tanh", model_type="gemma3_text", architectures=("Gemma3ForCausalLM",),
    remote_class="JaxpruneGemma3ForCausalLM", act_key="hidden_activation",
    native_biases=native_biases, config_extra=config_extra,
    table=dataclasses.replace(TABLE, block=BLOCK), tie_default=True, sliding=Sliding.LAYER_TYPES,
    attention_bias_groups=("qkv", "o"), remote_mlp_bias=True, gguf_arch="gemma3", gguf_block=GGUF_BLOCK, gguf_rope_permuted=False,
    gguf_deci=False, gguf_checks=gguf_checks, gguf_meta=gguf_meta, decilm=False,
    norm_offset=1.0, qk_norm=True, post_norms=True, embed_scale=True, spec_keys=SPEC_KEYS,
    fixed_keys=MappingProxyType({"use_bidirectional_attention": False}),
)

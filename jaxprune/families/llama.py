"""LLaMA: RMSNorm, SiLU-gated MLP, RoPE; the layout Mistral and Qwen2 share."""

from __future__ import annotations

from types import MappingProxyType

from jaxprune.families import tensors as t
from jaxprune.families.base import ConfigLayout, Family, Norm, Positions
from jaxprune.families.tensors import Rule, TensorTable

BLOCK = (
    Rule("input_layernorm.weight", (("attn_norm", "scale"),), **t.ident()),
    Rule("post_attention_layernorm.weight", (("mlp_norm", "scale"),), **t.ident()),
    Rule("self_attn.q_proj.weight", (("attn", "q", "kernel"),), **t.heads_in("N")),
    Rule("self_attn.k_proj.weight", (("attn", "k", "kernel"),), **t.heads_in("K")),
    Rule("self_attn.v_proj.weight", (("attn", "v", "kernel"),), **t.heads_in("K")),
    Rule("self_attn.o_proj.weight", (("attn", "o", "kernel"),), **t.heads_out(conv1d=False)),
    Rule("self_attn.q_proj.bias", (("attn", "q", "bias"),), **t.heads_bias("N"), when=t.qkv_bias),
    Rule("self_attn.k_proj.bias", (("attn", "k", "bias"),), **t.heads_bias("K"), when=t.qkv_bias),
    Rule("self_attn.v_proj.bias", (("attn", "v", "bias"),), **t.heads_bias("K"), when=t.qkv_bias),
    Rule("self_attn.o_proj.bias", (("attn", "o", "bias"),), **t.ident(), when=t.o_bias),
    Rule("mlp.gate_proj.weight", (("mlp", "gate", "kernel"),), **t.linear()),
    Rule("mlp.up_proj.weight", (("mlp", "up", "kernel"),), **t.linear()),
    Rule("mlp.down_proj.weight", (("mlp", "down", "kernel"),), **t.linear()),
    Rule("mlp.gate_proj.bias", (("mlp", "gate", "bias"),), **t.ident(), when=t.mlp_bias),
    Rule("mlp.up_proj.bias", (("mlp", "up", "bias"),), **t.ident(), when=t.mlp_bias),
    Rule("mlp.down_proj.bias", (("mlp", "down", "bias"),), **t.ident(), when=t.mlp_bias),
)

TOP = (
    Rule("model.embed_tokens.weight", (("embed", "embedding"),), **t.ident()),
    Rule("model.norm.weight", (("final_norm", "scale"),), **t.ident()),
    Rule("lm_head.weight", (("lm_head", "kernel"),), **t.linear(), when=t.untied),
)

TABLE = TensorTable(TOP, BLOCK, "model.layers.{i}.", "model.",
                    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))

# llama.cpp's tensor names (GGUF name -> Hugging Face name), as its converter writes them.
GGUF_TOP = MappingProxyType({
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
})
GGUF_BLOCK = MappingProxyType({
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
})


def native_biases(spec):
  """LlamaConfig has one `attention_bias` for q, k, v and o and an `mlp_bias`, but no sliding window."""
  if spec.sliding_window is not None:
    return None
  attn = spec.qkv_bias or spec.o_bias
  return {"qkv": attn, "o": attn, "mlp": spec.mlp_bias}


def config_extra(spec, flags):
  return {"attention_bias": flags["qkv"], "mlp_bias": flags["mlp"]}


def gguf_checks(spec):
  """llama.cpp's llama and deci (and qwen2) have no attention window."""
  if spec.sliding_window is not None and spec.sliding_window < spec.max_positions:
    return [f"sliding_window={spec.sliding_window} is shorter than the context ({spec.max_positions}); "
            "llama.cpp's llama and deci attend to the whole context"]
  return []


LLAMA = Family(
    name="llama", norm=Norm.RMS, act="silu", gated_mlp=True, positions=Positions.ROPE,
    model_type="llama", architectures=("LlamaForCausalLM",), remote_class="JaxpruneLlamaForCausalLM",
    config_layout=ConfigLayout.LLAMA, act_key="hidden_act",
    act_to_hf=MappingProxyType({"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}),
    layer_keys=MappingProxyType({"num_attention_heads": "num_attention_heads",
                                 "num_key_value_heads": "num_key_value_heads",
                                 "intermediate_size": "intermediate_size"}),
    table=TABLE, native_biases=native_biases, config_extra=config_extra,
    strict_heads=True, attention_bias_groups=("qkv", "o"),
    gguf_arch="llama", gguf_top=GGUF_TOP, gguf_block=GGUF_BLOCK, gguf_rope_permuted=True, gguf_checks=gguf_checks,
    decilm=True,
)

"""GPT-2: LayerNorm, an ungated GELU MLP, learned positions, fused Conv1D attention, biases everywhere."""

from __future__ import annotations

from types import MappingProxyType

from jaxprune.families import tensors as t
from jaxprune.families.base import ConfigLayout, Family, Norm, Positions
from jaxprune.families.tensors import Rule, TensorTable

BLOCK = (
    Rule("ln_1.weight", (("attn_norm", "scale"),), **t.ident()),
    Rule("ln_1.bias", (("attn_norm", "bias"),), **t.ident()),
    Rule("ln_2.weight", (("mlp_norm", "scale"),), **t.ident()),
    Rule("ln_2.bias", (("mlp_norm", "bias"),), **t.ident()),
    Rule("attn.c_attn.weight", (("attn", "q", "kernel"), ("attn", "k", "kernel"), ("attn", "v", "kernel")),
         **t.fused_qkv_weight()),
    Rule("attn.c_attn.bias", (("attn", "q", "bias"), ("attn", "k", "bias"), ("attn", "v", "bias")),
         **t.fused_qkv_bias()),
    Rule("attn.c_proj.weight", (("attn", "o", "kernel"),), **t.heads_out(conv1d=True)),
    Rule("attn.c_proj.bias", (("attn", "o", "bias"),), **t.ident()),
    # GPT-2's MLP is Conv1D: its weights already have the kernel layout.
    Rule("mlp.c_fc.weight", (("mlp", "up", "kernel"),), **t.ident()),
    Rule("mlp.c_fc.bias", (("mlp", "up", "bias"),), **t.ident()),
    Rule("mlp.c_proj.weight", (("mlp", "down", "kernel"),), **t.ident()),
    Rule("mlp.c_proj.bias", (("mlp", "down", "bias"),), **t.ident()),
)

TOP = (
    Rule("transformer.wte.weight", (("embed", "embedding"),), **t.ident()),
    Rule("transformer.wpe.weight", (("pos_embed", "embedding"),), **t.ident()),
    Rule("transformer.ln_f.weight", (("final_norm", "scale"),), **t.ident()),
    Rule("transformer.ln_f.bias", (("final_norm", "bias"),), **t.ident()),
    Rule("lm_head.weight", (("lm_head", "kernel"),), **t.linear(), when=t.untied),
)

TABLE = TensorTable(TOP, BLOCK, "transformer.h.{i}.", "transformer.",
                    ignored=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",))


def native_biases(spec):
  """GPT2Config has every bias, always (zeros are written where the model lacks them)."""
  return {"qkv": True, "o": True, "mlp": True}


GPT2 = Family(
    name="gpt2", norm=Norm.LAYER, act="gelu_tanh", gated_mlp=False, positions=Positions.LEARNED,
    model_type="gpt2", architectures=("GPT2LMHeadModel",), remote_class="JaxpruneGPT2LMHeadModel",
    config_layout=ConfigLayout.GPT2, act_key="activation_function",
    act_to_hf=MappingProxyType({"silu": "silu", "gelu_tanh": "gelu_new", "gelu": "gelu"}),
    # GPT-2 configs name the sizes n_head and n_inner; jaxprune's per-layer names are LLaMA's.
    layer_aliases=MappingProxyType({"n_head": "num_attention_heads", "n_inner": "intermediate_size"}),
    layer_keys=MappingProxyType({"n_head": "n_head", "num_attention_heads": "n_head", "n_inner": "n_inner",
                                 "intermediate_size": "n_inner"}),
    table=TABLE, native_biases=native_biases, head_dim_from_hidden=True, tie_default=True,
    fixed_biases=("qkv", "o", "mlp"),
)

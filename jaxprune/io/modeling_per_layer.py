"""Per-layer sizes for transformers: the modeling file a jaxprune export ships when its layers differ.

A pruned model whose layers keep different numbers of heads or MLP channels has
a config with transformers' `per_layer_config` (layer index -> sizes), which
transformers' config classes read but its modeling code does not apply. This
file, copied into such an export and named in its config's `auto_map`, lets
stock transformers build and load it:

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

Each class is the family's own transformers class; after building the layers at
the global sizes it rebuilds every layer named in `per_layer_config` from a
copy of the config carrying that layer's sizes (GPT-2's attention, whose head
split transformers derives from n_embd, keeps the global head_dim and gets
projections of the layer's width). No modeling code is forked, and this file
needs nothing but transformers and PyTorch (`save_hf` copies it as
modeling_jaxprune.py; `jaxprune.pytorch` imports `add_mlp_biases` from it).

A config with `mlp_bias: true` for a family whose MLP has no biases (Gemma 3,
Qwen3: reconstruction with an intercept adds them) gets them too: the projections
are rebuilt with a bias, which is all the computation needs (each MLP projection
is a plain `nn.Linear` there).
"""

from torch import nn
from transformers import (Gemma3ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)


def _layer_configs(config) -> list:
  """Every layer's own config (transformers' `per_layer_config`), or [] for a plain config.

  Layers are first built from the global sizes, which a heterogeneous config gives only
  with `allow_global_per_layer_attribute_access` (jaxprune's exports set it)."""
  if not getattr(config, "is_heterogeneous", False):
    return []
  config.allow_global_per_layer_attribute_access = True
  return list(config.per_layer_config)


def _adopt(layer, layer_cfg, config) -> None:
  """Modules of the new layer refer to the model's config (their sizes were read at
  construction), so settings changed later on the model, like the attention implementation,
  reach them."""
  for module in layer.modules():
    if getattr(module, "config", None) is layer_cfg:
      module.config = config


def add_mlp_biases(model, config) -> None:
  """Gives every decoder layer's MLP projections a bias when `config.mlp_bias` asks for one
  and the family's modeling code made them without (LLaMA's reads the flag itself)."""
  if not getattr(config, "mlp_bias", False):
    return
  for layer in model.model.layers:
    for name in ("gate_proj", "up_proj", "down_proj"):
      old = getattr(layer.mlp, name)
      if old.bias is None:
        setattr(layer.mlp, name, nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device,
                                           dtype=old.weight.dtype))


def _resize_decoder_layers(model, config, layer_cfgs) -> None:
  layers = model.model.layers
  for i, layer_cfg in enumerate(layer_cfgs):
    layer_cfg._attn_implementation = config._attn_implementation
    layers[i] = type(layers[i])(layer_cfg, i)
    _adopt(layers[i], layer_cfg, config)


class _PerLayerDecoder:
  """Builds the family's model, then every layer at its own sizes, with MLP biases where asked."""

  def __init__(self, config):
    layer_cfgs = _layer_configs(config)
    super().__init__(config)
    _resize_decoder_layers(self, config, layer_cfgs)
    add_mlp_biases(self, config)
    self.post_init()


class JaxpruneLlamaForCausalLM(_PerLayerDecoder, LlamaForCausalLM):
  pass


class JaxpruneMistralForCausalLM(_PerLayerDecoder, MistralForCausalLM):
  pass


class JaxpruneQwen2ForCausalLM(_PerLayerDecoder, Qwen2ForCausalLM):
  pass


class JaxpruneQwen3ForCausalLM(_PerLayerDecoder, Qwen3ForCausalLM):
  pass


class JaxpruneGemma3ForCausalLM(_PerLayerDecoder, Gemma3ForCausalLM):
  pass


class JaxpruneGPT2LMHeadModel(GPT2LMHeadModel):
  def __init__(self, config):
    layer_cfgs = _layer_configs(config)
    super().__init__(config)
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.pytorch_utils import Conv1D

    blocks = self.transformer.h
    for i, layer_cfg in enumerate(layer_cfgs):
      layer_cfg._attn_implementation = config._attn_implementation
      heads = layer_cfg.n_head
      layer_cfg.n_head = config.n_head  # GPT-2 derives head_dim and the softmax scale from n_embd / n_head
      block = GPT2Block(layer_cfg, layer_idx=i)
      attn = block.attn
      width = heads * attn.head_dim
      attn.num_heads, attn.split_size = heads, width
      attn.c_attn = Conv1D(3 * width, config.n_embd)
      attn.c_proj = Conv1D(config.n_embd, width)
      blocks[i] = block
      _adopt(block, layer_cfg, config)
    self.post_init()

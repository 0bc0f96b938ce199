"""What a model family is: one frozen record of every fact jaxprune needs about it.

A family file (`llama.py`, `gpt2.py`, ...) builds one `Family`; the registry
(`jaxprune.families`) collects them. The forward pass reads the computation
fields (norm, act, gated_mlp, positions); the readers and writers in
`jaxprune.io` read the Hugging Face, GGUF and export fields. No other module
holds a table keyed by family name, so adding a family is adding one file.
"""

from __future__ import annotations

import dataclasses
import enum
from types import MappingProxyType
from typing import Any, Callable, Mapping

from jaxprune.families.tensors import TensorTable

# Bias flags per group ("qkv", "o", "mlp"), as the export rule returns them.
BiasFlags = dict[str, bool]


class Norm(enum.StrEnum):
  RMS = "rms"  # RMSNorm: a scale, no mean, no bias (LLaMA and its kin)
  LAYER = "layer"  # LayerNorm: mean, scale and bias (GPT-2)


class Positions(enum.StrEnum):
  ROPE = "rope"  # rotary embeddings inside attention
  LEARNED = "learned"  # a position embedding table added to the token embeddings


class ConfigLayout(enum.StrEnum):
  """How the Hugging Face config names the sizes: LLaMA's keys (hidden_size, ...) or GPT-2's (n_embd, ...)."""

  LLAMA = "llama"
  GPT2 = "gpt2"


class Sliding(enum.StrEnum):
  """What the family's Hugging Face config does with a sliding attention window."""

  READ = "read"  # the window is part of the model (Mistral)
  REFUSE = "refuse"  # the config can switch one on, which jaxprune does not compute (Qwen2)
  IGNORE = "ignore"  # the config has no window (LLaMA, GPT-2)
  LAYER_TYPES = "layer_types"  # the window is on the layers `layer_types` marks sliding, with their own RoPE (Gemma 3)


# Hugging Face activation names -> jaxprune's; every family's config may name any of them.
HF_ACTIVATIONS = MappingProxyType({"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
                                   "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"})
_EMPTY = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything true of one model family.

  Attributes:
    name: jaxprune's name (`ModelSpec.family`).
    norm, act, gated_mlp, positions: what the forward pass computes (act is the default activation).
    model_type: Hugging Face's `model_type`.
    architectures: the transformers class names config.json lists.
    remote_class: the class in io/modeling_per_layer.py that builds per-layer sizes.
    config_layout: which keys the Hugging Face config uses for the sizes.
    act_key: the config key holding the activation name.
    act_to_hf: jaxprune activation -> the name exports write.
    act_from_hf: Hugging Face activation names the reader accepts -> jaxprune's.
    layer_aliases: per_layer_config keys of this family -> jaxprune's per-layer names.
    layer_keys: per-layer keys the PyTorch loader applies -> the config attribute the modeling code reads
      (not head_dim: transformers computes one rotary table or one head split for all layers).
    head_dim_from_hidden: the modeling code derives head_dim from hidden_size / heads (GPT-2), so
      the attention split is fixed by the global head count.
    strict_heads: the config class insists that num_attention_heads divides hidden_size (LlamaConfig).
    tie_default: tie_word_embeddings when the config does not say.
    sliding: what the config does with a sliding window.
    attention_bias_groups: bias groups the config's `attention_bias` turns on.
    fixed_biases: bias groups the family always has.
    native_biases: the export rule: bias flags the family's own config writes for a spec, or None when
      the config cannot hold the spec's biases (it is then written as `fallback`).
    fallback: the family a spec with biases its own config cannot hold is written as.
    remote_mlp_bias: a spec with MLP biases the family's config cannot hold is written as the family
      itself with `mlp_bias: true`, which the shipped modeling file (io/modeling_per_layer.py) builds.
    config_extra: family-specific keys of the exported config, from (spec, bias flags).
    table: Hugging Face tensor names <-> jaxprune leaves.
    gguf_arch: llama.cpp's architecture for uniform models, or None when there is no GGUF export.
    gguf_top, gguf_block: GGUF tensor name -> Hugging Face name (blocks without their prefix).
    gguf_rope_permuted: llama.cpp permutes the rows of Q and K for its interleaved RoPE (its `llama` arch only).
    gguf_deci: per-layer widths are written as llama.cpp's `deci` (LLaMA's block, per-layer head and channel
      counts); without it only uniform models have a GGUF export.
    gguf_checks: what of a spec llama.cpp's `gguf_arch` cannot compute, as one phrase each (empty: it can).
    gguf_meta: the metadata only this family's llama.cpp architecture reads, from a spec: key without the
      `{arch}.` prefix -> value (an int is written as uint32, a float as float32, a list of bools as a bool array).
    decilm: the DeciLM (nemotron-nas) export can hold the family.
    norm_offset: RMSNorm scales by (offset + weight): 1 for Gemma, whose weights are stored around 0.
    qk_norm: an RMSNorm over head_dim on every query and key head before RoPE (Qwen3, Gemma 3).
    post_norms: each module's output is normalized before the residual add (Gemma 2 and 3).
    embed_scale: token embeddings are multiplied by sqrt(hidden_size) (Gemma).
    spec_keys: config keys only this family has -> the ModelSpec fields holding them (Gemma's scalings);
      None: a key the family's transformers code reads nowhere, accepted and ignored as there.
    fixed_keys: config keys this family reads only at one value (anything else is refused).
  """

  name: str
  norm: Norm
  act: str
  gated_mlp: bool
  positions: Positions
  model_type: str
  architectures: tuple[str, ...]
  remote_class: str
  config_layout: ConfigLayout
  act_key: str
  act_to_hf: Mapping[str, str]
  layer_keys: Mapping[str, str]
  table: TensorTable | None
  native_biases: Callable[[Any], BiasFlags | None]
  config_extra: Callable[[Any, BiasFlags], dict] = lambda spec, flags: {}
  act_from_hf: Mapping[str, str] = dataclasses.field(default_factory=lambda: HF_ACTIVATIONS)
  layer_aliases: Mapping[str, str] = dataclasses.field(default_factory=lambda: _EMPTY)
  head_dim_from_hidden: bool = False
  strict_heads: bool = False
  tie_default: bool = False
  sliding: Sliding = Sliding.IGNORE
  attention_bias_groups: tuple[str, ...] = ()
  fixed_biases: tuple[str, ...] = ()
  fallback: str | None = None
  remote_mlp_bias: bool = False
  gguf_arch: str | None = None
  gguf_top: Mapping[str, str] = dataclasses.field(default_factory=lambda: _EMPTY)
  gguf_block: Mapping[str, str] = dataclasses.field(default_factory=lambda: _EMPTY)
  gguf_rope_permuted: bool = False
  gguf_deci: bool = True
  gguf_checks: Callable[[Any], list[str]] = lambda spec: []
  gguf_meta: Callable[[Any], dict] = lambda spec: {}
  decilm: bool = False
  norm_offset: float = 0.0
  qk_norm: bool = False
  post_norms: bool = False
  embed_scale: bool = False
  spec_keys: Mapping[str, str | None] = dataclasses.field(default_factory=lambda: _EMPTY)
  fixed_keys: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _EMPTY)

  @property
  def embed_tensor(self) -> str:
    """The Hugging Face name of the token embedding (a tied LM head's weight)."""
    return next(r.hf for r in self.table.top if r.paths == (("embed", "embedding"),))


def rope_parameters(rope) -> dict:
  """A `RopeSpec` as Hugging Face's `rope_parameters`."""
  params = {"rope_type": rope.kind, "rope_theta": float(rope.theta)}
  if rope.kind in ("linear", "llama3"):
    params["factor"] = float(rope.factor)
  if rope.kind == "llama3":
    params.update(low_freq_factor=float(rope.low_freq_factor), high_freq_factor=float(rope.high_freq_factor),
                  original_max_position_embeddings=int(rope.original_max_positions))
  return params

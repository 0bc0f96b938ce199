"""How a `ModelSpec` is written for transformers: the model type, the bias flags and config.json.

The export rule (which family's config holds a spec, and which biases it pads
with zeros) is each family's `native_biases` and `fallback`
(`jaxprune.families`); this module turns the chosen family into the config dict.
Both `export.save_hf` and the DeciLM config (`decilm.py`) build on it.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxprune import families
from jaxprune.errors import ConfigError
from jaxprune.families.base import ConfigLayout, Sliding, rope_parameters
from jaxprune.spec import ModelSpec

@dataclasses.dataclass(frozen=True)
class HFTarget:
  """How a `ModelSpec` is written for transformers.

  Attributes:
    model_type: the transformers model type written to config.json.
    spec: the spec as transformers sees it: bias flags raised where zeros are padded in.
    padded: bias groups written as zeros ("qkv", "o", "mlp").
    config: the config.json dict.
    per_layer: the config carries `per_layer_config`.
    stock: stock `AutoModelForCausalLM.from_pretrained` (transformers 5.x) builds it.
    remote_code: the export ships modeling_per_layer.py (per-layer sizes, or MLP biases the
      family's modeling code has no place for).
  """

  model_type: str
  spec: ModelSpec
  padded: tuple[str, ...]
  config: dict
  per_layer: bool
  stock: bool
  remote_code: bool


def _mode(values):
  """Most common value; ties go to the one seen first."""
  return collections.Counter(values).most_common(1)[0][0]


def _layer_key(i: int, n: int) -> str:
  """Zero-padded layer index, as transformers writes per_layer_config keys."""
  return str(i).zfill(len(str(n - 1)))


def _has_biases(spec: ModelSpec) -> dict[str, bool]:
  return {"qkv": spec.qkv_bias, "o": spec.o_bias, "mlp": spec.mlp_bias}


def _bias_plan(spec: ModelSpec) -> tuple[str, dict[str, bool], bool]:
  """The model type to write, the bias flags it implies for each group, and whether its MLP
  biases need the shipped modeling file."""
  fam = families.get(spec.family)
  flags = fam.native_biases(spec)
  if flags is not None:
    return fam.model_type, flags, False
  if spec.mlp_bias and fam.remote_mlp_bias:
    flags = fam.native_biases(dataclasses.replace(spec, mlp_bias=False))
    if flags is not None:
      return fam.model_type, dict(flags, mlp=True), True
  if fam.fallback is None and fam.sliding != Sliding.IGNORE:  # Qwen3, Gemma 3: nothing else computes their block
    raise ConfigError(f"this {fam.name} model has MLP biases, which transformers' {fam.name} code cannot hold "
                      "(prune without an intercept to keep it exportable)")
  if spec.sliding_window is not None:
    if fam.sliding == Sliding.READ:
      has = _has_biases(spec)
      raise ConfigError(
          f"this {fam.name} model has biases ({', '.join(k for k, v in has.items() if v)}) that transformers' "
          f"{fam.name} code cannot hold, and sliding_window={spec.sliding_window} that its {fam.fallback} code "
          "cannot express, so no transformers family computes it (prune without an intercept to keep it exportable)")
    windowed = [f.name for f in families.REGISTRY.values() if f.sliding in (Sliding.READ, Sliding.LAYER_TYPES)]
    raise ConfigError(f"a {fam.name} model with sliding_window={spec.sliding_window} has no transformers config; "
                      f"only {', '.join(windowed)} configs (without biases) express a sliding window")
  target = families.get(fam.fallback)
  return target.model_type, target.native_biases(spec), False


def hf_problems(spec: ModelSpec) -> list[str]:
  """Why `spec` cannot be written as a transformers config (empty when it can)."""
  if spec.family not in families.exportable():
    return [f"family {spec.family!r} has no transformers export; supported: {', '.join(families.exportable())}"]
  problems = []
  uneven = [i for i, l in enumerate(spec.layers) if l.canonical().kv_map is not None]
  if uneven:
    problems.append(f"layers {uneven} have uneven query-to-KV groups, which transformers configs cannot express")
  head_dims = sorted({l.head_dim for l in spec.layers})
  if len(head_dims) > 1:
    problems.append(f"layers have different head_dim {head_dims}; transformers computes one rotary table (or one "
                    "attention split) for all layers")
  if spec.fam.head_dim_from_hidden and spec.hidden_size % head_dims[0]:
    problems.append(f"GPT-2 derives head_dim from n_embd/n_head, but head_dim {head_dims[0]} does not divide "
                    f"n_embd {spec.hidden_size}")
  try:
    _bias_plan(spec)
  except ConfigError as e:
    problems.append(str(e))
  return problems


def _per_layer_config(spec: ModelSpec, base: dict, groups) -> dict[str, dict]:
  """{layer key: overrides} for the layers whose sizes differ from the global config `base`.

  `groups(layer)` gives dicts of config keys that go together (a layer states
  both head counts when either differs).
  """
  out = {}
  for i, l in enumerate(spec.layers):
    over = {}
    for g in groups(l):
      if any(base[k] != v for k, v in g.items()):
        over.update(g)
    if over:
      out[_layer_key(i, spec.num_layers)] = over
  return out


def _llama_config(spec: ModelSpec, fam, flags: dict[str, bool]) -> tuple[dict, bool]:
  n, D, H = spec.num_layers, spec.hidden_size, spec.layers[0].head_dim
  heads = [(l.num_heads, l.num_kv_heads) for l in spec.layers]
  N, K = _mode(heads)
  F = _mode([l.ffn_dim for l in spec.layers])
  # transformers 5.x's LlamaConfig insists that num_attention_heads divides hidden_size, although the model uses
  # the explicit head_dim. When the common head count does not, the global count is one that does (the heads of
  # width head_dim that fill hidden_size), and every layer states its own count.
  if fam.strict_heads and D % N:
    N = K = D // H if D % H == 0 else 1
  cfg = {
      "architectures": list(fam.architectures),
      "model_type": fam.model_type,
      "vocab_size": spec.vocab_size,
      "hidden_size": D,
      "num_hidden_layers": n,
      "num_attention_heads": N,
      "num_key_value_heads": K,
      "head_dim": H,
      "intermediate_size": F,
      fam.act_key: fam.act_to_hf[spec.act],
      "max_position_embeddings": spec.max_positions,
      "rms_norm_eps": float(spec.norm_eps),
      "rope_parameters": rope_parameters(spec.rope),
      "tie_word_embeddings": spec.tie_embeddings,
      "bos_token_id": spec.bos_token_id,
      "eos_token_id": spec.eos_token_id,
  }
  cfg.update(fam.config_extra(spec, flags))
  per_layer = _per_layer_config(spec, cfg, lambda l: (
      {"num_attention_heads": l.num_heads, "num_key_value_heads": l.num_kv_heads}, {"intermediate_size": l.ffn_dim}))
  if per_layer:
    cfg["per_layer_config"] = per_layer
    if fam.strict_heads and any("num_attention_heads" in v for v in per_layer.values()):
      # LlamaConfig's validator reads the global num_attention_heads, which a heterogeneous config refuses to
      # give unless this documented switch is on; without it AutoConfig (hence AutoTokenizer) cannot read the
      # directory. Building the model from the global sizes still fails loudly (a size mismatch), as it should.
      cfg["allow_global_per_layer_attribute_access"] = True
  return cfg, not per_layer


def _gpt2_config(spec: ModelSpec, fam, flags: dict[str, bool]) -> tuple[dict, bool]:
  n = spec.num_layers
  H = spec.layers[0].head_dim
  N = spec.hidden_size // H  # GPT-2 splits n_embd into n_head heads: keep the original head count
  F = _mode([l.ffn_dim for l in spec.layers])
  cfg = {
      "architectures": list(fam.architectures),
      "model_type": fam.model_type,
      "vocab_size": spec.vocab_size,
      "n_embd": spec.hidden_size,
      "n_layer": n,
      "n_head": N,
      "n_inner": F,
      "n_positions": spec.max_positions,
      "layer_norm_epsilon": float(spec.norm_eps),
      "activation_function": fam.act_to_hf[spec.act],
      "tie_word_embeddings": spec.tie_embeddings,
      "bos_token_id": spec.bos_token_id,
      "eos_token_id": spec.eos_token_id,
  }
  cfg.update(fam.config_extra(spec, flags))
  per_layer = _per_layer_config(spec, cfg, lambda l: ({"n_head": l.num_heads}, {"n_inner": l.ffn_dim}))
  if per_layer:
    cfg["per_layer_config"] = per_layer
  return cfg, not per_layer


_CONFIG_WRITERS = {ConfigLayout.LLAMA: _llama_config, ConfigLayout.GPT2: _gpt2_config}


def hf_target(spec: ModelSpec) -> HFTarget:
  """The transformers form of `spec`; raises ConfigError when there is none."""
  problems = hf_problems(spec)
  if problems:
    raise ConfigError(
        "this model cannot be written as a Hugging Face checkpoint: " + "; ".join(problems) +
        ". Export it for JAX only with jax_only=True (CLI: --format jaxprune or --format orbax)")
  model_type, flags, remote_mlp_bias = _bias_plan(spec)
  padded = tuple(g for g, have in _has_biases(spec).items() if flags[g] and not have)
  hf_spec = dataclasses.replace(spec, qkv_bias=flags["qkv"], o_bias=flags["o"], mlp_bias=flags["mlp"])
  fam = families.for_model_type(model_type)
  cfg, stock = _CONFIG_WRITERS[fam.config_layout](hf_spec, fam, flags)
  if remote_mlp_bias:
    cfg["mlp_bias"] = True  # read by modeling_per_layer.add_mlp_biases (and by jaxprune's reader)
  per_layer = "per_layer_config" in cfg
  return HFTarget(model_type, hf_spec, padded, cfg, per_layer, stock and not remote_mlp_bias,
                  per_layer or remote_mlp_bias)


__all__ = ["HFTarget", "hf_problems", "hf_target"]

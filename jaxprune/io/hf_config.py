"""Hugging Face config <-> ModelSpec, with an allow-list of what is understood.

Anything that would change what the model computes and that jaxprune does not
implement is refused with the key, its value and what is supported.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxprune import families
from jaxprune.errors import ConfigError
from jaxprune.families.base import ConfigLayout, Family, Sliding
from jaxprune.io.layout import REMOTE_CODE
from jaxprune.spec import LayerSpec, ModelSpec, RopeSpec

SUPPORTED_ROPE = ("default", "linear", "llama3")

# Keys any checkpoint may carry that do not change the forward pass.
_HARMLESS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings", "max_position_embeddings",
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "per_layer_config", "id2label", "label2id", "task_specific_params", "tokenizer_class", "prefix",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "finetuning_task", "generation_config", "pruned_heads", "torchscript",
    "embd_pdrop", "resid_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "n_ctx", "n_positions", "n_embd", "n_layer", "n_head",
    "n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn", "unk_token_id", "sep_token_id", "decoder_start_token_id", "mlp_bias",
    "use_mrope", "rope_type", "partial_rotary_factor", "allow_global_per_layer_attribute_access",
}


def _get(cfg: Mapping[str, Any], key: str, default=None):
  v = cfg.get(key, default)
  return default if v is None else v


def _own_auto_map(cfg: Mapping[str, Any]) -> bool:
  """Whether `auto_map` names only the per-layer classes jaxprune's exports ship (which change
  no computation: they build every layer at the sizes per_layer_config states)."""
  own = {f"{REMOTE_CODE}.{f.remote_class}" for f in families.REGISTRY.values()}
  m = cfg.get("auto_map")
  return isinstance(m, dict) and set(m) == {"AutoModelForCausalLM"} and m["AutoModelForCausalLM"] in own


def _check_keys(fam: Family, cfg: Mapping[str, Any]) -> None:
  own = {fam.act_key, *fam.spec_keys, *fam.fixed_keys}
  if fam.sliding == Sliding.LAYER_TYPES:  # the older spellings of the window's layers and local RoPE
    own |= {"sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq"}
  unknown = sorted(k for k in cfg
                   if k not in _HARMLESS and k not in own and not (k == "auto_map" and _own_auto_map(cfg)))
  if unknown:
    *rest, last = (f.model_type for f in families.REGISTRY.values())
    raise ConfigError(
        f"config keys {unknown} are not understood by jaxprune, which will not guess what they change. "
        f"Supported keys are the standard ones of {', '.join(rest)} and {last} configs; if these keys are harmless "
        "for your checkpoint, remove them from config.json.")


def _refuse(key, value, supported):
  raise ConfigError(f"config {key}={value!r} is not supported; supported: {supported}")


def _rope(cfg: Mapping[str, Any], layer_type: str | None = None) -> RopeSpec:
  params = dict(_get(cfg, "rope_parameters", {}) or {})
  if layer_type is not None:  # Gemma 3: one set per layer type
    params = dict(params.get(layer_type) or {})
    if layer_type == "sliding_attention" and "rope_theta" not in params:
      params["rope_theta"] = float(_get(cfg, "rope_local_base_freq", 10000.0))
  legacy = dict(_get(cfg, "rope_scaling", {}) or {})
  params = {**legacy, **params}
  theta = float(params.get("rope_theta", _get(cfg, "rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in SUPPORTED_ROPE:
    _refuse("rope_type", kind, ", ".join(SUPPORTED_ROPE))
  if float(params.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0))) != 1.0:
    _refuse("partial_rotary_factor", params.get("partial_rotary_factor"), "1.0")
  if kind == "default":
    return RopeSpec(theta=theta)
  if kind == "linear":
    return RopeSpec(theta=theta, kind="linear", factor=float(params["factor"]))
  return RopeSpec(theta=theta, kind="llama3", factor=float(params["factor"]),
                  low_freq_factor=float(params["low_freq_factor"]),
                  high_freq_factor=float(params["high_freq_factor"]),
                  original_max_positions=int(params["original_max_position_embeddings"]))


def _act(fam: Family, cfg: Mapping[str, Any]) -> str:
  name = _get(cfg, fam.act_key, fam.act_to_hf[fam.act])
  if name not in fam.act_from_hf:
    _refuse("hidden_act", name, ", ".join(fam.act_from_hf))
  return fam.act_from_hf[name]


def _biases(fam: Family, cfg: Mapping[str, Any]) -> dict[str, bool]:
  """qkv_bias, o_bias and mlp_bias: the family's fixed ones, and those its config's switches turn on."""
  attn = bool(cfg.get("attention_bias", False))
  on = {"qkv": attn and "qkv" in fam.attention_bias_groups, "o": attn and "o" in fam.attention_bias_groups,
        "mlp": bool(cfg.get("mlp_bias", False))}
  return {f"{g}_bias": g in fam.fixed_biases or on[g] for g in ("qkv", "o", "mlp")}


def _per_layer(cfg: Mapping[str, Any], n_layers: int, aliases: Mapping[str, str]) -> list[dict]:
  overrides = cfg.get("per_layer_config") or {}
  out = [{} for _ in range(n_layers)]
  for k, v in overrides.items():
    i = int(k)
    if not 0 <= i < n_layers:
      raise ConfigError(f"per_layer_config names layer {k} but the model has {n_layers} layers")
    v = {aliases.get(name, name): value for name, value in v.items()}
    bad = sorted(set(v) - {"num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"})
    if bad:
      named = f" ({', '.join(aliases)})" if aliases else ""
      raise ConfigError(
          f"per_layer_config[{k}] overrides {bad}; jaxprune supports per-layer num_attention_heads, "
          f"num_key_value_heads, head_dim and intermediate_size{named}")
    out[i] = dict(v)
  return out


def spec_from_hf_config(cfg: Mapping[str, Any]) -> ModelSpec:
  """ModelSpec for a Hugging Face config dict (as in config.json)."""
  fam = families.for_model_type(cfg.get("model_type"))
  _check_keys(fam, cfg)
  for key, want in fam.fixed_keys.items():
    if cfg.get(key, want) not in (want, None):
      _refuse(key, cfg[key], repr(want))
  return _SPEC_READERS[fam.config_layout](fam, cfg)


def _llama_spec(fam: Family, cfg: Mapping[str, Any]) -> ModelSpec:
  """The spec of a config with LLaMA's keys (hidden_size, num_attention_heads, ...)."""
  n_layers = int(cfg["num_hidden_layers"])
  D = int(cfg["hidden_size"])
  N0 = int(cfg["num_attention_heads"])
  K0 = int(_get(cfg, "num_key_value_heads", N0))
  H0 = int(_get(cfg, "head_dim", D // N0))
  F0 = int(cfg["intermediate_size"])
  layers = []
  for over in _per_layer(cfg, n_layers, fam.layer_aliases):
    N = int(over.get("num_attention_heads", N0))
    layers.append(LayerSpec(N, int(over.get("num_key_value_heads", K0)), int(over.get("head_dim", H0)),
                            int(over.get("intermediate_size", F0))))

  sliding = None
  if fam.sliding == Sliding.READ:
    sliding = cfg.get("sliding_window")
  elif fam.sliding == Sliding.REFUSE:
    types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") or "sliding_attention" in types:
      _refuse("use_sliding_window", True, "False (full attention in every layer)")
  by_type = {}
  if fam.sliding == Sliding.LAYER_TYPES:
    by_type = _layer_types(cfg, n_layers)
    sliding = by_type["sliding_window"]
  return ModelSpec(
      family=fam.name,
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=D,
      layers=tuple(layers),
      norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
      max_positions=int(_get(cfg, "max_position_embeddings", 2048)),
      tie_embeddings=bool(_get(cfg, "tie_word_embeddings", fam.tie_default)),
      rope=_rope(cfg, "full_attention" if by_type else None),
      sliding_window=int(sliding) if sliding is not None else None,
      sliding_layers=by_type.get("sliding_layers"),
      rope_local=by_type.get("rope_local"),
      **{field: float(cfg[key]) for key, field in fam.spec_keys.items() if field and cfg.get(key) is not None},
      **_biases(fam, cfg),
      act=_act(fam, cfg),
      bos_token_id=_token_id(cfg.get("bos_token_id")),
      eos_token_id=_token_id(cfg.get("eos_token_id")),
  )


def _layer_types(cfg: Mapping[str, Any], n_layers: int) -> dict:
  """Gemma 3's window: on the layers `layer_types` marks sliding (by default five of every
  `sliding_window_pattern`), each with the sliding layers' RoPE."""
  pattern = int(_get(cfg, "sliding_window_pattern", _get(cfg, "_sliding_window_pattern", 6)))
  types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(n_layers)]
  if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
    _refuse("layer_types", types, f"{n_layers} entries, each sliding_attention or full_attention")
  window = cfg.get("sliding_window")
  return {"sliding_window": window,
          "sliding_layers": tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
          "rope_local": _rope(cfg, "sliding_attention")}


def _token_id(v):
  if isinstance(v, (list, tuple)):
    v = v[0] if v else None
  return None if v is None else int(v)


def _gpt2_spec(fam: Family, cfg: Mapping[str, Any]) -> ModelSpec:
  """The spec of a config with GPT-2's keys (n_embd, n_head, ...)."""
  if cfg.get("scale_attn_by_inverse_layer_idx"):
    _refuse("scale_attn_by_inverse_layer_idx", True, "False")
  if cfg.get("scale_attn_weights") is False:
    _refuse("scale_attn_weights", False, "True")
  if cfg.get("add_cross_attention"):
    _refuse("add_cross_attention", True, "False")
  D = int(_get(cfg, "n_embd", 768))
  N = int(_get(cfg, "n_head", 12))
  F = int(_get(cfg, "n_inner", 4 * D))
  n_layers = int(_get(cfg, "n_layer", 12))
  layers = []
  for over in _per_layer(cfg, n_layers, fam.layer_aliases):
    n = int(over.get("num_attention_heads", N))
    layers.append(LayerSpec(n, n, int(over.get("head_dim", D // N)), int(over.get("intermediate_size", F))))
  return ModelSpec(
      family=fam.name,
      vocab_size=int(_get(cfg, "vocab_size", 50257)),
      hidden_size=D,
      layers=tuple(layers),
      norm_eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)),
      max_positions=int(_get(cfg, "n_positions", 1024)),
      tie_embeddings=bool(_get(cfg, "tie_word_embeddings", fam.tie_default)),
      rope=None,
      **_biases(fam, cfg),
      act=_act(fam, cfg),
      bos_token_id=_token_id(cfg.get("bos_token_id")),
      eos_token_id=_token_id(cfg.get("eos_token_id")),
  )


_SPEC_READERS = {ConfigLayout.LLAMA: _llama_spec, ConfigLayout.GPT2: _gpt2_spec}

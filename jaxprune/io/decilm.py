"""The Hugging Face DeciLM (`nemotron-nas`) config, which vLLM and TensorRT-LLM load natively.

DeciLM is LLaMA with a `block_configs` list: per block, `attention.n_heads_in_group`
(query heads per KV head) and the FFN width. vLLM's `nemotron_nas` model builds every
attention with the one global `num_attention_heads` and `num_attention_heads //
n_heads_in_group` KV heads, so only models with the same query-head count in every
layer and even KV groups fit; KV groups and FFN widths may differ per layer.

FFN width: vLLM reads `ffn.ffn_mult` when the block has it (width
`int(2 * ffn_mult * hidden_size / 3)` rounded up to a multiple of 256), else
`ffn.intermediate_size` exactly. NVIDIA's own `block_config.py` (the checkpoints'
remote code) requires `ffn_mult` and drops `intermediate_size`. So every block states
`intermediate_size`, and `ffn_mult` only when it gives the same width (a multiple
of 256): such blocks read the same under both config classes, the others only under
the config class this export ships (`configuration_decilm.py`).
"""

from __future__ import annotations

import os
import shutil

from jaxprune.errors import ConfigError
from jaxprune.io.hf_target import HFTarget, hf_target
from jaxprune.spec import ModelSpec

MODEL_TYPE = "nemotron-nas"
CONFIG_CODE = "configuration_decilm"
# Global LLaMA keys vLLM's DeciLM code reads; the per-layer sizes live in block_configs.
_GLOBAL_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "hidden_act", "max_position_embeddings",
                "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id")


def vllm_ffn_width(ffn_mult: float, hidden_size: int) -> int:
  """The FFN width vLLM's nemotron_nas derives from `ffn_mult` (DeciLM's rule)."""
  width = int(2 * ffn_mult * hidden_size / 3)
  return -(-width // 256) * 256


def ffn_mult(width: int, hidden_size: int) -> float | None:
  """An `ffn_mult` (6 decimals, as NVIDIA's config rounds it) that vLLM turns back into `width`, or None."""
  mult = round(1.5 * width / hidden_size, 6)
  return mult if width > 0 and vllm_ffn_width(mult, hidden_size) == width else None


def decilm_problems(spec: ModelSpec) -> list[str]:
  """Why `spec` cannot be written as a DeciLM config (empty when it can)."""
  if not spec.fam.decilm or spec.sliding_window is not None:
    return [f"DeciLM is LLaMA-only; a {spec.family} model"
            + (f" with sliding_window={spec.sliding_window}" if spec.sliding_window is not None else "")
            + " has no DeciLM form"]
  problems = []
  heads = sorted({l.num_heads for l in spec.layers})
  if len(heads) > 1:
    problems.append(f"layers have different query-head counts {heads}; DeciLM has one num_attention_heads for "
                    "all layers (prune MLP channels or whole KV groups only)")
  uneven = [i for i, l in enumerate(spec.layers) if l.canonical().kv_map is not None]
  if uneven:
    problems.append(f"layers {uneven} have uneven query-to-KV groups; n_heads_in_group is one group size per layer")
  if len({l.head_dim for l in spec.layers}) > 1:
    problems.append("layers have different head_dim; DeciLM has one head_dim")
  empty = [i for i, l in enumerate(spec.layers) if l.ffn_dim == 0 or l.num_heads == 0]
  if empty:
    problems.append(f"layers {empty} have no heads or no FFN channels left")
  biases = [g for g, on in (("qkv", spec.qkv_bias), ("o", spec.o_bias), ("mlp", spec.mlp_bias)) if on]
  if biases:
    problems.append(f"the model has {'/'.join(biases)} biases (reconstruction with an intercept), which NVIDIA's "
                    "DeciLM config and modeling code have no place for (prune without an intercept)")
  if spec.act != "silu":
    problems.append(f"activation {spec.act!r}: vLLM's DeciLM MLP is SiLU-gated only")
  return problems


def _block(layer, hidden_size: int) -> dict:
  ffn = {"no_op": False, "replace_with_linear": False, "intermediate_size": layer.ffn_dim}
  mult = ffn_mult(layer.ffn_dim, hidden_size)
  if mult is not None:
    ffn["ffn_mult"] = mult
  return {"attention": {"no_op": False, "replace_with_linear": False,
                        "n_heads_in_group": layer.num_heads // layer.num_kv_heads},
          "ffn": ffn}


def decilm_config(spec: ModelSpec) -> dict | None:
  """config.json for `spec` as DeciLM (`DeciLMForCausalLM`, `nemotron-nas`), or None when it has none
  (`decilm_problems` says why)."""
  if decilm_problems(spec):
    return None
  llama = hf_target(spec).config
  cfg = {k: llama[k] for k in _GLOBAL_KEYS}
  rope = llama["rope_parameters"]
  cfg.update(
      architectures=["DeciLMForCausalLM"], model_type=MODEL_TYPE, num_attention_heads=spec.layers[0].num_heads,
      # Older vLLM and TensorRT-LLM read the pre-5.x rope keys.
      rope_theta=rope["rope_theta"], attention_bias=False, mlp_bias=False,
      block_configs=[_block(l, spec.hidden_size) for l in spec.layers],
      auto_map={"AutoConfig": f"{CONFIG_CODE}.DeciLMConfig"})
  if rope["rope_type"] != "default":
    cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  return cfg


def decilm_target(spec: ModelSpec) -> HFTarget:
  """The `HFTarget` that `save_hf(..., decilm=True)` writes; a one-line ConfigError when there is none."""
  cfg = decilm_config(spec)
  if cfg is None:
    raise ConfigError("this model cannot be written as a DeciLM (nemotron-nas) config: " +
                      "; ".join(decilm_problems(spec)) + ". Use --format hf or --format gguf instead")
  return HFTarget(MODEL_TYPE, spec, (), cfg, per_layer=False, stock=False, remote_code=False)


def ship_config_code(out_dir: str) -> str:
  """Copies the config class that `auto_map` names into `out_dir`; returns its file name."""
  name = CONFIG_CODE + ".py"
  shutil.copyfile(os.path.join(os.path.dirname(__file__), name), os.path.join(out_dir, name))
  return name


__all__ = ["CONFIG_CODE", "MODEL_TYPE", "decilm_config", "decilm_problems", "decilm_target", "ffn_mult",
           "ship_config_code", "vllm_ffn_width"]

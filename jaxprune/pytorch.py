"""Loading exported (pruned) models in PyTorch with transformers.

`load_pruned(path)` returns a `transformers` causal LM for any directory that
`jaxprune.io.export.save_hf` wrote:

* when the installed transformers builds the config natively with every
  tensor at its exported shape (always true for plain configs it accepts), it
  simply calls `AutoModelForCausalLM.from_pretrained`;
* otherwise it builds the model from the global config and replaces each layer
  named in `per_layer_config` by one built from that layer's own config (for
  GPT-2, whose attention derives its split from n_embd, the attention
  projections are resized), then loads the weights strictly.

Only stock transformers classes are used; no modeling code is forked. PyTorch
is imported lazily, so `import jaxprune` never needs it.
"""

from __future__ import annotations

import copy
import logging
import os

from jaxprune import families
from jaxprune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def _torch():
  try:
    import torch
  except ImportError:
    raise ConfigError("jaxprune.pytorch needs PyTorch; install it (pip install 'jaxprune[torch]', or on CPU "
                      "pip install torch first)") from None
  return torch


def _config_dict(path: str) -> dict:
  from jaxprune.io.hf import read_json
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    hint = (" It holds jaxprune.json only: a JAX-only export (e.g. uneven GQA groups), which PyTorch cannot load; "
            "load it with jaxprune.load" if os.path.exists(os.path.join(path, "jaxprune.json")) else "")
    raise CheckpointError(f"{path} has no config.json.{hint}")
  cfg = read_json(cfg_path)
  known = [f.model_type for f in families.REGISTRY.values()]
  if cfg.get("model_type") not in known:
    raise ConfigError(f"model_type {cfg.get('model_type')!r} is not supported by load_pruned; supported: "
                      f"{', '.join(known)}")
  return cfg


def _file_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape, from the safetensors headers (no data is read)."""
  from safetensors import SafetensorError, safe_open

  from jaxprune.io.hf import weight_files
  shapes = {}
  for f in weight_files(path):
    if not f.endswith(".safetensors"):
      raise CheckpointError(f"{f}: load_pruned reads safetensors only; re-export the model with jaxprune export")
    try:
      with safe_open(f, framework="pt") as st:
        shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
  return shapes


def _shapes_match(model, shapes: dict, tied: bool) -> list[str]:
  """Mismatches between a model's state dict and the file's tensors (empty when they agree)."""
  have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  bad = [f"{k}: model {have.get(k)}, file {s}" for k, s in shapes.items() if have.get(k) != s]
  bad += [f"{k}: not in the file" for k in have if k not in shapes and not (tied and k == "lm_head.weight")]
  return bad


def _tied(cfg: dict) -> bool:
  return bool(cfg.get("tie_word_embeddings", families.for_model_type(cfg["model_type"]).tie_default))


def native_support(path: str) -> bool:
  """True when the installed transformers builds `path` with every tensor at its exported shape."""
  return _native_problems(path, _config_dict(path), _file_shapes(path)) == []


def _native_problems(path: str, cfg: dict, shapes: dict) -> list[str]:
  torch = _torch()
  from transformers import AutoConfig, AutoModelForCausalLM
  from transformers.utils import logging as hf_logging
  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()  # the probe's warnings about global per-layer values are expected
  try:
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
      model = AutoModelForCausalLM.from_config(config)
  except Exception as e:  # noqa: BLE001 -- probing: any failure means "not natively"
    return [f"transformers cannot build it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
  finally:
    hf_logging.set_verbosity(verbosity)
  return _shapes_match(model, shapes, _tied(cfg))


def _make_config(cls, d: dict):
  """A config object for `d`, even where transformers' validators reject the pruned sizes.

  transformers 5.x's LlamaConfig requires num_attention_heads to divide
  hidden_size although the model uses the explicit head_dim; such configs are
  built with one head and then given their real sizes.
  """
  from huggingface_hub.errors import StrictDataclassError
  try:
    return cls(**d)
  except (StrictDataclassError, ValueError) as e:
    if "num_attention_heads" not in d or "head_dim" not in d:
      raise ConfigError(f"transformers refuses this config ({e}); it was not written by jaxprune export") from None
    cfg = cls(**{**d, "num_attention_heads": 1, "num_key_value_heads": 1})
    cfg.num_attention_heads = d["num_attention_heads"]
    cfg.num_key_value_heads = d.get("num_key_value_heads", d["num_attention_heads"])
    return cfg


def _layer_config(config, fam, i: int, over: dict):
  keys = fam.layer_keys
  bad = sorted(set(over) - set(keys))
  if bad:
    raise ConfigError(f"per_layer_config[{i}] overrides {bad}; load_pruned supports per-layer {sorted(keys)}")
  lc = copy.copy(config)
  for k, v in over.items():
    setattr(lc, keys[k], v)
  return lc


def _adopt_config(layer, layer_cfg, config) -> None:
  """Points the new layer's modules at the model's config (sizes were read at construction), so that settings
  changed later on the model, like the attention implementation, reach them."""
  for m in layer.modules():
    if getattr(m, "config", None) is layer_cfg:
      m.config = config


def _gpt2_block(config, layer_cfg, i: int):
  """A GPT-2 block with the layer's MLP width and its attention resized to the layer's head count.

  GPT2Attention splits c_attn at n_embd and derives head_dim and the softmax
  scale from n_embd/n_head, so the block is built with the global head count
  (right head_dim and scale) and only the projections and split are resized.
  """
  from transformers.models.gpt2.modeling_gpt2 import GPT2Block
  from transformers.pytorch_utils import Conv1D

  N = layer_cfg.n_head
  layer_cfg.n_head = config.n_head
  blk = GPT2Block(layer_cfg, layer_idx=i)
  a = blk.attn
  D, H = config.n_embd, a.head_dim
  a.num_heads, a.split_size = N, N * H
  a.c_attn = Conv1D(3 * N * H, D)
  a.c_proj = Conv1D(D, N * H)
  return blk


def _build(cfg: dict, attn_implementation):
  """The model of `cfg` with every layer at its own size (weights uninitialised)."""
  from transformers import CONFIG_MAPPING, AutoModelForCausalLM
  from transformers.initialization import no_init_weights

  from jaxprune.io.modeling_per_layer import add_mlp_biases

  fam = families.for_model_type(cfg["model_type"])
  overrides = {int(k): dict(v) for k, v in (cfg.get("per_layer_config") or {}).items()}
  base = {k: v for k, v in cfg.items() if k not in ("per_layer_config", "allow_global_per_layer_attribute_access")}
  config = _make_config(CONFIG_MAPPING[fam.model_type], base)
  n = config.num_hidden_layers
  bad = sorted(i for i in overrides if not 0 <= i < n)
  if bad:
    raise ConfigError(f"per_layer_config names layers {bad}, but the model has {n} layers")
  with no_init_weights():
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    config = model.config
    for i, over in sorted(overrides.items()):
      lc = _layer_config(config, fam, i, over)
      if fam.head_dim_from_hidden:
        layer = _gpt2_block(config, lc, i)
        model.transformer.h[i] = layer
      else:
        layer = type(model.model.layers[i])(lc, i)
        model.model.layers[i] = layer
      _adopt_config(layer, lc, config)
    add_mlp_biases(model, config)
  model.tie_weights()  # no_init_weights also skips tying the embedding to the LM head
  return model


def _read_state_dict(path: str) -> dict:
  from safetensors import SafetensorError
  from safetensors.torch import load_file

  from jaxprune.io.hf import weight_files
  sd = {}
  for f in weight_files(path):
    try:
      sd.update(load_file(f))
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
  return sd


def _torch_dtype(torch, dtype, cfg: dict):
  if dtype is None:
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
  if isinstance(dtype, str):
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
      raise ConfigError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    dtype = getattr(torch, dtype)
  return dtype


def load_pruned(path: str, *, dtype=None, attn_implementation: str | None = None, device=None):
  """Loads a jaxprune export (plain or per-layer config) as a transformers causal LM.

  Args:
    path: a directory written by `jaxprune.io.save_hf` / `jaxprune export --format hf`.
    dtype: torch dtype or name (default: the dtype the weights were written in).
    attn_implementation: passed to transformers ('eager', 'sdpa', ...).
    device: where to put the model (default: CPU).

  Returns:
    A `transformers.PreTrainedModel` in eval mode. `model.jaxprune_loader`
    says how it was built: 'transformers' (natively) or 'per_layer'.

  Raises:
    CheckpointError: missing, corrupt or mismatching files.
    ConfigError: a family or per-layer key that load_pruned does not know.
  """
  torch = _torch()
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory; pass the output directory of jaxprune export")
  cfg = _config_dict(path)
  shapes = _file_shapes(path)
  torch_dtype = _torch_dtype(torch, dtype, cfg)
  tied = _tied(cfg)

  problems = _native_problems(path, cfg, shapes)
  if not problems:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    model.jaxprune_loader = "transformers"
  else:
    log.debug("building %s layer by layer: %s", path, "; ".join(problems[:3]))
    model = _build(cfg, attn_implementation)
    mismatch = _shapes_match(model, shapes, tied)
    if mismatch:
      raise CheckpointError(f"{path}: the weights do not fit config.json ({len(mismatch)} tensors, e.g. "
                            f"{'; '.join(mismatch[:3])}). Re-export the model")
    sd = _read_state_dict(path)
    if tied and "lm_head.weight" not in sd:
      sd["lm_head.weight"] = sd[families.for_model_type(cfg["model_type"]).embed_tensor]
    model.load_state_dict(sd, strict=True)
    model.jaxprune_loader = "per_layer"
    model = model.to(torch_dtype)
  if device is not None:
    model = model.to(device)
  return model.eval()


def count_parameters(model) -> int:
  """Parameters of a torch model, a tied embedding counted once."""
  return int(sum(p.numel() for p in model.parameters()))


__all__ = ["count_parameters", "load_pruned", "native_support"]

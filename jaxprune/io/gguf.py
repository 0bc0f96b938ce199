"""Reading GGUF files (LLaMA architecture) through the `gguf` package.

Tensors are dequantized to float32 with `gguf.quants.dequantize`, so every
quantization type that package implements is supported. llama.cpp's converter
permutes the rows of Q and K for its interleaved RoPE; they are permuted back
exactly as transformers' GGUF loader does, so the weights are in Hugging Face
layout and go through the same key table as a Hugging Face checkpoint.
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxprune.errors import CheckpointError, ConfigError
from jaxprune.io.hf import to_device
from jaxprune.io.hf_config import spec_from_hf_config
from jaxprune.io.mapping import tensors_to_params
from jaxprune.model import Model
from jaxprune.spec import check_params

SUPPORTED_ARCHS = ("llama",)

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
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
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def _reader(path: str):
  import gguf

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/struct.error/IndexError on damaged files
    raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                          "it may be truncated or corrupt") from None


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  v = f.contents()
  return v


def hf_config_from_gguf(reader, path: str = "") -> dict:
  """The Hugging Face config dict a GGUF file's metadata describes."""
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
  a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
  names = {t.name for t in reader.tensors}
  n_heads = int(a("attention.head_count"))
  hidden = int(a("embedding_length"))
  vocab = a("vocab_size")
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  cfg = {
      "model_type": "llama",
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(a("feed_forward_length")),
      "num_hidden_layers": int(a("block_count")),
      "num_attention_heads": n_heads,
      "num_key_value_heads": int(a("attention.head_count_kv", n_heads)),
      "head_dim": int(a("attention.key_length", hidden // n_heads)),
      "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
      "max_position_embeddings": int(a("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "hidden_act": "silu",
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
  }
  rope = {"rope_type": "default", "rope_theta": float(a("rope.freq_base", 10000.0))}
  scaling = a("rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ConfigError(f"{path}: GGUF rope.scaling.type {scaling!r} is not supported; supported: none, linear")
    rope.update(rope_type="linear", factor=float(a("rope.scaling.factor")))
  if "rope_freqs.weight" in names:
    raise ConfigError(f"{path}: GGUF per-frequency RoPE factors (rope_freqs.weight, as in Llama 3.1) are not "
                      "supported; load the Hugging Face checkpoint instead")
  cfg["rope_parameters"] = rope
  return cfg


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (rows grouped per head as (2, H/2) -> (H/2, 2))."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf_tensors(reader, cfg: dict, path: str = "") -> dict[str, np.ndarray]:
  """GGUF tensors, dequantized to f32 and renamed to Hugging Face keys."""
  from gguf.quants import dequantize

  out = {}
  for t in reader.tensors:
    m = _BLOCK_RE.fullmatch(t.name)
    if m and m.group(2) in _BLOCK:
      key = f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    elif t.name in _TOP:
      key = _TOP[t.name]
    else:
      raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r} for a llama model")
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except (NotImplementedError, ValueError, KeyError) as e:
      raise CheckpointError(f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the installed "
                            f"gguf package cannot dequantize ({e})") from None
    w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # GGUF lists dims fastest-first
    if ".attn_q." in t.name:
      w = reverse_permute(w, cfg["num_attention_heads"])
    elif ".attn_k." in t.name:
      w = reverse_permute(w, cfg["num_key_value_heads"])
    out[key] = w
  return out


def load_gguf(path: str, dtype=np.float32) -> Model:
  """Loads a LLaMA-architecture GGUF file as a jaxprune `Model`."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is not a file")
  reader = _reader(path)
  cfg = hf_config_from_gguf(reader, path)
  spec = spec_from_hf_config(cfg)
  params = tensors_to_params(spec, read_gguf_tensors(reader, cfg, path), source=path)
  check_params(spec, params)
  return Model(spec, to_device(params, dtype), source=os.path.abspath(path))


def load_gguf_tokenizer(path: str):
  """A transformers fast tokenizer built from the GGUF's vocabulary.

  Uses transformers' own GGUF tokenizer conversion (the code behind
  `AutoTokenizer.from_pretrained(..., gguf_file=...)`), imported directly
  because the public entry point also imports torch.
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

  architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
  backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tokenizer_config, **extra})

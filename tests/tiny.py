"""Tiny random models built with transformers' own classes."""

from __future__ import annotations

KINDS = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16})),
    "llama_bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    # Every other layer slides (Gemma-3-270M: five of every six). head_dim 32
    # with 4 heads is wider than hidden (Gemma-3-270M's 256 x 4 over 640); one KV head, as there.
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                        sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                                        sliding_window_pattern=2, bos_token_id=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)),
}
# GGUF exports for llama.cpp. transformers' GGUF loader reads no head_dim for qwen3 (it takes
# Qwen3Config's 128) and, for gemma3, no query_pre_attn_scalar (256), window pattern (five of six),
# soft-cap or local RoPE base: these two keep its defaults. llama.cpp's gemma3 scales queries by
# head_dim, so "gemma3_cpp" is "gemma3" with that scale and a window on layers no period describes.
KINDS["qwen3_gguf"] = ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128))
KINDS["gemma3_gguf"] = ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                                 query_pre_attn_scalar=256, sliding_window=8, num_hidden_layers=6,
                                                 bos_token_id=2))
KINDS["gemma3_cpp"] = ("Gemma3TextConfig", {
    **KINDS["gemma3"][1], "query_pre_attn_scalar": 32, "num_hidden_layers": 3, "sliding_window_pattern": None,
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}})
LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=None)
VOCAB = 128


def build(kind: str, seed: int = 0, layers: int | None = None, vocab: int = VOCAB):
  """A transformers model of `kind` with every parameter (biases too) random (`layers` blocks, default 2;
  `vocab` tokens: a real tokenizer's size where a tool needs one, as llama.cpp does)."""
  import torch
  import transformers

  cls_name, extra = KINDS[kind]
  kw = dict(extra) if kind == "gpt2" else {**LLAMA_LIKE, **extra}
  if layers is not None:
    kw["n_layer" if kind == "gpt2" else "num_hidden_layers"] = layers
  kw["vocab_size"] = vocab
  cfg = getattr(transformers, cls_name)(**kw)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 1:  # norms and biases: random, so that a mapping error shows
        p.normal_(mean=1.0 if p.numel() == cfg.hidden_size else 0.0, std=0.2)
  return model


def save(kind: str, path: str, seed: int = 0, layers: int | None = None) -> str:
  build(kind, seed, layers).save_pretrained(path)
  return path


WORDS = [f"w{i}" for i in range(VOCAB - 1)]


def add_word_tokenizer(path: str) -> str:
  """Saves a word-level tokenizer over WORDS (ids 1..VOCAB-1) into a model directory."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
  return path


def write_words(path: str, n: int, seed: int = 0) -> str:
  import numpy as np

  with open(path, "w") as f:
    f.write(" ".join(np.random.default_rng(seed).choice(WORDS, size=n)))
  return path

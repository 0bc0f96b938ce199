"""Reading Hugging Face checkpoint directories.

Supports config.json with model.safetensors, sharded safetensors with an index,
and pytorch_model.bin (needs the `torch` extra). A `jaxprune.json` beside the
weights (written by jaxprune for pruned models) carries the full `ModelSpec`,
including uneven query-to-KV groupings that a Hugging Face config cannot say.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import CheckpointError
from jaxprune.io.layout import SPEC_FILE
from jaxprune.io.hf_config import spec_from_hf_config
from jaxprune.io.mapping import tensors_to_params
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, check_params

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); the file may be truncated or corrupt") from None


def read_spec(path: str) -> ModelSpec:
  """The ModelSpec of an HF directory: jaxprune.json if present, else config.json."""
  own = os.path.join(path, SPEC_FILE)
  if os.path.exists(own):
    return ModelSpec.from_json(read_json(own)["spec"])
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{path} has no config.json; a Hugging Face model directory needs one")
  return spec_from_hf_config(read_json(cfg_path))


def weight_files(path: str) -> list[str]:
  """The weight files of a directory, shards resolved through their index."""
  for name in WEIGHT_FILES:
    f = os.path.join(path, name)
    if not os.path.exists(f):
      continue
    if name.endswith(".index.json"):
      shards = sorted(set(read_json(f).get("weight_map", {}).values()))
      if not shards:
        raise CheckpointError(f"{f} lists no shards in its weight_map")
      missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
      if missing:
        raise CheckpointError(f"{f} names shards that are not in {path}: {missing}")
      return [os.path.join(path, s) for s in shards]
    return [f]
  raise CheckpointError(
      f"{path} holds no model weights; looked for {', '.join(WEIGHT_FILES)}. "
      "Point jaxprune at a directory written by save_pretrained (or jaxprune export).")


def _read_safetensors(f: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(f, framework="numpy") as st:
      return {k: st.get_tensor(k) for k in st.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(
        f"{f} is not a readable safetensors file ({e}); it is probably truncated or corrupt. "
        "Re-download or re-export it.") from None


def _read_torch_bin(f: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{f} is a PyTorch pickle; reading it needs torch. Install jaxprune[torch], or convert the checkpoint "
        "to safetensors.") from None
  try:
    sd = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a damaged zip
    raise CheckpointError(f"{f} could not be read by torch.load ({type(e).__name__}: {e}); it may be corrupt") from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def read_tensors(files: Iterable[str]) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for f in files:
    out.update(_read_safetensors(f) if f.endswith(".safetensors") else _read_torch_bin(f))
  return out


def load_hf(path: str, dtype=np.float32, lazy: bool = False) -> Model:
  """Loads a Hugging Face model directory as a jaxprune `Model`.

  With `lazy` (safetensors checkpoints), blocks are read when used (`jaxprune.io.lazy`);
  PyTorch pickles cannot be read a tensor at a time and are loaded whole.
  """
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  spec = read_spec(path)
  files = weight_files(path)
  if lazy:
    from jaxprune.io import lazy as lazy_io

    if lazy_io.can_stream(files):
      return lazy_io.lazy_model(spec, *lazy_io.safetensors_reader(files), path, dtype,
                                view=lazy_io.safetensors_views(files))
  params = tensors_to_params(spec, read_tensors(files), source=path)
  check_params(spec, params)
  return Model(spec, to_device(params, dtype), source=os.path.abspath(path))


def to_device(params, dtype):
  """numpy leaves -> jax arrays of `dtype` (tuples stay tuples).

  `dtype` may be a name ("bfloat16"), which numpy alone does not understand.
  One `device_put` moves the whole tree; a cast, where needed, runs in XLA.
  """
  dtype = jnp.dtype(dtype)
  arrays = jax.device_put(jax.tree.map(np.asarray, params))
  return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), arrays)


"""Reading Hugging Face checkpoint directories.

Supports config.json with model.safetensors, sharded safetensors with an index,
and pytorch_model.bin (needs the `torch` extra). A `jaxprune.json` beside the
weights (written by jaxprune for pruned models) carries the full `ModelSpec`,
including uneven query-to-KV groupings that a Hugging Face config cannot say.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import CheckpointError
from jaxprune.io.layout import SPEC_FILE
from jaxprune.io.hf_config import spec_from_hf_config
from jaxprune.io.mapping import normalize_keys, table, tensors_to_params, untie_distinct_head
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, check_params

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_json(path: str) -> dict:
  regular_file(path, path)
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); the file may be truncated or corrupt") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} holds a JSON {type(d).__name__}, expected an object; the file is not what its "
                          "name says")
  return d


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
    if not os.path.lexists(f):
      continue
    if name.endswith(".index.json"):
      return _index_shards(path, f)
    return [regular_file(f, f"{name} in {path}")]
  raise CheckpointError(
      f"{path} holds no model weights; looked for {', '.join(WEIGHT_FILES)}. "
      "Point jaxprune at a directory written by save_pretrained (or jaxprune export).")


def _index_shards(path: str, index: str) -> list[str]:
  weight_map = read_json(index).get("weight_map", {})
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index}: weight_map is a {type(weight_map).__name__}, expected an object of "
                          "tensor name -> shard file name; the index is corrupt")
  shards = sorted({str(s) for s in weight_map.values()})
  if not shards:
    raise CheckpointError(f"{index} lists no shards in its weight_map")
  missing = [s for s in shards if _confined(path, s) and not os.path.lexists(os.path.join(path, s))]
  if missing:
    raise CheckpointError(f"{index} names shards that are not in {path}: {missing}")
  return [_shard(path, index, s) for s in shards]


def _confined(path: str, shard: str) -> bool:
  """Whether an index entry names a file of the directory itself (no absolute path, no `..`)."""
  return bool(shard) and not os.path.isabs(shard) and ".." not in shard.replace("\\", "/").split("/")


def _shard(path: str, index: str, shard: str) -> str:
  """The path of index entry `shard`, which must be a regular file inside `path`.

  An index is data from whoever published the model: an entry may not reach a file outside
  the directory (`../`, an absolute path, a symlink pointing out), nor a FIFO or device, which
  would hang or read something that is not a checkpoint. Symlinks into the Hub cache's `blobs`
  folder are how every downloaded model is stored, so they are accepted.
  """
  f = os.path.join(path, shard)
  where = f"{index} entry {shard!r}"
  if not _confined(path, shard):
    raise CheckpointError(f"{where} is not a file name inside {path}; shard names must be relative and stay in "
                          "the model directory. Fix the index's weight_map (or re-export the model)")
  real, roots = os.path.realpath(f), [os.path.realpath(path)]
  if os.path.basename(os.path.dirname(roots[0])) == "snapshots":  # the Hub cache: snapshots/REV -> ../../blobs
    roots.append(os.path.join(os.path.dirname(os.path.dirname(roots[0])), "blobs"))
  if not any(real.startswith(r + os.sep) for r in roots):
    raise CheckpointError(f"{where} is a symlink that leads to {real}, outside {path}; shards must be files of the "
                          "model directory. Copy the file into it instead of linking")
  return regular_file(f, where)


def regular_file(f: str, what: str) -> str:
  """`f`, after checking that it is a regular file (a FIFO would block the read forever)."""
  try:
    mode = os.stat(f).st_mode
  except OSError as e:
    raise CheckpointError(f"{what} cannot be read ({f}: {e.strerror}); restore the file") from None
  if not stat.S_ISREG(mode):
    raise CheckpointError(f"{what} is not a regular file ({f}); weights must be plain files. Replace it with the "
                          "checkpoint file")
  return f


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
  bad = _not_a_state_dict(sd, torch.Tensor)
  if bad:
    raise CheckpointError(f"{f} does not hold a PyTorch state dict ({bad}); expected a dict of tensor name -> "
                          "tensor, as save_pretrained writes. Point jaxprune at the model's weights")
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def _not_a_state_dict(sd, tensor_type) -> str:
  """What makes an unpickled object not a state dict (empty when it is one)."""
  if not isinstance(sd, dict):
    return f"it holds a {type(sd).__name__}"
  if not sd:
    return "it holds an empty dict"
  for k, v in sd.items():
    if not isinstance(k, str) or not isinstance(v, tensor_type):
      return f"entry {k!r} is a {type(v).__name__}"
  return ""


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
  tensors = normalize_keys(table(spec), read_tensors(files))
  spec = untie_distinct_head(spec, tensors, tensors.__getitem__, path)
  params = tensors_to_params(spec, tensors, source=path)
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


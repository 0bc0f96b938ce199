"""What a run's checkpoint must agree on with the run that resumes it, and the hashes that
prove its files are the ones written: one digest per input (the model's every tensor, the
calibration windows, the scoring windows, the configuration), and the sha256 of a file or of a
directory's files (`jaxprune.prune.checkpoint`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune.errors import CheckpointError

log = logging.getLogger(__name__)

# sha256 of weight files on one busy core (measured, see `weights_digest`); past ANNOUNCE_BYTES
# (a few seconds of it) the hashing is announced with its estimated time.
HASH_BYTES_PER_S = 0.58e9
ANNOUNCE_BYTES = 2e9


def _leaf_update(h, name: str, x) -> None:
  """Adds one tensor (its name, dtype, shape and values) to the hash `h`."""
  h.update(f"{name}:{x.dtype}{tuple(x.shape)}".encode())
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Split over processes: a checksum computed where the shards live, so nothing is gathered.
    h.update(np.asarray(_device_checksum(x)).tobytes())
  else:
    h.update(np.ascontiguousarray(np.asarray(x)).view(np.uint8).reshape(-1).data)


@jax.jit
def _device_checksum(x):
  """Two position-weighted sums of the bits of `x` (any change of one value changes them)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32).reshape(-1)
  pos = jnp.arange(bits.size, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(bits * (2 * pos + 1)), jnp.sum(bits ^ (pos * jnp.uint32(2654435761)))])


def _digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    _leaf_update(h, "", np.asarray(a))
  return h.hexdigest()[:16]


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
  """The sha256 of a file, read in chunks (memory stays at `chunk` bytes whatever its size)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def dir_sha256(path: str) -> str:
  """The sha256 of a directory's files: their names within it and their contents, in sorted order."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      f = os.path.join(root, name)
      h.update(f"{os.path.relpath(f, path)}:{file_sha256(f)}\n".encode())
  return h.hexdigest()


def _weight_files(source: str) -> list[str]:
  """The files a streamed model's blocks are read from: the file itself (GGUF, safetensors), a
  Hugging Face directory's weight files, or every file of another directory (Orbax)."""
  if os.path.isfile(source):
    return [source]
  from jaxprune.io.hf import weight_files

  try:
    return weight_files(source)
  except CheckpointError:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs)


def weights_digest(params) -> str:
  """One digest of every tensor of a model.

  Blocks streamed from files (`jaxprune.io.lazy`) are hashed as the files they are read
  from, streamed through sha256: one sequential read that the run's own reads then find
  in the page cache, no decoding or dequantizing, and no block held in memory (0.58 GB/s
  on one busy core with SHA-NI: 1.2 s for SmolLM2's 98 MB GGUF and 113 MB embedding, a
  few minutes for a 70B model whose pruning takes hours). Hashing the tensors as the loop
  reads them would cost nothing extra, but a resumed run would have to read every
  finished block again to check them, and sharded reads see only their slices.

  Tensors in memory (the embeddings, and every block of a model that is not streamed) are
  hashed as they are; a tensor split over processes by a checksum on its devices, so no
  process gathers another's shards.
  """
  h = hashlib.sha256()
  top = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "layers"}, sep="/")
  for name in sorted(top):
    _leaf_update(h, name, top[name])
  layers = params["layers"]
  source = getattr(layers, "source", None)
  if isinstance(source, str) and os.path.exists(source):
    base = source if os.path.isdir(source) else os.path.dirname(source)
    files = _weight_files(source)
    total = sum(os.path.getsize(f) for f in files)
    if total > ANNOUNCE_BYTES:  # minutes for a large model: a line, so that the run is not taken for hung
      log.info("fingerprinting the model for the checkpoint: hashing %.1f GB of weights, about %.0f s at %.1f GB/s",
               total / 1e9, total / HASH_BYTES_PER_S, HASH_BYTES_PER_S / 1e9)
    for f in files:  # by names within the model: a copy elsewhere is the same model
      h.update(f"{os.path.relpath(f, base)}:{file_sha256(f)}".encode())
    return h.hexdigest()[:16]
  for i, block in enumerate(layers):
    flat = traverse_util.flatten_dict(block, sep="/")
    for name in sorted(flat):
      _leaf_update(h, f"{i}/{name}", flat[name])
  return h.hexdigest()[:16]


def fingerprint(model, config, calib, score_windows) -> dict[str, str]:
  """What a checkpoint must agree on with the run that resumes it, one digest per input."""
  cfg = dataclasses.asdict(config)
  return {
      "model": hashlib.sha256(json.dumps(model.spec.to_json(), sort_keys=True).encode()).hexdigest()[:16] + ":" +
               weights_digest(model.params),
      "calibration": _digest(calib),
      "score_windows": _digest(score_windows) if score_windows is not None else "none",
      "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
  }

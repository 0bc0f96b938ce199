"""File names and formats shared by jaxprune's checkpoint readers and writers."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import CheckpointError, UsageError

SPEC_FILE = "jaxprune.json"  # the per-layer spec beside the weights
SPEC_FORMAT = 1
PARAMS_DIR = "params"  # an Orbax checkpoint's parameter tree
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
# The modeling file per-layer Hugging Face exports carry (a copy of io/modeling_per_layer.py, named in
# config.json's auto_map); each family names its class in it (`Family.remote_class`).
REMOTE_CODE = "modeling_jaxprune"


def parse_dtype(dtype) -> tuple[str, object]:
  """('float32'|'bfloat16'|'float16', numpy dtype) for a name or dtype."""
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in DTYPES:
    raise UsageError(f"dtype {dtype!r} is not supported for export; choose one of {', '.join(DTYPES)}")
  return name, DTYPES[name]


def is_orbax_dir(path: str) -> bool:
  """True for a directory written by `save_orbax`."""
  return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, SPEC_FILE))


def cast_finite(x, dtype, name: str):
  """`x` (a numpy or JAX array) cast to `dtype`, refusing a cast that would write inf.

  float16 holds magnitudes up to 65504 only: a larger weight becomes inf, and the exported
  model computes NaN. The check costs one pass over the cast tensor.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  with np.errstate(over="ignore"):  # the overflow is reported below, with the tensor's name
    y = xp.asarray(x).astype(dtype)
  if bool(xp.all(xp.isfinite(y))):
    return y
  src = xp.asarray(x)
  if not bool(xp.all(xp.isfinite(src))):
    raise CheckpointError(f"tensor {name} holds NaN or Inf before the cast to {jnp.dtype(dtype).name}; the model "
                          "is damaged and is not exported. Reload it from an intact checkpoint")
  big = float(xp.max(xp.abs(src.astype(xp.float32))))
  raise UsageError(
      f"tensor {name} holds values up to |{big:.6g}|, beyond {jnp.dtype(dtype).name}'s largest finite value "
      f"{float(jnp.finfo(dtype).max):.6g}, so the export would write inf; export with --dtype bfloat16 or "
      "--dtype float32 (dtype= in Python)")

"""File names and formats shared by jaxprune's checkpoint readers and writers."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UsageError

SPEC_FILE = "jaxprune.json"  # the per-layer spec beside the weights
SPEC_FORMAT = 1
PARAMS_DIR = "params"  # an Orbax checkpoint's parameter tree
DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}
# The modeling file per-layer Hugging Face exports carry (a copy of io/modeling_per_layer.py,
# named in config.json's auto_map) and its class for each family.
REMOTE_CODE = "modeling_jaxprune"
REMOTE_CLASSES = {"llama": "JaxpruneLlamaForCausalLM", "mistral": "JaxpruneMistralForCausalLM",
                  "qwen2": "JaxpruneQwen2ForCausalLM", "gpt2": "JaxpruneGPT2LMHeadModel"}


def parse_dtype(dtype) -> tuple[str, object]:
  """('float32'|'bfloat16'|'float16', numpy dtype) for a name or dtype."""
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in DTYPES:
    raise UsageError(f"dtype {dtype!r} is not supported for export; choose one of {', '.join(DTYPES)}")
  return name, DTYPES[name]


def is_orbax_dir(path: str) -> bool:
  """True for a directory written by `save_orbax`."""
  return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, SPEC_FILE))

"""From a name or a path to a loaded model (the loaders by checkpoint kind) and its tokenizer."""

from __future__ import annotations

import numpy as np

from jaxprune.io.gguf import load_gguf
from jaxprune.io.hf import load_hf
from jaxprune.io.locate import BUILTIN, Location, load_tokenizer, resolve
from jaxprune.io.orbax_io import load_orbax


def load(name_or_path: str, dtype=np.float32, lazy: bool = False):
  """Loads a model by built-in name, path or Hub id, as a `jaxprune.Model`.

  With `lazy`, a safetensors, GGUF or Orbax checkpoint's blocks stay on disk until
  used (`jaxprune.io.lazy`); PyTorch pickles are read whole.
  """
  loc = resolve(name_or_path)
  if loc.kind == "gguf":
    return load_gguf(loc.path, dtype, lazy=lazy)
  if loc.kind == "orbax":
    return load_orbax(loc.path, dtype, lazy=lazy)
  return load_hf(loc.path, dtype, lazy=lazy)


__all__ = ["BUILTIN", "Location", "load", "load_tokenizer", "resolve"]

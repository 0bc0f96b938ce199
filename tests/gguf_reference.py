"""transformers' own loaders on a built-in GGUF (the parity references), without the reader's overhead.

transformers parses a GGUF with gguf-py's GGUFReader, which slices an np.memmap once per
metadata value: the tokenizer's arrays (49k tokens and merges for SmolLM2, 262k for Gemma 3)
make millions of memmap slices, each paying numpy's Python-level memmap hooks, and
transformers reads the file twice (config, then weights). A plain ndarray view of the same
mapping reads the same bytes: the same tensors and config, bit for bit, in about half the time
(SmolLM2: 60 s -> 35 s on two busy cores).
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def plain_gguf_arrays():
  """While open, every GGUFReader keeps its file mapping as a plain ndarray view instead of an np.memmap."""
  import gguf.gguf_reader
  import numpy as np

  reader = gguf.gguf_reader.GGUFReader
  if "data" in vars(reader):  # already open (nested)
    yield
    return

  def keep(self, value):
    self.__dict__["data"] = value.view(np.ndarray)  # the view keeps the memmap (and its file) alive as its base

  reader.data = property(lambda self: self.__dict__["data"], keep)
  try:
    yield
  finally:
    del reader.data


def from_gguf(name: str, **kwargs):
  """transformers' AutoModelForCausalLM from the built-in checkpoint `name`'s GGUF (float32 unless
  kwargs say otherwise)."""
  import torch
  import transformers

  from jaxprune.io import resolve

  path = resolve(name).path
  with plain_gguf_arrays():
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             **{"dtype": torch.float32, **kwargs})


def tokenizer_from_gguf(name: str):
  """transformers' AutoTokenizer from the built-in checkpoint `name`'s GGUF."""
  import transformers

  from jaxprune.io import resolve

  path = resolve(name).path
  with plain_gguf_arrays():
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))

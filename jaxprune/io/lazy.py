"""Models whose blocks stay in their checkpoint until a block is needed (streaming).

`load(..., lazy=True)` reads the embeddings, the final norm and the LM head, and
checks every tensor's name against the family's table, but leaves the blocks on
disk: `params["layers"]` is a `LazyBlocks`, a sequence that reads block i (in
the checkpoint's dtype, safetensors' `safe_open` reading only that block's
tensors, GGUF dequantizing only them), checks its shapes against the spec and
upcasts that block alone to float32. A pruning run then holds only the blocks it
is working on, whatever the size of the model (`jaxprune.pipeline`).

Code that walks a parameter tree with `jax.tree` sees a `LazyBlocks` as one
leaf; the functions that accept lazy models (the pipeline, `perplexity`,
`save_hf`, `count_params`, `check_params`) go through it block by block, and
`materialize` turns a lazy model into an ordinary one for everything else.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune.errors import CheckpointError, ShapeError
from jaxprune.model import Model
from jaxprune.spec import ModelSpec, Params, layer_shapes


def _shape_tree(tree, dtype) -> Params:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype), tree, is_leaf=lambda x: isinstance(x, tuple))


class LazyBlocks(Sequence):
  """Blocks read on demand by `read(i) -> block tree` (numpy or jax leaves).

  `shapes[i]` is block i's tree of `jax.ShapeDtypeStruct` (what `count_params`
  and `check_params` read without loading anything); every block read is checked
  against it. The last `cache` blocks read are kept: the layer loop reads each
  dense block once and keeps its pruned version itself.
  """

  def __init__(self, read: Callable[[int], Params], shapes: Sequence[Params], dtype=jnp.float32, cache: int = 1,
               source: str = "checkpoint"):
    self._read = read
    self.shapes = tuple(shapes)
    self.dtype = jnp.dtype(dtype)
    self.source = source
    self._cache: collections.OrderedDict[int, Params] = collections.OrderedDict()
    self._size = cache
    self.reads = 0  # blocks read from disk so far (a test of the streaming's cost)

  def __len__(self) -> int:
    return len(self.shapes)

  def __getitem__(self, i: int):
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"block {i} of a {n}-block model")
    i = i % n
    if i in self._cache:
      self._cache.move_to_end(i)
      return self._cache[i]
    blk = self._read(i)
    self.reads += 1
    want = traverse_util.flatten_dict(self.shapes[i], sep=".")
    have = traverse_util.flatten_dict(blk, sep=".")
    bad = [f"{k}: {tuple(np.shape(have[k])) if k in have else 'missing'}, expected {want[k].shape}"
           for k in want if k not in have or tuple(np.shape(have[k])) != want[k].shape]
    bad += [f"{k}: unexpected" for k in have if k not in want]
    if bad:
      raise ShapeError(f"{self.source}: block {i} does not match the model description ({'; '.join(bad[:5])}). "
                       "Check that the config belongs to these weights.")
    # The block alone is upcast (in XLA), never the whole model.
    blk = jax.tree.map(lambda x: jnp.asarray(x).astype(self.dtype), blk)
    self._cache[i] = blk
    while len(self._cache) > self._size:
      self._cache.popitem(last=False)
    return blk


def block_shapes(spec: ModelSpec, dtype=jnp.float32) -> list[Params]:
  """Every block's tree of `jax.ShapeDtypeStruct`, from the spec alone."""
  return [_shape_tree(layer_shapes(spec, l), dtype) for l in spec.layers]


def is_lazy(params: Params) -> bool:
  return isinstance(params.get("layers"), LazyBlocks)


def materialize(model: Model) -> Model:
  """`model` with every block read into memory (a lazy model's blocks, once)."""
  if not is_lazy(model.params):
    return model
  layers = model.params["layers"]
  top = {k: jax.tree.map(lambda x: x.astype(layers.dtype), v) for k, v in model.params.items() if k != "layers"}
  return Model(model.spec, {**top, "layers": tuple(layers)}, model.source)


def lazy_model(spec: ModelSpec, keys: Sequence[str], get: Callable[[str], np.ndarray], source: str,
               dtype=jnp.float32) -> Model:
  """A Model whose blocks are read through `get(hf_key)` when used; the rest is read now.

  `keys` are every tensor name of the checkpoint: they are checked against the family's
  table first, so a checkpoint with missing or unexpected tensors fails before any work.
  """
  from jaxprune.io.mapping import TABLES, block_params, check_keys, key_renames, top_params

  names = key_renames(TABLES[spec.family], keys)
  original = {v: k for k, v in names.items()}
  read = lambda key: get(original[key])
  check_keys(spec, original, lambda k: not np.any(read(k)), source)
  # The embeddings and head stay in the checkpoint's dtype (a quarter of a 7B model's size at
  # float32); what reads them casts rows or products to float32 (`embed_f32`, the head's einsum).
  top = jax.tree.map(jnp.asarray, top_params(spec, read, source))
  blocks = LazyBlocks(lambda i: block_params(spec, i, read, source),
                      block_shapes(spec, dtype), dtype, source=source)
  return Model(spec, {**top, "layers": blocks}, source=os.path.abspath(source))


# --------------------------------------------------------------------------
# Readers: every tensor name of a checkpoint, and a function reading one tensor.


def safetensors_reader(files: Sequence[str]) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """(keys, get) over safetensors files; `get` opens the file holding the key and reads that tensor only."""
  from safetensors import SafetensorError, safe_open

  where: dict[str, str] = {}
  for f in files:
    try:
      with safe_open(f, framework="numpy") as st:
        where.update({k: f for k in st.keys()})
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it is probably truncated or corrupt. "
                            "Re-download or re-export it.") from None

  def get(key: str) -> np.ndarray:
    try:
      with safe_open(where[key], framework="numpy") as st:
        return st.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{where[key]}: tensor {key} could not be read ({e}); the file may be truncated") from None

  return list(where), get


def can_stream(files: Sequence[str]) -> bool:
  """Whether these weight files can be read a tensor at a time (safetensors can; pickles cannot)."""
  return all(f.endswith(".safetensors") for f in files)
